"""The C-STORE Success response, encoded by hand.

pynetdicom sends every DIMSE response by building a pydicom Dataset for the command
set (each attribute set through pydicom's validation), encoding it with pydicom's
writer, and cutting it into P-DATA fragments: a tenth of the node's time per 0.5 MB
instance over one association (figures in ``benchmarks/README.md``). A Success response
to a C-STORE has seven fixed elements (PS3.7 9.3.1.2), always Implicit VR Little
Endian (PS3.7 6.3.1), so :func:`encode_store_success` writes them directly (a test
checks it byte for byte against pynetdicom's own encoding).

:func:`install` wraps ``DIMSEServiceProvider.send_msg``: a C-STORE response with
status 0x0000 and no optional element, on an association the node accepted, with no
handler bound to ``EVT_DIMSE_SENT``, and small enough for one PDU, is sent as one
P-DATA with that command set; everything else goes through pynetdicom as shipped.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.wire.statuses import SUCCESS

_UL = struct.Struct("<HHLL")
_US = struct.Struct("<HHLH")
#: The optional response elements; any of them set means the slow path.
_OPTIONAL = ("OffendingElement", "ErrorComment")


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHL", 0x0000, element, len(raw)) + raw


def encode_store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int,
                          status: int) -> bytes:
    """The command set of a C-STORE-RSP with ``status`` and no optional element."""
    body = b"".join((
        _ui(0x0002, sop_class_uid),
        _US.pack(0x0000, 0x0100, 2, 0x8001),  # Command Field: C-STORE-RSP
        _US.pack(0x0000, 0x0120, 2, message_id),  # Message ID Being Responded To
        _US.pack(0x0000, 0x0800, 2, 0x0101),  # Command Data Set Type: no data set
        _US.pack(0x0000, 0x0900, 2, status),
        _ui(0x1000, sop_instance_uid),
    ))
    return _UL.pack(0x0000, 0x0000, 4, len(body)) + body


def encode_store_success(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    """The command set of a C-STORE-RSP with status Success (Implicit VR Little Endian)."""
    return encode_store_response(sop_class_uid, sop_instance_uid, message_id, SUCCESS)


def _fast_command(dimse: Any, primitive: Any) -> bytes | None:
    """The encoded command set when ``primitive`` qualifies for the fast path, else None."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.Status != SUCCESS or not dimse.assoc.is_acceptor:
        return None
    if any(getattr(primitive, name, None) is not None for name in _OPTIONAL):
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if not sop_class or not sop_instance or not (sop_class.isascii() and sop_instance.isascii()):
        return None
    if dimse.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        return None  # somebody wants to see the message object: pynetdicom's path
    command = encode_store_success(sop_class, sop_instance, primitive.MessageIDBeingRespondedTo)
    limit = dimse.maximum_pdu_size
    if limit and len(command) + 6 > limit:
        return None
    return command


_shipped_send_msg = DIMSEServiceProvider.send_msg


def _send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    command = _fast_command(self, primitive)
    if command is None:
        _shipped_send_msg(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    self.dul.send_pdu(pdata)


def install() -> None:
    """Send C-STORE Success responses by hand (idempotent)."""
    DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
