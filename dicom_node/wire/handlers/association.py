"""Association notifications: who connected, who was refused, who aborted; their audit.

Audit events are written here, once per association (accepted or refused) and once per
study received on it (when the connection closes), never per instance: the C-STORE
handler only adds to a :class:`StudyLedger` in memory.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from pynetdicom.events import Event

from dicom_node.wire.handlers.admission import Admission
from dicom_node.wire.metrics import NodeMetrics
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome

LOG = logging.getLogger(__name__)


def _who(event: Event) -> str:
    req = event.assoc.requestor
    return f"{(req.ae_title or '').strip() or '?'} at {req.address}:{req.port}"


def peer_name(event: Event) -> str:
    """The peer as the audit log names it: ``AE@address``."""
    req = event.assoc.requestor
    return f"{(req.ae_title or '').strip() or '?'}@{req.address}"


def _uses_tls(event: Event) -> bool:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    return isinstance(sock, ssl.SSLSocket)


def audit_safely(audit: AuditLog | None, *args: Any, **kwargs: Any) -> None:
    """Record an audit event; a failing audit write is logged, never raised into pynetdicom."""
    if audit is None:
        return
    try:
        audit.record(*args, **kwargs)
    except Exception:
        LOG.exception("could not write the audit event %s", args[0] if args else "?")


class StudyLedger:
    """Studies received on each open association; written to the audit log when it closes.

    Parameters
    ----------
    audit : twin_archive.audit.AuditLog or None
        Where ``study-received`` events go (nothing is recorded when ``None``).
    """

    def __init__(self, audit: AuditLog | None) -> None:
        self.audit = audit
        self._lock = threading.Lock()
        self._open: dict[object, tuple[str, dict[str, list[int]]]] = {}
        self._ended: dict[object, str] = {}

    def mark(self, assoc: object, how: str) -> None:
        """Say how an association ends (e.g. aborted by the node's stop) before it closes."""
        with self._lock:
            if assoc in self._open:
                self._ended[assoc] = how

    def add(self, event: Event, study_uid: str, size: int) -> None:
        """Count one stored instance of ``study_uid`` on the event's association (cheap)."""
        assoc = event.assoc
        with self._lock:
            entry = self._open.get(assoc)
            if entry is None:
                entry = self._open[assoc] = (peer_name(event), {})
            counts = entry[1].setdefault(study_uid, [0, 0])
            counts[0] += 1
            counts[1] += size

    def flush(self, event: Event, ended: str) -> int:
        """Record one ``study-received`` event per study of the association; return how many."""
        with self._lock:
            entry = self._open.pop(event.assoc, None)
            ended = self._ended.pop(event.assoc, ended)
        if entry is None:
            return 0
        who, studies = entry
        for study_uid, (instances, size) in studies.items():
            audit_safely(self.audit, AuditEvent.STUDY_RECEIVED, AuditOutcome.SUCCESS, who,
                         study_uid, {"instances": instances, "bytes": size, "association": ended})
        return len(studies)

    def open_associations(self) -> int:
        """Associations with instances not yet recorded."""
        with self._lock:
            return len(self._open)


def handle_accepted(event: Event, metrics: NodeMetrics, audit: AuditLog | None = None) -> None:
    """Log, count and audit an accepted association."""
    metrics.association("accepted")
    LOG.info("association accepted from %s", _who(event))
    audit_safely(audit, AuditEvent.ASSOCIATION_ACCEPTED, AuditOutcome.SUCCESS, peer_name(event),
                 (event.assoc.acceptor.ae_title or "").strip(),
                 {"port": event.assoc.requestor.port, "tls": _uses_tls(event)})


#: Why pynetdicom rejected an association, by (source, diagnostic) of its A-ASSOCIATE-RJ
#: (PS3.8 9.3.4): what the log and the audit say.
_REJECTIONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context not supported",
    (0x01, 0x03): "calling AE title not allowed by configuration",
    (0x01, 0x07): "called AE title is not this node's",
    (0x02, 0x01): "user identity not accepted",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "too many associations in progress (max_associations)",
}


