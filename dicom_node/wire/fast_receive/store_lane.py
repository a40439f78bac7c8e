"""The C-STORE lane: C-STOREs on an established association received in one thread.

pynetdicom receives a C-STORE in many steps. The DUL thread reads each P-DATA-TF PDU,
copies it into a PDU object and a P-DATA primitive, and passes it through the state
machine's event queue to the DIMSE layer. When the message is complete the DIMSE layer
decodes the command set with pydicom and queues the message for the association
thread. That thread wakes, builds the service class and the event, calls the
handler, builds the response primitive and queues it back. The DUL thread wakes again
and sends it. For a 0.5 MB CT slice in 128 KiB PDUs that was a third of what the node
spent per instance, and two thread hand-offs; with four associations on two cores it
was the limit (figures in ``benchmarks/README.md``).

The lane does the same work for the one message that dominates a DICOM node's traffic,
a C-STORE request with a data set on a plain TCP association, in the DUL thread. It
reads each PDU once, into one reusable buffer, and writes each data fragment straight
into the data set's :class:`twin_archive.spool.Spool` (the same spool as
:mod:`dicom_node.wire.fast_receive.spooling`). It decodes the command set's few fixed elements by hand.
It calls the handler bound to ``EVT_C_STORE`` through pynetdicom's own
``evt.trigger``, with the request primitive and the event that pynetdicom would have
built. It sends the response as soon as the handler returns.

Everything else stays pynetdicom's, untouched:

* association negotiation, release and abort, and every PDU other than P-DATA-TF;
* every other DIMSE message (C-ECHO, for one), and a C-STORE whose command set does
  not arrive whole in one fragment or carries anything unexpected;
* TLS associations, associations the node requested, and any association where a
  handler watches PDUs or DIMSE messages (pynetdicom's debug logging, for one).

The lane decides at the first PDU of a message: it reads the PDU's header and first
fragment and, for anything it does not take, reads the rest of that PDU and passes it
to pynetdicom's DUL exactly as pynetdicom's own read would have (``_decode_pdu``, the
event, the PDU). PDUs that are not P-DATA-TF are left on the socket for pynetdicom
(one byte is peeked). The first request of an association is pynetdicom's when it
arrives before pynetdicom has marked the association established (its
``EVT_ACCEPTED`` handlers may still run): pynetdicom serves requests only after that.
After a message, pynetdicom's loop runs again (it sends what is queued, honours an
abort from the node). It also runs again between two PDUs of a message whenever the
next PDU has not arrived yet, so pynetdicom's idle timer and abort still apply.

The state machine is not involved: a P-DATA-TF PDU received in Sta6 leads to
Sta6 (action DT-2), and so does a P-DATA sent in Sta6 (DT-1). A malformed PDU in a
message the lane has taken is answered as pynetdicom answers one (``Evt19``: A-ABORT).
The partly received data set is never acknowledged; its spool is removed when the
connection closes (:func:`dicom_node.wire.fast_receive.spooling.discard_unclaimed`, which the node binds).

If pynetdicom no longer has the names this relies on, nothing is installed (logged
once at WARNING) and every PDU takes pynetdicom's path.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import weakref
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom import _config, evt
from pynetdicom import dul as _dul
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.wire.fast_receive import spooling, store_response
from dicom_node.wire.bounded_wire import GuardedSocket, command_set_problem
from dicom_node.wire.statuses import HANDLER_FAILED

LOG = logging.getLogger(__name__)

#: Bytes read from the socket in one go (a PDU's data is read in pieces of this size).
_BUFFER = 1 << 20
#: The most of a command set the lane decodes; a larger one goes to pynetdicom.
_MAX_COMMAND = 4096
#: Events whose handlers want to see PDUs or DIMSE messages: the lane steps aside.
_WATCHING = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV, evt.EVT_DATA_SENT,
             evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT, evt.EVT_FSM_TRANSITION)

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
_P_DATA_TF = 0x04

_install_lock = threading.Lock()
_installed = False
_shipped_read_pdu_data: Any = None
#: The AEs whose accepted associations use the lane (the node's; weak: tests make many).
_lane_aes: weakref.WeakSet[Any] = weakref.WeakSet()


class _ProtocolError(Exception):
    """The peer broke PS3.8 inside a message the lane had taken."""


@dataclass(frozen=True)
class StoreCommand:
    """The elements of a C-STORE-RQ command set (PS3.7 9.3.1.1) the lane needs.

    Built by :func:`decode_store_command`, which returns None for anything else.
    """

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae: str | None
    move_originator_id: int | None

    def __post_init__(self) -> None:
        if not 0 <= self.message_id <= 0xFFFF:
            raise ValueError(f"Message ID {self.message_id} out of range")
        if not self.sop_class_uid or not self.sop_instance_uid:
            raise ValueError("Affected SOP Class and Instance UIDs are required")


def _text(value: bytes, pad: bytes) -> str | None:
    try:
        return value.rstrip(pad).decode("ascii")
    except UnicodeDecodeError:
        return None


def decode_store_command(raw: bytes | memoryview) -> StoreCommand | None:
    """A C-STORE-RQ with a data set, from its command set (Implicit VR Little Endian).

    Returns None for any other command, and for one with an element this does not
    expect, an odd length or a value that is not ASCII: pynetdicom's decoder then
    takes the message, as it did before the lane.
    """
    values: dict[int, bytes] = {}
    at, end = 0, len(raw)
    while at < end:
        if at + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(raw, at)
        at += 8
        if group != 0 or at + length > end or element in values:
            return None
        values[element] = bytes(raw[at:at + length])
        at += length
    try:
        if _us(values[0x0100]) != 0x0001 or _us(values[0x0800]) == 0x0101:
            return None  # not a C-STORE-RQ, or one without a data set
        if set(values) - {0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031}:
            return None
        sop_class = _text(values[0x0002], b"\x00 ")
        sop_instance = _text(values[0x1000], b"\x00 ")
        move_ae = _text(values[0x1030], b" ") if 0x1030 in values else None
        if sop_class is None or sop_instance is None or (0x1030 in values and move_ae is None):
            return None
        return StoreCommand(
            message_id=_us(values[0x0110]),
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            priority=_us(values[0x0700]) if 0x0700 in values else 0,
            move_originator_ae=move_ae.strip() if move_ae else None,
            move_originator_id=_us(values[0x1031]) if 0x1031 in values else None,
        )
    except (KeyError, ValueError, struct.error):
        return None


def command_problem(raw: bytes | memoryview, context_id: int, accepted: Any) -> str | None:
    """Why a whole command set cannot be served, or None to let pynetdicom decode it.

    pynetdicom meets a message on a presentation context it never accepted with an
    exception in its receive thread; the lane refuses it first (A-ABORT). What a command
    set lacks is the rule of :func:`dicom_node.wire.bounded_wire.command_set_problem`, which
    the node's sockets apply in both receive modes before the lane reads the bytes.
    """
    if context_id not in accepted:
        return f"a message on presentation context {context_id}, which was not accepted"
    return command_set_problem(bytes(raw))[0]


def _us(value: bytes) -> int:
    if len(value) != 2:
        raise ValueError("US must be 2 bytes")
    return int.from_bytes(value, "little")


@dataclass(frozen=True, slots=True)
class _Message:
    """A C-STORE the lane has taken: its request primitive, context and spool."""

    context_id: int
    command: StoreCommand
    request: C_STORE
    spool_file: spooling.SpoolFile


class _Lane:
    """The lane of one association; lives in its DUL thread only."""

    def __init__(self, dul: Any, sock: socket.socket) -> None:
        self.dul = dul
        self.assoc = dul.assoc
        self.sock = sock
        self.buffer = memoryview(bytearray(_BUFFER))
        self.message: _Message | None = None
        #: Bytes of the current PDU not read yet.
        self.left = 0
        self.stores = 0

    # ------------------------------------------------------------------ reading
    def _read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the socket (blocking, bounded by the network timeout)."""
        got, want = 0, len(view)
        while got < want:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionResetError("peer closed the connection in the middle of a PDU")
            got += n

    def _read(self, n: int) -> memoryview:
        view = self.buffer[:n]
        self._read_into(view)
        return view

    def read_pdu(self) -> bool:
        """Read the next PDU if it is P-DATA-TF; False leaves it to pynetdicom.

        Called when the socket has data. In the middle of a message the lane reads
        every P-DATA-TF PDU; anything else ends the message unacknowledged. Between
        messages it reads the PDU's first fragment: a C-STORE-RQ command set the lane
        takes, anything else it hands to pynetdicom's DUL as pynetdicom would have read
        it (the lane never only peeks and waits: a peer may wait for the ACK that
        reading sends).
        """
        if self.dul.state_machine.current_state != "Sta6":
            self._drop("the association left the data transfer state")
            return False
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            first = b""
        if first != bytes((_P_DATA_TF,)):
            self._drop("the peer sent something other than data in the middle of a data set")
            return False  # pynetdicom reads it (or meets the same error) and reports it
        try:
            if self.message is None:
                if not self._open_message():
                    return True
            else:
                self._consume_pdu()
            while self.message is not None and self._next_ready():
                self._consume_pdu()
        except _ProtocolError as exc:
            LOG.warning("association with %s: %s; aborting it (nothing of the message was "
                        "acknowledged)", self.assoc.requestor.ae_title, exc)
            self._drop(str(exc))
            try:
                self._skip_rest()
            except (OSError, ValueError):
                pass  # the abort goes out all the same
            self.dul.event_queue.put("Evt19")  # invalid PDU: pynetdicom sends the A-ABORT
        except (OSError, ValueError):
            self._drop("the connection failed during a transfer")
            self.dul.event_queue.put("Evt17")  # transport closed, as pynetdicom reports it
        return True

    def _next_ready(self) -> bool:
        """Read on without pynetdicom's loop: the next PDU is there and nothing waits."""
        if self.dul._kill_thread or self.dul.to_provider_queue.queue:  # noqa: SLF001
            return False
        try:
            ready, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(ready)  # read_pdu's checks apply to it when it is not P-DATA-TF

    def _open_message(self) -> bool:
        """Read a PDU's first fragment; take a C-STORE-RQ, else hand the PDU over."""
        header = bytes(self._read(6))
        pdu_length = _PDU_HEADER.unpack(header)[2]
        if pdu_length < 6:
            self._hand_over(header, pdu_length)
            return False
        pdv = bytes(self._read(6))
        item_length, context_id, control = _PDV_HEADER.unpack(pdv)
        command_length = item_length - 2
        prefix = header + pdv
        if control & 0x03 != 0x03 or not 0 < command_length <= min(_MAX_COMMAND, pdu_length - 6):
            self._hand_over(prefix, pdu_length - 6)
            return False  # not a whole command set in the first fragment
        raw = bytes(self._read(command_length))
        message = self._take(context_id, raw)
        if message is None:
            # The last fragment of a command set pynetdicom is assembling is not a whole one.
            problem = None if self.assoc.dimse.message is not None else \
                command_problem(raw, context_id, self.assoc._accepted_cx)  # noqa: SLF001
            if problem is not None:
                self.left = pdu_length - 6 - command_length
                raise _ProtocolError(problem)
            self._hand_over(prefix + raw, pdu_length - 6 - command_length)
            return False
        self.message = message
        self._consume_items(pdu_length - 6 - command_length)
        return True

    def _hand_over(self, prefix: bytes, left: int) -> None:
        """Finish reading a PDU the lane does not take and pass it on as pynetdicom would."""
        dul = self.dul
        bytestream = bytearray(prefix)
        if left > 0:
            bytestream += dul.socket.recv(left)
            if len(bytestream) != len(prefix) + left:
                LOG.error("Connection closed before the entire PDU was received")
                dul.event_queue.put("Evt17")
                return
        try:
            pdu, event = dul._decode_pdu(bytestream)  # noqa: SLF001 - the DUL's own decoder
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU aborts
            LOG.warning("association with %s: malformed PDU, aborted (%s: %.200s)",
                        self.assoc.requestor.ae_title, type(exc).__name__, exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)  # noqa: SLF001

    def _take(self, context_id: int, raw: bytes) -> _Message | None:
        """A message for a C-STORE-RQ command set the lane can take, else None."""
        assoc = self.assoc
        # Until pynetdicom has run EVT_ACCEPTED's handlers and marked the association
        # established (its thread does, after the A-ASSOCIATE-AC has gone out), a fast
        # peer's first request is pynetdicom's: it serves requests only after that.
        if not assoc.is_established or assoc._sent_release:  # noqa: SLF001
            return None
        if assoc.dimse.message is not None:
            return None  # pynetdicom is assembling a message: it keeps it
        command = decode_store_command(raw)
        if command is None:
            return None
        context = assoc._accepted_cx.get(context_id)  # noqa: SLF001
        if context is None or not _is_storage(assoc, command.sop_class_uid):
            return None
        request = _request(command, context_id)
        folder = spooling.spool_dir(assoc)
        if request is None or folder is None:
            return None
        spool_file = spooling.open_spool(assoc, folder)
        spool_file.write_file_meta(command.sop_class_uid, command.sop_instance_uid,
                                   str(context.transfer_syntax[0]))
        # pynetdicom's NTF protocol is wrong for a file (its write() returns bytes, not the
        # count) and asks a BufferedWriter; SpoolFile has the name, write, file.flush, close.
        request._dataset_file = spool_file  # type: ignore[assignment]  # noqa: SLF001
        request._dataset_path = spool_file.spool.path  # noqa: SLF001
        return _Message(context_id, command, request, spool_file)

    def _consume_pdu(self) -> None:
        """Read one P-DATA-TF PDU of the current message."""
        # Data is flowing: pynetdicom's idle timer (network_timeout_s) restarts per PDU,
        # as its own loop does, or a transfer longer than the timeout read in one go
        # (a 256 MiB instance) was aborted as idle.
        self.dul._idle_timer.restart()  # noqa: SLF001
        pdu_type, _, pdu_length = _PDU_HEADER.unpack(self._read(6))
        if pdu_type != _P_DATA_TF:
            raise _ProtocolError(f"PDU type 0x{pdu_type:02X} where data was expected")
        self._consume_items(pdu_length)

    def _consume_items(self, left: int) -> None:
        """Read the presentation data values in the ``left`` bytes of the PDU."""
        self.left = left
        while self.left:
            if self.message is None:
                self._hand_rest(self.left)  # another message follows in the same PDU
                self.left = 0
                return
            if self.left < 6:
                raise _ProtocolError("P-DATA-TF PDU ends inside a fragment header")
            item_length, context_id, control = _PDV_HEADER.unpack(self._read(6))
            self.left -= 6
            data_length = item_length - 2
            if data_length < 0 or data_length > self.left:
                raise _ProtocolError("presentation data value longer than its PDU")
            if control & 0x01:
                raise _ProtocolError("a command fragment inside a data set")
            if context_id != self.message.context_id:
                raise _ProtocolError(f"data set fragment on context {context_id}, "
                                     f"command on {self.message.context_id}")
            self.left -= data_length
            self._fragment(control, data_length)

    def _skip_rest(self) -> None:
        """Read past the rest of a PDU found invalid, so the next read starts at a PDU."""
        left, self.left = self.left, 0
        while left:
            left -= len(self._read(min(left, _BUFFER)))

    def _fragment(self, control: int, length: int) -> None:
        message = self.message
        assert message is not None
        spool = message.spool_file.spool
        while length:
            chunk = self._read(min(length, _BUFFER))
            spool.write(chunk)
            length -= len(chunk)
        if control & 0x02:
            self.message = None
            self._answer(message)

    def _hand_rest(self, left: int) -> None:
        """Give the rest of a PDU (another message) to pynetdicom's DIMSE layer (DT-2)."""
        rest = bytes(self._read(left)) if left <= _BUFFER else self._read_large(left)
        primitive = P_DATA()
        at = 0
        while at < len(rest):
            if at + 6 > len(rest):
                raise _ProtocolError("P-DATA-TF PDU ends inside a fragment header")
            item_length, context_id, _ = _PDV_HEADER.unpack_from(rest, at)
            if item_length < 2 or at + 4 + item_length > len(rest):
                raise _ProtocolError("presentation data value longer than its PDU")
            primitive.presentation_data_value_list.append(
                (context_id, rest[at + 5:at + 4 + item_length]))
            at += 4 + item_length
        self.assoc.dimse.receive_primitive(primitive)

    def _read_large(self, n: int) -> bytes:
        """``n`` bytes, the buffer growing with what arrives (never sized from ``n``)."""
        out = bytearray()
        while len(out) < n:
            out += self._read(min(n - len(out), _BUFFER))
        return bytes(out)

    # ---------------------------------------------------------------- answering
    def _answer(self, message: _Message) -> None:
        """Call the ``EVT_C_STORE`` handler as pynetdicom would, then send its status."""
        assoc, request = self.assoc, message.request
        context = assoc._accepted_cx[message.context_id]  # noqa: SLF001
        try:
            status: Any = evt.trigger(assoc, evt.EVT_C_STORE,
                                      {"request": request, "context": context.as_tuple})
        except Exception:  # noqa: BLE001 - pynetdicom answers a failing handler the same way
            LOG.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            status = HANDLER_FAILED
        finally:
            message.spool_file.close()
            message.spool_file.spool.discard()  # nothing if the archive took it
        self.stores += 1
        if not assoc.is_established:
            return
        command = message.command
        encoded = None
        if type(status) is int and status in STORAGE_SERVICE_CLASS_STATUS:
            encoded = store_response.encode_store_response(
                command.sop_class_uid, command.sop_instance_uid, command.message_id, status)
            limit = assoc.dimse.maximum_pdu_size
            if limit and len(encoded) + 6 > limit:
                encoded = None
        if encoded is None or self.dul.to_provider_queue.queue:
            self._answer_by_pynetdicom(message, status)
            return
        pdv = _PDV_HEADER.pack(len(encoded) + 2, message.context_id, 0x03)
        self.dul.socket.send(_PDU_HEADER.pack(_P_DATA_TF, 0, len(pdv) + len(encoded)) + pdv + encoded)

    def _answer_by_pynetdicom(self, message: _Message, status: Any) -> None:
        """Queue the response through pynetdicom (odd statuses, or something queued first)."""
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message.command.message_id
        rsp.AffectedSOPInstanceUID = message.command.sop_instance_uid
        rsp.AffectedSOPClassUID = message.command.sop_class_uid
        rsp = StorageServiceClass(self.assoc).validate_status(status, rsp)
        self.assoc.dimse.send_msg(rsp, message.context_id)

    def _drop(self, why: str) -> None:
        """Give up a data set in progress: never acknowledged, and the association ends.

        Its spool stays registered with the association, so
        :func:`dicom_node.wire.fast_receive.spooling.discard_unclaimed` removes it (and says so) when the
        connection closes, as for a data set pynetdicom was receiving.
        """
        message, self.message = self.message, None
        if message is not None:
            LOG.debug("association with %s: data set %s left unfinished (%s)",
                      self.assoc.requestor.ae_title, message.command.sop_instance_uid, why)


