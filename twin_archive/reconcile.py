"""Files and rows that disagree: found, re-indexed or set aside (issue 13 items 5 and 6).

A crash between the rename of a file into place and the commit of its row leaves a
file that no row names. At start (:func:`recover`) and with
``dicom-node archive verify --repair``:

* an instance file under ``archive/`` that no row names is indexed when it is intact
  (its data set's SHA-256 matches the hash in its name and it parses to the end), else
  moved to ``<data-dir>/quarantine/`` (same relative path) and logged;
* a result or label file that no row names is moved to quarantine: a result set is
  recorded all or nothing, so a stray file is never part of a result (its job, run
  again, records the whole set);
* ``verify`` also finds rows whose file is gone, and (``--deep``) files whose content no
  longer has the SHA-256 of their row; ``--repair`` marks such instances missing
  (``instances.missing_at``: their series say so in ``twin show``) and moves a damaged
  file to quarantine.

Nothing is ever deleted here. The walk uses ``os.scandir`` and compares text paths
with the index's (about 0.4 s per 100,000 files on a local disk, the index's paths
read included; ``benchmarks/archive_scale.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag

from dicom_node.foundation.durable import clean_tmp, replace_durably
from twin_archive.layout import ARCHIVE_DIR, QUARANTINE_DIR
from twin_archive.records import StoreOutcome, StoreResult
from twin_archive.retention import Retention

if TYPE_CHECKING:
    from twin_archive.ingest import Ingest

LOG = logging.getLogger(__name__)

RESULT_DIRS = ("results", "labels")
_SHA12 = re.compile(r"[0-9a-f]{12}\Z")
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class FileCheck:
    """What reading one instance file showed."""

    sha256: str  # of the data set, after the File Meta Information
    dataset_offset: int
    size: int


def walk_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (none when it is absent)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def relative_files(data_dir: Path, folder: str) -> Iterator[str]:
    """The path relative to ``data_dir`` (as the index writes it) of every regular file
    under ``data_dir/folder``, as text.

    Text, not :class:`~pathlib.Path`: start-up walks every file of the archive, and a
    ``Path`` and its ``relative_to`` per file cost several times the walk itself (about
    13 s for 1,000,000 files, where the walk is 3 s; ``benchmarks/archive_scale.py``).
    """
    base = os.path.join(data_dir, "")
    cut = len(base)
    stack = [base + folder]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path[cut:]


def data_files(data_dir: Path) -> Iterator[tuple[str, str]]:
    """``(kind, path relative to data_dir)`` of every file the index should name:
    ``instance`` under ``archive/``, ``result`` under ``results/`` and ``labels/``."""
    yield from (("instance", p) for p in relative_files(data_dir, ARCHIVE_DIR))
    for folder in RESULT_DIRS:
        yield from (("result", p) for p in relative_files(data_dir, folder))


def read_part10_meta(fh: BinaryIO) -> FileMetaDataset:
    """The File Meta Information of a Part 10 file open at its first byte; ``fh`` is left
    at the data set's first byte.

    Read with pydicom's public ``read_dataset``, stopped at the first element past group
    0002 (its public ``read_file_meta_info`` takes a path and does not say where the data
    set starts); File Meta written in implicit VR, as some old writers did, is read again
    that way.

    Raises
    ------
    ValueError
        If it is not a Part 10 file (no preamble or File Meta Information).
    """
    try:
        read_preamble(fh, False)
        start = fh.tell()
        meta = FileMetaDataset(read_dataset(fh, is_implicit_VR=False, is_little_endian=True,
                                            stop_when=_past_group_0002))
        try:
            for element in meta:  # each value parsed: an implicit-VR meta fails here
                element.value
        except NotImplementedError:
            fh.seek(start)
            meta = FileMetaDataset(read_dataset(fh, is_implicit_VR=True, is_little_endian=True,
                                                stop_when=_past_group_0002))
        return meta
    except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds
        raise ValueError(f"not a DICOM Part 10 file ({exc})") from exc


def _past_group_0002(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 2


def hash_instance_file(path: Path) -> FileCheck:
    """SHA-256 of an instance file's data set (what the archive records), streamed.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it is not a Part 10 file (no preamble or File Meta Information).
    """
    with path.open("rb") as fh:
        read_part10_meta(fh)
        offset = fh.tell()
        digest = hashlib.sha256()
        size = offset
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return FileCheck(sha256=digest.hexdigest(), dataset_offset=offset, size=size)


def name_hash(path: Path) -> str | None:
    """The 12 hex digits of content hash in an instance file's name, if it has them."""
    parts = path.name.split(".")
    if len(parts) >= 3 and parts[-1] == "dcm" and _SHA12.match(parts[-2]):
        return parts[-2]
    return None