#: A-ASSOCIATE-RJ (result, source, diagnostic) for a request over the node's limits: rejected
#: transient, service provider (presentation), local limit exceeded (PS3.8 9.3.4).
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def rejection_reason(event: Event) -> str:
    """Why the association of ``event`` was rejected, in words."""
    primitive = event.assoc.acceptor.primitive
    key = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
    return _REJECTIONS.get(key, "rejected (source %s, reason %s)" % key)  # type: ignore[arg-type]


def request_problem(primitive: Any) -> str | None:
    """What in an A-ASSOCIATE-RQ pynetdicom cannot negotiate, or None.

    pynetdicom's negotiation raises (in the association thread, which then dies with
    the connection left open) on a presentation context without an abstract syntax
    or without a transfer syntax; found by fuzzing (``tests/fuzz_regressions``).
    """
    for cx in primitive.presentation_context_definition_list or []:
        if cx.abstract_syntax is None:
            return f"presentation context {cx.context_id} has no abstract syntax"
        if not cx.transfer_syntax:
            return f"presentation context {cx.context_id} has no transfer syntax"
    return None


def handle_requested(event: Event, metrics: NodeMetrics, audit: AuditLog | None = None,
                     admission: Admission | None = None) -> None:
    """``EVT_REQUESTED``: abort a request pynetdicom cannot negotiate; reject one over the
    limits of :class:`~dicom_node.wire.handlers.admission.Admission` (transient, local limit)."""
    problem = request_problem(event.assoc.requestor.primitive)
    req = event.assoc.requestor
    calling = (getattr(req.primitive, "calling_ae_title", None) or "?").strip() or "?"
    if problem is None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        why = admission.request(sock, req.address) if admission and sock is not None else None
        if why is None:
            return
        metrics.association("rejected")
        LOG.debug("association request from %s at %s:%s rejected: %s", calling, req.address,
                  req.port, why)  # the lock-out's first refusal is logged at WARNING
        audit_safely(audit, AuditEvent.ASSOCIATION_REFUSED, AuditOutcome.MINOR_FAILURE,
                     f"{calling}@{req.address}", (event.assoc.acceptor.ae_title or "").strip(),
                     {"reason": why, "port": req.port})
        event.assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
        event.assoc.kill()  # as pynetdicom's own rejection does
        return
    metrics.association("rejected")
    LOG.warning("association request from %s at %s:%s malformed (%s): aborted",
                calling, req.address, req.port, problem)
    audit_safely(audit, AuditEvent.ASSOCIATION_REFUSED, AuditOutcome.MINOR_FAILURE,
                 peer_name(event), (event.assoc.acceptor.ae_title or "").strip(),
                 {"reason": f"malformed association request: {problem}",
                  "port": event.assoc.requestor.port})
    event.assoc.abort()


def handle_rejected(event: Event, metrics: NodeMetrics, audit: AuditLog | None = None) -> None:
    """Log, count and audit a rejected association, with the peer's address and the reason."""
    metrics.association("rejected")
    called = (event.assoc.acceptor.ae_title or "").strip()
    reason = rejection_reason(event)
    LOG.warning("association REJECTED from %s (called AE %s): %s", _who(event), called, reason)
    audit_safely(audit, AuditEvent.ASSOCIATION_REFUSED, AuditOutcome.MINOR_FAILURE,
                 peer_name(event), called,
                 {"reason": reason, "port": event.assoc.requestor.port})


def handle_aborted(event: Event, metrics: NodeMetrics) -> None:
    """Log an aborted association; nothing of an unfinished C-STORE is kept."""
    metrics.association("aborted")
    LOG.warning("association aborted by or with %s", _who(event))


def handle_released(event: Event) -> None:
    """Log a normal release."""
    LOG.info("association released by %s", _who(event))


def handle_closed(event: Event, ledger: StudyLedger) -> None:
    """Connection closed (after release or abort): audit the studies received on it."""
    ended = "aborted" if event.assoc.is_aborted else "released"
    ledger.flush(event, ended)
