"""Crash-safe file writes: temporary file, fsync, atomic rename, fsync of the directory."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (so a rename inside it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(final: Path, chunks: Iterable[bytes], tmp_dir: Path) -> None:
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

    Raises
    ------
    OSError
        On any write failure (``ENOSPC`` when the disk is full); the temporary file is
        removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _mkstemp(tmp_dir)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, final)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(final.parent)


def _mkstemp(tmp_dir: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(dir=tmp_dir, suffix=".part")


def clean_tmp(tmp_dir: Path) -> int:
    """Remove leftovers of interrupted writes; return how many were removed."""
    removed = 0
    if tmp_dir.is_dir():
        for p in tmp_dir.glob("*.part"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
