"""A data set written to the archive's temporary folder while it is still arriving.

The network layer creates a :class:`Spool` when a C-STORE's command set has arrived
and hands it each fragment of the data set as it comes off the wire. Each fragment
is written and its write-back to the disk started (``sync_file_range``, Linux) at
once, and hashed (sha256) by a thread beside the network thread, so that when the
last fragment arrives most of the bytes are already on their way to the disk and
hashed: the ``fdatasync`` that makes the file durable then waits for the tail only,
and the archive runs it (:meth:`Spool.flush`) while another thread reads the header,
so the two overlap (figures in ``benchmarks/README.md``). The data set is never
assembled in memory.

The durability contract is the one of :func:`dicom_node.foundation.durable.write_durably`
(DESIGN decision 1): the spool *is* the temporary file; :meth:`Spool.commit` flushes it
(``fdatasync``), renames it into place, and leaves the directory ``fsync`` to the
archive's group commit, which runs before the index row is committed.

A spool is consumed exactly once: :meth:`Spool.claim` by the archive (which then
commits or discards it), or :meth:`Spool.discard` when the association ends before the
request was handled (abort, connection lost). Anything left by a crash is a
``*.part`` file that :func:`dicom_node.foundation.durable.clean_tmp` removes at the next start.

Write errors (``ENOSPC``) are kept, not raised: the fragment writer runs in the
network thread, which must go on; :meth:`Spool.claim` raises them where the C-STORE
is answered.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dicom_node.foundation.durable import mkstemp_part, replace_durably

#: Bytes at the start of the data set kept in memory for reading its header (:attr:`Spool.head`).
HEAD_BYTES = 64 * 1024

#: ``SYNC_FILE_RANGE_WRITE``: start write-back of dirty pages in the range, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: write-back starts at fdatasync
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()

_pools_lock = threading.Lock()
_pools: dict[str, ThreadPoolExecutor] = {}


def helper_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool of helper threads ``name`` (made on first use, ``workers``
    threads at most, named ``spool-<name>``; they end with the process)."""
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix=f"spool-{name}")
        return pool


_live_lock = threading.Lock()
_live = 0  # spools of this process receiving or being stored


def _live_change(delta: int) -> int:
    global _live
    with _live_lock:
        _live += delta
        return _live


def alone() -> bool:
    """Whether at most one spool of this process is receiving or being stored.

    Then the helper threads (hashing, and the archive's header read beside the flush)
    shorten that instance's wait on cores that would idle; with several at once the
    associations already keep the cores busy and the hand-offs (a copy of each fragment,
    a thread woken per step) would only add CPU, so the work is done in line.
    """
    return _live <= 1


def _hashing() -> ThreadPoolExecutor:
    """One thread for every spool's sha256 updates: first in, first hashed, so each
    spool's fragments are hashed in order. hashlib lets go of the GIL on large inputs,
    so the hash runs beside the network thread, which goes on reading the next fragment."""
    return helper_pool("hash", 1)


class SpoolError(Exception):
    """The spool cannot be used (written past an error, or already consumed)."""


