"""One node per data directory (DESIGN decision 10): an exclusive lock on ``serve.lock``.

``serve`` and ``demo`` take the lock before they touch anything in the data directory
(start-up recovery removes the temporary files of writes in progress, reconciles the
archive, puts interrupted jobs back in the queue: all of that would break a node that
is still serving). A second node on the same directory exits with status 2 and one
line naming the holder's pid. Read-only commands (``status``, ``twin list``, ``audit``
...) never take it and keep working beside the node.

The lock is ``flock(2)`` on ``<data-dir>/serve.lock``: the kernel drops it when the
holder dies (SIGKILL, power cut), so there is no stale lock to clean up, and the file
itself stays (its content is only the last holder's pid, for the message). Written by
hand on ``fcntl`` because it is a dozen lines and the standard library's; the
``filelock`` package would add a dependency for the same ``flock`` call.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from dicom_node.foundation.errors import DicomNodeError

LOG = logging.getLogger(__name__)

LOCK_NAME = "serve.lock"


class DataDirInUseError(DicomNodeError, OSError):
    """Another node serves this data directory; the message names its pid.

    ``exit_status`` is 2: the command cannot run as asked (like a configuration error).
    """

    exit_status = 2

    def __init__(self, data_dir: Path, holder: str) -> None:
        self.data_dir = data_dir
        self.holder = holder
        super().__init__(
            f"data directory {data_dir} is in use by another node (pid {holder}); one node per "
            "data directory: stop that one first, or give this one another --data-dir")


class DataDirLock:
    """The exclusive lock of one data directory, held until :meth:`release`.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The data directory (created if missing).

    Raises
    ------
    DataDirInUseError
        If another process holds the lock.
    OSError
        If the lock file cannot be created (the directory is not writable).
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DataDirInUseError(self.data_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd
        LOG.debug("data directory %s locked by pid %d", self.data_dir, os.getpid())

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Give the lock up (idempotent); the file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"
