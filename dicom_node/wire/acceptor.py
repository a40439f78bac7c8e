"""Extra DICOM acceptor processes on the node's port (``listener_processes`` > 1).

One Python process stores on one CPU core at a time (the GIL): with four parallel
associations the node was CPU-bound on one core while the other idled. With
``listener_processes = N`` the node's listener and N-1 lean acceptor processes
(:mod:`dicom_node.runtime.acceptor_process`: DICOM listener and archive only, no
inference, about 60 MiB each; this module is the node's side, the pool)
accept on the node's listening socket, which they inherit; the least busy process
takes each new association (see ``SharedSocketServer`` in :mod:`dicom_node.wire.listening`). Each process stores into the same archive (SQLite WAL and ``BEGIN
IMMEDIATE`` keep writers apart, as for the CLI) and writes its own association
audit events (the audit log takes writers from several processes).

The node talks to each acceptor over a socket pair, one JSON object a line:

* node -> acceptor: ``{"op": "allow", "titles": [...]}`` (allow-list reloaded),
  ``{"op": "stop", "grace_s": 20}`` (drain like the node: associations in progress
  get the grace, then are aborted);
* acceptor -> node: ``{"op": "ready"}`` once listening, then ``{"op": "metrics",
  "counts": {...}, "bytes_received": n}`` with what it counted since the last report
  (every second and at exit), added to the node's own counters.

An acceptor dies with the node: it asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``) and stops at once when its end of the socket pair closes.
Associations an acceptor answered Success for are durable like any other; one it
had not answered is re-sent by the peer.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from dicom_node.wire.metrics import NodeMetrics
from dicom_node.wire.childproc import read_messages, send_message
from dicom_node.settings import Settings

LOG = logging.getLogger(__name__)

REPORT_EVERY_S = 1.0


class _Child:
    """One acceptor process and the node's end of its socket pair."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.reader: threading.Thread | None = None


class AcceptorPool:
    """The node's extra acceptor processes: started, told, counted and stopped together.

    Parameters
    ----------
    settings : Settings
        The node's settings (the acceptors get them as they are, with the bound port).
    count : int
        How many acceptor processes to run (``listener_processes - 1``).
    metrics : NodeMetrics
        The node's counters; the acceptors' counts are added to them.
    """

    def __init__(self, settings: Settings, count: int, metrics: NodeMetrics) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.settings = settings
        self.count = count
        self.metrics = metrics
        self._children: list[_Child] = []
        self._stopping = False

    def start(self, port: int, listen_fd: int, timeout_s: float = 60.0) -> None:
        """Start the acceptors on the node's listening socket and wait until each serves.

        Raises
        ------
        OSError
            If an acceptor exits or does not listen within ``timeout_s``.
        """
        settings = self.settings.replace(port=port)
        blob = base64.b64encode(pickle.dumps(settings)).decode()
        for _ in range(self.count):
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.runtime.acceptor_process", str(theirs.fileno()), str(os.getpid()),
                 str(listen_fd)],
                pass_fds=(theirs.fileno(), listen_fd), stdin=subprocess.DEVNULL,
            )
            theirs.close()
            child = _Child(proc, ours)
            send_message(ours, child.lock, {"op": "settings", "blob": blob})
            child.reader = threading.Thread(target=self._read, args=(child,),
                                            name=f"acceptor-{proc.pid}", daemon=True)
            child.reader.start()
            self._children.append(child)
        deadline = time.monotonic() + timeout_s
        for child in self._children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop(0.0)
                raise OSError(f"acceptor process {child.proc.pid} did not start listening on "
                              f"port {port} (exit code {child.proc.poll()})")
        LOG.info("%d extra acceptor process(es) listening on port %d: %s", self.count, port,
                 ", ".join(str(c.proc.pid) for c in self._children))

    def _read(self, child: _Child) -> None:
        for message in read_messages(child.sock):
            if message.get("op") == "ready":
                child.ready.set()
            elif message.get("op") == "metrics":
                self._add(message)
        code = child.proc.wait()
        if not self._stopping:
            LOG.error("acceptor process %d ended unexpectedly (exit code %s); the node goes on "
                      "with the other listener(s)", child.proc.pid, code)

    def _add(self, message: dict[str, Any]) -> None:
        counts = {str(k): int(v) for k, v in message.get("counts", {}).items()}
        size = int(message.get("bytes_received", 0))
        lock = self.metrics._lock  # noqa: SLF001 - NodeMetrics' own lock, for a batch update
        with lock:
            self.metrics.counts.update(counts)
            self.metrics.bytes_received += size

    def set_allowed_calling_aes(self, titles: tuple[str, ...]) -> None:
        """Pass a reloaded allow-list on to every acceptor."""
        for child in self._children:
            send_message(child.sock, child.lock, {"op": "allow", "titles": list(titles)})

    def alive(self) -> int:
        """Acceptor processes running."""
        return sum(1 for c in self._children if c.proc.poll() is None)

    def stopping(self) -> None:
        """The node is stopping (its signal handler): an acceptor that exits from now on
        went with it (a SIGTERM to the whole process group), not unexpectedly."""
        self._stopping = True

    def stop(self, grace_s: float) -> None:
        """Drain and stop every acceptor (in parallel); return when all have exited."""
        self._stopping = True
        for child in self._children:
            send_message(child.sock, child.lock, {"op": "stop", "grace_s": grace_s})
        deadline = time.monotonic() + grace_s + 30.0
        for child in self._children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.error("acceptor process %d did not stop; killing it", child.proc.pid)
                child.proc.kill()
                child.proc.wait()
            if child.reader is not None:
                child.reader.join(5.0)
            child.sock.close()
        self._children.clear()


# ---------------------------------------------------------------- the acceptor process
