"""The services the node's listener offers beyond Verification and Storage.

Built here, where the queue is in reach, and handed to every listening process (the
node's own :class:`~dicom_node.wire.server.DicomServer` and each extra acceptor
process): Storage Commitment reports (:mod:`dicom_node.queue.commitment`) and MPPS
N-CREATE/N-SET (:mod:`dicom_node.queue.mpps_handlers`).
"""

from __future__ import annotations

from collections.abc import Callable

from dicom_node.queue import commitment, mpps_handlers
from dicom_node.settings import Settings
from dicom_node.wire.services import Service


def listener_services(settings: Settings, *,
                      on_mpps: Callable[[], None] = lambda: None) -> tuple[Service, ...]:
    """Every extra DIMSE service of the listener, for ``settings``; ``on_mpps`` is called
    after each MPPS message kept (the node wakes its monitor and MPPS forwarder; an extra
    acceptor process has none to wake: the monitor looks every 0.1 s)."""
    return (commitment.listener_service(settings.data_dir, max_resends=settings.confirm_resends),
            mpps_handlers.listener_service(settings, on_mpps))
