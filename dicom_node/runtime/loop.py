"""The node's loop beside the DICOM listener: stability monitor, inference workers, sender.

Started and stopped together by ``dicom-node serve`` and ``dicom-node demo``. The
inference workers are processes of their own (:mod:`dicom_node.runtime.supervisor`); nothing
here imports torch. On stop the monitor stops first, then the workers (a job still
running after a short grace goes back to the queue) and the sender; queued jobs and
sends stay in ``queue.sqlite``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

from dicom_node.runtime import retention
from dicom_node.queue.jobs import JobQueue
from dicom_node.learning.label_intake import TaskLabelIntake
from dicom_node.queue.monitor import StabilityMonitor
from dicom_node.queue.mpps_forward import MppsForwarder
from dicom_node.queue.sender import Sender
from dicom_node.wire.priors import asks_priors
from dicom_node.wire.tls import client_tls_context
from dicom_node.settings import Destination, Settings, job_seg_types, parse_destination
from dicom_node.runtime.supervisor import WorkerPool
from dicom_node.tasks import Task
from dicom_node.learning.training import NightlyScheduler
from twin_archive import Archive
from twin_archive.audit import AuditLog
from twin_archive.labels import LabelStore

LOG = logging.getLogger(__name__)


def describe_tasks(tasks: Sequence[Task]) -> str:
    """``spleen-ct, wholebody-ct (disabled)`` or ``none``."""
    return ", ".join(t.name + ("" if t.enabled else " (disabled)") for t in tasks) or "none"


def apply_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """Settings with ``--stable-after`` and ``--destination`` applied (validated).

    Raises
    ------
    ConfigError
        If a flag's value is invalid.
    """
    changes: dict[str, Any] = {}
    if getattr(args, "stable_after", None) is not None:
        changes["stable_after"] = args.stable_after
    if getattr(args, "workers", None) is not None:
        changes["workers"] = args.workers
    extra = tuple(parse_destination(text) for text in getattr(args, "destination", []) or [])
    if extra:
        changes["destinations"] = settings.destinations + extra
    return settings.replace(**changes) if changes else settings


class Loop:
    """The monitor, the worker processes and the sender of one node, started and stopped together.

    Parameters
    ----------
    on_workers_change : callable, optional
        Called when a worker process started, became ready, took a job, died or restarted.
    """

    def __init__(self, settings: Settings, archive: Archive, audit: AuditLog | None = None,
                 on_workers_change: Callable[[], None] | None = None) -> None:
        self.jobs = JobQueue(settings.data_dir)
        self.sender = Sender(settings.data_dir, ae_title=settings.ae_title,
                             backoff_initial_s=settings.send_backoff_initial_s,
                             backoff_max_s=settings.send_backoff_max_s,
                             network_timeout_s=settings.network_timeout_s,
                             tls_context=client_tls_context(settings),
                             tls_destinations=frozenset(d.key for d in settings.destinations if d.tls),
                             audit=audit, destinations=settings.destinations,
                             confirm_timeout_s=settings.confirm_timeout_s,
                             confirm_resends=settings.confirm_resends)
        self.labels = LabelStore(settings.data_dir)
        self.intake = TaskLabelIntake(settings.data_dir, self.labels, settings.tasks)
        self.monitor = StabilityMonitor(
            archive, self.jobs, settings.tasks, stable_after_s=settings.stable_after,
            label_intake=self.intake, guard_s=settings.early_guard_s,
            learn_from=settings.learn_from_series, reopen_limit=settings.early_reopen_limit,
            ask_priors=asks_priors(settings))
        self.mpps_forwarder = MppsForwarder(
            settings.data_dir, ae_title=settings.ae_title,
            backoff_initial_s=settings.send_backoff_initial_s,
            backoff_max_s=settings.send_backoff_max_s,
            network_timeout_s=settings.network_timeout_s) if settings.forward_mpps else None
        self.workers = WorkerPool(settings, self.jobs, on_queued=self.sender.wakeup.set,
                                  on_change=on_workers_change)
        if settings.backend == "triton":
            LOG.info("inference on Triton at %s (%s models); pre- and post-processing in "
                     "the workers", settings.triton_url, settings.triton_variant)
        # The node's one scheduler (STYLE rule 15): nightly training, when enabled, and
        # the archive prune; the disk guard prunes under pressure between them.
        self.scheduler = NightlyScheduler(settings)
        self.settings = settings
        self.scheduler.add_every(lambda: retention.prune(self.settings, by="scheduler", audit=audit),
                                 settings.prune_every_min, job_id="archive-prune",
                                 name="archive prune")
        self.disk_guard = retention.DiskGuard(settings, audit)
        archive.ingest.make_room = self.disk_guard.make_room
        LOG.info("tasks: %s", describe_tasks(settings.tasks))
        if not settings.destinations:
            LOG.warning("no destinations configured: results are kept in the twins only "
                        "(add [[destinations]] or --destination AET@HOST:PORT)")
        else:
            LOG.info("results go to: %s", ", ".join(
                f"{d.key} ({'/'.join(d.send)})" for d in settings.destinations))
            if len(job_seg_types(settings.destinations)) > 1:
                LOG.info("destinations ask for BINARY and LABELMAP SEGs: a job whose "
                         "destinations differ writes a SEG and an SR of each type; each "
                         "destination gets its own")

    def set_destinations(self, destinations: tuple[Destination, ...]) -> None:
        """Send future results to ``destinations`` (SIGHUP reload; queued sends keep theirs)."""
        self.workers.set_destinations(destinations)
        self.sender.tls_destinations = frozenset(d.key for d in destinations if d.tls)
        self.sender.set_destinations(destinations)

    def set_tasks(self, tasks: tuple[Task, ...]) -> None:
        """Serve ``tasks`` from now on (SIGHUP reload): new series get jobs of these
        tasks; queued jobs of a removed task fail with that reason when they come up."""
        self.monitor.set_tasks(tasks)
        self.workers.set_tasks(tasks)
        self.intake.set_tasks(tasks)
        self.scheduler.set_tasks(tasks)
        self.settings = self.settings.replace(tasks=tasks)  # their retention overrides
        self.disk_guard.settings = self.settings

    def claim_labels(self, *, via: str) -> None:
        """Claim the unclaimed labels that a configured task or model names now (at start
        and on SIGHUP); a failure is logged, the node goes on (``labels rescan`` retries)."""
        try:
            self.intake.rescan(via=via)
        except Exception:  # the reload or the start must not fail for it
            LOG.exception("could not claim unclaimed labels (%s); `dicom-node labels rescan` "
                          "tries again", via)

    def mpps_changed(self) -> None:
        """An MPPS step was created or set: the monitor and the forwarder look at once."""
        self.monitor.wake()
        if self.mpps_forwarder is not None:
            self.mpps_forwarder.wakeup.set()

    def healthy(self) -> bool:
        """True while the sender thread and the workers' supervisor run.

        Not whether each worker process lives: a dead worker is restarted by the
        supervisor (and shown in ``status``), never by stopping the listener."""
        sender = self.sender._thread  # noqa: SLF001 - the sender's own thread
        return sender is not None and sender.is_alive() and self.workers.supervising()

    def start(self) -> None:
        """Recover interrupted jobs, then start the sender, the workers and the monitor."""
        self.jobs.recover()
        self.claim_labels(via="start")
        self.sender.start()
        self.workers.start()
        self.monitor.start()
        if self.mpps_forwarder is not None:
            self.mpps_forwarder.start()
        self.scheduler.start()
        self.disk_guard.start()

    def stop(self) -> None:
        """Stop all three; what is not done stays queued for the next start."""
        self.scheduler.stop()
        self.disk_guard.stop()
        self.monitor.stop()
        if self.mpps_forwarder is not None:
            self.mpps_forwarder.stop()
        self.workers.stop()
        self.sender.stop()
        counts = self.jobs.counts()
        LOG.info("left for the next start: %d job(s) queued, %d object(s) to send",
                 counts.get("queued", 0), self.sender.pending())
        self.jobs.close()
        self.sender.close()
        self.labels.close()
