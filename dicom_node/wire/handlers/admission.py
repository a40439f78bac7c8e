"""Who gets the node's association slots: per-peer limits, and lock-outs said once.

pynetdicom counts every connection it has accepted against ``maximum_associations``,
also one whose A-ASSOCIATE-RQ has not arrived, and one whose peer has already gone (its
thread waits ``acse_timeout_s`` for a request that never comes). Twenty connections
that connected and closed, or sent half a request, held every slot for
``acse_timeout_s`` or ``network_timeout_s`` and, repeated, kept the scanners out; the
slots freed without a word (issue 28). Here, for each listener process:

* a connection is *pending* from its accept until its association request arrives; a
  pending connection counts against nothing but its own peer's limit: a peer address
  with ``max_associations_per_host`` pending connections has its next ones closed at
  once, at accept, and all pending connections together are bounded too
  (:attr:`Admission.max_pending`), so a flood costs threads in proportion to the limits;
* an association request is admitted while fewer than ``max_associations`` admitted
  associations are in progress, and fewer than ``max_associations_per_host`` of its
  peer address; otherwise it is rejected (A-ASSOCIATE-RJ, transient, local limit
  exceeded) and audited;
* a lock-out (a peer address, or every peer, being refused) is logged once when it
  starts, with the reason, and once when it ends (nothing refused for
  :data:`LOCKOUT_QUIET_S`), with how long it lasted and how many were refused; the
  metrics count connections closed at accept (``associations_refused``) and lock-outs
  (``lockouts``).

A connection lasts until its association's threads have ended (pynetdicom closes the
socket of a peer that left at once, but its thread waits ``acse_timeout_s`` for the
request: counted by socket, a peer that connected and closed 170 times a second left
hundreds of threads, which pynetdicom's own count then refused everyone for).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node.wire.metrics import NodeMetrics

LOG = logging.getLogger(__name__)

#: A lock-out ends once nothing was refused for this long, seconds.
LOCKOUT_QUIET_S = 1.0
#: Pending connections of all peers together, per association slot (at least MIN_PENDING).
PENDING_PER_SLOT = 4
MIN_PENDING = 64
#: The lock-out key when every peer is refused.
EVERY_PEER = "every peer"


@dataclass(slots=True)
class _Connection:
    host: str
    requested: bool = False
    admitted: bool = False
    assoc: Any = None  # the pynetdicom Association serving it, once made

    def alive(self, sock: socket.socket) -> bool:
        """True until the association's threads have ended (or, before it has one, the
        socket is closed)."""
        assoc = self.assoc
        if assoc is None:
            return sock.fileno() != -1
        return assoc.ident is None or assoc.is_alive() or assoc.dul.is_alive()


@dataclass(slots=True)
class _LockOut:
    reason: str
    started: float
    last: float
    refused: int = 1


class Admission:
    """Decides which connections and association requests the node serves.

    Parameters
    ----------
    max_associations : int
        Admitted associations in progress, all peers together (>= 1).
    per_host : int
        Admitted associations, and pending connections, of one peer address (>= 1).
    metrics : NodeMetrics
        Where refusals and lock-outs are counted.
    clock : callable, optional
        Monotonic seconds (tests).

    Raises
    ------
    ValueError
        If a limit is below 1.
    """

    def __init__(self, max_associations: int, per_host: int, metrics: NodeMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_associations < 1:
            raise ValueError(f"max_associations must be >= 1, got {max_associations}")
        if per_host < 1:
            raise ValueError(f"per_host must be >= 1, got {per_host}")
        self.max_associations = max_associations
        self.per_host = per_host
        self.max_pending = max(MIN_PENDING, PENDING_PER_SLOT * max_associations)
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}
        self._lockouts: dict[str, _LockOut] = {}

    def _count(self, host: str, *, admitted: bool) -> tuple[int, int]:
        """(all peers, ``host``): open connections admitted, or (False) still pending."""
        every = of_host = 0
        for sock, conn in list(self._connections.items()):
            if not conn.alive(sock):
                del self._connections[sock]
            elif conn.admitted if admitted else not conn.requested:
                every += 1
                of_host += conn.host == host
        return every, of_host

    def opened(self, sock: Any, assoc: Any) -> None:
        """``EVT_CONN_OPEN``: the association that serves the connection on ``sock``."""
        with self._lock:
            conn = self._connections.get(sock)
            if conn is not None:
                conn.assoc = assoc

    def connection(self, sock: socket.socket, host: str) -> bool:
        """A connection was accepted from ``host``: True to serve it, False to close it."""
        with self._lock:
            every, of_host = self._count(host, admitted=False)
            if of_host >= self.per_host:
                self._refused(host, f"{of_host} of its connections have not finished their "
                                    f"association request (max_associations_per_host = "
                                    f"{self.per_host})")
            elif every >= self.max_pending:
                self._refused(EVERY_PEER, f"{every} connections have not finished their "
                                          "association request")
            else:
                self._connections[sock] = _Connection(host)
                return True
        self.metrics.association("refused")
        return False

    def request(self, sock: socket.socket, host: str) -> str | None:
        """The association request on ``sock`` arrived: None to admit it, else why not."""
        with self._lock:
            conn = self._connections.get(sock)
            if conn is None:
                conn = self._connections[sock] = _Connection(host)
            conn.requested = True
            self._count(host, admitted=False)  # forget the ended ones
            every, of_host = self._count(host, admitted=True)
            if every >= self.max_associations:
                why = f"too many associations in progress (max_associations = {self.max_associations})"
                self._refused(EVERY_PEER, why)
                return why
            if of_host >= self.per_host:
                why = (f"too many associations from {host} in progress "
                       f"(max_associations_per_host = {self.per_host})")
                self._refused(host, why)
                return why
            conn.admitted = True
            return None

    def _refused(self, key: str, reason: str) -> None:
        """Count a refusal for ``key``; the first of a lock-out is logged (lock held)."""
        now = self._clock()
        lockout = self._lockouts.get(key)
        if lockout is not None:
            lockout.refused += 1
            lockout.last = now
            LOG.debug("lock-out of %s: refused again (%s)", key, reason)
            return
        self._lockouts[key] = _LockOut(reason=reason, started=now, last=now)
        self.metrics.association("lockouts")
        LOG.warning("lock-out of %s started: %s; %s", key, reason,
                    "the others are still served" if key != EVERY_PEER else
                    "new associations are refused until one ends")

    def tick(self) -> int:
        """End the lock-outs that refused nothing for :data:`LOCKOUT_QUIET_S`; return how
        many are still on (called twice a second by the server's reaper)."""
        now = self._clock()
        with self._lock:
            self._count("", admitted=False)  # forget ended connections (and their buffers)
            ended = [(k, v) for k, v in self._lockouts.items() if now - v.last >= LOCKOUT_QUIET_S]
            for key, _ in ended:
                del self._lockouts[key]
            left = len(self._lockouts)
        for key, lockout in ended:
            LOG.info("lock-out of %s ended after %.1f s: %d connection(s) or request(s) refused "
                     "(%s)", key, lockout.last - lockout.started, lockout.refused, lockout.reason)
        return left
