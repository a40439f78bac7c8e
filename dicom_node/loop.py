"""The node's loop beside the DICOM listener: stability monitor, inference worker, sender.

Started and stopped together by ``dicom-node serve`` and ``dicom-node demo``. On stop the
monitor stops first, then the worker (a job still running after a short grace goes back
to the queue) and the sender; queued jobs and sends stay in ``queue.sqlite``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

from dicom_node.jobs import JobQueue
from dicom_node.label_intake import intake_seg_series
from dicom_node.monitor import StabilityMonitor
from dicom_node.sender import Sender
from dicom_node.server import client_tls_context
from dicom_node.settings import Destination, Settings, parse_destination
from dicom_node.training import NightlyScheduler
from dicom_node.worker import DEFAULT_PIPELINES, Worker
from pipelines.memory import budget_bytes
from twin_archive import Archive
from twin_archive.audit import AuditLog
from twin_archive.labels import LabelStore
from twin_archive.results import ResultStore

LOG = logging.getLogger(__name__)


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
    extra = tuple(parse_destination(text) for text in getattr(args, "destination", []) or [])
    if extra:
        changes["destinations"] = settings.destinations + extra
    return settings.replace(**changes) if changes else settings


class Loop:
    """The monitor, the worker and the sender of one node, started and stopped together.

    Raises
    ------
    WorkerStartupError
        If the pipeline runner cannot be imported (at construction, i.e. start-up).
    """

    def __init__(self, settings: Settings, archive: Archive, audit: AuditLog | None = None) -> None:
        self.jobs = JobQueue(settings.data_dir)
        self.results = ResultStore(settings.data_dir)
        self.sender = Sender(settings.data_dir, ae_title=settings.ae_title,
                             backoff_initial_s=settings.send_backoff_initial_s,
                             backoff_max_s=settings.send_backoff_max_s,
                             network_timeout_s=settings.network_timeout_s,
                             tls_context=client_tls_context(settings),
                             tls_destinations=frozenset(d.key for d in settings.destinations if d.tls),
                             audit=audit)
        self.labels = LabelStore(settings.data_dir)
        self.monitor = StabilityMonitor(
            archive, self.jobs, DEFAULT_PIPELINES, stable_after_s=settings.stable_after,
            label_intake=functools.partial(intake_seg_series, labels=self.labels))
        self.worker = Worker(archive=archive, jobs=self.jobs, results=self.results,
                             sender=self.sender, destinations=settings.destinations,
                             pipelines=DEFAULT_PIPELINES,
                             max_memory_bytes=budget_bytes(settings.max_memory_gb))
        # The node's one scheduler (STYLE rule 15): nightly training, when enabled.
        self.scheduler = NightlyScheduler(settings) if settings.train_enabled else None
        if not settings.destinations:
            LOG.warning("no destinations configured: results are kept in the twins only "
                        "(add [[destinations]] or --destination AET@HOST:PORT)")
        else:
            LOG.info("results go to: %s", ", ".join(
                f"{d.key} ({'/'.join(d.send)})" for d in settings.destinations))

    def set_destinations(self, destinations: tuple[Destination, ...]) -> None:
        """Send future results to ``destinations`` (SIGHUP reload; queued sends keep theirs)."""
        self.worker.destinations = tuple(destinations)
        self.sender.tls_destinations = frozenset(d.key for d in destinations if d.tls)

    def healthy(self) -> bool:
        """True while the worker and the sender threads run."""
        threads = (self.worker._thread, self.sender._thread)
        return all(t is not None and t.is_alive() for t in threads)

    def start(self) -> None:
        """Recover interrupted jobs, then start the sender, the worker and the monitor."""
        self.jobs.recover()
        self.sender.start()
        self.worker.start()
        self.monitor.start()
        if self.scheduler is not None:
            self.scheduler.start()
        else:
            LOG.info("nightly training is disabled (train_enabled = false)")

    def stop(self) -> None:
        """Stop all three; what is not done stays queued for the next start."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.monitor.stop()
        self.worker.stop()
        self.sender.stop()
        counts = self.jobs.counts()
        LOG.info("left for the next start: %d job(s) queued, %d object(s) to send",
                 counts.get("queued", 0), self.sender.pending())
        self.jobs.close()
        self.sender.close()
        self.results.close()
        self.labels.close()
