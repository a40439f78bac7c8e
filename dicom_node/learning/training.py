"""Nightly learning in the application shell: which tasks, with what settings, and when.

* :func:`task_rules` - the selection rules of a configured task (``[[tasks]]``);
* :func:`nightly_config` - the trainer's :class:`~trainer.nightly.NightlyConfig` from
  the node's settings;
* :func:`train_task` - one task's training in a subprocess at lower priority
  (``dicom-node train TASK --now`` and the nightly job);
* :class:`NightlyScheduler` - the one APScheduler 3.x ``BackgroundScheduler`` of the
  node (STYLE rule 15), started by ``dicom-node serve`` when ``train_enabled``: a
  cron job at ``train_at`` local time that trains each configured task which gained at least
  ``train_min_new_series`` labelled series of donating patients since its last
  training. The job never runs twice at once (``max_instances=1``) and a missed run
  is done once (``coalesce``) when the node was down at that time, within an hour.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from dicom_node.settings import Settings, parse_time_of_day
from dicom_node.tasks import Task, find_task
from pipelines.selection import SelectionRules
from trainer.errors import TrainingError
from trainer.changes import new_labelled_series
from trainer.child import run_in_subprocess
from trainer.nightly import NightlyConfig, TrainingOutcome

LOG = logging.getLogger(__name__)

JOB_ID = "nightly-training"


def task_rules(task: str, tasks: Sequence[Task]) -> SelectionRules:
    """The selection rules of a configured task.

    Raises
    ------
    ValueError
        If no ``[[tasks]]`` table names ``task``.
    """
    return find_task(tasks, task).rules


def nightly_config(settings: Settings, *, epochs: int | None = None,
                   min_dice: float | None = None, template: Path | None = None) -> NightlyConfig:
    """The trainer's configuration from the settings (``epochs`` overrides the maximum).

    Parameters
    ----------
    min_dice : float, optional
        The task's own quality floor (a ``[[tasks]]`` table's ``min_dice``); default
        ``settings.train_min_dice``.
    template : pathlib.Path, optional
        The task's template bundle (a ``[[tasks]]`` table's ``template``): its first
        model is trained de novo from it.

    Raises
    ------
    ValueError
        If ``epochs`` is < 1 or ``min_dice`` is outside [0, 1].
    """
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if min_dice is not None and not 0 <= min_dice <= 1:
        raise ValueError(f"min_dice must be in [0, 1], got {min_dice}")
    return NightlyConfig(
        finetune_lr=settings.train_finetune_lr, scratch_lr=settings.train_scratch_lr,
        max_epochs=epochs or settings.train_max_epochs,
        min_patches_per_epoch=settings.train_min_patches_per_epoch,
        time_budget_s=settings.train_time_budget_min * 60.0,
        margin=settings.train_promote_margin,
        min_dice=settings.train_min_dice if min_dice is None else min_dice,
        promote_after_shadow=settings.train_promote_after_shadow,
        validation_fraction=settings.train_validation_fraction,
        patch_size=settings.train_patch_size, device=settings.train_device,
        template=str(template) if template is not None else "")


def train_task(settings: Settings, task: str, *, epochs: int | None = None,
               by: str = "trainer", min_dice: float | None = None) -> TrainingOutcome:
    """Train ``task`` now, in a subprocess at ``train_nice``; return the outcome.

    Raises
    ------
    ValueError
        If the task is not configured.
    TrainingError
        If the training subprocess fails.
    """
    spec = find_task(settings.tasks, task)
    if min_dice is None:  # the task's own floor, else train_min_dice
        min_dice = spec.min_dice
    return run_in_subprocess(settings.data_dir, task, spec.rules,
                             nightly_config(settings, epochs=epochs, min_dice=min_dice,
                                            template=spec.template),
                             nice=settings.train_nice, by=by)


@dataclass(frozen=True, kw_only=True, slots=True)
class NightlyRun:
    """What one firing of the nightly job did, per task: outcome or why not."""

    started_at: float
    results: tuple[tuple[str, str], ...]  # (task, summary)


class NightlyScheduler:
    """The node's one scheduler, with the nightly training job.

    Parameters
    ----------
    settings : Settings
        ``train_at``, ``train_min_new_series``, the training settings and the
        configured tasks (every one is considered; :meth:`set_tasks` on SIGHUP).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks = tuple(settings.tasks)
        hms = parse_time_of_day(settings.train_at)
        assert hms is not None  # validated by Settings
        self.trigger = CronTrigger(hour=hms[0], minute=hms[1], second=hms[2])
        self.scheduler = BackgroundScheduler(job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
        self.scheduler.add_listener(self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        self.runs: list[NightlyRun] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Train ``tasks`` from the next firing on."""
        self.tasks = tuple(tasks)

    def add_every(self, func: Callable[[], object], minutes: float, *, job_id: str,
                  name: str) -> None:
        """Run ``func`` every ``minutes`` on this scheduler (e.g. the archive prune), the
        first time ``minutes`` after the start: not during it, beside the first
        associations (a prune at start held two database connections while the hostile-peer
        tests counted the node's descriptors, 2 of 5 suite runs)."""
        self.scheduler.add_job(func, IntervalTrigger(minutes=minutes), id=job_id, name=name,
                               replace_existing=True)

    def start(self) -> None:
        """Start the scheduler thread with the nightly job (when ``train_enabled``) and
        the jobs added with :meth:`add_every`."""
        if not self.settings.train_enabled:
            self.scheduler.start()
            LOG.info("nightly training is disabled (train_enabled = false)")
            return
        self.scheduler.add_job(self.run_nightly, self.trigger, id=JOB_ID, name="nightly training",
                               replace_existing=True)
        self.scheduler.start()
        job = self.scheduler.get_job(JOB_ID)
        LOG.info("nightly training scheduled at %s local time (next: %s); a task is trained "
                 "after >= %d new labelled series of donating patients", self.settings.train_at,
                 job.next_run_time.isoformat() if job and job.next_run_time else "-",
                 self.settings.train_min_new_series)

    def stop(self) -> None:
        """Stop the scheduler; a training subprocess in progress is terminated (its next
        run on the same dataset resumes from the checkpoint)."""
        self._cancel.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def run_nightly(self) -> NightlyRun:
        """Train every configured task that gained enough new labelled series (the job)."""
        import time

        started = time.time()
        results = []
        if self.settings.train_promote_after_shadow:
            from dicom_node.learning.shadow import promote_after_shadow

            try:
                for line in promote_after_shadow(
                        self.settings.data_dir, series=self.settings.train_promote_after_shadow,
                        min_agreement=self.settings.train_shadow_min_agreement):
                    LOG.info("nightly: %s", line)
                    results.append(("shadow", line))
            except Exception as exc:  # the training of the tasks still runs
                LOG.exception("nightly: shadow promotions failed")
                results.append(("shadow", f"failed: {exc}"))
        for spec in self.tasks:
            try:
                new = new_labelled_series(self.settings.data_dir, spec.task, spec.rules)
            except Exception as exc:  # one task's failure does not stop the others
                LOG.exception("nightly training: cannot count new labelled series of %s",
                              spec.task)
                results.append((spec.task, f"failed: {exc}"))
                continue
            if new < self.settings.train_min_new_series:
                msg = (f"{new} new labelled series since the last training; "
                       f"{self.settings.train_min_new_series} needed")
                LOG.info("nightly training of %s skipped: %s", spec.task, msg)
                results.append((spec.task, f"skipped: {msg}"))
                continue
            LOG.info("nightly training of %s: %d new labelled series", spec.task, new)
            try:
                outcome = run_in_subprocess(self.settings.data_dir, spec.task, spec.rules,
                                            nightly_config(self.settings, min_dice=spec.min_dice,
                                                           template=spec.template),
                                            nice=self.settings.train_nice, by="nightly",
                                            cancel=self._cancel)
            except TrainingError as exc:
                LOG.error("nightly training of %s failed: %s", spec.task, exc)
                results.append((spec.task, f"failed: {exc}"))
                continue
            results.append((spec.task, outcome.summary()))
        run = NightlyRun(started_at=started, results=tuple(results))
        with self._lock:
            self.runs.append(run)
        return run

    def _on_event(self, event: JobExecutionEvent) -> None:
        if event.job_id != JOB_ID:
            if event.exception is not None:
                LOG.error("scheduled job %s raised: %s", event.job_id, event.exception)
            return
        if event.exception is not None:
            LOG.error("nightly training job raised: %s", event.exception)
        else:
            LOG.info("nightly training job done: %s",
                     "; ".join(f"{t}: {r}" for t, r in getattr(event.retval, "results", ())))
