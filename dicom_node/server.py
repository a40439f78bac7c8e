"""The node's DICOM Application Entity: Verification and Storage SCP."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom import uid as tsuid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.handlers.association import (
    StudyLedger,
    audit_safely,
    handle_aborted,
    handle_accepted,
    handle_closed,
    handle_rejected,
    handle_released,
    handle_requested,
)
from dicom_node.handlers.admission import Admission
from dicom_node.handlers.echo import handle_echo
from dicom_node.handlers.mpps import handle_n_create, handle_n_set
from dicom_node.handlers.store import handle_store
from dicom_node import bounded_wire, fast_receive
from dicom_node.acceptor import AcceptorPool
from dicom_node.errors import DicomNodeError
from dicom_node.jobs import connect_queue
from dicom_node.metrics import NodeMetrics
from dicom_node.mpps import MppsSteps
from dicom_node.settings import Settings, resolve_forward
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
    listen_socket : socket.socket, optional
        Given inside an extra acceptor process (:mod:`dicom_node.acceptor`): the node's
        listening socket, inherited, to accept on beside the node; no acceptors of its
        own are started. With ``settings.listener_processes`` > 1 the node's own server
        listens the same way (non-blocking, shared) and starts the others.

    Raises
    ------
    TlsSetupError
        If TLS is configured and the certificate, key or CA cannot be loaded.
    """

    def __init__(self, settings: Settings, ingest: Ingest, metrics: NodeMetrics | None = None,
                 audit: AuditLog | None = None, *,
                 listen_socket: socket.socket | None = None) -> None:
        self.settings = settings
        self._in_acceptor = listen_socket is not None
        self._listen_socket = listen_socket
        self._pool: AcceptorPool | None = None
        self.ingest = ingest
        self.metrics = metrics or NodeMetrics()
        self.audit = audit
        self.ledger = StudyLedger(audit)
        self.admission = Admission(settings.max_associations, settings.max_associations_per_host,
                                   self.metrics)
        self.ssl_context = server_tls_context(settings, on_refused=self._tls_refused)
        # MPPS steps go to queue.sqlite (dicom_node/mpps.py); on_mpps wakes the monitor.
        forward = resolve_forward(settings.forward_mpps, settings.destinations).key \
            if settings.forward_mpps else ""
        self.mpps = MppsSteps(connect_queue(settings.data_dir), forward_to=forward)
        self._mpps_lock = threading.Lock()
        self.on_mpps: Callable[[], None] = lambda: None
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
        ae.add_supported_context(ModalityPerformedProcedureStep,
                                 [tsuid.ExplicitVRLittleEndian, tsuid.ImplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
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
            (evt.EVT_N_CREATE, handle_n_create, [self.mpps, self._mpps_lock, self._mpps_changed]),
            (evt.EVT_N_SET, handle_n_set, [self.mpps, self._mpps_lock, self._mpps_changed]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.metrics, self.audit]),
            (evt.EVT_REQUESTED, handle_requested, [self.metrics, self.audit, self.admission]),
            (evt.EVT_REJECTED, handle_rejected, [self.metrics, self.audit]),
            (evt.EVT_ABORTED, handle_aborted, [self.metrics]),
            (evt.EVT_RELEASED, handle_released),
            (evt.EVT_CONN_CLOSE, handle_closed, [self.ledger]),
            (evt.EVT_CONN_CLOSE, fast_receive.discard_unclaimed),
            (evt.EVT_CONN_OPEN, self._connection_opened),
        ]

    def _mpps_changed(self) -> None:
        self.on_mpps()

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
        base = _SharedSocketServer if shared else _GuardedServer
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
        :meth:`dicom_node.acceptor.AcceptorPool.stopping`)."""
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
            with self._mpps_lock:
                self.mpps.db.conn.close()
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


#: How long a process waits per association it serves before accepting another.
_ACCEPT_DELAY_S = 0.002
_ACCEPT_DELAY_MAX_S = 0.01
_serving_lock = threading.Lock()


class _GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose accepted sockets have bounded reads
    (:mod:`dicom_node.bounded_wire`; ``socketserver``'s ``get_request`` hook), and that
    closes at once a connection its :class:`Admission` refuses (a peer over its limit of
    connections without an association request); ``socketserver`` takes the
    ``OSError`` as a connection that failed to be accepted."""

    inherited: socket.socket | None = None
    max_pdu = 0
    read_timeout_s = 60.0
    admission: Admission | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        try:
            guarded = bounded_wire.guard(sock, max_pdu=self.max_pdu, timeout_s=self.read_timeout_s)
        except OSError:
            sock.close()
            raise
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        if self.admission is not None and not self.admission.connection(guarded, host):
            guarded.close()
            raise ConnectionRefusedError(f"connection from {host} refused: lock-out")
        return guarded, address