def quarantine(data_dir: Path, path: Path, why: str) -> Path:
    """Move ``path`` to ``<data_dir>/quarantine/`` under its relative path; log why.

    A file of the same name already there is kept: the new one gets a numbered suffix.
    """
    rel = path.relative_to(data_dir)
    target = data_dir / QUARANTINE_DIR / rel
    n = 1
    while target.exists():
        target = target.with_name(f"{rel.name}.{n}")
        n += 1
    replace_durably(path, target)
    LOG.warning("archive: %s moved to %s: %s", rel, target.relative_to(data_dir), why)
    return target


def recently_written(path: Path, seconds: float) -> bool:
    """True when ``path`` changed in the last ``seconds`` (a write may be in flight)."""
    try:
        return time.time() - path.stat().st_mtime < seconds
    except FileNotFoundError:
        return False


def recover(ingest: Ingest) -> int:
    """Start-up recovery (under the data directory's lock): remove temporary files
    of writes interrupted by a crash, finish removals (prune, erasure) a crash
    interrupted, then reconcile files and rows (:func:`reconcile`). Returns how many temporary files were removed."""
    removed = clean_tmp(ingest.tmp_dir)
    if removed:
        LOG.warning("archive: removed %d unfinished temporary file(s) after restart", removed)
    with Retention(ingest.data_dir) as retention:
        retention.finish_pending()
    reconcile(ingest)
    return removed


def stray_files(ingest: Ingest, *, skip_recent_s: float = 0.0) -> list[tuple[str, Path]]:
    """``(kind, path)`` of the files no row names (``instance`` or ``result``).

    Files changed in the last ``skip_recent_s`` seconds are left out (a node that
    serves may be between the rename and the commit of one).
    """
    known = ingest.indexed_paths()
    out = []
    for kind, rel in data_files(ingest.data_dir):
        if rel in known:
            continue
        path = ingest.data_dir / rel
        if skip_recent_s and recently_written(path, skip_recent_s):
            continue
        out.append((kind, path))
    return out


def reconcile(ingest: Ingest, *, skip_recent_s: float = 0.0) -> tuple[int, int]:
    """Index the intact instance files no row names; quarantine the other strays.

    Returns ``(indexed, quarantined)``; each quarantined file is logged with why.
    """
    t0 = time.perf_counter()
    strays = stray_files(ingest, skip_recent_s=skip_recent_s)
    indexed = quarantined = 0
    instances = sorted((p for kind, p in strays if kind == "instance"),
                       key=lambda p: p.stat().st_mtime)
    for path, outcome in ingest.index_files(instances):
        if isinstance(outcome, StoreResult) and outcome.outcome is not StoreOutcome.DUPLICATE:
            indexed += 1
            LOG.warning("archive: %s had no index row (a crash before its commit); "
                        "intact, indexed now", path.relative_to(ingest.data_dir))
        else:
            why = ("the same content is indexed under another file" if
                   isinstance(outcome, StoreResult) else f"not intact ({outcome})")
            quarantine(ingest.data_dir, path, why)
            quarantined += 1
    for kind, path in strays:
        if kind == "result":
            quarantine(ingest.data_dir, path, "result or label file without its row (a "
                       "result set is recorded whole or not at all)")
            quarantined += 1
    if indexed or quarantined:
        LOG.warning("archive: reconciled files and index in %.1f s: %d file(s) indexed, %d "
                    "moved to %s", time.perf_counter() - t0, indexed, quarantined,
                    ingest.data_dir / QUARANTINE_DIR)
    return indexed, quarantined