def _is_storage(assoc: Any, sop_class_uid: str) -> bool:
    """True when pynetdicom would serve this SOP class with its Storage service class."""
    if assoc.acceptor.accepted_common_extended:
        return False  # pynetdicom maps those through the extended negotiation
    if _config.UNRESTRICTED_STORAGE_SERVICE:
        return True
    return uid_to_service_class(sop_class_uid) is StorageServiceClass


def _request(command: StoreCommand, context_id: int) -> C_STORE | None:
    """The C-STORE request primitive pynetdicom would build; None if it refuses a value."""
    request = C_STORE()
    try:
        request.MessageID = command.message_id
        request.AffectedSOPClassUID = command.sop_class_uid
        request.AffectedSOPInstanceUID = command.sop_instance_uid
        request.Priority = command.priority
        if command.move_originator_ae is not None:
            request.MoveOriginatorApplicationEntityTitle = command.move_originator_ae
        if command.move_originator_id is not None:
            request.MoveOriginatorMessageID = command.move_originator_id
    except (ValueError, TypeError):
        return None
    request.DataSet = BytesIO()
    request._context_id = context_id  # noqa: SLF001 - as message_to_primitive sets it
    return request


def _lane_of(dul: Any) -> _Lane | None:
    """The DUL's lane, made on first use; None when this association does not use one."""
    lane = dul.__dict__.get("_dicom_node_lane")
    if lane is not None:
        return lane or None
    assoc = dul.assoc
    sock = getattr(dul.socket, "socket", None)
    usable = (
        assoc.is_acceptor
        and assoc.ae in _lane_aes
        and type(sock) in (socket.socket, GuardedSocket)  # not TLS: MSG_PEEK, select see raw bytes
        and not any(assoc.get_handlers(event) for event in _WATCHING)
        and assoc.get_handlers(evt.EVT_C_STORE)[0] is not None
    )
    if not usable:
        dul._dicom_node_lane = False
        return None
    assert isinstance(sock, socket.socket)  # usable: a plain socket or a GuardedSocket
    dul._dicom_node_lane = lane = _Lane(dul, sock)
    return lane