class _OneLineErrors(logging.Filter):
    """pynetdicom's error records in one line: no traceback, at most 300 characters.

    pynetdicom logs a peer's malformed PDU or a broken connection with
    ``LOGGER.exception``: a traceback per connection, once 330 KB for one request.
    The node's log says what happened in one line (the reason is the exception's text).
    """

    #: pynetdicom's words for a peer's bytes it could not read, in the node's.
    REWORDED = {
        "Unable to decode the received PDU data":
            "malformed PDU received (cannot be decoded); the association is aborted",
    }

    #: pynetdicom's line before ``LOGGER.exception(exc)`` when a read of the socket failed.
    READ_FAILED = "Connection closed before the entire PDU was received"

    def filter(self, record: logging.LogRecord) -> bool:
        # A read the node's socket refused (bounded_wire) was logged there, with its reason:
        # pynetdicom's two lines about it (twice: it reads again) add nothing.
        if isinstance(record.msg, bounded_wire.LOGGED_REFUSALS):
            return False
        if record.msg == self.READ_FAILED and isinstance(sys.exc_info()[1],
                                                         bounded_wire.LOGGED_REFUSALS):
            return False
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        if isinstance(record.msg, BaseException):  # LOGGER.exception(exc) after its message
            if not str(record.msg).strip():
                return False  # nothing to add to the line before it
            record.msg, record.args = f"reason: {type(record.msg).__name__}: {record.msg}", None
        elif record.msg in self.REWORDED:
            record.msg = self.REWORDED[record.msg]
        text = record.getMessage()
        if len(text) > 300 or "\n" in text:
            record.msg, record.args = text.replace("\n", " ")[:300], None
        return True


_ONE_LINE = _OneLineErrors()


