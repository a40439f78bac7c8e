"""Storage SCP (C-STORE): validate, write durably, index, answer. Nothing else.

Inference is not started here: completion of a series is decided later by the quiet
period rule (DESIGN decision 3), never by association release.
"""

from __future__ import annotations

import logging
from typing import cast

from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.wire import statuses
from dicom_node.wire.fast_receive import encode_file_meta, pydicom_file_meta, spool_of
from dicom_node.wire.handlers.association import StudyLedger
from dicom_node.wire.metrics import NodeMetrics
from twin_archive import (
    IncomingInstance,
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
)
from twin_archive.ingest import Ingest

LOG = logging.getLogger(__name__)


def _name_of(uid: str) -> str:
    """``Verification`` for its UID; the UID itself when pydicom has no name for it."""
    name = UID(uid).name
    return name if name and name != uid else uid


def handle_store(event: Event, ingest: Ingest, metrics: NodeMetrics,
                 ledger: StudyLedger | None = None) -> int:
    """Store one instance in the twin archive and return the C-STORE status.

    A C-STORE whose SOP class is not the abstract syntax of its presentation context
    (an image sent on the Verification context) is refused 0122 before anything is read.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The ``EVT_C_STORE`` event.
    ingest : twin_archive.ingest.Ingest
        The archive's ingest path, where the instance is filed.
    metrics : NodeMetrics
        Counters updated on each outcome.
    ledger : StudyLedger, optional
        Counts the instance under its study for the association's audit event (in
        memory; the audit is written when the association closes, not here).
    """
    assoc = event.assoc
    calling_ae = (assoc.requestor.ae_title or "").strip()
    peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
    request = cast(C_STORE, event.request)  # EVT_C_STORE's request
    transfer_syntax = str(event.context.transfer_syntax)
    sop_class_uid = str(request.AffectedSOPClassUID)
    sop_instance_uid = str(request.AffectedSOPInstanceUID)
    context_class = str(event.context.abstract_syntax)
    if context_class != sop_class_uid:
        LOG.warning("C-STORE from %s (%s) refused: its SOP class %s is not the abstract syntax "
                    "of presentation context %d (%s)", calling_ae, peer, sop_class_uid,
                    event.context.context_id, _name_of(context_class))
        metrics.store_failed("context_mismatch")
        return statuses.REFUSED_SOP_CLASS_NOT_SUPPORTED
    spool = spool_of(request)
    if spool is not None:
        # Written to the archive's temporary folder while it arrived (dicom_node/fast_receive).
        file_meta, dataset = b"", b""
    else:
        # The data set as it came off the wire (never decoded here): no pydicom Dataset.
        dataset, spool = event.encoded_dataset(include_meta=False), None
        file_meta = (encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae)
                     or pydicom_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae))
    incoming = IncomingInstance(
        file_meta=file_meta,
        dataset=dataset,
        transfer_syntax_uid=transfer_syntax,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        calling_ae=calling_ae,
        spool=spool,
    )
    try:
        result = ingest.store(incoming)
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
    metrics.stored(incoming.size, result.outcome.value)
    if ledger is not None:
        ledger.add(event, result.study_uid, incoming.size)
    if result.warning:
        LOG.warning("C-STORE from %s (%s) stored with a warning, data set does not match its "
                    "SOP class: %s", calling_ae, peer, result.warning)
        return statuses.WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS
    LOG.debug("C-STORE %s from %s: %s", result.sop_instance_uid, calling_ae, result.outcome.value)
    return statuses.SUCCESS