def _read_pdu_data(self: Any) -> None:
    """``DULServiceProvider._read_pdu_data``: the lane's PDUs, else pynetdicom's path."""
    if self.state_machine.current_state == "Sta6":
        lane = _lane_of(self)
        if lane is not None and lane.read_pdu():
            return
    _shipped_read_pdu_data(self)


def stores(assoc: Any) -> int:
    """How many C-STOREs the lane has answered on ``assoc`` (0 when it had no lane)."""
    lane = assoc.dul.__dict__.get("_dicom_node_lane")
    return lane.stores if lane else 0


def _compatible() -> str | None:
    read = getattr(_dul.DULServiceProvider, "_read_pdu_data", None)
    if read is None:
        return "DULServiceProvider has no _read_pdu_data"
    probe = _dul.DULServiceProvider.__init__.__code__.co_names
    for name in ("_recv_pdu", "event_queue", "to_provider_queue", "state_machine", "_idle_timer"):
        if name not in probe:
            return f"DULServiceProvider has no {name}"
    if not hasattr(C_STORE(), "_dataset_file"):
        return "C_STORE has no _dataset_file"
    return None


def install(ae: Any) -> bool:
    """Let the associations ``ae`` accepts receive C-STOREs in the lane (idempotent).

    Needs :func:`dicom_node.wire.fast_receive.spooling.install` for the same AE (the lane writes into its
    spools).

    Returns
    -------
    bool
        True when the lane is on for ``ae``; False when this pynetdicom does not fit
        (logged at WARNING) or spooling is off.
    """
    global _installed, _shipped_read_pdu_data
    with _install_lock:
        if not _installed:
            problem = _compatible()
            if problem is not None:
                LOG.warning("C-STORE lane not installed (%s): pynetdicom receives every PDU",
                            problem)
                return False
            _shipped_read_pdu_data = _dul.DULServiceProvider._read_pdu_data  # noqa: SLF001
            _dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
            _installed = True
        if not spooling.spools_for(ae):
            return False
        _lane_aes.add(ae)
        return True
