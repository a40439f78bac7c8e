"""Storage SCP (C-STORE): validate, write durably, index, answer. Nothing else.

Inference is not started here: completion of a series is decided later by the quiet
period rule (DESIGN decision 3), never by association release.
"""

from __future__ import annotations

import logging
import struct

from pydicom.filewriter import write_file_meta_info
from pydicom.filebase import DicomBytesIO
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.events import Event

from dicom_node import statuses
from dicom_node.handlers.association import StudyLedger
from dicom_node.metrics import NodeMetrics
from twin_archive import (
    Archive,
    IncomingInstance,
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
)

LOG = logging.getLogger(__name__)


def _file_meta_bytes(event: Event, calling_ae: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information as pydicom writes them (the slow path)."""
    meta = event.file_meta
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128)
    buf.write(b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


_PREAMBLE = b"\x00" * 128 + b"DICM"
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _short_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                     calling_ae: str) -> bytes | None:
    """Preamble, ``DICM`` and File Meta Information for a received instance, by hand.

    Byte for byte what :func:`_file_meta_bytes` gets from pydicom (a test compares
    them) in a few microseconds instead of a few hundred: Explicit VR Little Endian,
    UIDs padded with NUL, the AE title with a space, pynetdicom's implementation UID
    and version name, (0002,0016) only when the calling AE title is known.

    Returns
    -------
    bytes or None
        None when a value is not plain ASCII or too long for its VR; the caller then
        takes pydicom's path, which validates and reports it.
    """
    values = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling_ae)
    if not all(v.isascii() and len(v) <= 64 for v in values):
        return None
    parts = [
        _META_VERSION,
        _short_element(0x0002, b"UI", sop_class_uid.encode(), b"\x00"),
        _short_element(0x0003, b"UI", sop_instance_uid.encode(), b"\x00"),
        _short_element(0x0010, b"UI", transfer_syntax_uid.encode(), b"\x00"),
        _short_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode(), b"\x00"),
        _short_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "),
    ]
    if calling_ae:
        parts.append(_short_element(0x0016, b"AE", calling_ae.encode(), b" "))
    body = b"".join(parts)
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + group_length + body


def handle_store(event: Event, archive: Archive, metrics: NodeMetrics,
                 ledger: StudyLedger | None = None) -> int:
    """Store one instance in the twin archive and return the C-STORE status.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_C_STORE`` event.
    archive : twin_archive.Archive
        Where the instance is filed.
    metrics : NodeMetrics
        Counters updated on each outcome.
    ledger : StudyLedger, optional
        Counts the instance under its study for the association's audit event (in
        memory; the audit is written when the association closes, not here).
    """
    assoc = event.assoc
    calling_ae = (assoc.requestor.ae_title or "").strip()
    peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    request = event.request
    # The data set as it came off the wire (never decoded here), and the file meta
    # built from the request: no pydicom Dataset on this path.
    dataset = event.encoded_dataset(include_meta=False)
    transfer_syntax = str(event.context.transfer_syntax)
    sop_class_uid = str(request.AffectedSOPClassUID)
    sop_instance_uid = str(request.AffectedSOPInstanceUID)
    file_meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
    incoming = IncomingInstance(
        file_meta=file_meta if file_meta is not None else _file_meta_bytes(event, calling_ae),
        dataset=dataset,
        transfer_syntax_uid=transfer_syntax,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        calling_ae=calling_ae,
    )
    try:
        result = archive.store(incoming)
    except InvalidInstanceError as exc:
        LOG.warning("C-STORE from %s (%s) refused, cannot understand: %s", calling_ae, peer, exc)
        metrics.store_failed("cannot_understand")
        return statuses.CANNOT_UNDERSTAND
    except SopClassMismatchError as exc:
        LOG.warning("C-STORE from %s (%s) refused, data set does not match SOP class: %s",
                    calling_ae, peer, exc)
        metrics.store_failed("sop_class_mismatch")
        return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    except OutOfResourcesError as exc:
        LOG.error("C-STORE from %s (%s) refused, out of resources: %s", calling_ae, peer, exc)
        metrics.store_failed("out_of_resources")
        return statuses.OUT_OF_RESOURCES
    size = len(incoming.file_meta) + len(dataset)
    metrics.stored(size, result.outcome.value)
    if ledger is not None:
        ledger.add(event, result.study_uid, size)
    LOG.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling_ae, result.outcome.value)
    return statuses.SUCCESS