class Spool:
    """A temporary file in ``tmp_dir`` receiving one data set, fragment by fragment.

    Parameters
    ----------
    tmp_dir : pathlib.Path
        The archive's temporary folder (same file system as the archive).

    Attributes
    ----------
    path : pathlib.Path
        The temporary file (``*.part``).
    meta_length : int
        Bytes of preamble and File Meta Information at the start of the file.
    size : int
        Bytes of the data set received so far (after the File Meta Information).
    error : Exception or None
        The first error (a write's ``OSError``, or what the network layer found wrong
        with the request), kept for :meth:`claim` to raise.
    """

    def __init__(self, tmp_dir: Path) -> None:
        fd, name = mkstemp_part(tmp_dir)
        self._fd: int | None = fd
        self._live = True
        _live_change(+1)
        self.path = Path(name)
        self.meta_length = 0
        self.size = 0
        self.error: Exception | None = None
        self._sha = hashlib.sha256()
        self._hashed: Future[None] | None = None  # the last fragment's hash update
        self._flushed = False  # fdatasync done (by flush)
        self._head = bytearray()
        self._offset = 0
        self._state = "receiving"
        self._lock = threading.Lock()

    # ------------------------------------------------------------ receiving
    @property
    def pending(self) -> bool:
        """Still receiving or waiting for the archive (neither claimed nor discarded)."""
        return self._state == "receiving"

    @property
    def name(self) -> str:
        """The path as a string (what ``NamedTemporaryFile.name`` gives)."""
        return str(self.path)

    def write_meta(self, meta: bytes) -> None:
        """Write the preamble and File Meta Information (not hashed)."""
        self.meta_length = len(meta)
        self._write(meta, meta=True)

    def write(self, data: bytes) -> int:
        """Append one fragment of the data set: written, hashed, its write-back started."""
        if self.size < HEAD_BYTES:
            self._head += data[:HEAD_BYTES - self.size]
        self.size += len(data)
        self._write(data, meta=False)
        return len(data)

    @property
    def head(self) -> bytes:
        """The first :data:`HEAD_BYTES` of the data set (all of it if shorter), from memory.

        Where the archive reads the header from: a CT header ends after a few
        kilobytes, and reading it here saves opening the file again and the ~60 system
        calls (seeks) of pydicom reading it from a file.
        """
        return bytes(self._head)

    def _write(self, data: bytes, *, meta: bool) -> None:
        if self.error is not None or self._fd is None:
            return
        start = self._offset
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = exc
            return
        self._offset += len(data)
        if not meta:
            if alone():
                # a copy: the network layer reuses its buffer for the next fragment
                self._hashed = _hashing().submit(self._sha.update, bytes(data))
            else:
                if self._hashed is not None:  # the fragments before, hashed first
                    self._hashed.result()
                    self._hashed = None
                self._sha.update(data)
        if _sync_file_range is not None and len(data) >= 65536:
            _sync_file_range(self._fd, start, len(data), _SYNC_FILE_RANGE_WRITE)

    # ------------------------------------------------------------- consuming
    def claim(self) -> None:
        """Take the spool for storing; raises the kept write error, if any.

        Raises
        ------
        SpoolError
            Already claimed or discarded.
        Exception
            The kept :attr:`error` (``OSError`` when a fragment could not be written);
            the spool is discarded first.
        """
        with self._lock:
            if self._state != "receiving":
                raise SpoolError(f"spool {self.path.name} is {self._state}")
            self._state = "claimed"
        if self.error is not None:
            error = self.error
            self.discard(force=True)
            raise error

    @property
    def sha256(self) -> str:
        """Hex sha256 of the data set (without the File Meta Information), once every
        fragment written so far is hashed."""
        if self._hashed is not None:
            self._hashed.result()
        return self._sha.hexdigest()

    def flush(self) -> None:
        """``fdatasync`` the claimed spool now, in the calling thread (which lets go of the
        GIL meanwhile: the archive reads the header in another thread during it).
        :meth:`commit` then renames without flushing again; the order of DESIGN decision
        1 stands, the rename still follows the flush.

        Raises
        ------
        OSError
            The flush failed (:meth:`commit` is then not to be called; discard it).
        """
        if self._state != "claimed" or self._fd is None:
            raise SpoolError(f"spool {self.path.name} is {self._state}, not claimed")
        os.fdatasync(self._fd)
        self._flushed = True

    @property
    def total_size(self) -> int:
        """Bytes in the file: File Meta Information and data set."""
        return self.meta_length + self.size

    def open_dataset(self) -> BinaryIO:
        """A reader positioned at the start of the data set."""
        fh = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        fh.seek(self.meta_length)
        return fh

    def read_at(self, offset: int, n: int) -> bytes:
        """``n`` bytes of the data set at ``offset`` (fewer at its end): from the head in
        memory, else from the file."""
        n = max(0, min(n, self.size - offset))
        if offset + n <= len(self._head):
            return bytes(self._head[offset:offset + n])
        if self._fd is not None:
            return os.pread(self._fd, n, self.meta_length + offset)
        with open(self.path, "rb") as fh:
            fh.seek(self.meta_length + offset)
            return fh.read(n)

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes of the data set (fewer if it is shorter)."""
        n = min(n, self.size)
        if self._fd is None or n <= 0:
            return b""
        return os.pread(self._fd, n, self._offset - n)

    def commit(self, final: Path) -> None:
        """``fdatasync`` the file and rename it to ``final`` (directories created durably).

        The caller fsyncs ``final``'s directory before relying on the name.

        Raises
        ------
        OSError
            Flush or rename failed; the temporary file is removed, ``final`` untouched.
        """
        if self._state != "claimed" or self._fd is None:
            raise SpoolError(f"spool {self.path.name} is {self._state}, not claimed")
        try:
            if not self._flushed:
                os.fdatasync(self._fd)
            self._close_fd()
            replace_durably(self.path, final, synced=True, sync_dir=False)
        except BaseException:
            self.discard(force=True)
            raise
        self._state = "committed"
        self._retire()

    def discard(self, *, force: bool = False) -> bool:
        """Close and remove the file unless the archive has claimed it (or ``force``).

        Returns
        -------
        bool
            True when this call removed it.
        """
        with self._lock:
            if self._state in ("committed", "discarded") or (self._state == "claimed" and not force):
                return False
            self._state = "discarded"
        self._retire()
        self._close_fd()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return True

    def close(self) -> None:
        """Release the descriptor (the file stays until committed or discarded)."""
        if self._state != "claimed":
            self._close_fd()

    def _retire(self) -> None:
        """No longer receiving or being stored (counted once)."""
        if self._live:
            self._live = False
            _live_change(-1)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
