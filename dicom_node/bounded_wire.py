"""Bounded reads on every socket the node accepts, in both receive modes.

pynetdicom reads a PDU by its 6-byte header: it then blocks in ``recv()`` until the
declared length has arrived, with no timeout on accepted sockets, and it takes any
length up to 4 GiB whatever maximum the node advertised. A peer that sends half a
PDU (or half an A-ASSOCIATE-RQ) held its thread and association slot until it left;
one that declared a PDU larger than ``max_pdu_size`` was read on.

Here every accepted socket is a :class:`GuardedSocket` (plain TCP) or
:class:`GuardedSSLSocket` (TLS, through ``SSLContext.sslsocket_class``): the same
socket classes with ``recv``/``recv_into`` watching the PDU stream as it passes
(:class:`PduWatch`, headers only, no copy):

* a PDU must arrive whole within ``network_timeout_s`` of its first byte: each read in
  its middle waits at most the time left (``TimeoutError``); a read between PDUs waits
  at most ``network_timeout_s``;
* a P-DATA-TF PDU longer than the maximum the node advertised (``max_pdu_size``, when
  not 0), or any other PDU longer than :data:`MAX_CONTROL_PDU`, is refused as soon as
  its header arrives: the node sends an A-ABORT (invalid PDU parameter value), logs
  why and ends the read with ``ConnectionAbortedError``.

pynetdicom (and the fast path) meet those as a broken connection (``OSError``): the
association ends, its thread and slot are freed, and the data set it was receiving is
discarded, never acknowledged. Nothing here reads a private name of pynetdicom: the
sockets are made in the server's ``get_request`` (``socketserver``'s hook, the server
class passed to ``AE.make_server``) and in the TLS context.

Why by hand: neither pynetdicom nor the standard library has a per-message deadline
or a length check on a byte stream; the rule is a few lines over the PDU header.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from typing import Any

LOG = logging.getLogger(__name__)

#: Longest non-data PDU taken (A-ASSOCIATE-RQ and the like; a real request is a few KiB).
MAX_CONTROL_PDU = 1 << 20
_P_DATA_TF = 0x04
#: A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value).
A_ABORT_INVALID_PARAMETER = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


class PduTooLargeError(ConnectionAbortedError):
    """The peer declared a PDU longer than the node takes."""

    def __init__(self, peer: str, kind: str, length: int, limit: int) -> None:
        super().__init__(f"{peer} sent a {kind} PDU of {length} bytes, larger than the "
                         f"maximum of {limit} the node takes")


class PduTimeoutError(TimeoutError):
    """A PDU did not arrive whole within the network timeout."""

    def __init__(self, peer: str, got: int, length: int, timeout_s: float) -> None:
        super().__init__(f"{peer} sent {got} of {length} bytes of a PDU and nothing more "
                         f"for {timeout_s:g} s (network_timeout_s)")


class PduWatch:
    """Follows PDU boundaries in a received byte stream and enforces the limits.

    Parameters
    ----------
    peer : str
        ``address:port``, for the log.
    max_pdu : int
        Largest P-DATA-TF PDU length taken, bytes (0: no limit).
    timeout_s : float
        Seconds a PDU may take from its first byte to its last.
    """

    __slots__ = ("peer", "max_pdu", "timeout_s", "_header", "_left", "_length", "_deadline")

    def __init__(self, peer: str, max_pdu: int, timeout_s: float) -> None:
        self.peer = peer
        self.max_pdu = max_pdu
        self.timeout_s = timeout_s
        self._header = b""
        self._left = 0
        self._length = 0
        self._deadline: float | None = None

    def wait_s(self) -> float:
        """How long the next read may wait; raises when the current PDU is overdue.

        Raises
        ------
        PduTimeoutError
            A PDU was begun and its deadline has passed.
        """
        if self._deadline is None:
            return self.timeout_s
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self.overdue()
        return left

    def overdue(self) -> PduTimeoutError:
        got = len(self._header) if self._header else self._length - self._left + 6
        return PduTimeoutError(self.peer, got, self._length + 6 if not self._header else 6,
                               self.timeout_s)

    def in_pdu(self) -> bool:
        """True when a PDU has begun and not ended."""
        return self._deadline is not None

    def received(self, data: Any) -> None:
        """Account for ``data`` (bytes or memoryview) just read from the stream.

        Raises
        ------
        PduTooLargeError
            A PDU header declares more than the limit.
        """
        at, end = 0, len(data)
        while at < end:
            if self._left:
                take = min(self._left, end - at)
                self._left -= take
                at += take
                if not self._left:
                    self._deadline = None
                continue
            if self._deadline is None:
                self._deadline = time.monotonic() + self.timeout_s
            need = 6 - len(self._header)
            self._header += bytes(data[at:at + need])
            at += need
            if len(self._header) < 6:
                return
            pdu_type, _, length = struct.unpack(">BBL", self._header)
            self._header = b""
            limit = self.max_pdu if pdu_type == _P_DATA_TF else MAX_CONTROL_PDU
            if limit and length > limit:
                kind = "P-DATA-TF" if pdu_type == _P_DATA_TF else f"type 0x{pdu_type:02X}"
                raise PduTooLargeError(self.peer, kind, length, limit)
            self._length = self._left = length
            if not length:
                self._deadline = None


class _Bounded:
    """``recv``/``recv_into`` through a :class:`PduWatch`; mixed into the socket classes."""

    watch: PduWatch | None = None
    _failed: BaseException | None = None

    def guard(self, watch: PduWatch) -> None:
        """Start watching reads (before the first one)."""
        self.watch = watch
        self.settimeout(watch.timeout_s)  # type: ignore[attr-defined]

    def _before(self) -> PduWatch | None:
        if self._failed is not None:
            raise self._failed
        watch = self.watch
        if watch is not None:
            try:
                wait = watch.wait_s()
            except PduTimeoutError as exc:
                self._fail(exc)
            if watch.in_pdu():
                self.settimeout(wait)  # type: ignore[attr-defined]
        return watch

    def _after(self, watch: PduWatch, data: Any) -> None:
        try:
            watch.received(data)
        except PduTooLargeError as exc:
            self._fail(exc)
        if not watch.in_pdu():
            self.settimeout(watch.timeout_s)  # type: ignore[attr-defined]

    def _fail(self, exc: BaseException) -> None:
        """Log once, A-ABORT when the PDU was refused, and raise ``exc`` (now and after)."""
        if self._failed is None:
            self._failed = exc
            LOG.warning("association with %s aborted: %s", self.watch.peer if self.watch else "?", exc)
            if isinstance(exc, PduTooLargeError):
                try:
                    self.settimeout(1.0)  # type: ignore[attr-defined]
                    self.sendall(A_ABORT_INVALID_PARAMETER)  # type: ignore[attr-defined]
                except OSError:
                    pass
        raise exc

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        if flags:  # MSG_PEEK: nothing consumed
            return super().recv(bufsize, flags)  # type: ignore[misc]
        watch = self._before()
        try:
            data = super().recv(bufsize, flags)  # type: ignore[misc]
        except TimeoutError:
            if watch is not None and watch.in_pdu():
                self._fail(watch.overdue())
            raise
        if watch is not None and data:
            self._after(watch, data)
        return data  # type: ignore[no-any-return]

    def recv_into(self, buffer: Any, nbytes: Any = None, flags: int = 0) -> int:
        args = (buffer,) if nbytes is None else (buffer, nbytes)
        if flags:
            return super().recv_into(*args, flags=flags)  # type: ignore[misc]
        watch = self._before()
        try:
            n = super().recv_into(*args)  # type: ignore[misc]
        except TimeoutError:
            if watch is not None and watch.in_pdu():
                self._fail(watch.overdue())
            raise
        if watch is not None and n:
            self._after(watch, memoryview(buffer)[:n])
        return n  # type: ignore[no-any-return]


class GuardedSocket(_Bounded, socket.socket):
    """An accepted plain TCP socket whose reads are bounded (see the module docstring)."""

    @classmethod
    def adopt(cls, sock: socket.socket) -> GuardedSocket:
        """The same connection as a :class:`GuardedSocket` (``sock`` is detached)."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())


class GuardedSSLSocket(_Bounded, ssl.SSLSocket):
    """An accepted TLS socket whose reads (of decrypted bytes) are bounded."""


def peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def guard(sock: socket.socket, *, max_pdu: int, timeout_s: float) -> socket.socket:
    """``sock`` (just accepted) with its reads bounded; plain sockets are re-made, TLS
    sockets must already be :class:`GuardedSSLSocket` (set ``sslsocket_class``)."""
    guarded: Any = sock
    if not isinstance(sock, _Bounded):
        if isinstance(sock, ssl.SSLSocket):
            raise TypeError("TLS sockets are guarded through SSLContext.sslsocket_class")
        guarded = GuardedSocket.adopt(sock)
    guarded.guard(PduWatch(peer_of(guarded), max_pdu, timeout_s))
    return guarded  # type: ignore[no-any-return]
