"""Crash-safe file writes: temporary file, fsync, atomic rename, fsync of the directory.

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
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (so a rename inside it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, chunks: Iterable[bytes], tmp_dir: Path, *,
                  sync_dir: bool = True) -> None:
    """Write ``chunks`` to ``final`` so that a crash leaves either nothing or the whole file.

    Parameters
    ----------
    final : pathlib.Path
        Destination. Its parent directories are created. An existing file is replaced
        atomically (callers only ever replace a file with identical content).
    chunks : iterable of bytes
        The content, written in order.
    tmp_dir : pathlib.Path
        Directory for the temporary file; must be on the same file system as ``final``.
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
    makedirs_durably(final.parent)
    fd, tmp_name = mkstemp_part(tmp_dir)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
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
    """A new temporary ``*.part`` file in ``tmp_dir`` (what :func:`clean_tmp` removes)."""
    return tempfile.mkstemp(dir=tmp_dir, suffix=".part")


def clean_tmp(tmp_dir: Path) -> int:
    """Remove leftovers of interrupted writes; return how many were removed."""
    removed = 0
    if tmp_dir.is_dir():
        for p in tmp_dir.glob("*.part"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
