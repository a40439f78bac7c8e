"""``dicom-node serve``: run the DICOM node until SIGTERM/SIGINT.

The node itself (listener, archive, monitor, sender, scheduler, and the supervised
inference worker processes) is :class:`dicom_node.runtime.node.Node`; its lifecycle under
systemd is described there. This module is the command: flags, signals, and the
SIGHUP reload (the configuration file read again; an invalid file is logged and the
running configuration kept).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

from dicom_node.foundation.errors import DicomNodeError
from dicom_node.logconfig import configure_logging
from dicom_node.runtime.loop import apply_flags
from dicom_node.runtime.node import Node
from dicom_node.settings import Settings, load_settings

__all__ = ["cmd_serve", "register"]

LOG = logging.getLogger(__name__)


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
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="inference worker processes (default from configuration: 1)")
    p.set_defaults(func=cmd_serve)


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"data_dir": getattr(args, "data_dir", None), "log_level": getattr(args, "log_level", None),
            "port": getattr(args, "port", None), "ae_title": getattr(args, "ae_title", None),
            "bind_address": getattr(args, "bind", None)}


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    settings = apply_flags(args, settings)
    configure_logging(settings.log_level)
    node = Node(settings)
    stop = threading.Event()
    reload = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            reload.set()
            return
        node.stopping()  # first: the same signal may be ending the workers (a process group)
        LOG.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    # The handlers come first: the listener is ready (and a supervisor may send SIGHUP or
    # SIGTERM) before start() returns; a signal in between was lost, or ended the process.
    node.start()
    next_status = time.monotonic() + 10.0
    while not stop.wait(0.5):
        if reload.is_set():
            reload.clear()
            LOG.info("received SIGHUP: reloading the configuration")
            node.notifier.notify(RELOADING=1, STATUS="reloading the configuration")
            try:
                new = apply_flags(args, load_settings(getattr(args, "config", None),
                                                      overrides=_flag_overrides(args)))
                node.reload(new)
            except DicomNodeError as exc:  # ConfigError, TlsSetupError
                LOG.error("configuration NOT reloaded, the running one is kept: %s", exc)
            node.notifier.notify(READY=1, STATUS=node.status_line())
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + 10.0
            node.notifier.notify(STATUS=node.status_line())
    node.stop()
    LOG.info("stopped cleanly")
    return 0
