"""The node's DICOM Application Entity: Verification and Storage SCP."""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom import uid as tsuid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.handlers.association import (
    handle_aborted,
    handle_accepted,
    handle_rejected,
    handle_released,
)
from dicom_node.handlers.echo import handle_echo
from dicom_node.handlers.store import handle_store
from dicom_node.metrics import NodeMetrics
from dicom_node.settings import Settings
from twin_archive import Archive

LOG = logging.getLogger(__name__)

# Accepted as they arrive, never decoded on the way in (decoding happens in the
# pipeline, with pydicom's codecs). Uncompressed first: that is what we prefer when a
# peer proposes several for one SOP class.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    tsuid.ExplicitVRLittleEndian,
    tsuid.ImplicitVRLittleEndian,
    tsuid.DeflatedExplicitVRLittleEndian,
    tsuid.ExplicitVRBigEndian,
    tsuid.JPEGBaseline8Bit,
    tsuid.JPEGExtended12Bit,
    tsuid.JPEGLossless,
    tsuid.JPEGLosslessSV1,
    tsuid.JPEGLSLossless,
    tsuid.JPEGLSNearLossless,
    tsuid.JPEG2000Lossless,
    tsuid.JPEG2000,
    tsuid.HTJ2KLossless,
    tsuid.HTJ2KLosslessRPCL,
    tsuid.HTJ2K,
    tsuid.RLELossless,
)


class DicomServer:
    """Runs the node's listener in background threads, one per association.

    Parameters
    ----------
    settings : Settings
        AE title, address, port, allow-list, limits.
    archive : twin_archive.Archive
        Where C-STOREd instances are filed.
    metrics : NodeMetrics, optional
        Counters (a new set when omitted).
    """

    def __init__(self, settings: Settings, archive: Archive, metrics: NodeMetrics | None = None) -> None:
        self.settings = settings
        self.archive = archive
        self.metrics = metrics or NodeMetrics()
        self.ae = self._build_ae()
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = min(30.0, s.network_timeout_s)
        ae.dimse_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae
        ae.require_calling_aet = list(s.allowed_calling_aes)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.archive, self.metrics]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.metrics]),
            (evt.EVT_REJECTED, handle_rejected, [self.metrics]),
            (evt.EVT_ABORTED, handle_aborted, [self.metrics]),
            (evt.EVT_RELEASED, handle_released),
        ]

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured with port 0)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start listening; returns at once."""
        s = self.settings
        if not s.allowed_calling_aes:
            LOG.warning(
                "allowed_calling_aes is empty: associations from ANY calling AE title are "
                "accepted; set allowed_calling_aes in the configuration to restrict them"
            )
        else:
            LOG.info("accepting associations only from: %s", ", ".join(s.allowed_calling_aes))
        self._server = self.ae.start_server(
            (s.bind_address, s.port), block=False, evt_handlers=self._handlers()
        )
        LOG.info("ready: listening as AE %s on %s:%d (%d storage SOP classes, %d transfer syntaxes)",
                 s.ae_title, s.bind_address, self.port, len(AllStoragePresentationContexts),
                 len(TRANSFER_SYNTAXES))

    def set_allowed_calling_aes(self, titles: tuple[str, ...]) -> None:
        """Replace the calling AE allow-list (safe while serving)."""
        self.ae.require_calling_aet = list(titles)

    def stop(self) -> None:
        """Stop accepting associations and wait for those in progress to end."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
                LOG.info("listener stopped")
