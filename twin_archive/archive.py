"""The per-patient archive: durable instance files and their SQLite index."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag
from pydicom.uid import UID

from dicom_node.database import connect, iso, migrate, utc_now, write
from dicom_node.durable import clean_tmp, fsync_dir, write_durably
from twin_archive.dataset_walk import Walked, walk
from twin_archive import reconcile
from twin_archive.errors import (
    ArchiveError,
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
    TwinNotFoundError,
)
from twin_archive.layout import (
    INDEX_NAME,
    QUARANTINE_DIR,
    instance_relpath,
    load_or_create_key,
    patient_key,
    unidentified_key,
)
from twin_archive.records import (
    ConsentEvent,
    IncomingInstance,
    SeriesRecord,
    StoreOutcome,
    StoreResult,
    StudyRecord,
    TwinDetail,
    TwinMerge,
    TwinSummary,
)
from twin_archive.schema import MIGRATIONS
from twin_archive.text import printable
from twin_archive.uids import uid_problem

LOG = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


# Every attribute the store path reads (identification, validation, index columns),
# read once per instance by :func:`_fields`.
_FIELD_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "Modality",
    "BodyPartExamined", "SeriesDescription", "SeriesNumber", "Manufacturer",
    "ManufacturerModelName", "FrameOfReferenceUID", "InstanceNumber",
)
_FIELD_TAGS = tuple((kw, int(Tag(kw))) for kw in _FIELD_KEYWORDS)
_PIXEL_TAGS = frozenset(int(Tag(kw)) for kw in _PIXEL_KEYWORDS)
_ROWS, _COLUMNS = int(Tag("Rows")), int(Tag("Columns"))
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQ_DELIM = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}


def _ascii_text(raw: bytes) -> str | None:
    """The value of a raw single-valued text element, as ``_text`` would give it.

    Only for the plain case: 7-bit ASCII, no backslash (value multiplicity > 1), no
    escape (ISO 2022 code extensions), no NUL but one trailing pad byte. Anything else
    returns ``None`` and goes through pydicom, which applies the Specific Character
    Set and the VR's own rules.
    """
    if raw.endswith(b"\x00"):
        raw = raw[:-1]
    if not raw.isascii() or b"\\" in raw or b"\x1b" in raw or b"\x00" in raw:
        return None
    return raw.decode("ascii").strip()


def _fields(ds: Dataset) -> dict[str, str]:
    """Read every attribute the store path needs, in one pass over the data set.

    Equivalent to ``_text(ds, keyword)`` for each keyword (a test compares them), but
    plain ASCII values are taken from the raw bytes without building pydicom elements.
    """
    out: dict[str, str] = {}
    elements = ds._dict  # noqa: SLF001 - raw elements, before pydicom converts them
    for keyword, tag in _FIELD_TAGS:
        elem = elements.get(tag)  # type: ignore[call-overload]
        if elem is None:
            out[keyword] = ""
            continue
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            if not elem.value:
                text: str | None = ""
            else:
                text = _ascii_text(bytes(elem.value))
            if text is not None:
                out[keyword] = text
                continue
        out[keyword] = _text(ds, keyword)
    return out


def _scan(fp: BinaryIO, start: int, size: int, implicit: bool, little: bool,
          tail: Callable[[int], bytes], *, need_pixels: bool, walked: bool = False) -> _Parsed | None:
    """Read a data set from ``fp`` (at ``start``, ``size`` bytes) up to its pixel data.

    With ``need_pixels`` (``fp`` holds only the first part of the data set), a result
    is given only when the pixel data element was reached inside it. None whenever the
    result might differ from a full parse (see :meth:`Archive._parse_fast`). With
    ``walked`` the data set is known to parse to its end (:mod:`twin_archive.dataset_walk`):
    what follows the pixel data is not looked at, and values over 1 MiB before it are
    skipped, not read.
    """
    stop: list[tuple[int, int]] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            stop.append((fp.tell() - start, length))  # positioned at the value
            return True
        return False

    try:
        with fp:
            ds = read_dataset(fp, implicit, little, stop_when=at_pixels,
                              defer_size=(1 << 20) if walked else None)
            end = fp.tell() - start
        if not stop and need_pixels:
            return None
        if walked:
            pass
        elif stop:
            value_at, length = stop[0]
            if length == _UNDEFINED_LENGTH:
                delimiter = _SEQ_DELIM[little]
                if tail(len(delimiter)) != delimiter:
                    return None
            elif value_at + length != size:
                return None  # trailing elements or truncated pixel data
        elif end != size:
            return None
        fields = _fields(ds)
    except Exception:  # noqa: BLE001 - the full parse reports it properly
        return None
    elements = ds._dict  # noqa: SLF001
    return _Parsed(
        fields=fields,
        has_pixels=bool(stop),
        has_rows_columns=_ROWS in elements and _COLUMNS in elements,
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What the store path learns from a data set before writing it."""

    fields: dict[str, str]
    has_pixels: bool
    has_rows_columns: bool


