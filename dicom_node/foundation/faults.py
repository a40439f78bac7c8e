"""Faults that last (a full disk): recognised, and logged once per change of state.

On a full disk every pass of the stability monitor, the worker and the sender fails
the same way; a traceback per pass (every 0.8 s) buries the one line an operator needs.
:class:`StateLog` logs the first failure of a kind as one line, stays quiet while it
repeats (the traceback only at DEBUG), and logs one line when things work again.

A full disk does not always say "no space": SQLite answers ``disk I/O error``
(``SQLITE_IOERR_SHMSIZE``) when a reader cannot create a database's shared-memory
file. :func:`is_disk_full` takes such an error on a file system with less than
:data:`FULL_BELOW_BYTES` free for what it is, so that ``status`` says "disk full"
instead of sending the operator to repair a database that is not damaged.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from pathlib import Path

#: errno values that mean "no space left" (disk full, quota, file size limit).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: A file system with less than this free (bytes, for an unprivileged user) is full.
FULL_BELOW_BYTES = 1 << 20


def is_out_of_space(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the disk or a quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
                return True
            if "disk is full" in str(exc):
                return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def free_bytes(path: Path | str) -> int | None:
    """Bytes free for an unprivileged user on ``path``'s file system; None if unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, path: Path | str) -> bool:
    """True when ``exc`` says no space (:func:`is_out_of_space`), or is an I/O error
    (OS or SQLite) while ``path``'s file system has less than :data:`FULL_BELOW_BYTES`
    free."""
    if is_out_of_space(exc):
        return True
    io_error = (isinstance(exc, OSError) and exc.errno == errno.EIO) or (
        isinstance(exc, sqlite3.Error) and (
            (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_IOERR
            or "disk I/O error" in str(exc)))
    free = free_bytes(path) if io_error else None
    return free is not None and free < FULL_BELOW_BYTES


def describe(exc: BaseException) -> str:
    """A one-line account of a failure: what kind, and its message."""
    if is_out_of_space(exc):
        return f"disk full ({exc})"
    return f"{type(exc).__name__}: {exc}"


class StateLog:
    """Logs a repeating failure once per change of state.

    Parameters
    ----------
    logger : logging.Logger
        Where the lines go.
    what : str
        The part that fails, in words ("stability monitor", "sender").
    """

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self._state: str | None = None

    @property
    def failing(self) -> bool:
        """True between a failure and the next success."""
        return self._state is not None

    def failed(self, exc: BaseException, doing: str = "") -> None:
        """Record a failure: one ERROR line when it is new, DEBUG (with traceback) after."""
        state = "disk full" if is_out_of_space(exc) else type(exc).__name__
        if state != self._state:
            self._state = state
            self.logger.error("%s: %s%s; trying again, and saying so here once it works",
                              self.what, f"{doing}: " if doing else "", describe(exc))
            self.logger.debug("%s: failure detail", self.what, exc_info=exc)
        else:
            self.logger.debug("%s: still failing: %s", self.what, describe(exc), exc_info=exc)

    def ok(self) -> None:
        """Record a success: one INFO line if it ends a failure."""
        if self._state is not None:
            self.logger.info("%s: working again (after: %s)", self.what, self._state)
            self._state = None