def _receive_thread_failed(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook``: a thread of an accepted association died (DUL or reactor).

    pynetdicom's state machine re-raises what its receive thread met in a peer's
    message (a command set without Command Data Set Type, for one): the thread ended
    with a traceback on stderr, no A-ABORT was sent and the connection stayed open.
    Here the node logs one line, sends the A-ABORT, closes the connection and ends
    the association; :meth:`DicomServer.reap` then releases what it left.
    """
    thread = args.thread
    if isinstance(thread, DULServiceProvider):
        assoc = thread.assoc
    elif isinstance(thread, Association):
        assoc = thread
    else:
        _previous_excepthook(args)
        return
    if not assoc.is_acceptor:
        _previous_excepthook(args)
        return
    dul = assoc.dul
    LOG.warning("association with %s aborted: the node could not read what it sent (%s: %.200s)",
                (assoc.requestor.ae_title or "?").strip(), args.exc_type.__name__, args.exc_value)
    sock = getattr(dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.settimeout(1.0)
            sock.sendall(bounded_wire.A_ABORT_INVALID_PARAMETER)
        except OSError:
            pass
    assoc.is_aborted = True
    assoc.is_established = False
    assoc.kill()
    if isinstance(thread, Association):
        dul.kill_dul()


_previous_excepthook = threading.excepthook


def one_line_pynetdicom_errors() -> None:
    """Keep pynetdicom's own error records to one line each (idempotent).

    A logger's filters apply to the records logged on it, not on its children, so the
    filter goes on each of pynetdicom's module loggers (all exist once it is imported).
    """
    names = [n for n in list(logging.Logger.manager.loggerDict)
             if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        pn_logger = logging.getLogger(name)
        if _ONE_LINE not in pn_logger.filters:
            pn_logger.addFilter(_ONE_LINE)
    threading.excepthook = _receive_thread_failed


class _SharedSocketServer(_GuardedServer):
    """pynetdicom's threaded server on one listening socket that several processes accept on.

    The node binds and listens; each acceptor process inherits the descriptor
    (``inherited``) instead of binding. All of them poll the socket and the first to
    ``accept()`` serves the new association: a process whose threads are busy storing
    gets there later than an idle one, so associations go to the least busy process
    (with ``SO_REUSEPORT`` the kernel hashed each connection to a process whatever its
    load, and four associations often landed three on one of two processes). The
    socket is non-blocking, so a process that loses the race goes back to polling
    instead of waiting in ``accept()``.

    Polling alone is not fair when connections arrive together: four ``storescu`` started
    at once went 3+1 to two processes about half the time, because the first process
    to wake accepted again before the other had woken. So a process that is already
    serving associations waits :data:`_ACCEPT_DELAY_S` per association in progress (at
    most :data:`_ACCEPT_DELAY_MAX_S`) before it accepts, which lets a less busy process
    take the connection first; an idle process accepts at once.
    """

    #: Associations this process is serving (counted from accept to the end of the thread).
    serving = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        busy = self.serving
        if busy:
            time.sleep(min(_ACCEPT_DELAY_S * busy, _ACCEPT_DELAY_MAX_S))
        return super().get_request()  # BlockingIOError when another process was first

    def process_request(self, request: Any, client_address: Any) -> None:
        with _serving_lock:
            self.serving += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done_serving()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done_serving()

    def _done_serving(self) -> None:
        with _serving_lock:
            self.serving -= 1

    def server_bind(self) -> None:
        if self.inherited is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.inherited
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited is None:
            super().server_activate()
        self.socket.setblocking(False)


class TlsSetupError(DicomNodeError, OSError):
    """The TLS certificate, key or CA of the configuration cannot be loaded."""

    def __init__(self, what: str, path: object, why: object) -> None:
        super().__init__(f"TLS: cannot load {what} {path}: {why}")


class _RefusingContext(ssl.SSLContext):
    """Server context that reports failed handshakes (untrusted or missing client certificate).

    pynetdicom wraps each accepted socket in its accept loop; the handshake gets a
    timeout so that a peer that connects and says nothing cannot hold the listener.
    """

    on_refused: Callable[[str, str], None]
    handshake_timeout_s: float
    sslsocket_class = bounded_wire.GuardedSSLSocket  # reads bounded once accepted

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        try:
            peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            peer = "?"
        sock.settimeout(self.handshake_timeout_s)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (ssl.SSLError, OSError) as exc:
            self.on_refused(peer, getattr(exc, "reason", None) or str(exc))
            sock.close()
            raise
        wrapped.settimeout(None)
        return wrapped


def _load_chain(ctx: ssl.SSLContext, settings: Settings) -> None:
    try:
        ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("certificate/key", f"{settings.tls_cert} / {settings.tls_key}",
                            getattr(exc, "strerror", None) or exc) from exc
    try:
        ctx.load_verify_locations(cafile=str(settings.tls_ca))
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("CA", settings.tls_ca, getattr(exc, "strerror", None) or exc) from exc


def server_tls_context(settings: Settings,
                       on_refused: Callable[[str, str], None] | None = None) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+, client certificate required), or None.

    Raises
    ------
    TlsSetupError
        If a file cannot be loaded.
    """
    if settings.tls_cert is None:
        return None
    ctx = _RefusingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.on_refused = on_refused or (lambda peer, why: None)
    ctx.handshake_timeout_s = min(10.0, settings.network_timeout_s)
    _load_chain(ctx, settings)
    return ctx


def client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The sender's TLS context (verifies the destination against ``tls_ca``; presents
    the node's certificate), or None when TLS is not configured.

    Raises
    ------
    TlsSetupError
        If a file cannot be loaded.
    """
    if settings.tls_cert is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _load_chain(ctx, settings)
    return ctx
