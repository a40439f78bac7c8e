"""``dicom-node serve``: run the DICOM node until SIGTERM/SIGINT.

Besides the DICOM listener it runs the stability monitor (quiet series become jobs),
one inference worker and the sender. On SIGTERM the listener stops first, then the
monitor, the worker (a job still running after a short grace goes back to the queue)
and the sender; queued jobs and sends stay in ``queue.sqlite`` for the next start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from dicom_node.errors import DicomNodeError
from dicom_node.logconfig import configure_logging
from dicom_node.loop import Loop, apply_flags
from dicom_node.server import DicomServer
from dicom_node.settings import Settings
from twin_archive import Archive

LOG = logging.getLogger(__name__)


class StartupError(DicomNodeError, OSError):
    """The node cannot start (data directory unusable, port taken)."""


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", parents=parents,
                       help="run the DICOM node (C-ECHO, C-STORE, inference, sending results)",
                       description="Run the DICOM node until SIGTERM or Ctrl-C.")
    p.add_argument("--port", type=int, default=None, help="DICOM port (default from configuration: 11112)")
    p.add_argument("--ae-title", default=None, help="the node's AE title")
    p.add_argument("--bind", default=None, metavar="ADDRESS", help="address to listen on")
    p.add_argument("--stable-after", type=float, default=None, metavar="SECONDS",
                   help="a series is complete after this many seconds without a new instance "
                        "(default from configuration: 30)")
    p.add_argument("--destination", action="append", default=[], metavar="AET@HOST:PORT",
                   help="send SEG, SR and overlay to this DICOM node (repeatable; added to the "
                        "configuration's [[destinations]])")
    p.set_defaults(func=cmd_serve)


def open_archive(settings: Settings) -> Archive:
    """Open the archive under the configured data directory, with a clear error."""
    try:
        return Archive(settings.data_dir, min_free_bytes=settings.min_free_mb << 20)
    except OSError as exc:
        raise StartupError(
            f"cannot use data directory {settings.data_dir}: {exc.strerror or exc}; "
            "set data_dir in the configuration, DICOM_NODE_DATA_DIR or --data-dir"
        ) from exc


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    settings = apply_flags(args, settings)
    configure_logging(settings.log_level)
    archive = open_archive(settings)
    archive.recover()
    loop = Loop(settings, archive)
    server = DicomServer(settings, archive)
    try:
        server.start()
    except OSError as exc:
        archive.close()
        raise StartupError(
            f"cannot listen on {settings.bind_address}:{settings.port}: {exc.strerror or exc} "
            "(another DICOM service on that port? ports below 1024 need CAP_NET_BIND_SERVICE)"
        ) from exc
    loop.start()
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        LOG.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(1.0):
        pass
    server.stop()
    loop.stop()
    archive.close()
    LOG.info("stopped cleanly")
    return 0
