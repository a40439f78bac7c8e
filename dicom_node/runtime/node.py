"""The running node: listener, archive, loop (monitor, worker processes, sender), metrics.

:class:`Node` is what ``dicom-node serve`` and ``dicom-node demo`` run. Nothing it
imports loads torch: inference runs in the worker processes of
:mod:`dicom_node.runtime.supervisor` (DESIGN decision 10).

Lifecycle, as systemd (``Type=notify``) sees it:

* ``READY=1`` once the listener is bound and the loop runs (the workers load their
  models in the background; jobs wait for them); ``STATUS=`` lines with the figures of
  the moment; ``WATCHDOG=1`` at half of ``WatchdogSec`` while the listener, the sender
  and the workers' supervisor live. A worker process that dies is restarted by the
  supervisor, not by systemd, so the DICOM port stays up.
* SIGTERM (or SIGINT): ``STOPPING=1``; the listener stops accepting associations,
  those in progress get ``stop_grace_s`` to finish (then are aborted: what was not
  acknowledged the sender sends again), then the monitor, the workers (a running job
  goes back to the queue) and the sender stop; queued jobs and sends stay in
  ``queue.sqlite`` for the next start. Exit status 0.
* SIGHUP (:meth:`Node.reload`): the calling AE allow-list, the destinations (workers
  too), the log level, the tasks and the TLS files are applied at once; anything else
  that changed is logged as needing a restart. The unclaimed labels that a task or
  model names now are claimed (:mod:`dicom_node.learning.label_intake`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

from dicom_node.foundation.clock import utc_now
from dicom_node.wire.fast_receive import speedups
from dicom_node.runtime.datadir_lock import DataDirLock
from dicom_node.learning.drift import config_of
from dicom_node.foundation.durable import write_durably
from dicom_node.foundation.errors import DicomNodeError
from dicom_node.logconfig import configure_logging
from dicom_node.runtime.loop import Loop, describe_tasks
from dicom_node.wire.metrics import NodeMetrics
from dicom_node.runtime import retention
from dicom_node.runtime.observability import MetricsServer, NodeCollector, build_registry
from dicom_node.runtime.sdnotify import Notifier
from dicom_node.runtime.listener_services import listener_services
from dicom_node.wire.server import DicomServer
from dicom_node.wire.tls import load_chain
from dicom_node.settings import Settings
from twin_archive import Archive
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome
from twin_archive.reconcile import recover

#: Written in the data directory while the node serves (read by ``dicom-node status``).
STATE_FILE = "serve.json"
#: Settings applied on SIGHUP without a restart.
RELOADABLE = ("allowed_calling_aes", "destinations", "log_level", "tls_cert", "tls_key", "tls_ca",
              "tasks")

LOG = logging.getLogger(__name__)


class StartupError(DicomNodeError, OSError):
    """The node cannot start (data directory unusable, port taken)."""


def open_archive(settings: Settings) -> Archive:
    """Open the archive under the configured data directory, with a clear error."""
    try:
        return Archive(settings.data_dir, min_free_bytes=settings.min_free_mb << 20)
    except OSError as exc:
        raise StartupError(
            f"cannot use data directory {settings.data_dir}: {exc.strerror or exc}; "
            "set data_dir in the configuration, DICOM_NODE_DATA_DIR or --data-dir"
        ) from exc


class Node:
    """One running node: archive, audit log, loop (with the worker processes), listener,
    metrics endpoint, and ``serve.json`` (pid, port, the workers) while it serves.

    Parameters
    ----------
    settings : Settings
        The configuration (flags applied).
    notifier : Notifier, optional
        systemd notifications (a disabled one outside systemd).
    lock : DataDirLock, optional
        The data directory's lock, already taken; by default the node takes it.
        Either way the node releases it when it closes.

    Raises
    ------
    DataDirInUseError
        If another node holds the data directory (exit status 2).
    StartupError
        If the data directory or the port cannot be used.
    """

    def __init__(self, settings: Settings, notifier: Notifier | None = None, *,
                 lock: DataDirLock | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        # One node per data directory: locked before recovery touches anything in it
        # (``demo`` takes it earlier, before its Orthanc, and hands it in).
        self.lock = lock if lock is not None else DataDirLock(settings.data_dir)
        try:
            self.archive = open_archive(settings)
            recover(self.archive.ingest)
        except BaseException:
            self.lock.release()
            raise
        self.audit = AuditLog(settings.data_dir)
        self.metrics = NodeMetrics()
        self.state_path = Path(settings.data_dir) / STATE_FILE
        self._state: dict[str, Any] | None = None  # serve.json while serving
        self._state_lock = threading.Lock()
        self.loop = Loop(settings, self.archive, self.audit, on_workers_change=self._write_state)
        self.server = DicomServer(settings, self.archive.ingest, self.metrics, self.audit,
                                  services=listener_services(settings,
                                                             on_mpps=self.loop.mpps_changed))
        self.http: MetricsServer | None = None

    def _write_state(self) -> None:
        """(Re)write ``serve.json`` with the workers as they are now (atomic, durable replace)."""
        with self._state_lock:
            if self._state is None:
                return
            self._state["workers"] = [w.as_dict() for w in self.loop.workers.describe()]
            write_durably(self.state_path, [json.dumps(self._state).encode()])

    def alive(self) -> bool:
        """The listener, the sender and the workers' supervisor run (what the watchdog
        pings for; a dead worker is restarted by the supervisor, not by systemd)."""
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
            "workers_running": self.loop.workers.running(),
            "workers_configured": self.settings.workers,
        }
        ok = all(v for k, v in checks.items() if isinstance(v, bool))
        return ok, checks

    def _storage_metrics(self) -> list[Any]:
        """``/metrics`` families of the disk and retention (:mod:`dicom_node.runtime.retention`);
        none while the index cannot be read (a full disk: ``dicom_node_disk_full`` says so)."""
        try:
            found = retention.storage(self.settings)
        except (sqlite3.DatabaseError, OSError, RuntimeError):
            return []
        return retention.storage_families(found,
                                          nothing_prunable=self.loop.disk_guard.nothing_prunable)

    def status_line(self) -> str:
        c = self.metrics.snapshot()
        received = sum(v for k, v in c.items() if k.startswith("instances_"))
        return (f"serving {self.settings.ae_title} on port {self.server.port}: "
                f"{received} instance(s) received, {self.server.active_associations()} "
                f"association(s) open, {self.loop.sender.pending()} object(s) to send, "
                f"{self.loop.workers.running()} of {self.settings.workers} worker(s) running")

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
                    NodeCollector(self.metrics, s.data_dir, healthy=self.alive, workers=lambda: [
                        (w.state, w.restarts) for w in self.loop.workers.describe()],
                        drift=config_of(s), storage=self._storage_metrics)), self.health)
            except OSError as exc:
                self.server.stop(0)
                self.loop.stop()
                self.close()
                raise StartupError(f"cannot serve metrics on {s.metrics_bind}:{s.metrics_port}: "
                                   f"{exc.strerror or exc}") from exc
            self.http.start()
        with self._state_lock:
            self._state = {
                "pid": os.getpid(), "started_at": utc_now().isoformat(timespec="seconds"),
                "ae_title": s.ae_title, "bind_address": s.bind_address, "port": self.server.port,
                "tls": s.tls_cert is not None,
                "metrics": f"http://{s.metrics_bind}:{self.http.port}" if self.http else ""}
        self._write_state()
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
            self.loop.workers.set_log_level(new.log_level)
            applied.append("log_level")
        if "tasks" in changed:
            self.loop.set_tasks(new.tasks)
            applied.append("tasks")
            before, after = {t.name for t in old.tasks}, {t.name for t in new.tasks}
            LOG.info("tasks reloaded: now %s (added: %s; removed: %s)", describe_tasks(new.tasks),
                     ", ".join(sorted(after - before)) or "none",
                     ", ".join(sorted(before - after)) or "none")
        tls_keys = [k for k in ("tls_cert", "tls_key", "tls_ca") if k in changed]
        if (old.tls_cert is None) != (new.tls_cert is None):
            restart.append("tls_cert/tls_key/tls_ca (turning TLS on or off)")
        elif self.server.ssl_context is not None and new.tls_cert is not None:
            # Re-read even when the paths are the same: a renewed certificate.
            load_chain(self.server.ssl_context, new)
            if self.loop.sender.tls_context is not None:
                load_chain(self.loop.sender.tls_context, new)
            applied += tls_keys or ["tls files re-read"]
        self.settings = old.replace(**{k: getattr(new, k) for k in applied if k in changed})
        # Every reload: a task added or given segments, or a model registered meanwhile,
        # may name an unclaimed label's segments now.
        self.loop.claim_labels(via="SIGHUP")
        LOG.info("configuration reloaded: applied %s", ", ".join(applied) or "nothing (no change)")
        if restart:
            LOG.warning("configuration reloaded: changed but NOT applied until a restart: %s",
                        ", ".join(restart))
        return restart

    def stopping(self) -> None:
        """Called from the signal handler, before :meth:`stop`: the workers are not
        restarted from now on, and an acceptor process that exits is not a surprise (a
        signal to the whole process group reaches them too)."""
        self.server.stopping()
        self.loop.workers.stopping()

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
        with self._state_lock:
            self._state = None
        remove_state_file(self.state_path)
        self.audit.close()
        self.archive.close()
        self.lock.release()


def remove_state_file(path: Path) -> None:
    """Remove ``serve.json`` only when this process wrote it (never another node's)."""
    try:
        if int(json.loads(path.read_text()).get("pid", -1)) != os.getpid():
            return
    except (OSError, ValueError, TypeError, AttributeError):
        return
    path.unlink(missing_ok=True)
