"""Crash-safe file writes: temporary file, fsync, atomic rename, fsync of the directory.

The one place that writes a file the node keeps (archive instances, results, labels,
registry artifacts, checkpoints, pipeline outputs, ``serve.json``): no other module
calls ``os.replace``/``os.rename`` or ``tempfile`` for them (``tests/test_layering.py``).
A leaf like :mod:`dicom_node.foundation.errors`: it imports only the standard library, so every
room may use it.

* :func:`write_durably` -- bytes to a file;
* :func:`open_durably` -- a file object for writers that stream (``torch.save``,
  ``pydicom``'s ``save_as``);
* :func:`replace_durably` -- rename a file or a directory tree written elsewhere into
  place (exports, bundle copies, quarantine, moving a database aside).

What each flush is for (Linux, ext4/xfs; DESIGN decision 1):

* ``fdatasync`` of the temporary file: its bytes and the metadata needed to read them
  back (size, block map) are on disk. Plain ``fsync`` would also flush the timestamps,
  which nothing here needs (for a new file the two cost about the same on ext4: the
  journal commit for the new inode is needed either way).
* ``rename`` into place: atomic, readers see nothing or the whole file.
* ``fsync`` of the destination directory: the new name survives a power cut. Needed
  for every instance (each is a new name), so it is not skipped; ``syncfs`` would
  be one call instead of two but flushes every dirty page of the whole file system
  (other processes' too), with unbounded latency, so it is not used.
* directories created for a new patient, study or series: each new directory's
  parent is fsynced too, once, so the path to the file survives as well as its name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (so a rename inside it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, chunks: Iterable[bytes], tmp_dir: Path | None = None, *,
                  sync_dir: bool = True) -> None:
    """Write ``chunks`` to ``final`` so that a crash leaves either nothing or the whole file.

    Parameters
    ----------
    final : pathlib.Path
        Destination. Its parent directories are created. An existing file is replaced
        atomically (callers only ever replace a file with identical content).
    chunks : iterable of bytes
        The content, written in order.
    tmp_dir : pathlib.Path, optional
        Directory for the temporary file; must be on the same file system as ``final``.
        Default: ``final``'s directory (a hidden ``.*.part`` name).
    sync_dir : bool
        Fsync ``final``'s directory before returning (default). With False the caller
        must call :func:`fsync_dir` on it before relying on the new name (the archive
        does, once for all the files a group commit renamed into one directory).

    Raises
    ------
    OSError
        On any write failure (``ENOSPC`` when the disk is full); the temporary file is
        removed and ``final`` is untouched.
    """
    with _into_place(final, tmp_dir, sync_dir) as fd:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]


@contextmanager
def open_durably(final: Path, tmp_dir: Path | None = None, *,
                 sync_dir: bool = True) -> Iterator[BinaryIO]:
    """A binary file that becomes ``final`` when the ``with`` block ends without error.

    The same contract as :func:`write_durably`, for writers that want a file object
    (``torch.save``, ``Dataset.save_as``): on a normal exit the file is flushed,
    ``fdatasync``-ed and renamed into place (and ``final``'s directory fsynced unless
    ``sync_dir`` is False); on an exception the temporary file is removed and ``final``
    is untouched.

    Parameters
    ----------
    final : pathlib.Path
        Destination; its parent directories are created.
    tmp_dir : pathlib.Path, optional
        As for :func:`write_durably`.
    sync_dir : bool
        As for :func:`write_durably`.

    Raises
    ------
    OSError
        On any write failure.
    """
    with _into_place(final, tmp_dir, sync_dir) as fd, os.fdopen(fd, "wb", closefd=False) as fh:
        yield fh


@contextmanager
def _into_place(final: Path, tmp_dir: Path | None, sync_dir: bool) -> Iterator[int]:
    """The descriptor of a new ``.part`` file that becomes ``final`` when the block ends
    without error (``fdatasync``, close, atomic rename, directory fsync unless
    ``sync_dir`` is False); on an exception it is closed and removed, ``final`` untouched.
    The one body of :func:`write_durably` and :func:`open_durably`."""
    makedirs_durably(final.parent)
    fd, tmp_name = mkstemp_part(final.parent if tmp_dir is None else tmp_dir)
    try:
        try:
            yield fd
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, final)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    if sync_dir:
        fsync_dir(final.parent)


def replace_durably(src: Path, final: Path, *, synced: bool = False,
                    sync_dir: bool = True) -> None:
    """Rename ``src`` (a file or a directory tree) to ``final`` so that it survives a crash.

    The content of ``src`` is fsynced first (every file and directory of a tree), then
    renamed atomically (an existing file ``final`` is replaced; an existing directory
    must be empty, as for :func:`os.replace`), then both directories are fsynced so the
    new name and the removal of the old one survive a power cut.

    Parameters
    ----------
    src : pathlib.Path
        What was written (on the same file system as ``final``).
    final : pathlib.Path
        Its name from now on; missing parent directories are created durably.
    synced : bool
        The caller has already flushed ``src``'s content (the spool ``fdatasync``-s
        its file): it is not fsynced again.
    sync_dir : bool
        Fsync the directories (default). With False the caller fsyncs ``final``'s
        directory before relying on the name (the spool, in a group commit).

    Raises
    ------
    OSError
        If a flush or the rename fails; ``final`` is then untouched.
    """
    if not synced:
        _sync_tree(Path(src))
    makedirs_durably(final.parent)
    os.replace(src, final)
    if sync_dir:
        fsync_dir(final.parent)
        if Path(src).parent != final.parent:
            fsync_dir(Path(src).parent)


def _sync_tree(path: Path) -> None:
    """Fsync a file, or every file and directory of a tree (bottom-up)."""
    if not path.is_dir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _sync_tree(Path(root) / name)
        fsync_dir(Path(root))


def makedirs_durably(path: Path) -> None:
    """Create ``path`` and missing parents; fsync the parent of each one created."""
    if path.is_dir():
        return
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # created meanwhile by another association
            continue
        fsync_dir(directory.parent)


def mkstemp_part(tmp_dir: Path) -> tuple[int, str]:
    """A new temporary hidden ``.*.part`` file in ``tmp_dir`` (what :func:`clean_tmp` removes)."""
    return tempfile.mkstemp(dir=tmp_dir, prefix=".", suffix=".part")


def clean_tmp(tmp_dir: Path) -> int:
    """Remove leftovers of interrupted writes; return how many were removed."""
    removed = 0
    if tmp_dir.is_dir():
        for p in tmp_dir.glob("*.part"):  # pathlib's glob matches hidden names too
            p.unlink(missing_ok=True)
            removed += 1
    return removed
