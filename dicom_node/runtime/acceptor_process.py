"""One extra acceptor process (``listener_processes`` > 1): the child's side.

Started by :class:`dicom_node.wire.acceptor.AcceptorPool` as ``python -m
dicom_node.runtime.acceptor_process FD PARENT_PID LISTEN_FD``: it accepts associations
on the node's inherited listening socket with a :class:`~dicom_node.wire.server.DicomServer`
of its own (the same services as the node's: :mod:`dicom_node.runtime.listener_services`),
stores into the same archive, reports its counters to the node every second and stops
when told (or at once when the node is gone).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from dicom_node.runtime.listener_services import listener_services
from dicom_node.settings import Settings
from dicom_node.wire.acceptor import REPORT_EVERY_S as _REPORT_EVERY_S
from dicom_node.wire.childproc import die_with_parent, send_message
from dicom_node.wire.metrics import NodeMetrics


def _serve(sock: socket.socket, listener: socket.socket, settings: Settings, buf: bytes) -> int:
    from dicom_node.wire.fast_receive import speedups
    from dicom_node.logconfig import configure_logging
    from dicom_node.wire.server import DicomServer
    from twin_archive import Archive
    from twin_archive.audit import AuditLog

    configure_logging(settings.log_level)
    archive = Archive(settings.data_dir, min_free_bytes=settings.min_free_mb << 20)
    audit = AuditLog(settings.data_dir)
    metrics = NodeMetrics()
    server = DicomServer(settings, archive.ingest, metrics, audit, listen_socket=listener,
                         services=listener_services(settings))
    lock = threading.Lock()
    speedups.freeze_heap()  # after set-up, before serving
    server.start()
    send_message(sock, lock, {"op": "ready", "pid": os.getpid()})

    stop_grace: list[float] = []
    wake_r, wake_w = os.pipe()

    def on_sigterm(signum: int, _frame: object) -> None:
        stop_grace.append(settings.stop_grace_s)
        os.write(wake_w, b"x")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which tells us
    report = _Reporter(sock, lock, metrics)
    _obey(sock, buf, server, stop_grace, wake_r, report)
    server.stop(stop_grace[0])
    report()
    archive.close()
    return 0


class _Reporter:
    """Sends the node what the counters gained since the last report (nothing if nothing)."""

    def __init__(self, sock: socket.socket, lock: threading.Lock, metrics: NodeMetrics) -> None:
        self.sock, self.lock, self.metrics = sock, lock, metrics
        self.reported: dict[str, int] = {}
        self.reported_bytes = 0

    def __call__(self) -> None:
        now = self.metrics.snapshot()
        size = now.pop("bytes_received", 0)
        delta = {k: v - self.reported.get(k, 0) for k, v in now.items()
                 if v != self.reported.get(k, 0)}
        if delta or size != self.reported_bytes:
            send_message(self.sock, self.lock, {"op": "metrics", "counts": delta,
                                                "bytes_received": size - self.reported_bytes})
        self.reported, self.reported_bytes = now, size


def _obey(sock: socket.socket, buf: bytes, server: Any, stop_grace: list[float], wake_r: int,
          report: _Reporter) -> None:
    """Follow the node's messages (allowed calling AE titles, stop) and report the counters
    every :data:`_REPORT_EVERY_S`, until told to stop, SIGTERM or the node is gone."""
    next_report = time.monotonic() + _REPORT_EVERY_S
    while not stop_grace:
        if b"\n" in buf:
            ready: list[Any] = [sock]
        else:
            ready, _, _ = select.select([sock, wake_r], [], [],
                                        max(0.0, next_report - time.monotonic()))
        if time.monotonic() >= next_report:
            report()
            next_report = time.monotonic() + _REPORT_EVERY_S
        if sock not in ready:
            continue
        if b"\n" not in buf:
            data = sock.recv(65536)
            if not data:  # the node is gone: stop at once, like it
                stop_grace.append(0.0)
                return
            buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            message = json.loads(line)
            if message.get("op") == "allow":
                server.set_allowed_calling_aes(tuple(message["titles"]))
            elif message.get("op") == "stop":
                stop_grace.append(float(message["grace_s"]))


def main(argv: list[str] | None = None) -> int:
    """Entry point of an acceptor process: ``python -m dicom_node.runtime.acceptor_process FD PARENT_PID LISTEN_FD``."""
    args = sys.argv[1:] if argv is None else argv
    fd, parent_pid, listen_fd = int(args[0]), int(args[1]), int(args[2])
    die_with_parent(parent_pid)
    sock = socket.socket(fileno=fd)
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(1 << 20)
        if not data:
            return 1
        buf += data
    line, rest = buf.split(b"\n", 1)
    message = json.loads(line)
    settings = pickle.loads(base64.b64decode(message["blob"]))  # noqa: S301 - from our parent
    return _serve(sock, socket.socket(fileno=listen_fd), settings, rest)


if __name__ == "__main__":
    sys.exit(main())
