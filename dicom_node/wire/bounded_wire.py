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

* the presentation data values of P-DATA-TF PDUs must frame DIMSE messages as PS3.7
  and PS3.8 say (:class:`DimseFraming`): a command set, whole, then its data set on
  the same presentation context when the command announces one; a C-STORE-RQ command
  set must carry its Message ID, Affected SOP Class UID and Affected SOP Instance UID.
  A data set fragment on another context than its command, a command fragment inside
  a data set, a data set without a command, or a command set missing those elements is
  answered with an A-ABORT at once, the reason logged, in both receive modes alike
  (plain pynetdicom ignored the command without its UIDs and archived the data set on
  the wrong context; the fast path aborted: one rule here makes one answer).

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


class FramingError(ConnectionAbortedError):
    """The peer's presentation data values do not frame DIMSE messages (PS3.7, PS3.8 E)."""

    def __init__(self, peer: str, what: str) -> None:
        super().__init__(f"{peer} sent {what}")


#: Longest command set taken, bytes (a real one is under 200).
MAX_COMMAND_SET = 1 << 16
#: Command Field of C-STORE-RQ and C-CANCEL-RQ (PS3.7 E.1); the response bit.
_C_STORE_RQ, _C_CANCEL_RQ, _RESPONSE = 0x0001, 0x0FFF, 0x8000
#: Command Data Set Type when no data set follows (PS3.7 E.1).
_NO_DATA_SET = 0x0101
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")


def command_set_problem(raw: bytes) -> tuple[str | None, bool]:
    """What is missing from a whole command set, and whether a data set follows it.

    Returns
    -------
    problem : str or None
        Why the command set cannot be served (the words of the log), or None.
    has_data_set : bool
        True when its Command Data Set Type announces a data set.
    """
    values: dict[int, bytes] = {}
    at, end = 0, len(raw)
    while at < end:
        if at + 8 > end:
            return "a command set that ends inside an element header", False
        group, element, length = _ELEMENT.unpack_from(raw, at)
        at += 8
        if group != 0 or length > end - at:
            return "a command set with an element outside group 0000 or past its end", False
        values[element] = raw[at:at + length]
        at += length
    field, data_set_type = values.get(0x0100, b""), values.get(0x0800, b"")
    if len(field) != 2 or len(data_set_type) != 2:
        return "a command set without Command Field or Command Data Set Type", False
    command = int.from_bytes(field, "little")
    has_data_set = int.from_bytes(data_set_type, "little") != _NO_DATA_SET
    if not command & _RESPONSE and command != _C_CANCEL_RQ and len(values.get(0x0110, b"")) != 2:
        return "a request without Message ID", has_data_set
    if command == _C_STORE_RQ:
        for element, name in ((0x0002, "Affected SOP Class UID"),
                              (0x1000, "Affected SOP Instance UID")):
            if not values.get(element, b"").rstrip(b"\x00 "):
                return f"a C-STORE request without {name}", has_data_set
        if not has_data_set:
            return "a C-STORE request without a data set", False
    return None, has_data_set


