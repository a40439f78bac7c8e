"""The inference worker: one job = archive files -> pipeline -> results in the twin -> sends.

A :class:`Worker` thread claims jobs from the :class:`~dicom_node.jobs.JobQueue`, runs
the pipeline of the job's task on the current instances of the series
(:func:`pipelines.run.run_series`), records the SEG and SR in the twin
(:class:`~twin_archive.results.ResultStore`, under the job's key, so a job re-run after
a crash records nothing twice) and queues them for every destination
(:class:`~dicom_node.sender.Sender`); only then does it build, check, record and queue
the overlay series (one image per slice with a segment), so the SEG and SR do not wait
for it. A node stopped between the two gets the overlay on the job's re-run, when the
pipeline finds the same segments again.

What a job produces is its task's (:class:`~dicom_node.tasks.Task`, from ``[[tasks]]``):
its selection rules, and its ``outputs`` narrowing what each destination gets.

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
:data:`~dicom_node.jobs.SPACE_RETRY_S` seconds, or at once when space was freed. A job
that finds the disk full before its inference goes back to the queue
(:meth:`~dicom_node.jobs.JobQueue.wait_for_space`). Neither counts as an attempt; the
worker says so in one journal line, and in one more when it works again.

With ``backend = "triton"`` the model runs on a Triton Inference Server
(:mod:`pipelines.triton`). Triton down or the model not loaded there is not a failure
of the job: it goes back to the queue to wait (its attempt not counted, the reason
``waiting for Triton at ...`` on the job, which ``dicom-node status`` shows), 2 s
the first time and twice as long each further time up to ``triton_backoff_max_s``,
until Triton answers; it never falls back to local inference silently.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from dicom_node.database import utc_now
from dicom_node.faults import FULL_BELOW_BYTES, StateLog, describe, free_bytes, is_out_of_space
from dicom_node.jobs import SPACE_RETRY_S, Job, JobQueue
from dicom_node.live_learning import LiveLearning
from dicom_node.prior_results import JobPriors, volume_points
from dicom_node.priors import PriorRetriever
from dicom_node.sender import Sender
from dicom_node.settings import Destination, Settings
from dicom_node.tasks import Task
from pipelines.errors import EmptyResultError, PipelineError, SeriesGeometryError
from pipelines.inference import LoadedModel, load_model
from pipelines.memory import MemoryBudgetError
from pipelines.triton import TritonTarget, TritonUnavailableError, load_triton_model
from pipelines.types import WriterOptions
from pipelines.comparison import banner_line
from pipelines.writers import build_overlay
from pipelines.writers.history_plot import history_image
from pipelines.validation import invalid, validate_results, validate_series
from registry.errors import NoActiveModelError
from registry.store import Registry
from twin_archive import Archive
from twin_archive.history import HistoryStore
from twin_archive.results import AIResult, ResultStore, SegmentMeasure

LOG = logging.getLogger(__name__)

#: Seconds between two looks at the registry for models that jobs wait for.
WAITING_CHECK_S = 2.0


class WorkerStartupError(PipelineError, RuntimeError):
    """The worker cannot start: the pipeline runner is not installed."""


def _pipeline_runner() -> Any:
    """``pipelines.run.run_series``, imported when the worker is built (start-up, not call time).

    Raises
    ------
    WorkerStartupError
        If :mod:`pipelines.run` cannot be imported.
    """
    try:
        from pipelines.run import run_series
    except ImportError as exc:
        raise WorkerStartupError(f"inference is unavailable: cannot import pipelines.run ({exc})") from exc
    return run_series


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Computed:
    """What the pipeline made of one job's series, before anything of it is stored.

    Kept by the worker until the job ends, so that a job that found the disk full
    stores its results once space is back without running its inference again (in
    memory only: a worker stopped or killed meanwhile leaves the job to run again).
    """

    job_key: str
    files: tuple[Path, ...]
    loaded: LoadedModel
    outcome: Any  # pipelines.run's outcome: results (SEG, SR), segments, volume, model
    model_load_s: float
    pipeline_s: float


class Worker:
    """Runs inference jobs in a background thread.

    Parameters
    ----------
    archive : twin_archive.Archive
        Source of the series files.
    jobs : JobQueue
        The queue it takes jobs from.
    results : ResultStore
        Where results are recorded.
    sender : Sender
        Where results are queued for sending.
    destinations : sequence of Destination
        Who gets results.
    tasks : sequence of Task
        Tasks served: their selection rules and outputs (:meth:`set_tasks` on SIGHUP).
    waiting_max_age_h : float
        Jobs waiting for a model run when one becomes active only if their series was
        received within this many hours; older ones are left failed.
    name : str
        Thread name (``worker-1``).
    triton : TritonTarget, optional
        Run the models on this Triton server instead of here.
    wait_backoff_max_s : float
        Longest wait of a job for Triton between two tries, seconds.
    max_memory_bytes : int
        Memory budget of one inference, bytes (0: none): a series predicted over it
        is refused before it starts, once, with one line (``max_memory_gb``).
    """

    #: First wait of a job for Triton, seconds (doubled each further time).
    WAIT_BACKOFF_INITIAL_S = 2.0

    def __init__(self, *, archive: Archive, jobs: JobQueue, results: ResultStore, sender: Sender,
                 destinations: Sequence[Destination], tasks: Sequence[Task],
                 waiting_max_age_h: float = 24.0, name: str = "worker-1",
                 triton: TritonTarget | None = None, wait_backoff_max_s: float = 60.0,
                 live: LiveLearning | None = None, max_memory_bytes: int = 0,
                 priors: PriorRetriever | None = None, send_prior_results: bool = False) -> None:
        if not waiting_max_age_h > 0:
            raise ValueError(f"waiting_max_age_h must be > 0 hours, got {waiting_max_age_h}")
        self.archive = archive
        self.jobs = jobs
        self.results = results
        self.sender = sender
        self.destinations = tuple(destinations)
        self.tasks: dict[str, Task] = {t.name: t for t in tasks}
        self.waiting_max_age_h = float(waiting_max_age_h)
        self._waiting_told: set[tuple[str, str, str]] = set()
        self._next_waiting_check = 0.0
        self.name = name
        self.max_memory_bytes = int(max_memory_bytes)
        self._run_series = _pipeline_runner()
        self._models: dict[str, LoadedModel] = {}
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: Job | None = None
        self.triton = triton
        self.wait_backoff_max_s = wait_backoff_max_s
        self._waits = 0  # consecutive times a job had to wait for Triton
        self._space = StateLog(LOG, name)  # disk full: one line per change of state
        self._stalled: Job | None = None  # found the disk full; not yet back in the queue
        self.computed: Computed | None = None  # the pipeline's work for the current job
        self._storing: Job | None = None  # claimed, computed, waits for space to store
        self._storing_at = 0.0  # when to try storing again (monotonic)
        self._storing_free = 0  # bytes free when storing last failed
        self._loop_state = StateLog(LOG, name)

        # drift figures and shadow runs of served series (dicom_node.live_learning)
        self.live = live or LiveLearning(archive.data_dir, run_series=self._run_series)
        # issue 26: each result set against the patient's prior (dicom_node.prior_results)
        self.history = HistoryStore(archive.data_dir)
        self.priors = JobPriors(self.history, priors)
        self.send_prior_results = send_prior_results
        self._prior_notes: dict[str, str] = {}
        self._prior_s: dict[str, float] = {}

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Serve ``tasks`` from the next job on (SIGHUP reload)."""
        self.tasks = {t.name: t for t in tasks}

    def _destinations(self, task: Task) -> tuple[Destination, ...]:
        """The destinations, each narrowed to what the task outputs (and it accepts)."""
        out = []
        for d in self.destinations:
            send = tuple(k for k in d.send if k in task.outputs)
            if send:
                out.append(d if send == d.send else replace(d, send=send))
        return tuple(out)

    # ----------------------------------------------------------------- one job
    def _registry_here(self) -> Registry:
        if self._registry is None:  # one connection per thread (registry.store.Registry)
            self._registry = Registry(self.archive.data_dir)
        return self._registry

    def _model(self, task: str, manufacturer: str, model_name: str) -> LoadedModel:
        try:
            version = self._registry_here().resolve(task, manufacturer, model_name)
        except NoActiveModelError:
            raise JobWaitsForModel(task, manufacturer, model_name) from None
        if version.version not in self._models:
            self._models[version.version] = (
                load_model(version, registry=self._registry) if self.triton is None
                else load_triton_model(version, self.triton))
        return self._models[version.version]

    def run(self, job: Job) -> JobOutcome:
        """Run one claimed job to its result (or raise).

        The pipeline's work is kept (:attr:`computed`) until the job ends: a retry of
        the same job after the disk was full only stores the results.

        Raises
        ------
        JobRefused
            The pipeline refuses the series, or its task is no longer configured
            (retrying cannot help).
        JobWaitsForModel
            The task has no active model for the series' scanner.
        Exception
            Anything else; the queue retries the job.
        """
        t0 = time.perf_counter()
        spec = self.tasks.get(job.task)
        if spec is None:
            raise JobRefused(f"task {job.task!r} is not configured any more (no [[tasks]] table "
                             "names it)")
        destinations = self._destinations(spec)
        if not self.send_prior_results and self.history.is_retrieved(job.series_uid):
            destinations = ()  # a prior from the PACS: its result serves the comparison
        overlay = "overlay" in spec.outputs and (
            any("overlay" in d.send for d in destinations) or not self.destinations)
        done = self.results.by_job_key(job.key)
        if done is not None:  # a re-run after a crash between recording and completing
            self.sender.enqueue(done, destinations)
            if overlay and not done.series_uids("overlay"):
                done = self._recover_overlay(job, done, destinations)
            return JobOutcome(job_id=job.id, result=done, note="already recorded",
                              seconds=time.perf_counter() - t0)
        computed = self._kept_for(job)
        if computed is None:
            try:
                computed = self._compute(job, spec)
            except EmptyResultError as exc:
                return JobOutcome(job_id=job.id, result=None, seconds=time.perf_counter() - t0,
                                  note=f"nothing found, nothing sent ({exc})")
        else:
            LOG.info("job %d: storing the results of its inference, kept while the disk was "
                     "full (not run again)", job.id)
        return self._store(job, spec, computed, destinations, overlay, t0)

    def _kept_for(self, job: Job) -> Computed | None:
        """What the pipeline already made of ``job`` in this process, if anything."""
        kept = self.computed
        return kept if kept is not None and kept.job_key == job.key else None

    def _compute(self, job: Job, spec: Task) -> Computed:
        """Run the job's pipeline (the model loaded first); keep and return its work.

        Raises
        ------
        JobRefused, JobWaitsForModel
            As :meth:`run`.
        EmptyResultError
            The model found nothing (recorded for drift; nothing to store).
        """
        files = self.archive.twins.series_files(job.series_uid)
        if not files:
            raise JobRefused("the series has no current instances")
        extra = self._prior_of(job, spec, files)  # timed apart (prior_s): it may retrieve
        t0 = time.perf_counter()
        manufacturer, model_name = _scanner(files[0])
        loaded = self._model(job.task, manufacturer, model_name)
        predecessors = self._predecessor_srs(job)
        t_load = time.perf_counter()
        try:
            # the overlay is built after the SEG and SR are on their way (_store)
            outcome = self._run_series(files, loaded, rules=spec.rules,
                                       options=WriterOptions(write_overlay=False),
                                       predecessors=predecessors,
                                       max_memory_bytes=self.max_memory_bytes, **extra)
        except MemoryBudgetError as exc:  # retrying would hit the same wall
            raise JobRefused(str(exc)) from exc
        except EmptyResultError:
            self.live.served(job=job, files=files, rules=spec.rules, loaded=loaded, outcome=None,
                             result=None)
            raise
        except SeriesGeometryError as exc:
            raise JobRefused(str(exc)) from exc
        self.computed = Computed(job_key=job.key, files=tuple(files), loaded=loaded,
                                 outcome=outcome, model_load_s=t_load - t0,
                                 pipeline_s=time.perf_counter() - t_load)
        return self.computed

    def _store(self, job: Job, spec: Task, computed: Computed,
               destinations: Sequence[Destination], overlay: bool, t0: float) -> JobOutcome:
        """Record the SEG and SR in the twin, queue them, then the overlay (:meth:`run`)."""
        t_run = time.perf_counter()
        outcome, loaded, files = computed.outcome, computed.loaded, list(computed.files)
        datasets = outcome.results
        objects: list[tuple[str, Any]] = [("seg", datasets.seg), ("sr", datasets.sr)]
        # every object is checked before it may be sent; an invalid one is kept in the
        # twin but held back from every destination, with the reason
        held = invalid(validate_results(datasets))
        timings = _timings(outcome)
        timings["model_load_s"] = computed.model_load_s
        timings["pipeline_s"] = computed.pipeline_s
        timings["prior_s"] = self._prior_s.pop(job.key, 0.0)  # finding (or retrieving) the prior
        result = self.results.record(
            job_key=job.key, patient_key=job.patient_key, study_uid=job.study_uid,
            source_series_uid=job.series_uid, source_last_received=job.series_last_received,
            source_instances=len(files), task=job.task, model_name=_model_name(outcome, loaded),
            model_version=loaded.version.version, backend=str(loaded.backend.value),
            segments=tuple(SegmentMeasure(name=s.name, volume_ml=round(float(s.volume_ml), 3))
                           for s in outcome.segments),
            timings=timings, objects=objects,
        )
        self.sender.enqueue(result, destinations, held=held)
        t_seg_sr = time.perf_counter()
        self._log_held(job, held)
        if overlay:
            result = self._add_overlay(job, result, outcome,
                                       {"seg_sr_store_s": t_seg_sr - t_run}, destinations)
        self.live.served(job=job, files=files, rules=spec.rules, loaded=loaded, outcome=outcome,
                         result=result)
        seconds = time.perf_counter() - t0
        LOG.info("job %d (%s): series %s -> result %d (%s %s on %s): %s; %.1f s (pipeline "
                 "%.1f s, SEG+SR stored and queued %.2f s, overlay %.2f s)", job.id, job.task,
                 job.series_uid, result.id, result.model_name, result.model_version, result.backend,
                 ", ".join(f"{s.name} {s.volume_ml:.1f} mL" for s in result.segments) or "no segment",
                 seconds, computed.pipeline_s, t_seg_sr - t_run, time.perf_counter() - t_seg_sr)
        # what the comparison could not be (a PACS that did not answer), in the job's note
        return JobOutcome(job_id=job.id, result=result, note=self._prior_notes.pop(job.key, ""),
                          seconds=seconds)

    def _add_overlay(self, job: Job, result: AIResult, outcome: Any,
                     timings: dict[str, float], destinations: Sequence[Destination]) -> AIResult:
        """Build, check, store and queue the overlay series of a recorded result.

        Runs after the SEG and SR are queued, so that they do not wait for it. Its
        instances are checked with :func:`~pipelines.validation.validate_series`
        (Python checks on each, ``dciodvfy`` on the first); an invalid one is held.
        """
        t0 = time.perf_counter()
        try:
            images = build_overlay(outcome.volume, outcome.segments, outcome.model,
                                   options=WriterOptions(write_overlay=True),
                                   note=banner_line(getattr(outcome, "comparison", None),
                                                    note=self._prior_notes.get(job.key, "")))
        except EmptyResultError:
            return result
        images = (*images, *self._history_chart(result, images))
        t1 = time.perf_counter()
        held = invalid(validate_series(images, "overlay"))
        t2 = time.perf_counter()
        timings = {**timings, "overlay_write_s": t1 - t0, "overlay_validate_s": t2 - t1}
        result = self.results.add_objects(result.id, [("overlay", ds) for ds in images],
                                          timings=timings)
        self.sender.enqueue(result, destinations, held=held)
        self._log_held(job, held)
        LOG.info("job %d: overlay of %d image(s): built %.2f s, checked %.2f s, stored and "
                 "queued %.2f s", job.id, len(images), t1 - t0, t2 - t1, time.perf_counter() - t2)
        return result

    def _recover_overlay(self, job: Job, done: AIResult,
                         destinations: Sequence[Destination]) -> AIResult:
        """The node stopped after the SEG and SR of ``done`` were recorded but before its
        overlay was: run the pipeline again and add the overlay, if (and only if) it
        finds the same segments (names and volumes) as the recorded result."""
        kept = self._kept_for(job)
        if kept is not None:  # the disk was full after recording: the same work, stored now
            return self._add_overlay(job, done, kept.outcome, {}, destinations)
        spec = self.tasks.get(job.task)
        files = self.archive.twins.series_files(job.series_uid)
        if spec is None or not files:
            return done
        try:
            loaded = self._model(job.task, *_scanner(files[0]))
        except JobWaitsForModel as exc:
            LOG.warning("job %d: overlay of result %d not recovered (%s)", job.id, done.id, exc)
            return done
        try:
            outcome = self._run_series(files, loaded, rules=spec.rules,
                                       options=WriterOptions(write_overlay=False))
        except PipelineError as exc:
            LOG.warning("job %d: overlay of result %d not recovered (%s)", job.id, done.id, exc)
            return done
        again = tuple((s.name, round(float(s.volume_ml), 3)) for s in outcome.segments)
        if again != tuple((s.name, s.volume_ml) for s in done.segments):
            LOG.warning("job %d: overlay of result %d not recovered: the pipeline now finds "
                        "other segments than the recorded SEG", job.id, done.id)
            return done
        return self._add_overlay(job, done, outcome, {}, destinations)

    def _prior_of(self, job: Job, spec: Task, files: Sequence[Path]) -> dict[str, Any]:
        """``{"prior": PriorResult}`` for the pipeline when the patient has a prior result
        of the task (retrieved from the PACS first when the twin has none), else ``{}``;
        what could not be done is kept for the overlay's banner line."""
        lookup = self.priors.lookup(
            patient_key=job.patient_key, task=job.task, study_uid=job.study_uid,
            series_uid=job.series_uid, files=files, rules=spec.rules,
            run_prior=lambda uid: self._run_prior(job, spec, uid))
        self._prior_s[job.key] = lookup.seconds
        if lookup.note:
            self._prior_notes[job.key] = lookup.note
        if lookup.prior is None:
            return {}
        LOG.info("job %d: compared with the prior result of %s (found in %.3f s)", job.id,
                 lookup.prior.study_date, lookup.seconds)
        return {"prior": lookup.prior}

    def _run_prior(self, job: Job, spec: Task, series_uid: str) -> None:
        """Run ``job``'s task on a series retrieved as a prior and record its result
        (under the key its own job will have: that job then finds it recorded); not
        sent unless ``send_prior_results`` (:meth:`run` narrows its destinations)."""
        arrival = self.history.series_arrival(series_uid)
        if arrival is None or arrival[2] == 0:
            return
        prior_job = replace(job, series_uid=series_uid, study_uid=arrival[0],
                            series_last_received=arrival[1], instances=arrival[2])
        if self.results.by_job_key(prior_job.key) is not None:
            return
        destinations = self._destinations(spec) if self.send_prior_results else ()
        try:
            computed = self._compute(prior_job, spec)
            self._store(prior_job, spec, computed, destinations, False, time.perf_counter())
        except (PipelineError, JobWaitsForModel) as exc:
            LOG.warning("job %d: prior series %s not measured: %s", job.id, series_uid, exc)
        finally:
            self.computed = None

    def _history_chart(self, result: AIResult, images: Sequence[Any]) -> tuple[Any, ...]:
        """The twin's volumes over time as one more overlay image (two time points or more)."""
        points = volume_points(self.history, result.patient_key, result.task)
        if len({p.study_date for p in points}) < 2 or not images:
            return ()
        return (history_image(points, images),)

    @staticmethod
    def _log_held(job: Job, held: dict[str, str]) -> None:
        if held:
            LOG.error("job %d: %d object(s) failed validation and are held back, not sent: %s",
                      job.id, len(held), "; ".join(sorted(set(held.values())))[:500])

    def _predecessor_srs(self, job: Job) -> list[Any]:
        """The SR(s) of the current result of this series and task, which the new one supersedes."""
        import pydicom

        out = []
        for earlier in self.results.for_series(job.series_uid):
            if earlier.task != job.task or earlier.superseded_by is not None:
                continue
            for obj in earlier.objects:
                if obj.kind == "sr":
                    try:
                        out.append(pydicom.dcmread(obj.path, stop_before_pixels=True))
                    except (OSError, ValueError) as exc:
                        LOG.warning("job %d: earlier SR %s cannot be read (%s); not referenced",
                                    job.id, obj.sop_instance_uid, exc)
        return out

    def run_one(self) -> JobOutcome | None:
        """Claim and run the next due job, recording its end in the queue; ``None`` if none."""
        job = self.jobs.claim()
        if job is None:
            return None
        self.computed = None  # the work of an earlier job is of no use to this one
        LOG.log(logging.DEBUG if self._space.failing else logging.INFO,
                "job %d: %s on series %s (%d instance(s)), attempt %d of %d", job.id, job.task,
                job.series_uid, job.instances, job.attempts, job.max_attempts)
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
        :data:`~dicom_node.jobs.SPACE_RETRY_S` seconds, or at once when space was freed."""
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


def triton_target(settings: Settings) -> TritonTarget | None:
    """Where the models run: ``None`` (here) or the Triton server the settings name."""
    if settings.backend != "triton":
        return None
    return TritonTarget(url=settings.triton_url, variant=settings.triton_variant,
                        timeout_s=settings.triton_timeout_s)


def _scanner(path: Any) -> tuple[str, str]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["Manufacturer", "ManufacturerModelName"])
    return str(ds.get("Manufacturer", "") or ""), str(ds.get("ManufacturerModelName", "") or "")


def _timings(outcome: Any) -> dict[str, float]:
    """Stage timings of a pipeline outcome as ``{name_s: seconds}``."""
    t = getattr(outcome, "timings", None)
    if t is None:
        return {}
    if isinstance(t, dict):
        return {str(k): float(v) for k, v in t.items()}
    names = getattr(t, "__slots__", None) or getattr(t, "__dataclass_fields__", {})
    return {str(n): float(getattr(t, n)) for n in names
            if isinstance(getattr(t, n, None), int | float)}


def _model_name(outcome: Any, loaded: LoadedModel) -> str:
    info = getattr(outcome, "model", None)
    name = getattr(info, "name", None)
    if isinstance(name, str) and name:
        return name
    return loaded.version.bundle_name or loaded.version.task
