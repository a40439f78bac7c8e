"""The listening socket: pynetdicom's threaded server with bounded reads and admission,
and its variant shared by several acceptor processes (``listener_processes`` > 1)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.wire import bounded_wire
from dicom_node.wire.handlers.admission import Admission
from dicom_node.wire.tls import finish_handshake


#: How long a process waits per association it serves before accepting another.
_ACCEPT_DELAY_S = 0.002
_ACCEPT_DELAY_MAX_S = 0.01
_serving_lock = threading.Lock()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server whose accepted sockets have bounded reads
    (:mod:`dicom_node.wire.bounded_wire`; ``socketserver``'s ``get_request`` hook), and that
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

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The TLS handshake here, in the connection's thread, not in the accept loop."""
        if not finish_handshake(request):
            return
        super().process_request_thread(request, client_address)


class SharedSocketServer(GuardedServer):
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
        if self.socket is not None:  # TCPServer's own, unused
            self.socket.close()
        self.socket = self.inherited
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited is None:
            super().server_activate()
        assert self.socket is not None  # TCPServer made it or server_bind set the inherited one
        self.socket.setblocking(False)
