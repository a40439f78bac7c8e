"""The node's DICOM Application Entity: Verification and Storage SCP."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydicom import uid as tsuid
from pynetdicom import AE, AllStoragePresentationContexts, evt
# pynetdicom.sop_class makes its SOP classes at import time (globals()): mypy cannot see them.
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.wire.handlers.association import (
    StudyLedger,
    audit_safely,
    handle_aborted,
    handle_accepted,
    handle_closed,
    handle_rejected,
    handle_released,
    handle_requested,
)
from dicom_node.wire.handlers.admission import Admission
from dicom_node.wire.handlers.echo import handle_echo
from dicom_node.wire.handlers.store import handle_store
from dicom_node.wire import fast_receive
from dicom_node.wire.acceptor import AcceptorPool
from dicom_node.wire.listening import GuardedServer, SharedSocketServer
from dicom_node.wire.log_lines import one_line_pynetdicom_errors
from dicom_node.wire.services import Service
from dicom_node.wire.tls import server_tls_context
from dicom_node.wire.metrics import NodeMetrics
from dicom_node.settings import Settings
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome
from twin_archive.ingest import Ingest

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
    ingest : twin_archive.ingest.Ingest
        The archive's ingest path, where C-STOREd instances are filed
        (:attr:`twin_archive.Archive.ingest`).
    metrics : NodeMetrics, optional
        Counters (a new set when omitted).
    audit : twin_archive.audit.AuditLog, optional
        Where associations and received studies are audited (not audited when omitted).
    services : sequence of Service
        DIMSE services beyond Verification and Storage that rooms above the wire handle
        (:mod:`dicom_node.wire.services`; e.g. Storage Commitment reports).
    listen_socket : socket.socket, optional
        Given inside an extra acceptor process (:mod:`dicom_node.wire.acceptor`): the node's
        listening socket, inherited, to accept on beside the node; no acceptors of its
        own are started. With ``settings.listener_processes`` > 1 the node's own server
        listens the same way (non-blocking, shared) and starts the others.

    Raises
    ------
    TlsSetupError
        If TLS is configured and the certificate, key or CA cannot be loaded.
    """

    def __init__(self, settings: Settings, ingest: Ingest, metrics: NodeMetrics | None = None,
                 audit: AuditLog | None = None, *, services: Sequence[Service] = (),
                 listen_socket: socket.socket | None = None) -> None:
        self.settings = settings
        self._in_acceptor = listen_socket is not None
        self._listen_socket = listen_socket
        self._pool: AcceptorPool | None = None
        self.ingest = ingest
        self.metrics = metrics or NodeMetrics()
        self.audit = audit
        self.ledger = StudyLedger(audit)
        self.services = tuple(services)
        self.admission = Admission(settings.max_associations, settings.max_associations_per_host,
                                   self.metrics)
        self.ssl_context = server_tls_context(settings, on_refused=self._tls_refused)
        self.ae = self._build_ae()
        # The one switch for everything that reaches into pynetdicom (dicom_node/fast_receive).
        self.fast_receive = settings.fast_receive and fast_receive.install(self.ae, ingest.tmp_dir)
        self._server: ThreadedAssociationServer | None = None
        self._server_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Every association accepted, until the reaper has seen its threads end.
        self._opened: set[Any] = set()
        self._opened_lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.add_supported_context(Verification)
        for service in self.services:  # e.g. Storage Commitment reports (queue/commitment.py)
            ae.add_supported_context(service.sop_class, list(service.transfer_syntaxes) or None,
                                     scu_role=service.scu_role, scp_role=service.scp_role)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None  # pynetdicom builds each from its SOP class
            ae.add_supported_context(cx.abstract_syntax, list(TRANSFER_SYNTAXES))
        # pynetdicom counts connections whose request has not arrived; the node's own
        # Admission decides (handlers/admission.py), pynetdicom's count only bounds threads.
        ae.maximum_associations = s.max_associations + 2 * self.admission.max_pending
        ae.maximum_pdu_size = s.max_pdu_size
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = s.acse_timeout_s  # a connection that says nothing is closed after it
        ae.dimse_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae
        ae.require_calling_aet = list(s.allowed_calling_aes)
        return ae

    def _handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingest, self.metrics, self.ledger]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.metrics, self.audit]),
            (evt.EVT_REQUESTED, handle_requested, [self.metrics, self.audit, self.admission]),
            (evt.EVT_REJECTED, handle_rejected, [self.metrics, self.audit]),
            (evt.EVT_ABORTED, handle_aborted, [self.metrics]),
            (evt.EVT_RELEASED, handle_released),
            (evt.EVT_CONN_CLOSE, handle_closed, [self.ledger]),
            (evt.EVT_CONN_CLOSE, fast_receive.discard_unclaimed),
            (evt.EVT_CONN_OPEN, self._connection_opened),
        ] + [(e, h, list(a)) if a else (e, h) for s in self.services for e, h, a in s.handlers]

    def _connection_opened(self, event: Any) -> None:
        with self._opened_lock:
            self._opened.add(event.assoc)
        self.admission.opened(getattr(event.assoc.dul.socket, "socket", None), event.assoc)

    def reap(self) -> int:
        """Release what ended associations left: spools not handled, open sockets.

        pynetdicom ends an association whose receive thread met an exception (a
        command set without its UIDs, a data set on a context never accepted) by
        sending an A-ABORT and stopping its threads, without closing the connection
        the usual way: ``EVT_CONN_CLOSE`` never comes, so its spool file and
        descriptors stayed. Run every 0.5 s (and at stop); returns how many
        associations it released.
        """
        with self._opened_lock:
            # Started and ended: EVT_CONN_OPEN comes before the association's thread starts.
            ended = [a for a in self._opened
                     if a.ident is not None and not a.is_alive() and not a.dul.is_alive()]
            self._opened.difference_update(ended)
        for assoc in ended:
            fast_receive.release_ended(assoc)
        self.admission.tick()  # a lock-out that refused nothing lately has ended: say so
        return len(ended)

    def _reap_forever(self) -> None:
        while not self._reaper_stop.wait(0.5):
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad association
                LOG.exception("releasing an ended association failed")

    def _tls_refused(self, peer: str, reason: str) -> None:
        self.metrics.association("rejected")
        LOG.warning("TLS connection REFUSED from %s: %s", peer, reason)
        audit_safely(self.audit, AuditEvent.ASSOCIATION_REFUSED, AuditOutcome.MINOR_FAILURE,
                     f"?@{peer.rsplit(':', 1)[0]}", self.settings.ae_title,
                     {"reason": f"TLS handshake failed: {reason}"})

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
        fast_receive.quiet_standard_handlers()  # before any server or association exists
        fast_receive.accept_nonconformant_uids()  # both modes: DESIGN decision 2
        one_line_pynetdicom_errors()
        self._server = self._start_server((s.bind_address, s.port), self._listen_socket,
                                          shared=s.listener_processes > 1 or self._in_acceptor)
        self._reaper = threading.Thread(target=self._reap_forever, name="association-reaper",
                                        daemon=True)
        self._reaper.start()
        if s.listener_processes > 1 and not self._in_acceptor:
            self._pool = AcceptorPool(s, s.listener_processes - 1, self.metrics)
            assert self._server.socket is not None  # TCPServer made it (or it was inherited)
            try:
                self._pool.start(self.port, self._server.socket.fileno())
            except OSError:
                self._pool = None
                self.stop(0.0)
                raise
        LOG.info("ready: listening as AE %s on %s:%d%s (%d storage SOP classes, %d transfer "
                 "syntaxes, %s)", s.ae_title, s.bind_address, self.port,
                 " with TLS, client certificate required" if self.ssl_context else "",
                 len(AllStoragePresentationContexts), len(TRANSFER_SYNTAXES),
                 "fast receive path" if self.fast_receive else "plain pynetdicom receive path")

    @property
    def listening(self) -> bool:
        """True while the listener thread serves."""
        server = self._server
        thread = self._server_thread
        return server is not None and (thread is None or thread.is_alive())

    def active_associations(self) -> int:
        """Associations in progress."""
        server = self._server
        return len(server.active_associations) if server is not None else 0

    def _start_server(self, address: tuple[str, int], inherited: socket.socket | None,
                      *, shared: bool) -> ThreadedAssociationServer:
        """``AE.start_server(block=False)`` with bounded reads on every accepted socket,
        on a listening socket of its own or (``shared``) one shared with other processes."""
        s = self.settings
        base = SharedSocketServer if shared else GuardedServer
        server_class = type(base.__name__, (base,), {
            "inherited": inherited, "max_pdu": s.max_pdu_size, "read_timeout_s": s.network_timeout_s,
            "admission": self.admission})
        server = self.ae.make_server(address, evt_handlers=self._handlers(),
                                     ssl_context=self.ssl_context, server_class=server_class)
        thread = threading.Thread(target=server.serve_forever, daemon=True,
                                  name=f"AcceptorServer@{address[1]}")
        thread.start()
        self._server_thread = thread  # what ``listening`` looks at
        fast_receive.register_server(self.ae, server)
        return server

    def set_allowed_calling_aes(self, titles: tuple[str, ...]) -> None:
        """Replace the calling AE allow-list (safe while serving; acceptors too)."""
        self.ae.require_calling_aet = list(titles)
        if self._pool is not None:
            self._pool.set_allowed_calling_aes(titles)

    def stopping(self) -> None:
        """Called from the node's signal handler before :meth:`stop` (see
        :meth:`dicom_node.wire.acceptor.AcceptorPool.stopping`)."""
        pool = self._pool
        if pool is not None:
            pool.stopping()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting associations; let those in progress finish, then abort the rest.

        The listening socket is closed first (new connections are refused). Associations
        in progress get ``grace_s`` seconds (default ``settings.stop_grace_s``) to end;
        then they are aborted. A C-STORE being written when the abort comes completes
        its durable write first (the handler runs to its end), but is not acknowledged,
        so nothing acknowledged is ever lost. Returns when no association thread runs.
        """
        grace = self.settings.stop_grace_s if grace_s is None else grace_s
        pool, self._pool = self._pool, None
        pool_stop = None
        if pool is not None:  # the acceptors drain at the same time as this listener
            pool_stop = threading.Thread(target=pool.stop, args=(grace,), name="acceptors-stop")
            pool_stop.start()
        with self._lock:
            server = self._server
            if server is None:
                if pool_stop is not None:
                    pool_stop.join()
                return
            server.shutdown()
            LOG.info("listener stopped: no new associations")
            everything = self._in_progress(server)
            for assoc in everything:  # no request yet: nothing to wait for
                if assoc.requestor.primitive is None:
                    _hang_up(assoc)
            deadline = time.monotonic() + grace
            active = self._in_progress(server, requested=True)
            if active:
                LOG.info("waiting up to %.0f s for %d association(s) in progress", grace, len(active))
            while active and time.monotonic() < deadline:
                time.sleep(0.05)
                active = self._in_progress(server, requested=True)
            for assoc in active:
                LOG.warning("aborting association with %s after %.0f s grace: the sender "
                            "re-sends what was not acknowledged",
                            (assoc.requestor.ae_title or "?").strip(), grace)
                self.ledger.mark(assoc, "aborted at stop")
                _wake_reads(assoc)  # a read in progress (half a PDU) returns now
                assoc.abort()
            for assoc in everything:
                if assoc.requestor.primitive is not None:  # the others wait on a queue (daemons)
                    assoc.join(30.0)  # a handler in its durable write finishes it first
                _hang_up(assoc)  # no DUL thread (not a daemon) may outlive the node (issue 28)
            self._server = None
            self._reaper_stop.set()
            self.reap()
            for service in self.services:
                if service.close is not None:
                    service.close()
        if pool_stop is not None:
            pool_stop.join()

    def _in_progress(self, server: ThreadedAssociationServer, *,
                     requested: bool = False) -> list[Any]:
        """The server's associations whose threads run (``requested``: those whose
        association request has arrived), and those the reaper has not seen end."""
        with self._opened_lock:
            opened = [a for a in self._opened if a.is_alive() or a.dul.is_alive()]
        found = {id(a): a for a in [*server.active_associations, *opened]}
        return [a for a in found.values()
                if not requested or a.requestor.primitive is not None]


#: A-ABORT, source 0 (service user), reason 0: the node stops.
_A_ABORT_AT_STOP = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x00, 0x00)


def _wake_reads(assoc: Any) -> None:
    """Shut the reading side of the association's socket: a read that waits (half a PDU
    sent, ``network_timeout_s`` to go) returns at once; sending still works."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def _hang_up(assoc: Any) -> None:
    """End a connection at stop whatever its threads wait for: an A-ABORT when the
    association's DUL thread still runs, the socket shut, the DUL thread told to stop
    and joined. A DUL thread is not a daemon: one left reading a silent peer's socket
    kept a node that had logged "stopped cleanly" alive until its timeout."""
    dul = assoc.dul
    if not dul.is_alive():
        return
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.settimeout(1.0)
            sock.sendall(_A_ABORT_AT_STOP)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    assoc.is_aborted = True
    dul.kill_dul()
    dul.join(5.0)
