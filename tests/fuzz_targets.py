"""Fuzz targets for the node's front door (issue 13 item 8), and their seed inputs.

Each target takes the bytes a peer could send and runs them through what the node
runs them through; it returns quietly when the node would refuse them the way it
means to (an A-ABORT, a C000) and raises anything else, which atheris reports as a
crash:

* ``pdu`` - the PDU stream watch (:class:`dicom_node.wire.bounded_wire.PduWatch`, with its
  DIMSE framing rules, whose refusals are ``FramingError``), the
  fast path's command-set decoder and its refusal of broken command sets
  (:mod:`dicom_node.wire.fast_receive.store_lane`), and pynetdicom's P-DATA-TF decoder;
* ``association`` - an A-ASSOCIATE-RQ: pynetdicom's decoder (whose errors its DUL
  answers with an A-ABORT), then what runs in the node's threads after it: the
  primitive, and the presentation context negotiation against the node's contexts;
* ``store`` - a data set as received: the walk to its end
  (:mod:`twin_archive.dataset_walk`) and ``Ingest.store`` (header parse, validation,
  durable write, index), which may only refuse with its own errors.

Used by ``tests/test_fuzz.py`` (a bounded run and the regression inputs) and by
``benchmarks/fuzz.py`` (longer runs).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

TARGETS = ("pdu", "association", "store")


def _setup_pdu() -> Callable[[bytes], None]:
    from pynetdicom.pdu import P_DATA_TF

    from dicom_node.wire.bounded_wire import FramingError, PduTooLargeError, PduWatch
    from dicom_node.wire.fast_receive.store_lane import command_problem, decode_store_command

    accepted = {1: object(), 3: object()}

    def run(data: bytes) -> None:
        watch = PduWatch("fuzz", 4096, 60.0)
        try:
            watch.received(data)
        except (PduTooLargeError, FramingError):
            pass
        decode_store_command(data)
        command_problem(data, data[0] if data else 1, accepted)
        if len(data) >= 6 and data[0] == 0x04:
            try:
                pdu = P_DATA_TF()
                pdu.decode(data)
            except Exception:  # noqa: BLE001 - pynetdicom's DUL answers these with an A-ABORT
                return
            # What the DUL does next with a decoded PDU (not guarded by pynetdicom).
            pdu.to_primitive()

    return run


def _setup_association() -> Callable[[bytes], None]:
    from pynetdicom import AllStoragePresentationContexts
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.presentation import build_context, negotiate_as_acceptor

    from dicom_node.wire.handlers.association import request_problem
    from dicom_node.wire.server import TRANSFER_SYNTAXES

    supported = [build_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
                 for cx in AllStoragePresentationContexts[:8]]

    def run(data: bytes) -> None:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(data)
        except Exception:  # noqa: BLE001 - pynetdicom's DUL answers these with an A-ABORT
            return
        try:
            primitive = pdu.to_primitive()
        except Exception:  # noqa: BLE001 - since issue 13: the node's excepthook aborts
            return
        if request_problem(primitive) is not None:
            return  # the node aborts it (EVT_REQUESTED)
        negotiate_as_acceptor(primitive.presentation_context_definition_list, supported, {})

    return run


def _setup_store() -> Callable[[bytes], None]:
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    from twin_archive import (
        Archive,
        IncomingInstance,
        InvalidInstanceError,
        OutOfResourcesError,
        SopClassMismatchError,
    )
    from twin_archive.dataset_walk import walk

    folder = Path(tempfile.mkdtemp(prefix="fuzz-archive-"))
    archive = Archive(folder)
    sop_uid = "1.2.826.0.1.3680043.8.498.1"

    def run(data: bytes) -> None:
        try:
            walk(lambda at, n: data[at:at + n], len(data), implicit=False, little=True)
        except InvalidInstanceError:
            pass
        try:
            walk(lambda at, n: data[at:at + n], len(data), implicit=True, little=True)
        except InvalidInstanceError:
            pass
        incoming = IncomingInstance(
            file_meta=b"", dataset=data, transfer_syntax_uid=ExplicitVRLittleEndian,
            sop_class_uid=CTImageStorage, sop_instance_uid=sop_uid, calling_ae="FUZZ", spool=None)
        try:
            archive.ingest.store(incoming)
        except (InvalidInstanceError, SopClassMismatchError, OutOfResourcesError):
            pass

    return run


def setup(target: str) -> Callable[[bytes], None]:
    """The one-input function of ``target`` (imports and state made once)."""
    return {"pdu": _setup_pdu, "association": _setup_association, "store": _setup_store}[target]()


def seeds(target: str) -> list[bytes]:
    """Valid inputs of ``target``, the fuzzer's starting corpus."""
    from io import BytesIO

    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from node_harness import small_ct

    ds = small_ct(size=4, patient_id="FUZZ")
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    if target == "store":
        nested = small_ct(size=4, patient_id="FUZZ")
        nested.SOPInstanceUID = ds.SOPInstanceUID
        nested.ReferencedSeriesSequence = [small_ct(size=2)]
        del nested.ReferencedSeriesSequence[0].PixelData
        return [encode(ds, False, True), encode(nested, False, True)]
    if target == "pdu":
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = BytesIO(encode(ds, False, True))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        out = []
        for primitive in msg.encode_msg(1, 512):
            from pynetdicom.pdu import P_DATA_TF

            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            out.append(pdu.encode())
        command = out[0][12:]
        return [*out[:3], command]
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "FUZZ"
    primitive.called_ae_title = "DICOM_NODE"
    contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    contexts[0].context_id = 1
    primitive.presentation_context_definition_list = contexts
    item = MaximumLengthNotification()
    item.maximum_length_received = 16382
    primitive.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    rq = pdu.encode()
    return [rq, rq[:74] + struct.pack(">H", 0xFFF0) + rq[76:]]
