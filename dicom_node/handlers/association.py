"""Association notifications: who connected, who was refused, who aborted."""

from __future__ import annotations

import logging

from pynetdicom.events import Event

from dicom_node.metrics import NodeMetrics

LOG = logging.getLogger(__name__)


def _who(event: Event) -> str:
    req = event.assoc.requestor
    return f"{(req.ae_title or '').strip() or '?'} at {req.address}:{req.port}"


def handle_accepted(event: Event, metrics: NodeMetrics) -> None:
    """Log and count an accepted association."""
    metrics.association("accepted")
    LOG.info("association accepted from %s", _who(event))


def handle_rejected(event: Event, metrics: NodeMetrics) -> None:
    """Log and count a rejected association, with the peer's address."""
    metrics.association("rejected")
    called = (event.assoc.acceptor.ae_title or "").strip()
    LOG.warning("association REJECTED from %s (called AE %s): not allowed by configuration",
                _who(event), called)


def handle_aborted(event: Event, metrics: NodeMetrics) -> None:
    """Log an aborted association; nothing of an unfinished C-STORE is kept."""
    metrics.association("aborted")
    LOG.warning("association aborted by or with %s", _who(event))


def handle_released(event: Event) -> None:
    """Log a normal release."""
    LOG.info("association released by %s", _who(event))
