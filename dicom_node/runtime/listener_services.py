"""The services the node's listener offers beyond Verification and Storage.

Built here, where the queue is in reach, and handed to every listening process (the
node's own :class:`~dicom_node.wire.server.DicomServer` and each extra acceptor
process): Storage Commitment reports (:mod:`dicom_node.queue.commitment`).
"""

from __future__ import annotations

from dicom_node.queue import commitment
from dicom_node.settings import Settings
from dicom_node.wire.services import Service


def listener_services(settings: Settings) -> tuple[Service, ...]:
    """Every extra DIMSE service of the listener, for ``settings``."""
    return (commitment.listener_service(settings.data_dir, max_resends=settings.confirm_resends),)
