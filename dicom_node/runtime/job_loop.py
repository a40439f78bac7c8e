"""The worker thread's policy: claim a job, run it, record how it ended; wait well.

:class:`JobLoop` is what a :class:`~dicom_node.runtime.worker.Worker` does around each
job (the job itself, archive files -> pipeline -> results -> sends, is the worker's
``run``): claim the next due job, record its end in the queue, and decide what a job
that cannot end now becomes.

A task with no active model for the series' scanner does not fail the job: the job
*waits* (state ``waiting``, the reason says which model to import; logged once per task
and scanner, no traceback). Every :data:`WAITING_CHECK_S` seconds the worker asks the
registry whether a model now serves the waiting jobs (``models import --activate``,
``promote``, ``rollback`` in another process) and queues those whose series was received
within ``waiting_for_model_max_age_h``; older ones are left failed with the reason.

Failures: a series the pipeline refuses (geometry, empty result, a predicted memory need
over ``max_memory_gb``) fails at once with the reason, not retried; anything else (an
unexpected error) is retried by the queue a bounded number of
times, then left failed with its reason.

A full disk is no failure. A job whose inference has run when storing its results (or
its completion) finds no space stays claimed, its :class:`Computed` work kept in
memory; the worker takes no other job meanwhile and tries only the storing again every
:data:`~dicom_node.queue.jobs.SPACE_RETRY_S` seconds, or at once when space was freed. A job
that finds the disk full before its inference goes back to the queue
(:meth:`~dicom_node.queue.jobs.JobQueue.wait_for_space`). Neither counts as an attempt; the
worker says so in one journal line, and in one more when it works again.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from dicom_node.foundation.clock import utc_now
from dicom_node.foundation.faults import (
    FULL_BELOW_BYTES,
    StateLog,
    describe,
    free_bytes,
    is_out_of_space,
)
from dicom_node.queue.jobs import SPACE_RETRY_S, Job, JobKind, JobQueue
from pipelines.errors import PipelineError
from pipelines.triton import TritonUnavailableError
from registry.errors import NoActiveModelError

if TYPE_CHECKING:
    from registry.store import Registry
    from twin_archive import Archive
    from twin_archive.results import AIResult

LOG = logging.getLogger("dicom_node.runtime.worker")

#: Seconds between two looks at the registry for models that jobs wait for.
WAITING_CHECK_S = 2.0


class JobRefused(PipelineError):
    """The job cannot succeed however often it is tried (the message says why)."""


class JobWaitsForModel(PipelineError, LookupError):
    """The job's task has no active model for the series' scanner: the job waits.

    Parameters
    ----------
    task : str
    manufacturer, scanner_model : str
        The series' scanner ('' when not recorded).
    """

    def __init__(self, task: str, manufacturer: str, scanner_model: str) -> None:
        self.task = task
        self.manufacturer = manufacturer
        self.scanner_model = scanner_model
        scanner = " / ".join(s for s in (manufacturer, scanner_model) if s) or "any scanner"
        super().__init__(f"waiting for a model: task {task!r} has no active model for {scanner}; "
                         f"import one with `dicom-node models import BUNDLE_DIR --task {task} "
                         "--activate` or promote a candidate, and the series runs")


@dataclass(frozen=True, kw_only=True, slots=True)
class JobOutcome:
    """What one job produced."""

    job_id: int
    result: AIResult | None
    note: str
    seconds: float


class JobLoop:
    """Claims jobs, runs each (``run``, the subclass's), records how it ended, in a thread.

    The subclass provides ``run(job)``, ``_kept_for(job)`` (the work kept for a job that
    found the disk full) and ``_registry_here()``, and sets the attributes below.
    """

    #: First wait of a job for Triton, seconds (doubled each further time).
    WAIT_BACKOFF_INITIAL_S = 2.0

    archive: Archive
    jobs: JobQueue
    name: str
    waiting_max_age_h: float
    wait_backoff_max_s: float
    current: Job | None
    computed: Any
    live: Any
    _registry: Registry | None
    _waiting_told: set[tuple[str, str, str]]
    _next_waiting_check: float
    _stop: threading.Event
    _thread: threading.Thread | None
    _waits: int
    _space: StateLog
    _loop_state: StateLog
    _stalled: Job | None
    _storing: Job | None
    _storing_at: float
    _storing_free: int

    def run(self, job: Job) -> JobOutcome:
        raise NotImplementedError

    def _kept_for(self, job: Job) -> Any:
        raise NotImplementedError

    def _registry_here(self) -> Registry:
        raise NotImplementedError

    def run_one(self) -> JobOutcome | None:
        """Claim and run the next due job, recording its end in the queue; ``None`` if none."""
        job = self.jobs.claim()
        if job is None:
            return None
        self.computed = None  # the work of an earlier job is of no use to this one
        level = logging.DEBUG if self._space.failing else logging.INFO
        if job.kind is JobKind.PRIORS:
            LOG.log(level, "job %d: the priors of study %s for %s, attempt %d of %d", job.id,
                    job.study_uid, job.task, job.attempts, job.max_attempts)
        else:
            LOG.log(level, "job %d: %s on series %s (%d instance(s)), attempt %d of %d", job.id,
                    job.task, job.series_uid, job.instances, job.attempts, job.max_attempts)
        return self._run_claimed(job)

    def _run_claimed(self, job: Job) -> JobOutcome | None:
        """Run a claimed job and record how it ended; ``None`` when it has no result now."""
        self.current = job
        try:
            outcome = self.run(job)
            self.jobs.complete(job.id, result_id=outcome.result.id if outcome.result else None,
                               note=outcome.note)
        except Exception as exc:  # noqa: BLE001 - each kind is recorded in _not_done
            self._not_done(job, exc)
            return None
        finally:
            self.current = None
        self._waits = 0
        self.computed = None
        self._space.ok()
        if outcome.result is None:
            LOG.info("job %d done: %s", job.id, outcome.note)
        return outcome

    def _not_done(self, job: Job, exc: Exception) -> None:
        """Record in the queue why a claimed job has no result now (see :meth:`run`)."""
        if is_out_of_space(exc):  # not a failure of the job: it waits for space
            self._wait_for_space(job, exc)
            return
        self.computed = None
        if isinstance(exc, JobRefused):
            self.jobs.fail(job.id, str(exc), permanent=True)
            LOG.error("job %d failed, not retried: %s", job.id, exc)
        elif isinstance(exc, TritonUnavailableError):
            delay = min(self.wait_backoff_max_s,
                        self.WAIT_BACKOFF_INITIAL_S * 2 ** min(self._waits, 30))
            self._waits += 1
            self.jobs.postpone(job.id, str(exc), delay_s=delay)
            LOG.warning("job %d waits %.0f s, not counted as an attempt: %s", job.id, delay, exc)
        elif isinstance(exc, JobWaitsForModel):
            self.jobs.wait_for_model(job.id, str(exc), manufacturer=exc.manufacturer,
                                     scanner_model=exc.scanner_model)
            told = (exc.task, exc.manufacturer, exc.scanner_model)
            if told not in self._waiting_told:  # once per task and scanner, no traceback
                self._waiting_told.add(told)
                LOG.warning("job %d on series %s %s", job.id, job.series_uid, exc)
            else:
                LOG.debug("job %d on series %s also waits for a model of %s", job.id,
                          job.series_uid, exc.task)
        else:
            state = self.jobs.fail(job.id, f"{type(exc).__name__}: {exc}")
            LOG.error("job %d attempt %d failed (%s)", job.id, job.attempts,
                      "will be retried" if state.value == "queued" else "no attempts left",
                      exc_info=exc)

    def _wait_for_space(self, job: Job, exc: BaseException) -> None:
        """The disk is full. A job whose inference ran stays claimed, its work kept, and
        only the storing is tried again (:meth:`_retry_storing`); a job that had not run
        yet goes back to the queue. Neither counts as a failed attempt."""
        if self._kept_for(job) is None:
            self._space.failed(exc, f"job {job.id} waits for disk space (not counted as a "
                                    "failed attempt)")
            self._stalled = job
            self._requeue_stalled()
            return
        self._space.failed(exc, f"job {job.id} waits for disk space, its inference done and "
                                "kept: only storing its results is tried again (not counted as "
                                "a failed attempt)")
        self._storing = job
        self._storing_at = time.monotonic() + SPACE_RETRY_S
        self._storing_free = free_bytes(self.archive.data_dir) or 0

    def _retry_storing(self) -> JobOutcome | None:
        """Try again to store the kept results of the job that found the disk full: every
        :data:`~dicom_node.queue.jobs.SPACE_RETRY_S` seconds, or at once when space was freed."""
        job = self._storing
        if job is None:
            return None
        freed = (free_bytes(self.archive.data_dir) or 0) - self._storing_free
        if time.monotonic() < self._storing_at and freed < FULL_BELOW_BYTES:
            return None
        self._storing = None
        return self._run_claimed(job)

    # ----------------------------------------------------------------- waiting jobs
    def check_waiting(self) -> int:
        """Queue the waiting jobs a model now serves; fail those waiting too long.

        Returns the number of jobs queued again.
        """
        cutoff = utc_now() - timedelta(hours=self.waiting_max_age_h)
        for job in self.jobs.expire_waiting(received_before=cutoff,
                                            max_age_h=self.waiting_max_age_h):
            LOG.warning("job %d (%s) on series %s no longer waits: no model became active within "
                        "%g h of the series' arrival", job.id, job.task, job.series_uid,
                        self.waiting_max_age_h)
        released = 0
        for task, manufacturer, scanner_model in self.jobs.waiting_scanners():
            try:
                version = self._registry_here().resolve(task, manufacturer, scanner_model)
            except NoActiveModelError:
                continue
            jobs = self.jobs.release_waiting(task, manufacturer, scanner_model,
                                             received_after=cutoff)
            self._waiting_told.discard((task, manufacturer, scanner_model))
            if jobs:
                released += len(jobs)
                LOG.info("model %s now serves task %s (%s): %d waiting job(s) queued: %s",
                         version.version, task, version.scope, len(jobs),
                         ", ".join(str(j.id) for j in jobs))
        return released

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Work in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() >= self._next_waiting_check:
                self._next_waiting_check = time.monotonic() + WAITING_CHECK_S
                try:
                    self.check_waiting()
                except Exception:
                    LOG.exception("%s: could not look for models that jobs wait for", self.name)
            try:
                if self._storing is not None:  # no other job while one waits to store
                    outcome = self._retry_storing()
                else:
                    ready = self._requeue_stalled() and not self._below_reserve()
                    outcome = self.run_one() if ready else None
                self._loop_state.ok()
            except Exception as exc:
                self._loop_state.failed(exc, "could not take a job")
                outcome = None
            if outcome is None and not self._stop.is_set():
                self.jobs.wakeup.wait(1.0)
                self.jobs.wakeup.clear()
        if self._registry is not None:
            self._registry.close()
        self.live.close()

    def _requeue_stalled(self) -> bool:
        """Give the job that found the disk full back to the queue (not as a failed
        attempt); the queue's own file may be full too, so this is retried before each
        claim until it works. True when no job is left stalled."""
        job = self._stalled
        if job is None:
            return True
        try:
            self.jobs.wait_for_space(job.id, "no space left on the data directory's disk")
        except Exception as exc:  # noqa: BLE001 - the queue cannot be written either
            if not is_out_of_space(exc):
                raise
            return False
        self._stalled = None
        return True

    def _below_reserve(self) -> bool:
        """True (and said once) while free space is below the archive's reserve: no job
        is taken then, so none runs only to find the disk full."""
        reserve = self.archive.min_free_bytes
        if not reserve:
            return False
        try:
            free = shutil.disk_usage(self.archive.data_dir).free
        except OSError:
            return False
        if free >= reserve:
            return False
        self._space.failed(OSError(errno.ENOSPC, f"{free >> 20} MiB free, below the reserve "
                                   f"of {reserve >> 20} MiB (min_free_mb)"),
                           "jobs wait for disk space")
        return True

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking jobs; a job still running after ``grace_s`` goes back to the queue."""
        self._stop.set()
        self.jobs.wakeup.set()
        if self._thread is None:
            return
        self._thread.join(grace_s)
        job = self.current
        if self._thread.is_alive() and job is not None:
            self.jobs.requeue_running(job.id)
            LOG.info("%s: job %d interrupted by the stop; it stays queued and runs after the "
                     "restart", self.name, job.id)
        storing = self._storing
        if storing is not None and not self._thread.is_alive():
            try:  # on a full disk this may fail too: the next start's recovery queues it
                self.jobs.requeue_running(storing.id)
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                LOG.warning("%s: job %d waited for disk space and stays running for the next "
                            "start to queue (%s)", self.name, storing.id, describe(exc))
            else:
                LOG.info("%s: job %d waited for disk space; it stays queued and runs again "
                         "after the restart (its kept inference lived in this process)",
                         self.name, storing.id)
