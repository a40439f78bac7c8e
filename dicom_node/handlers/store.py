"""Storage SCP (C-STORE): validate, write durably, index, answer. Nothing else.

Inference is not started here: completion of a series is decided later by the quiet
period rule (DESIGN decision 3), never by association release.
"""

from __future__ import annotations

import logging

from pydicom.filewriter import write_file_meta_info
from pydicom.filebase import DicomBytesIO
from pynetdicom.events import Event

from dicom_node import statuses
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
    meta = event.file_meta
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    buf = DicomBytesIO()
    buf.write(b"\x00" * 128)
    buf.write(b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def handle_store(event: Event, archive: Archive, metrics: NodeMetrics) -> int:
    """Store one instance in the twin archive and return the C-STORE status.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_C_STORE`` event.
    archive : twin_archive.Archive
        Where the instance is filed.
    metrics : NodeMetrics
        Counters updated on each outcome.
    """
    assoc = event.assoc
    calling_ae = (assoc.requestor.ae_title or "").strip()
    peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    request = event.request
    dataset = event.encoded_dataset(include_meta=False)
    incoming = IncomingInstance(
        file_meta=_file_meta_bytes(event, calling_ae),
        dataset=dataset,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=str(request.AffectedSOPInstanceUID),
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
    metrics.stored(len(incoming.file_meta) + len(dataset), result.outcome.value)
    LOG.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling_ae, result.outcome.value)
    return statuses.SUCCESS
