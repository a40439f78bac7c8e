"""The inference worker: one job = archive files -> pipeline -> results in the twin -> sends.

A :class:`Worker` thread (its policy: :class:`~dicom_node.runtime.job_loop.JobLoop`) claims jobs from the :class:`~dicom_node.queue.jobs.JobQueue`, runs
the pipeline of the job's task on the current instances of the series
(:func:`pipelines.run.run_series`), records the SEG and SR in the twin
(:class:`~twin_archive.results.ResultStore`, under the job's key, so a job re-run after
a crash records nothing twice) and queues them for every destination
(:class:`~dicom_node.queue.sender.Sender`); only then does it build, check, record and queue
the overlay series (one image per slice with a segment), so the SEG and SR do not wait
for it. A node stopped between the two gets the overlay on the job's re-run, when the
pipeline finds the same segments again.

What a job produces is its task's (:class:`~dicom_node.tasks.Task`, from ``[[tasks]]``):
its selection rules, and its ``outputs`` narrowing what each destination gets.

SEG type per destination: when the destinations that take the SEG ask for different
``seg_type`` (:func:`~dicom_node.settings.job_seg_types`), the job writes a SEG of each
type and, for each, an SR that references it (and the prior's SEG of that type, and
the earlier SR of that type it supersedes), all recorded in one transaction as one
result (one measurement of the study); the sender gives each destination the SEG of
its type and its SR. The overlay and the RTSTRUCT are written once, for all. When all
agree, one SEG and one SR, as always.

How a job that cannot end now is recorded (waiting for a model, for Triton, for disk
space), and the thread itself: :mod:`dicom_node.runtime.job_loop`.

With ``backend = "triton"`` the model runs on a Triton Inference Server
(:mod:`pipelines.triton`). Triton down or the model not loaded there is not a failure
of the job: it goes back to the queue to wait (its attempt not counted, the reason
``waiting for Triton at ...`` on the job, which ``dicom-node status`` shows), 2 s
the first time and twice as long each further time up to ``triton_backoff_max_s``,
until Triton answers; it never falls back to local inference silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dicom_node.foundation.faults import StateLog
from dicom_node.queue.jobs import Job, JobKind, JobQueue, JobState
from dicom_node.runtime.job_loop import JobLoop, JobOutcome, JobRefused, JobWaitsForModel
from dicom_node.learning.live_learning import LiveLearning
from dicom_node.queue.sender import Sender
from dicom_node.settings import Destination, Settings, job_seg_types
from dicom_node.runtime.rtstruct_output import add_rtstruct
from dicom_node.runtime.prior_results import NO_COMPARISON, JobPriors, PriorLookup, volume_points
from dicom_node.wire.priors import PriorRetriever
from dicom_node.tasks import Task
from pipelines.errors import EmptyResultError, PipelineError, SeriesGeometryError
from pipelines.inference import LoadedModel, load_model
from pipelines.memory import MemoryBudgetError
from pipelines.triton import TritonTarget, load_triton_model
from pipelines.types import ResultDatasets, WriterOptions
from pipelines.comparison import banner_line
from pipelines.writers import build_overlay, write_results
from pipelines.writers.history_plot import history_image
from pipelines.validation import invalid, validate_results, validate_series
from registry.errors import NoActiveModelError
from registry.store import Registry
from twin_archive import Archive
from twin_archive.history import HistoryStore
from twin_archive.results import AIResult, ResultStore, SegmentMeasure

LOG = logging.getLogger(__name__)

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
    prior_s: float = 0.0  # finding (or retrieving) the prior
    prior_note: str = ""  # what the comparison could not be (the banner line, the job's note)
    # the SEG and SR of each further type the destinations asked for, and their time
    other_seg_types: tuple[ResultDatasets, ...] = ()
    other_seg_types_s: float = 0.0


def task_destinations(destinations: Sequence[Destination], task: Task
                      ) -> tuple[Destination, ...]:
    """The destinations of ``task``'s results, each narrowed to what the task outputs and
    it accepts (destinations left with nothing are dropped).

    The RTSTRUCT is the SEG's segments as contours: a task that outputs the SEG outputs
    it too, for the destinations whose ``send`` lists ``"rtstruct"``.
    """
    made = set(task.outputs) | ({"rtstruct"} if "seg" in task.outputs else set())
    out = []
    for d in destinations:
        send = tuple(k for k in d.send if k in made)
        if send:
            out.append(d if send == d.send else replace(d, send=send))
    return tuple(out)


class Worker(JobLoop):
    """Runs inference jobs in a background thread (its policy: :class:`JobLoop`).

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

    def __init__(self, *, archive: Archive, jobs: JobQueue, results: ResultStore, sender: Sender,
                 destinations: Sequence[Destination], tasks: Sequence[Task],
                 waiting_max_age_h: float = 24.0, name: str = "worker-1",
                 triton: TritonTarget | None = None, wait_backoff_max_s: float = 60.0,
                 live: LiveLearning | None = None, max_memory_bytes: int = 0,
                 priors: PriorRetriever | None = None, send_prior_results: bool = False,
                 priors_wait_s: float = 30.0) -> None:
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

        # drift figures and shadow runs of served series (dicom_node.learning.live_learning)
        self.live = live or LiveLearning(archive.data_dir, run_series=self._run_series)
        # issue 26: each result set against the patient's prior (dicom_node.runtime.prior_results)
        self.history = HistoryStore(archive.data_dir)
        self.priors = JobPriors(self.history, priors)
        self.send_prior_results = send_prior_results
        self.priors_wait_s = float(priors_wait_s)

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Serve ``tasks`` from the next job on (SIGHUP reload)."""
        self.tasks = {t.name: t for t in tasks}

    def _destinations(self, task: Task) -> tuple[Destination, ...]:
        """The destinations, each narrowed to what the task outputs (and it accepts)."""
        return task_destinations(self.destinations, task)

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
        if job.kind is JobKind.PRIORS:
            return self._look_for_priors(job, spec, t0)
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
                computed = self._compute(job, spec, job_seg_types(destinations))
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

    def _compute(self, job: Job, spec: Task, seg_types: Sequence[str] = ("binary",)
                 ) -> Computed:
        """Run the job's pipeline (the model loaded first), writing a SEG and SR of each
        of ``seg_types`` (:func:`~dicom_node.settings.job_seg_types`); keep and return
        its work.

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
        lookup = self._prior_of(job, spec, files)  # timed apart (prior_s): it may retrieve
        t0 = time.perf_counter()
        manufacturer, model_name = _scanner(files[0])
        loaded = self._model(job.task, manufacturer, model_name)
        predecessors = self._predecessor_srs(job)
        t_load = time.perf_counter()
        try:
            # the overlay is built after the SEG and SR are on their way (_store)
            outcome = self._run_series(files, loaded, rules=spec.rules,
                                       options=WriterOptions(write_overlay=False,
                                                             seg_type=seg_types[0]),
                                       predecessors=_of_type(predecessors, seg_types[0]),
                                       max_memory_bytes=self.max_memory_bytes,
                                       prior=lookup.for_seg_type(seg_types[0]))
        except MemoryBudgetError as exc:  # retrying would hit the same wall
            raise JobRefused(str(exc)) from exc
        except EmptyResultError:
            self.live.served(job=job, files=files, rules=spec.rules, loaded=loaded, outcome=None,
                             result=None)
            raise
        except SeriesGeometryError as exc:
            raise JobRefused(str(exc)) from exc
        t_run = time.perf_counter()
        others = _other_seg_types(outcome, seg_types[1:], predecessors, lookup)
        self.computed = Computed(job_key=job.key, files=tuple(files), loaded=loaded,
                                 outcome=outcome, model_load_s=t_load - t0,
                                 pipeline_s=t_run - t_load,
                                 prior_s=lookup.seconds, prior_note=lookup.note,
                                 other_seg_types=others,
                                 other_seg_types_s=time.perf_counter() - t_run)
        return self.computed

    def _store(self, job: Job, spec: Task, computed: Computed,
               destinations: Sequence[Destination], overlay: bool, t0: float,
               served: bool = True) -> JobOutcome:
        """Record the SEG(s) and SR(s) in the twin in one transaction, queue them, then
        the overlay (:meth:`run`).

        ``served`` false (a prior's result that goes nowhere): no drift figures and no
        shadow run of a candidate model on it, which would only delay today's result."""
        t_run = time.perf_counter()
        outcome, loaded, files = computed.outcome, computed.loaded, list(computed.files)
        written = (outcome.results, *computed.other_seg_types)
        objects: list[tuple[str, Any]] = [(kind, ds) for d in written
                                          for kind, ds in (("seg", d.seg), ("sr", d.sr))]
        # every object is checked before it may be sent; an invalid one is kept in the
        # twin but held back from every destination, with the reason
        held = {uid: why for d in written for uid, why in invalid(validate_results(d)).items()}
        timings = _timings(outcome)
        timings["model_load_s"] = computed.model_load_s
        timings["pipeline_s"] = computed.pipeline_s
        timings["prior_s"] = computed.prior_s
        if computed.other_seg_types:
            timings["other_seg_types_s"] = computed.other_seg_types_s
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
                                       {"seg_sr_store_s": t_seg_sr - t_run}, destinations,
                                       computed.prior_note)
        if any("rtstruct" in d.send for d in destinations):
            result = add_rtstruct(self.results, self.sender, job.id, result, outcome, destinations)
        if served:
            self.live.served(job=job, files=files, rules=spec.rules, loaded=loaded,
                             outcome=outcome, result=result)
        seconds = time.perf_counter() - t0
        LOG.info("job %d (%s): series %s -> result %d (%s %s on %s): %s; %.1f s (pipeline "
                 "%.1f s, SEG+SR stored and queued %.2f s, overlay %.2f s)%s", job.id, job.task,
                 job.series_uid, result.id, result.model_name, result.model_version, result.backend,
                 ", ".join(f"{s.name} {s.volume_ml:.1f} mL" for s in result.segments) or "no segment",
                 seconds, computed.pipeline_s, t_seg_sr - t_run, time.perf_counter() - t_seg_sr,
                 f"; SEG and SR of each type: {'/'.join(result.seg_types)}, "
                 f"{computed.other_seg_types_s:.2f} s more" if computed.other_seg_types else "")
        # what the comparison could not be (a PACS that did not answer), in the job's note
        return JobOutcome(job_id=job.id, result=result, note=computed.prior_note,
                          seconds=seconds)

    def _add_overlay(self, job: Job, result: AIResult, outcome: Any,
                     timings: dict[str, float], destinations: Sequence[Destination],
                     prior_note: str = "") -> AIResult:
        """Build, check, store and queue the overlay series of a recorded result.

        Runs after the SEG and SR are queued, so that they do not wait for it. Its
        instances are checked with :func:`~pipelines.validation.validate_series`
        (Python checks on each, ``dciodvfy`` on the first); an invalid one is held.
        ``prior_note``: why there is no comparison, for the banner line.
        """
        t0 = time.perf_counter()
        try:
            images = build_overlay(outcome.volume, outcome.segments, outcome.model,
                                   options=WriterOptions(write_overlay=True),
                                   note=banner_line(getattr(outcome, "comparison", None),
                                                    note=prior_note))
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
            return self._add_overlay(job, done, kept.outcome, {}, destinations, kept.prior_note)
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

    def _prior_of(self, job: Job, spec: Task, files: Sequence[Path]) -> PriorLookup:
        """The patient's prior result of the task for the pipeline (retrieved from the
        PACS first when the twin has none: by the study's priors job, waited for at most
        ``priors_wait_s``, or here when there is none), and what could not be done (the
        overlay's banner line); kept with the job's :class:`Computed` work."""
        lookup = self.priors.lookup(
            patient_key=job.patient_key, task=job.task, study_uid=job.study_uid,
            series_uid=job.series_uid, files=files, rules=spec.rules,
            run_prior=lambda uid: self._run_prior(job, spec, uid),
            asked=self._priors_asked(job, spec))
        if lookup.prior is None:
            return lookup
        LOG.info("job %d: compared with the prior result of %s (found in %.3f s)", job.id,
                 lookup.prior.study_date, lookup.seconds)
        return lookup

    def _look_for_priors(self, job: Job, spec: Task, t0: float) -> JobOutcome:
        """A priors job: retrieve the priors of its study and measure them, while the
        study is still arriving (:meth:`JobPriors.ask`); nothing is sent."""
        files = self.archive.twins.series_files(job.series_uid)
        if not files:
            note = "priors not looked for: the series has no current instances"
        else:
            note = self.priors.ask(patient_key=job.patient_key, study_uid=job.study_uid,
                                   files=files, rules=spec.rules,
                                   run_prior=lambda uid: self._run_prior(job, spec, uid))
        LOG.info("job %d: priors of study %s looked for in %.1f s: %s", job.id, job.study_uid,
                 time.perf_counter() - t0, note)
        return JobOutcome(job_id=job.id, result=None, note=note,
                          seconds=time.perf_counter() - t0)

    def _priors_asked(self, job: Job, spec: Task) -> str | None:
        """The note of the study's priors job once it has ended (None: there is none, or
        the series is a prior itself). One not begun (or given back by a worker that
        died) is run here and now; one another worker runs is waited for at most
        ``priors_wait_s``, then the job goes on without it, saying so."""
        if self.priors.retriever is None or self.history.is_retrieved(job.series_uid):
            return None
        asked = self.jobs.priors_job(job.study_uid, job.task)
        if asked is None:
            return None
        t_wait, deadline = time.perf_counter(), time.monotonic() + self.priors_wait_s
        while True:
            if asked.state is JobState.QUEUED:
                taken = self.jobs.take(asked.id)
                if taken is not None:
                    return self._run_priors_here(job, taken, spec)
            if asked.state not in (JobState.QUEUED, JobState.RUNNING) or \
                    time.monotonic() >= deadline or self._stop.is_set():
                break
            time.sleep(0.1)
            asked = self.jobs.get(asked.id)
        LOG.info("job %d: waited %.1f s for job %d (the priors of its study): %s", job.id,
                 time.perf_counter() - t_wait, asked.id, asked.state.value)
        if asked.state is JobState.DONE:
            return asked.error
        if asked.state is JobState.FAILED:
            return f"{NO_COMPARISON} looking for priors failed ({asked.error})"[:200]
        return (f"{NO_COMPARISON} the priors were still being retrieved or measured after "
                f"{self.priors_wait_s:g} s (priors_wait_s)")

    def _run_priors_here(self, job: Job, taken: Job, spec: Task) -> str:
        """Run the priors job ``taken`` (claimed by this worker) inside ``job``, record
        how it ended, and return its note."""
        LOG.info("job %d: runs job %d (the priors of its study, not begun) itself", job.id,
                 taken.id)
        try:
            note = self._look_for_priors(taken, spec, time.perf_counter()).note
        except Exception as exc:  # noqa: BLE001 - recorded on the priors job
            self.jobs.fail(taken.id, f"{exc}", permanent=True)
            return f"{NO_COMPARISON} looking for priors failed ({exc})"[:200]
        self.jobs.complete(taken.id, result_id=None, note=note)
        return note

    def _run_prior(self, job: Job, spec: Task, series_uid: str) -> None:
        """Run ``job``'s task on a series retrieved as a prior and record its result
        (under the key its own job will have: that job then finds it recorded); not
        sent unless ``send_prior_results`` (:meth:`run` narrows its destinations)."""
        arrival = self.history.series_arrival(series_uid)
        if arrival is None or arrival[2] == 0:
            return
        prior_job = replace(job, kind=JobKind.SERIES, series_uid=series_uid, study_uid=arrival[0],
                            series_last_received=arrival[1], instances=arrival[2])
        if self.results.by_job_key(prior_job.key) is not None:
            return
        destinations = self._destinations(spec) if self.send_prior_results else ()
        try:
            computed = self._compute(prior_job, spec, job_seg_types(destinations))
            self._store(prior_job, spec, computed, destinations, False, time.perf_counter(),
                        served=bool(destinations))
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

    def _predecessor_srs(self, job: Job) -> list[tuple[str, Any]]:
        """The SR(s) of the current result of this series and task, which the new one
        supersedes, each with the type of the SEG it references."""
        import pydicom

        out = []
        for earlier in self.results.for_series(job.series_uid):
            if earlier.task != job.task or earlier.superseded_by is not None:
                continue
            types = earlier.seg_types or ("binary",)
            paired = earlier.seg_type_of_objects() if len(types) > 1 else {}
            for obj in earlier.objects:
                if obj.kind == "sr":
                    try:
                        out.append((paired.get(obj.sop_instance_uid, types[0]),
                                    pydicom.dcmread(obj.path, stop_before_pixels=True)))
                    except (OSError, ValueError) as exc:
                        LOG.warning("job %d: earlier SR %s cannot be read (%s); not referenced",
                                    job.id, obj.sop_instance_uid, exc)
        return out


def _of_type(predecessors: Sequence[tuple[str, Any]], seg_type: str) -> list[Any]:
    """The earlier SRs an SR of ``seg_type`` supersedes: those of its type, or all when
    none is (the destinations of this type got the other one before)."""
    return ([ds for t, ds in predecessors if t == seg_type]
            or [ds for _, ds in predecessors])


def _other_seg_types(outcome: Any, seg_types: Sequence[str],
                     predecessors: Sequence[tuple[str, Any]], lookup: PriorLookup
                     ) -> tuple[ResultDatasets, ...]:
    """The SEG, and the SR that references it, of each further type asked for, from the
    same segments, comparison and model as the pipeline's first pair."""
    out = []
    for seg_type in seg_types:
        comparison = outcome.comparison
        prior = lookup.for_seg_type(seg_type)
        if comparison is not None and prior is not None and prior is not comparison.prior:
            comparison = replace(comparison, prior=prior)  # its SEG of this type
        out.append(write_results(outcome.volume, outcome.segments, outcome.model,
                                 options=WriterOptions(write_overlay=False, seg_type=seg_type),
                                 predecessors=_of_type(predecessors, seg_type),
                                 comparison=comparison))
    return tuple(out)


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
