"""Storage Commitment Push Model (PS3.4 Annex J), the node as its SCU.

After a batch of C-STOREs to a destination with ``confirm = "commitment"``, the
sender asks the archive to commit to them: one N-ACTION (Action Type 1, PS3.4 J.3.2)
on the well-known SOP Instance, listing each object's SOP Class and Instance UIDs under
a new Transaction UID. The archive answers later with an N-EVENT-REPORT (Event Type 1:
all committed; 2: some failed, PS3.4 J.3.3), on the same association while it is open
or on a new association to the node's listener, for which the listener accepts the
Storage Commitment Push Model SOP class in both roles. :func:`handle_report` takes it
in either place and records it (:class:`~dicom_node.queue.confirmations.ConfirmationLedger`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.association import Association

from dicom_node.queue.confirmations import ConfirmationLedger
from dicom_node.wire.services import Service
from dicom_node.wire.statuses import COMMITMENT_PROCESSING_FAILURE, SUCCESS

LOG = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.5).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: N-ACTION Action Type ID "Request Storage Commitment" (PS3.4 J.3.2.1).
ACTION_REQUEST = 1
#: N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3.1): all committed / failures exist.
EVENT_ALL_COMMITTED, EVENT_FAILURES = 1, 2


@dataclass(frozen=True, kw_only=True, slots=True)
class Report:
    """One Storage Commitment result (an N-EVENT-REPORT's Event Information)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: Mapping[str, str]  # SOP Instance UID -> reason


def new_transaction_uid() -> str:
    """A Transaction UID for one request (recorded before the request goes out)."""
    return str(generate_uid())


def request(assoc: Association, uid: str, objects: Sequence[tuple[str, str]]) -> int | None:
    """Send one N-ACTION asking the peer to commit to ``objects`` ((class, instance)
    UIDs) under Transaction UID ``uid``; returns its status (None: no answer)."""
    ds = Dataset()
    ds.TransactionUID = uid
    items = []
    for sop_class, sop_instance in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    status, _ = assoc.send_n_action(ds, ACTION_REQUEST, STORAGE_COMMITMENT,
                                    STORAGE_COMMITMENT_INSTANCE)
    return int(status.Status) if "Status" in status else None


def accepts_commitment(assoc: Association) -> bool:
    """True when the peer accepted the Storage Commitment context on ``assoc``."""
    return any(str(cx.abstract_syntax) == STORAGE_COMMITMENT for cx in assoc.accepted_contexts)


def parse_report(info: Dataset) -> Report:
    """The result an N-EVENT-REPORT's Event Information carries.

    Raises
    ------
    ValueError
        If it has no Transaction UID.
    """
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("a Storage Commitment report without a Transaction UID")
    committed = tuple(str(i.ReferencedSOPInstanceUID)
                      for i in info.get("ReferencedSOPSequence", []) or []
                      if "ReferencedSOPInstanceUID" in i)
    failed = {str(i.ReferencedSOPInstanceUID): _reason(i)
              for i in info.get("FailedSOPSequence", []) or [] if "ReferencedSOPInstanceUID" in i}
    return Report(transaction_uid=uid, committed=committed, failed=failed)


def _reason(item: Dataset) -> str:
    code = item.get("FailureReason")
    return f"failure reason 0x{int(code):04X}" if code is not None else "no reason given"


class ReportInbox:
    """Where the N-EVENT-REPORTs of one process go: the queue's confirmation ledger.

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory (its ``queue.sqlite``, opened at the first report).
    max_resends : int
        Re-sends of an object whose commitment failed before it is held.
    ledger : ConfirmationLedger, optional
        The ledger to record in (the sender's); by default one on a connection of its own.
    """

    def __init__(self, data_dir: Path | str, *, max_resends: int,
                 ledger: ConfirmationLedger | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.max_resends = max_resends
        self._ledger = ledger
        self._lock = threading.Lock()
        self.received = threading.Event()  # set at each report (the sender may wait on it)

    def ledger(self) -> ConfirmationLedger:
        with self._lock:
            if self._ledger is None:
                from dicom_node.queue.jobs import connect_queue

                self._ledger = ConfirmationLedger(connect_queue(self.data_dir))
            return self._ledger

    def take(self, report: Report) -> tuple[int, int]:
        """Record ``report``; returns (confirmed, failed) rows."""
        done = self.ledger().report(report.transaction_uid, report.committed, report.failed,
                                    max_resends=self.max_resends)
        self.received.set()
        return done


def handle_report(event: object, inbox: ReportInbox) -> tuple[int, Dataset | None]:
    """``EVT_N_EVENT_REPORT``: a Storage Commitment result, recorded; Success.

    Reports of another SOP class, or that cannot be read, are answered with a
    processing failure (0110: the peer may send it again) and one warning line.
    """
    request_ = event.request  # type: ignore[attr-defined]
    who = event.assoc.remote["ae_title"]  # type: ignore[attr-defined]
    if str(request_.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        LOG.warning("N-EVENT-REPORT of SOP class %s from %s refused (0x%04X): not a Storage "
                    "Commitment report", request_.AffectedSOPClassUID, who,
                    COMMITMENT_PROCESSING_FAILURE)
        return COMMITMENT_PROCESSING_FAILURE, None
    try:
        report = parse_report(event.event_information)  # type: ignore[attr-defined]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # the peer's fault
        LOG.warning("storage commitment report from %s refused (0x%04X): cannot read it (%s)",
                    who, COMMITMENT_PROCESSING_FAILURE, exc)
        return COMMITMENT_PROCESSING_FAILURE, None
    try:
        confirmed, failed = inbox.take(report)
    except Exception:
        LOG.exception("storage commitment report from %s could not be recorded", who)
        return COMMITMENT_PROCESSING_FAILURE, None
    LOG.info("storage commitment report %s from %s: %d object(s) confirmed, %d failed",
             report.transaction_uid, who, confirmed, failed)
    return SUCCESS, None


def listener_service(data_dir: Path | str, *, max_resends: int) -> Service:
    """Storage Commitment reports on a new association (PS3.4 J.3.3), for the listener:
    the archive proposes itself as SCP of the SOP class, so the node accepts both roles;
    each report goes to the queue's confirmation ledger."""
    from pynetdicom import evt

    inbox = ReportInbox(data_dir, max_resends=max_resends)
    return Service(sop_class=STORAGE_COMMITMENT, scu_role=True, scp_role=True,
                   handlers=((evt.EVT_N_EVENT_REPORT, handle_report, [inbox]),),
                   name="Storage Commitment reports")
