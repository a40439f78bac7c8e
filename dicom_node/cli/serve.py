"""``dicom-node serve``: run the DICOM node until SIGTERM/SIGINT.

Besides the DICOM listener it runs the stability monitor (quiet series become jobs),
one inference worker and the sender.

Lifecycle, as systemd (``Type=notify``) sees it:

* ``READY=1`` once the listener is bound and the loop runs; ``STATUS=`` lines with
  the figures of the moment; ``WATCHDOG=1`` at half of ``WatchdogSec`` while the
  listener, the worker and the sender threads live.
* SIGTERM (or SIGINT): ``STOPPING=1``; the listener stops accepting associations,
  those in progress get ``stop_grace_s`` to finish (then are aborted: what was not
  acknowledged the sender sends again), then the monitor, the worker (a running job
  goes back to the queue) and the sender stop; queued jobs and sends stay in
  ``queue.sqlite`` for the next start. Exit status 0.
* SIGHUP: the configuration file is read again. Applied at once: the calling AE
  allow-list, the destinations, the log level, and the TLS certificate/key/CA files
  (re-read, for certificate renewal). Anything else that changed is logged as needing
  a restart. An invalid file is logged and the running configuration kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node import speedups
from dicom_node.errors import DicomNodeError
from dicom_node.logconfig import configure_logging
from dicom_node.loop import Loop, apply_flags
from dicom_node.metrics import NodeMetrics
from dicom_node.observability import MetricsServer, NodeCollector, build_registry
from dicom_node.sdnotify import Notifier
from dicom_node.server import DicomServer, _load_chain
from dicom_node.settings import Settings, load_settings
from twin_archive import Archive
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome

#: Written in the data directory while the node serves (read by ``dicom-node status``).
STATE_FILE = "serve.json"
#: Settings applied on SIGHUP without a restart.
RELOADABLE = ("allowed_calling_aes", "destinations", "log_level", "tls_cert", "tls_key", "tls_ca")

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


def drift_config(settings: Settings) -> Any:
    """The ``drift_*`` settings for ``/metrics`` (:mod:`dicom_node.drift`)."""
    from dicom_node.cli.drift import config_of

    return config_of(settings)


def open_archive(settings: Settings) -> Archive:
    """Open the archive under the configured data directory, with a clear error."""
    try:
        return Archive(settings.data_dir, min_free_bytes=settings.min_free_mb << 20)
    except OSError as exc:
        raise StartupError(
            f"cannot use data directory {settings.data_dir}: {exc.strerror or exc}; "
            "set data_dir in the configuration, DICOM_NODE_DATA_DIR or --data-dir"
        ) from exc


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"data_dir": getattr(args, "data_dir", None), "log_level": getattr(args, "log_level", None),
            "port": getattr(args, "port", None), "ae_title": getattr(args, "ae_title", None),
            "bind_address": getattr(args, "bind", None)}


class Node:
    """One running node: archive, audit log, loop, listener, metrics endpoint.

    Parameters
    ----------
    settings : Settings
        The configuration (flags applied).
    notifier : Notifier, optional
        systemd notifications (a disabled one outside systemd).

    Raises
    ------
    StartupError
        If the data directory or the port cannot be used.
    """

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.archive = open_archive(settings)
        self.archive.recover()
        self.audit = AuditLog(settings.data_dir)
        self.metrics = NodeMetrics()
        self.loop = Loop(settings, self.archive, self.audit)
        self.server = DicomServer(settings, self.archive, self.metrics, self.audit)
        self.http: MetricsServer | None = None
        self.state_path = Path(settings.data_dir) / STATE_FILE

    def alive(self) -> bool:
        """The listener, the worker and the sender run (what the watchdog pings for)."""
        return self.server.listening and self.loop.healthy()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: every check with its detail; healthy when all pass."""
        free = shutil.disk_usage(self.settings.data_dir).free
        reserve = self.settings.min_free_mb << 20
        checks: dict[str, Any] = {
            "listener": self.server.listening,
            "worker_and_sender": self.loop.healthy(),
            "data_dir_writable": os.access(self.settings.data_dir, os.W_OK),
            "disk_above_reserve": free > reserve,
            "free_bytes": free,
            "associations_active": self.server.active_associations(),
        }
        ok = all(v for k, v in checks.items() if isinstance(v, bool))
        return ok, checks

    def status_line(self) -> str:
        c = self.metrics.snapshot()
        received = sum(v for k, v in c.items() if k.startswith("instances_"))
        return (f"serving {self.settings.ae_title} on port {self.server.port}: "
                f"{received} instance(s) received, {self.server.active_associations()} "
                f"association(s) open, {self.loop.sender.pending()} object(s) to send")

    def start(self) -> None:
        """Listen, start the loop and the metrics endpoint; tell systemd we are ready.

        Raises
        ------
        StartupError
            If the DICOM or the metrics port cannot be bound.
        """
        s = self.settings
        frozen = speedups.freeze_heap()  # after set-up, before serving
        LOG.debug("%d objects exempted from full garbage collections", frozen)
        try:
            self.server.start()
        except OSError as exc:
            self.close()
            raise StartupError(
                f"cannot listen on {s.bind_address}:{s.port}: {exc.strerror or exc} "
                "(another DICOM service on that port? ports below 1024 need CAP_NET_BIND_SERVICE)"
            ) from exc
        self.loop.start()
        if s.metrics_port:
            try:
                self.http = MetricsServer(s.metrics_bind, s.metrics_port, build_registry(
                    NodeCollector(self.metrics, s.data_dir, healthy=self.alive,
                                  drift=drift_config(s))), self.health)
            except OSError as exc:
                self.server.stop(0)
                self.loop.stop()
                self.close()
                raise StartupError(f"cannot serve metrics on {s.metrics_bind}:{s.metrics_port}: "
                                   f"{exc.strerror or exc}") from exc
            self.http.start()
        self.state_path.write_text(json.dumps({
            "pid": os.getpid(), "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ae_title": s.ae_title, "bind_address": s.bind_address, "port": self.server.port,
            "tls": s.tls_cert is not None,
            "metrics": f"http://{s.metrics_bind}:{self.http.port}" if self.http else ""}))
        self.audit.record(AuditEvent.APPLICATION_START, AuditOutcome.SUCCESS, "dicom-node",
                          s.ae_title, {"pid": os.getpid(), "port": self.server.port,
                                       "tls": s.tls_cert is not None})
        self.notifier.notify(READY=1, MAINPID=os.getpid(), STATUS=self.status_line())
        self.notifier.start_watchdog(self.alive)

    def reload(self, new: Settings) -> list[str]:
        """Apply what can change while serving; return the keys that need a restart."""
        old = self.settings
        changed = [f.name for f in dataclasses.fields(Settings)
                   if getattr(old, f.name) != getattr(new, f.name) and f.name != "config_path"]
        applied: list[str] = []
        restart = [key for key in changed if key not in RELOADABLE]
        if "allowed_calling_aes" in changed:
            self.server.set_allowed_calling_aes(new.allowed_calling_aes)
            applied.append("allowed_calling_aes")
        if "destinations" in changed:
            self.loop.set_destinations(new.destinations)
            applied.append("destinations")
        if "log_level" in changed:
            configure_logging(new.log_level)
            applied.append("log_level")
        tls_keys = [k for k in ("tls_cert", "tls_key", "tls_ca") if k in changed]
        if (old.tls_cert is None) != (new.tls_cert is None):
            restart.append("tls_cert/tls_key/tls_ca (turning TLS on or off)")
        elif self.server.ssl_context is not None and new.tls_cert is not None:
            # Re-read even when the paths are the same: a renewed certificate.
            _load_chain(self.server.ssl_context, new)
            if self.loop.sender.tls_context is not None:
                _load_chain(self.loop.sender.tls_context, new)
            applied += tls_keys or ["tls files re-read"]
        self.settings = old.replace(**{k: getattr(new, k) for k in applied if k in changed})
        LOG.info("configuration reloaded: applied %s", ", ".join(applied) or "nothing (no change)")
        if restart:
            LOG.warning("configuration reloaded: changed but NOT applied until a restart: %s",
                        ", ".join(restart))
        return restart

    def stop(self) -> None:
        """Stop in order (listener, loop, metrics); leave queues for the next start."""
        self.notifier.notify(STOPPING=1, STATUS="stopping: finishing associations in progress")
        self.server.stop()
        self.loop.stop()
        if self.http is not None:
            self.http.stop()
        try:
            self.audit.record(AuditEvent.APPLICATION_STOP, AuditOutcome.SUCCESS, "dicom-node",
                              self.settings.ae_title, {"pid": os.getpid()})
        except Exception:
            LOG.exception("could not write the audit event application-stop")
        self.close()

    def close(self) -> None:
        self.notifier.close()
        self.state_path.unlink(missing_ok=True)
        self.audit.close()
        self.archive.close()


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    settings = apply_flags(args, settings)
    configure_logging(settings.log_level)
    node = Node(settings)
    node.start()
    stop = threading.Event()
    reload = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            reload.set()
            return
        LOG.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
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