@dataclass(slots=True, kw_only=True)
class _Pending:
    """One instance written and renamed into place, waiting for its group commit."""

    fields: dict[str, str]
    ident: dict[str, str]
    key: str
    sha: str
    rel: str
    incoming: IncomingInstance
    final: Path
    received_at: str | None = None  # set when re-indexing a file (its mtime); else now
    result: tuple[StoreOutcome, int] | None = None
    error: BaseException | None = None
    done: bool = False


class _GroupCommit:
    """Leader/follower group commit of the directory fsyncs and index rows.

    A storing thread hands in its instance; if no flush is running it becomes the
    leader and flushes everything handed in so far (its own instance included) with
    ``flush``, otherwise it waits for a leader to flush it. Alone (one association)
    a thread leads a batch of one at once, so nothing waits; with several
    associations the instances that arrive during a flush share the next one: one
    ``fsync`` per directory and one SQLite commit for all of them, instead of one
    each.
    """

    def __init__(self, flush: Callable[[list[_Pending]], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False

    def commit(self, item: _Pending) -> None:
        """Return when ``item`` is flushed (``item.result`` or ``item.error`` set)."""
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._flush(batch)
                except BaseException as exc:
                    for p in batch:
                        if p.result is None and p.error is None:
                            p.error = exc
                    raise
                finally:
                    self._cond.acquire()
                    for p in batch:
                        p.done = True
                    self._leading = False
                    self._cond.notify_all()


class Archive:
    """The twin archive under one data directory.

    Thread-safe: the DICOM server calls :meth:`store` from one thread per association.
    Several processes may open the same data directory (the server and the CLI);
    SQLite's WAL mode and ``BEGIN IMMEDIATE`` keep their writes apart.

    Parameters
    ----------
    data_dir : pathlib.Path
        Root of the archive; created if missing.
    min_free_bytes : int
        Refuse new instances (A700) while less than this many bytes are free on the
        data directory's file system, so the index can always commit and the
        operating system keeps working.
    """

    def __init__(self, data_dir: Path | str, *, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.data_dir = Path(data_dir).resolve()
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = self.data_dir / "tmp"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        self._secret = load_or_create_key(self.data_dir)
        self.db = connect(self.data_dir / INDEX_NAME, timeout_s=30.0)
        self._lock = threading.Lock()
        self._group = _GroupCommit(self._flush)
        migrate(self.db, MIGRATIONS, name="archive index")

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> int:
        """Start-up recovery (under the data directory's lock): remove temporary files
        of writes interrupted by a crash, then reconcile files and rows
        (:meth:`reconcile`). Returns how many temporary files were removed."""
        removed = clean_tmp(self.tmp_dir)
        if removed:
            LOG.warning("archive: removed %d unfinished temporary file(s) after restart", removed)
        self.reconcile()
        return removed

    # ------------------------------------------------------------ reconciliation
    def indexed_paths(self) -> set[str]:
        """Every file path (relative to the data directory) a row of the index names."""
        with self._lock:
            paths = {r[0] for r in self.db.execute("SELECT path FROM instances")}
            paths.update(r[0] for r in self.db.execute("SELECT path FROM ai_result_objects"))
            paths.update(r[0] for r in self.db.execute("SELECT path FROM labels"))
            # shadow results (twin_archive.learning): stored, indexed, never sent
            paths.update(obj["path"] for r in self.db.execute("SELECT objects FROM shadow_results")
                         for obj in json.loads(r[0]))
        return paths

    def stray_files(self, *, skip_recent_s: float = 0.0) -> list[tuple[str, Path]]:
        """``(kind, path)`` of the files no row names (``instance`` or ``result``).

        Files changed in the last ``skip_recent_s`` seconds are left out (a node that
        serves may be between the rename and the commit of one).
        """
        known = self.indexed_paths()
        out = []
        for kind, path in reconcile.data_files(self.data_dir):
            if str(path.relative_to(self.data_dir)) in known:
                continue
            if skip_recent_s and reconcile.recently_written(path, skip_recent_s):
                continue
            out.append((kind, path))
        return out

    def reconcile(self, *, skip_recent_s: float = 0.0) -> tuple[int, int]:
        """Index the intact instance files no row names; quarantine the other strays.

        Returns ``(indexed, quarantined)``; each quarantined file is logged with why.
        """
        t0 = time.perf_counter()
        strays = self.stray_files(skip_recent_s=skip_recent_s)
        indexed = quarantined = 0
        instances = sorted((p for kind, p in strays if kind == "instance"),
                           key=lambda p: p.stat().st_mtime)
        for path, outcome in self.index_files(instances):
            if isinstance(outcome, StoreResult) and outcome.outcome is not StoreOutcome.DUPLICATE:
                indexed += 1
                LOG.warning("archive: %s had no index row (a crash before its commit); "
                            "intact, indexed now", path.relative_to(self.data_dir))
            else:
                why = ("the same content is indexed under another file" if
                       isinstance(outcome, StoreResult) else f"not intact ({outcome})")
                reconcile.quarantine(self.data_dir, path, why)
                quarantined += 1
        for kind, path in strays:
            if kind == "result":
                reconcile.quarantine(self.data_dir, path, "result or label file without its "
                                     "row (a result set is recorded whole or not at all)")
                quarantined += 1
        if indexed or quarantined:
            LOG.warning("archive: reconciled files and index in %.1f s: %d file(s) indexed, %d "
                        "moved to %s", time.perf_counter() - t0, indexed, quarantined,
                        self.data_dir / QUARANTINE_DIR)
        return indexed, quarantined

    def index_files(self, paths: Sequence[Path], *, batch: int = 256
                    ) -> list[tuple[Path, StoreResult | Exception]]:
        """Index instance files already in the archive (reconciliation, rebuild).

        Each file is checked first: a Part 10 file whose data set has the SHA-256 its
        name carries and parses to its end, with Study, Series and SOP Instance UIDs.
        Rows are committed ``batch`` at a time (one transaction each). Returns, per
        file, its :class:`StoreResult` or the exception that says why it is not intact.
        """
        out: list[tuple[Path, StoreResult | Exception]] = []
        pending: list[tuple[Path, _Pending]] = []

        def flush() -> None:
            if not pending:
                return
            self._flush([p for _, p in pending])
            for path, p in pending:
                if p.error is not None or p.result is None:
                    out.append((path, OutOfResourcesError(f"index cannot commit: {p.error}")))
                    continue
                outcome, version = p.result
                out.append((path, StoreResult(
                    outcome=outcome, sop_instance_uid=p.ident["sop_uid"],
                    series_uid=p.ident["series_uid"], study_uid=p.ident["study_uid"],
                    patient_key=p.key, version=version, path=p.rel, sha256=p.sha)))
            pending.clear()

        for path in paths:
            try:
                pending.append((path, self._pending_for_file(path)))
            except (ArchiveError, OSError, ValueError) as exc:
                out.append((path, exc))
            if len(pending) >= batch:
                flush()
        flush()
        return out

    def _pending_for_file(self, path: Path) -> _Pending:
        data = path.read_bytes()
        fh = BytesIO(data)
        try:
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds
            raise InvalidInstanceError("file", f"not a DICOM Part 10 file ({exc})") from exc
        offset = fh.tell()
        sha = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
        expected = reconcile.name_hash(path)
        if expected is not None and expected != sha[:12]:
            raise InvalidInstanceError("file", "content does not match the hash in its name "
                                       "(damaged or cut short)")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        probe = IncomingInstance(file_meta=data[:offset], dataset=data[offset:],
                                 transfer_syntax_uid=ts, sop_class_uid="", sop_instance_uid="")
        parsed = self._parse(probe)
        incoming = IncomingInstance(
            file_meta=data[:offset], dataset=data[offset:], transfer_syntax_uid=ts,
            sop_class_uid=parsed.fields["SOPClassUID"],
            sop_instance_uid=parsed.fields["SOPInstanceUID"],
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip())
        ident = self._identify(parsed, incoming)
        received = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        return _Pending(fields=parsed.fields, ident=ident, key=self._twin_key(ident), sha=sha,
                        rel=str(path.relative_to(self.data_dir)), incoming=incoming,
                        final=path, received_at=received.isoformat(timespec="microseconds"))

    def instance_files(self) -> list[dict[str, Any]]:
        """``id``, ``path``, ``sha256``, ``missing_at`` of every instance row."""
        return self._rows("SELECT id, path, sha256, missing_at FROM instances ORDER BY id")

    def mark_missing(self, row_ids: Sequence[int]) -> int:
        """Mark instance rows whose file is gone (one transaction); return how many."""
        at = iso(utc_now())
        with self._lock, write(self.db) as conn:
            n = 0
            for row_id in row_ids:
                n += conn.execute("UPDATE instances SET missing_at = ? WHERE id = ?"
                                  " AND missing_at IS NULL", (at, row_id)).rowcount
        return n

    # ------------------------------------------------------------------ storing
    def store(self, incoming: IncomingInstance) -> StoreResult:
        """Validate, write durably and index one instance.

        Returns only after the file is fsynced, renamed into place and its index row
        committed.

        Raises
        ------
        InvalidInstanceError
            A required identifier (Patient ID, Study/Series/SOP Instance UID) is missing
            or invalid, or the data set cannot be parsed.
        SopClassMismatchError
            The data set does not match the SOP class it was sent as.
        OutOfResourcesError
            Disk full, below the free-space reserve, or the index cannot commit.
        """
        spool = incoming.spool
        if spool is None:
            return self._store(incoming)
        try:
            spool.claim()
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise OutOfResourcesError(f"disk full receiving {incoming.sop_instance_uid}: "
                                          f"{exc.strerror}") from exc
            raise OutOfResourcesError(f"cannot spool {incoming.sop_instance_uid}: {exc}") from exc
        try:
            return self._store(incoming)
        finally:
            spool.discard(force=True)  # no-op once committed

    def _store(self, incoming: IncomingInstance) -> StoreResult:
        spool = incoming.spool
        parsed = self._parse(incoming)
        ident = self._identify(parsed, incoming)
        sha = spool.sha256 if spool is not None else hashlib.sha256(incoming.dataset).hexdigest()
        key = self._twin_key(ident)
        rel = instance_relpath(
            key, ident["study_uid"], ident["series_uid"], ident["sop_uid"], sha
        )

        with self._lock:
            row = self.db.execute(
                "SELECT version FROM instances WHERE sop_instance_uid = ? AND sha256 = ?",
                (ident["sop_uid"], sha),
            ).fetchone()
        if row is not None:
            LOG.info("archive: instance %s already archived (identical), not written again",
                     printable(ident["sop_uid"]))
            return StoreResult(
                outcome=StoreOutcome.DUPLICATE, sop_instance_uid=ident["sop_uid"],
                series_uid=ident["series_uid"], study_uid=ident["study_uid"],
                patient_key=key, version=row[0], path=str(rel), sha256=sha,
            )

        final = self.data_dir / rel
        try:
            # The directory is fsynced by the group commit, before the index row.
            if spool is not None:
                self._check_free_space(0)  # already written, in the temporary folder
                spool.commit(final)
            else:
                self._check_free_space(incoming.size)
                write_durably(final, (incoming.file_meta, incoming.dataset), self.tmp_dir,
                              sync_dir=False)
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise OutOfResourcesError(f"disk full writing {rel.name}: {exc.strerror}") from exc
            raise OutOfResourcesError(f"cannot write {rel.name}: {exc}") from exc

        pending = _Pending(fields=parsed.fields, ident=ident, key=key, sha=sha, rel=str(rel),
                           incoming=incoming, final=final)
        self._group.commit(pending)
        if isinstance(pending.error, OSError):
            final.unlink(missing_ok=True)
            raise OutOfResourcesError(
                f"cannot make {rel.name} durable (directory fsync): {pending.error}"
            ) from pending.error
        if pending.error is not None:
            self._discard_unindexed(final, str(rel))
            raise OutOfResourcesError(
                f"archive index cannot commit: {pending.error}"
            ) from pending.error
        assert pending.result is not None
        outcome, version = pending.result
        if outcome is StoreOutcome.NEW_VERSION:
            LOG.warning(
                "archive: instance %s resent with different content from %s; kept as "
                "version %d beside the earlier one(s), the newer is current",
                printable(ident["sop_uid"]), printable(incoming.calling_ae or "?"), version,
            )
        return StoreResult(
            outcome=outcome, sop_instance_uid=ident["sop_uid"],
            series_uid=ident["series_uid"], study_uid=ident["study_uid"],
            patient_key=key, version=version, path=str(rel), sha256=sha,
        )

    def _parse(self, incoming: IncomingInstance) -> _Parsed:
        parsed = self._parse_fast(incoming)
        if parsed is not None:
            if UID(incoming.transfer_syntax_uid).is_compressed:
                self._walk(incoming)  # fragments of encapsulated pixel data, to the end
            return parsed
        # Anything else is first followed to its end (bounded memory, no recursion;
        # twin_archive/dataset_walk.py), then its header read up to the pixel data.
        walked = self._walk(incoming)
        ds = self._parse_full(incoming)
        try:
            fields = {kw: _text(ds, kw) for kw in _FIELD_KEYWORDS}
        except Exception as exc:  # a malformed value deep in the data set
            raise InvalidInstanceError("DataSet", f"cannot be decoded ({exc})") from exc
        return _Parsed(
            fields=fields,
            has_pixels=walked.has_pixels,
            has_rows_columns="Rows" in ds and "Columns" in ds,
        )

    @staticmethod
    def _walk(incoming: IncomingInstance) -> Walked:
        """Check that the data set parses to its end (raises InvalidInstanceError)."""
        try:
            ts = UID(incoming.transfer_syntax_uid)
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        except (ValueError, AttributeError) as exc:
            raise InvalidInstanceError("TransferSyntaxUID", f"unknown ({exc})") from exc
        spool = incoming.spool
        if ts.is_deflated:  # inflated in memory (rare; its header is read the same way)
            raw = spool.path.read_bytes()[spool.meta_length:] if spool is not None else incoming.dataset
            try:
                data = zlib.decompress(raw, -zlib.MAX_WBITS)
            except zlib.error as exc:
                raise InvalidInstanceError("DataSet", f"cannot be inflated ({exc})") from exc
            return walk(lambda at, n: data[at:at + n], len(data), implicit=False, little=True)
        if spool is not None:
            return walk(spool.read_at, spool.size, implicit=implicit, little=little)
        data = incoming.dataset
        return walk(lambda at, n: data[at:at + n], len(data), implicit=implicit, little=little)

    @staticmethod
    def _parse_full(incoming: IncomingInstance) -> Dataset:
        """The header up to the pixel data (values over 1 MiB left on disk)."""
        try:
            if incoming.spool is not None:
                return pydicom.dcmread(incoming.spool.path, stop_before_pixels=True,
                                       defer_size="1 MiB")
            return pydicom.dcmread(BytesIO(incoming.file_meta + incoming.dataset),
                                   stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
                RecursionError) as exc:
            raise InvalidInstanceError("DataSet", f"cannot be parsed ({exc})") from exc

    @staticmethod
    def _parse_fast(incoming: IncomingInstance) -> _Parsed | None:
        """Read the data set up to its pixel data, without copying or decoding pixels.

        Returns ``None`` whenever the result might differ from a full parse (deflated
        or unknown transfer syntax, anything unusual at or after the pixel data, any
        parse or decode error); the caller then takes the full, slow path, which gives
        the same answers and the same error messages as before.
        """
        try:
            ts = UID(incoming.transfer_syntax_uid)
            if ts.is_deflated or not ts.is_transfer_syntax:
                return None
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        except (ValueError, AttributeError):
            return None
        spool = incoming.spool
        if spool is None:
            return _scan(BytesIO(incoming.dataset), 0, len(incoming.dataset), implicit, little,
                         lambda n: incoming.dataset[-n:], need_pixels=False)
        # Most headers end well inside the first bytes the spool keeps in memory: read
        # them there (a file read through pydicom costs about 60 system calls).
        parsed = _scan(BytesIO(spool.head), 0, spool.size, implicit, little, spool.tail,
                       need_pixels=True)
        if parsed is not None:
            return parsed
        # A longer header, or elements after the pixel data: walked to its end (bounded
        # memory), then read from the file up to the pixel data.
        Archive._walk(incoming)
        return _scan(spool.open_dataset(), spool.meta_length, spool.size, implicit, little,
                     spool.tail, need_pixels=False, walked=True)

    def _identify(self, parsed: _Parsed, incoming: IncomingInstance) -> dict[str, str]:
        """The instance's identifiers; refuses only what cannot be grouped at all.

        Kept as a PACS keeps them (issue 13): an empty or missing Patient ID files the
        instance into the unidentified twin of its study; a Study, Series or SOP
        Instance UID that is not conformant is flagged (``uid_flags``) and never used
        as a path. Refused: a missing or empty Study, Series or SOP Instance UID.
        """
        f = parsed.fields
        sop_class = f["SOPClassUID"]
        sop_uid = f["SOPInstanceUID"]
        ident = {
            "patient_id": f["PatientID"],
            "issuer": f["IssuerOfPatientID"],
            "study_uid": f["StudyInstanceUID"],
            "series_uid": f["SeriesInstanceUID"],
            "sop_uid": sop_uid,
            "sop_class": sop_class,
        }
        flags = []
        for keyword, name in (
            ("SOPInstanceUID", "sop_uid"),
            ("StudyInstanceUID", "study_uid"),
            ("SeriesInstanceUID", "series_uid"),
        ):
            if not ident[name]:
                raise InvalidInstanceError(keyword, "missing or empty: the instance cannot be "
                                           "grouped into a study and series")
            if uid_problem(ident[name]):
                flags.append(keyword)
        ident["uid_flags"] = ",".join(flags)
        ident["unidentified"] = "" if ident["patient_id"] else "1"
        problem = uid_problem(sop_class or None)
        if problem:
            raise InvalidInstanceError("SOPClassUID", problem)
        if sop_class != incoming.sop_class_uid:
            raise SopClassMismatchError(
                sop_uid, f"data set has SOP Class {sop_class} but was sent as {incoming.sop_class_uid}"
            )
        if sop_uid != incoming.sop_instance_uid:
            # Kept, as a PACS keeps it (issue 13), under the data set's own UID: that is
            # what every reader of the file sees.
            LOG.warning("archive: instance %s sent as %s (the request's Affected SOP Instance "
                        "UID differs from the data set's); kept under the data set's",
                        printable(sop_uid), printable(incoming.sop_instance_uid))
        if UID(sop_class).name.endswith("Image Storage") and "Multi-frame" not in UID(sop_class).name:
            if not parsed.has_pixels:
                raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Pixel Data")
            if not parsed.has_rows_columns:
                raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Rows/Columns")
        return ident

    def _twin_key(self, ident: dict[str, str]) -> str:
        if ident["unidentified"]:
            return unidentified_key(self._secret, ident["study_uid"], ident["issuer"])
        return patient_key(self._secret, ident["patient_id"], ident["issuer"])

    def _check_free_space(self, incoming_bytes: int) -> None:
        if not self.min_free_bytes:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResourcesError(
                f"only {free // (1 << 20)} MiB free on the data directory, below the "
                f"reserve of {self.min_free_bytes // (1 << 20)} MiB (min_free_mb)"
            )

    def _flush(self, batch: list[_Pending]) -> None:
        """Make a batch durable: each directory fsynced once, then one index transaction.

        Runs in whichever storing thread leads the group commit. Order matters: a
        directory is fsynced (the renames into it survive a power cut) before the
        transaction that indexes its files commits, so the index never names a file
        that might not be there. Each row has its own savepoint: one row that fails
        fails alone.
        """
        for directory in dict.fromkeys(p.final.parent for p in batch):
            try:
                fsync_dir(directory)
            except OSError as exc:
                for p in batch:
                    if p.final.parent == directory:
                        p.error = exc
        todo = [p for p in batch if p.error is None]
        if not todo:
            return
        try:
            with self._lock, write(self.db) as conn:
                for p in todo:
                    conn.execute("SAVEPOINT instance")
                    try:
                        p.result = self._index_rows(conn, p)
                    except sqlite3.Error as exc:
                        conn.execute("ROLLBACK TO instance")
                        p.error = exc
                    conn.execute("RELEASE instance")
        except sqlite3.Error as exc:  # BEGIN or COMMIT failed: nothing of the batch is in
            for p in todo:
                p.result = None
                p.error = exc

    def _index_rows(self, conn: sqlite3.Connection, p: _Pending) -> tuple[StoreOutcome, int]:
        """Write one instance's rows (twin, study, series, instance) in the open transaction."""
        fields, ident, key, sha, rel, incoming = (
            p.fields, p.ident, p.key, p.sha, p.rel, p.incoming)
        size = incoming.size
        now = iso(utc_now()) if p.received_at is None else p.received_at
        conn.execute(
            "INSERT INTO twins (patient_key, patient_id, issuer_of_patient_id, patient_name,"
            " birth_date, sex, donate, created_at, updated_at, unidentified)"
            " VALUES (?,?,?,?,?,?,0,?,?,?)"
            " ON CONFLICT(patient_key) DO UPDATE SET patient_name=excluded.patient_name,"
            " birth_date=excluded.birth_date, sex=excluded.sex, updated_at=excluded.updated_at",
            (key, ident["patient_id"], ident["issuer"], fields["PatientName"],
             fields["PatientBirthDate"], fields["PatientSex"], now, now,
             int(bool(ident["unidentified"]))),
        )
        merged = conn.execute("SELECT merged_into FROM twins WHERE patient_key = ?",
                              (key,)).fetchone()
        if merged is not None and merged[0]:  # an unidentified twin attached to a patient
            key = merged[0]
        conn.execute(
            "INSERT INTO studies (study_uid, patient_key, study_date, study_time, description,"
            " accession_number, first_received, last_received) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received",
            (ident["study_uid"], key, fields["StudyDate"], fields["StudyTime"],
             fields["StudyDescription"], fields["AccessionNumber"], now, now),
        )
        conn.execute(
            "INSERT INTO series (series_uid, study_uid, modality, body_part, description,"
            " series_number, manufacturer, model_name, frame_of_reference_uid,"
            " first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(series_uid) DO UPDATE SET last_received=excluded.last_received",
            (ident["series_uid"], ident["study_uid"], fields["Modality"],
             fields["BodyPartExamined"], fields["SeriesDescription"],
             fields["SeriesNumber"], fields["Manufacturer"],
             fields["ManufacturerModelName"], fields["FrameOfReferenceUID"], now, now),
        )
        previous = conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM instances WHERE sop_instance_uid = ?",
            (ident["sop_uid"],),
        ).fetchone()[0]
        cur = conn.execute(
            "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, series_uid,"
            " study_uid, patient_key, instance_number, transfer_syntax_uid, size, sha256,"
            " path, calling_ae, received_at, version, current, uid_flags)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1,?)",
            (ident["sop_uid"], ident["sop_class"], ident["series_uid"], ident["study_uid"],
             key, fields["InstanceNumber"], incoming.transfer_syntax_uid, size, sha, rel,
             incoming.calling_ae, now, previous + 1, ident["uid_flags"]),
        )
        if cur.rowcount == 0:  # the same content committed by a concurrent association
            return StoreOutcome.DUPLICATE, previous
        if previous:
            conn.execute(
                "UPDATE instances SET current = 0 WHERE sop_instance_uid = ? AND version <= ?",
                (ident["sop_uid"], previous),
            )
            return StoreOutcome.NEW_VERSION, previous + 1
        return StoreOutcome.STORED, 1

    def _discard_unindexed(self, final: Path, rel: str) -> None:
        """Remove a written file whose index row could not be committed."""
        try:
            with self._lock:
                referenced = self.db.execute(
                    "SELECT 1 FROM instances WHERE path = ?", (rel,)
                ).fetchone()
            if not referenced:
                final.unlink(missing_ok=True)
        except (sqlite3.Error, OSError):
            LOG.exception("archive: could not clean up %s after an index failure", rel)

    # ------------------------------------------------------------------ reading
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute(sql, params)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def list_twins(self) -> list[TwinSummary]:
        """All twins, most recently updated first."""
        rows = self._rows(
            "SELECT t.*, (SELECT COUNT(*) FROM studies s WHERE s.patient_key = t.patient_key) AS n_studies,"
            " (SELECT COUNT(*) FROM series se JOIN studies s ON se.study_uid = s.study_uid"
            "   WHERE s.patient_key = t.patient_key) AS n_series,"
            " (SELECT COUNT(*) FROM instances i WHERE i.patient_key = t.patient_key AND i.current = 1) AS n_instances,"
            " (SELECT MAX(received_at) FROM instances i WHERE i.patient_key = t.patient_key) AS last"
            " FROM twins t WHERE t.merged_into IS NULL ORDER BY t.updated_at DESC"
        )
        return [self._summary(r) for r in rows]

    @staticmethod
    def _summary(r: dict[str, Any]) -> TwinSummary:
        return TwinSummary(
            patient_key=r["patient_key"], patient_id=r["patient_id"],
            issuer_of_patient_id=r["issuer_of_patient_id"] or "",
            patient_name=r["patient_name"] or "", donate=bool(r["donate"]),
            studies=r["n_studies"], series=r["n_series"], instances=r["n_instances"],
            last_received=r["last"] or "", unidentified=bool(r["unidentified"]),
            merged_into=r["merged_into"] or "",
        )

    def find_twin_keys(self, patient_id: str, issuer: str | None = None) -> list[str]:
        """Patient keys of the twins with this Patient ID (one per issuer).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        sql = "SELECT patient_key FROM twins WHERE patient_id = ? AND patient_id <> ''"
        params: tuple[Any, ...] = (patient_id,)
        if issuer is not None:
            sql += " AND issuer_of_patient_id = ?"
            params += (issuer,)
        keys = [r["patient_key"] for r in self._rows(sql, params)]
        if not keys and issuer is None:  # a twin key (how unidentified twins are named)
            keys = [r["patient_key"] for r in self._rows(
                "SELECT patient_key FROM twins WHERE patient_key = ?", (patient_id.lower(),))]
        if not keys:
            raise TwinNotFoundError(patient_id)
        return keys

    def twin(self, patient_id: str, issuer: str | None = None) -> TwinDetail:
        """Everything known about one patient (the first issuer if several match).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        key = self.find_twin_keys(patient_id, issuer)[0]
        summary = self._summary(self._rows(
            "SELECT t.*, (SELECT COUNT(*) FROM studies s WHERE s.patient_key = t.patient_key) AS n_studies,"
            " (SELECT COUNT(*) FROM series se JOIN studies s ON se.study_uid = s.study_uid"
            "   WHERE s.patient_key = t.patient_key) AS n_series,"
            " (SELECT COUNT(*) FROM instances i WHERE i.patient_key = t.patient_key AND i.current = 1) AS n_instances,"
            " (SELECT MAX(received_at) FROM instances i WHERE i.patient_key = t.patient_key) AS last"
            " FROM twins t WHERE t.patient_key = ?", (key,))[0])
        studies = []
        for st in self._rows(
            "SELECT * FROM studies WHERE patient_key = ? ORDER BY study_date, study_time", (key,)
        ):
            series = tuple(
                SeriesRecord(
                    series_uid=se["series_uid"], modality=se["modality"] or "",
                    body_part=se["body_part"] or "", description=se["description"] or "",
                    series_number=se["series_number"] or "", manufacturer=se["manufacturer"] or "",
                    model_name=se["model_name"] or "",
                    frame_of_reference_uid=se["frame_of_reference_uid"] or "",
                    instances=se["n"], first_received=se["first_received"],
                    last_received=se["last_received"], nonconformant_uids=se["n_flagged"],
                    missing=se["n_missing"],
                )
                for se in self._rows(
                    "SELECT se.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
                    " AND i.current = 1) AS n, (SELECT COUNT(*) FROM instances i WHERE"
                    " i.series_uid = se.series_uid AND i.current = 1 AND i.uid_flags <> '') AS n_flagged,"
                    " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
                    " AND i.current = 1 AND i.missing_at IS NOT NULL) AS n_missing"
                    " FROM series se WHERE se.study_uid = ?"
                    " ORDER BY CAST(se.series_number AS INTEGER), se.first_received",
                    (st["study_uid"],),
                )
            )
            studies.append(StudyRecord(
                study_uid=st["study_uid"], study_date=st["study_date"] or "",
                study_time=st["study_time"] or "", description=st["description"] or "",
                accession_number=st["accession_number"] or "", series=series,
            ))
        history = tuple(
            ConsentEvent(at=r["at"], donate=bool(r["donate"]), previous=bool(r["previous"]),
                         by=r["by"] or "", reason=r["reason"] or "")
            for r in self._rows(
                "SELECT * FROM consent_events WHERE patient_key = ? ORDER BY id", (key,)
            )
        )
        from twin_archive.labels import twin_labels  # kept local: one hunk in this file
        from twin_archive.results import twin_results
        from twin_archive.training_use import twin_model_versions

        with self._lock:
            results = twin_results(self.db, self.data_dir, key)
            labels = twin_labels(self.db, self.data_dir, key)
            trained = twin_model_versions(self.db, key)
        merges = tuple(
            TwinMerge(source_key=r["source_key"], target_key=r["target_key"], at=r["at"],
                      by=r["by"], reason=r["reason"], studies=r["studies"])
            for r in self._rows("SELECT * FROM twin_merges WHERE target_key = ? OR source_key = ?"
                                " ORDER BY id", (key, key)))
        return TwinDetail(twin=summary, studies=tuple(studies), consent_history=history,
                          results=results, labels=labels, trained_model_versions=trained,
                          merges=merges)

    def merge_twins(self, source: str, target: str, *, by: str, reason: str,
                    at: str | None = None) -> TwinMerge:
        """Attach an unidentified twin to a patient's twin, in one transaction.

        Its studies, series, instances, AI results, labels and training records move to
        ``target``; the files stay where they are (paths are not identity). The source
        twin is kept, marked ``merged_into``, so that instances of the same study that
        arrive later without a Patient ID go to ``target`` too. The caller records the
        audit event (:meth:`twin_archive.audit.AuditLog.record`, ``twin-merged``).

        Parameters
        ----------
        source : str
            The unidentified twin, by its key (``twin list`` shows it).
        target : str
            The patient's twin, by Patient ID or key.
        by : str
            Who decides (required).
        reason : str
            Why (required): e.g. the order or the PACS reconciliation it follows.
        at : str, optional
            Time of the decision (ISO 8601, UTC); now by default (``rebuild-index``
            gives the recorded one).

        Raises
        ------
        TwinNotFoundError
            If either twin is unknown.
        ValueError
            Naming ``by``/``reason`` when empty, ``source`` when it is not an
            unidentified twin or already merged, ``target`` when it is unidentified or
            ambiguous, or the same twin.
        """
        if not by.strip():
            raise ValueError("by: the person attaching the twin must be named")
        if not reason.strip():
            raise ValueError("reason: say why the twin is attached to that patient")
        [src] = self.find_twin_keys(source)[:1]
        dst_keys = self.find_twin_keys(target)
        if len(dst_keys) > 1:
            raise ValueError(f"target: {len(dst_keys)} twins share Patient ID {printable(target)!r}"
                             " under different issuers; give the twin key")
        dst = dst_keys[0]
        if src == dst:
            raise ValueError("target: the source and the target are the same twin")
        at = at or iso(utc_now())
        with self._lock, write(self.db) as conn:
            s_row = conn.execute("SELECT unidentified, merged_into FROM twins WHERE patient_key = ?",
                                 (src,)).fetchone()
            d_row = conn.execute("SELECT unidentified, merged_into FROM twins WHERE patient_key = ?",
                                 (dst,)).fetchone()
            if not s_row[0]:
                raise ValueError("source: only an unidentified twin (no Patient ID) can be "
                                 "attached to a patient; correct identified patients in the PACS")
            if s_row[1]:
                raise ValueError(f"source: already merged into twin {s_row[1]}")
            if d_row[0] or d_row[1]:
                raise ValueError("target: must be an identified patient's twin")
            studies = conn.execute("SELECT COUNT(*) FROM studies WHERE patient_key = ?",
                                   (src,)).fetchone()[0]
            for table in ("studies", "instances", "ai_results", "labels", "training_use"):
                conn.execute(f"UPDATE {table} SET patient_key = ? WHERE patient_key = ?",  # noqa: S608
                             (dst, src))
            conn.execute("UPDATE twins SET merged_into = ?, updated_at = ? WHERE patient_key = ?",
                         (dst, at, src))
            conn.execute("UPDATE twins SET updated_at = ? WHERE patient_key = ?", (at, dst))
            conn.execute("INSERT INTO twin_merges (source_key, target_key, at, by, reason, studies)"
                         " VALUES (?,?,?,?,?,?)", (src, dst, at, by, reason, studies))
        LOG.info("twin %s (unidentified, %d study(ies)) attached to twin %s by %s", src, studies,
                 dst, printable(by))
        return TwinMerge(source_key=src, target_key=dst, at=at, by=by, reason=reason,
                         studies=studies)

    def set_consent(
        self, patient_id: str, *, donate: bool, by: str, reason: str = "",
        issuer: str | None = None, at: str | None = None,
    ) -> ConsentEvent:
        """Record a donation decision and its audit entry in one transaction.

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        ValueError
            If ``by`` is empty.
        """
        if not by.strip():
            raise ValueError("by: the person recording the consent decision must be named")
        keys = self.find_twin_keys(patient_id, issuer)
        if len(keys) > 1:
            raise ValueError(
                f"patient_id: {len(keys)} twins share Patient ID {patient_id!r} under different "
                "issuers; name the issuer"
            )
        at = at or iso(utc_now())  # given when replayed from the audit log (rebuild-index)
        with self._lock, write(self.db) as conn:
            previous = bool(conn.execute(
                "SELECT donate FROM twins WHERE patient_key = ?", (keys[0],)
            ).fetchone()[0])
            conn.execute(
                "UPDATE twins SET donate = ?, updated_at = ? WHERE patient_key = ?",
                (int(donate), at, keys[0]),
            )
            conn.execute(
                "INSERT INTO consent_events (patient_key, at, donate, previous, by, reason)"
                " VALUES (?,?,?,?,?,?)",
                (keys[0], at, int(donate), int(previous), by, reason),
            )
        LOG.info("consent: twin %s donation %s -> %s (by %s)", keys[0],
                 "on" if previous else "off", "on" if donate else "off", by)
        return ConsentEvent(at=at, donate=donate, previous=previous, by=by, reason=reason)

    def series_files(self, series_uid: str) -> list[Path]:
        """Absolute paths of the current instances of a series."""
        return [
            self.data_dir / r["path"]
            for r in self._rows(
                "SELECT path FROM instances WHERE series_uid = ? AND current = 1 ORDER BY id",
                (series_uid,),
            )
        ]

    def series_digest(self, series_uid: str) -> tuple[str, int]:
        """SHA-256 over the sorted SHA-256s of a series' current instances, and their number
        (the identity of the series' content, for dataset manifests)."""
        rows = self._rows("SELECT sha256 FROM instances WHERE series_uid = ? AND current = 1"
                          " ORDER BY sha256", (series_uid,))
        text = "\n".join(r["sha256"] for r in rows)
        return hashlib.sha256(text.encode()).hexdigest(), len(rows)

    def instance_count(self) -> int:
        """Number of instance rows (all versions)."""
        return int(self._rows("SELECT COUNT(*) AS n FROM instances")[0]["n"])