class DimseFraming:
    """Follows the presentation data values of P-DATA-TF PDUs, fed their bodies in pieces.

    Parameters
    ----------
    peer : str
        ``address:port``, for the error.
    """

    __slots__ = ("peer", "_header", "_left", "_command", "_context", "_phase", "_last")

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._header = b""  # a PDV header in progress
        self._left = 0  # bytes of the current PDV's data not seen yet
        self._command = bytearray()
        self._context = 0  # the context of the message in progress
        self._phase = "idle"  # idle (a command next), command, data
        self._last = False  # the current PDV is the message part's last fragment

    def fail(self, what: str) -> FramingError:
        return FramingError(self.peer, what)

    def pdu_ended(self) -> None:
        """A P-DATA-TF PDU ended; a PDV may not run past it.

        Raises
        ------
        FramingError
            A presentation data value was cut by the end of its PDU.
        """
        if self._header or self._left:
            raise self.fail("a presentation data value longer than its P-DATA-TF PDU")

    def feed(self, data: Any, pdu_left: int) -> None:
        """Account for ``data``, part of a P-DATA-TF PDU's body after which ``pdu_left``
        bytes of that PDU remain.

        Raises
        ------
        FramingError
            The values do not frame DIMSE messages (see the module docstring).
        """
        at, end = 0, len(data)
        while at < end:
            if self._left:
                take = min(self._left, end - at)
                if self._phase == "command":
                    if len(self._command) + take > MAX_COMMAND_SET:
                        raise self.fail(f"a command set longer than {MAX_COMMAND_SET} bytes")
                    self._command += data[at:at + take]
                self._left -= take
                at += take
                if not self._left:
                    self._fragment_ended()
                continue
            need = 6 - len(self._header)
            self._header += bytes(data[at:at + need])
            at += need
            if len(self._header) < 6:
                return
            length, context, control = _PDV_HEADER.unpack(self._header)
            self._header = b""
            if length < 2:
                raise self.fail(f"a presentation data value of {length} bytes (at least 2: its "
                                "context ID and control header)")
            if length - 2 > end - at + pdu_left:
                raise self.fail("a presentation data value longer than its P-DATA-TF PDU")
            self._fragment_began(context, control)
            self._left = length - 2
            if not self._left:
                self._fragment_ended()

    def _fragment_began(self, context: int, control: int) -> None:
        is_command = bool(control & 0x01)
        self._last = bool(control & 0x02)
        if self._phase == "data":
            if is_command:
                raise self.fail(f"a command fragment inside a data set (context {self._context})")
            if context != self._context:
                raise self.fail(f"a data set fragment on presentation context {context}, its "
                                f"command on {self._context}")
        elif self._phase == "command":
            if not is_command:
                raise self.fail("a data set fragment before its command set ended")
            if context != self._context:
                raise self.fail(f"command fragments on presentation contexts {self._context} "
                                f"and {context}")
        elif not is_command:
            raise self.fail(f"a data set fragment on presentation context {context} without "
                            "a command")
        else:
            self._phase, self._context = "command", context
            self._command.clear()

    def _fragment_ended(self) -> None:
        if not self._last:
            return
        if self._phase == "data":
            self._phase = "idle"
            return
        problem, has_data_set = command_set_problem(bytes(self._command))
        self._command.clear()
        if problem is not None:
            raise self.fail(problem)
        self._phase = "data" if has_data_set else "idle"


#: The errors a guarded socket raises after logging them itself (one line with the reason).
LOGGED_REFUSALS = (PduTooLargeError, PduTimeoutError, FramingError)


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

    __slots__ = ("peer", "max_pdu", "timeout_s", "_header", "_left", "_length", "_deadline",
                 "_framing", "_data")

    def __init__(self, peer: str, max_pdu: int, timeout_s: float) -> None:
        self.peer = peer
        self.max_pdu = max_pdu
        self.timeout_s = timeout_s
        self._header = b""
        self._left = 0
        self._length = 0
        self._deadline: float | None = None
        self._framing = DimseFraming(peer)
        self._data = False  # the current PDU is a P-DATA-TF

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
        FramingError
            A P-DATA-TF PDU's values do not frame DIMSE messages.
        """
        at, end = 0, len(data)
        while at < end:
            if self._left:
                take = min(self._left, end - at)
                self._left -= take
                if self._data:
                    self._framing.feed(data[at:at + take], self._left)
                at += take
                if not self._left:
                    self._deadline = None
                    if self._data:
                        self._framing.pdu_ended()
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
            self._data = pdu_type == _P_DATA_TF
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
        except (PduTooLargeError, FramingError) as exc:
            self._fail(exc)
        if not watch.in_pdu():
            self.settimeout(watch.timeout_s)  # type: ignore[attr-defined]

    def _fail(self, exc: BaseException) -> None:
        """Log once, A-ABORT when the PDU was refused, and raise ``exc`` (now and after)."""
        if self._failed is None:
            self._failed = exc
            LOG.warning("association with %s aborted: %s", self.watch.peer if self.watch else "?", exc)
            if isinstance(exc, (PduTooLargeError, FramingError)):
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
