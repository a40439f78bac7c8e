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

Failures: a series the pipeline refuses (geometry, empty result, a predicted memory need
over ``max_memory_gb``) fails at once with the reason, not retried; anything else (no model, an unexpected error) is retried by the queue a
bounded number of times, then left failed with its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.jobs import Job, JobQueue
from dicom_node.monitor import PipelineSpec
from dicom_node.sender import Sender
from dicom_node.settings import Destination
from pipelines.errors import EmptyResultError, PipelineError, SeriesGeometryError
from pipelines.inference import LoadedModel, load_model
from pipelines.memory import MemoryBudgetError
from pipelines.selection import SelectionRules
from pipelines.types import WriterOptions
from pipelines.writers import build_overlay
from pipelines.validation import invalid, validate_results, validate_series
from registry.store import Registry
from twin_archive import Archive
from twin_archive.results import AIResult, ResultStore, SegmentMeasure

LOG = logging.getLogger(__name__)

#: The pipeline served by default: the demo task on abdominal CT.
DEFAULT_PIPELINES = (
    PipelineSpec(task="spleen-ct", rules=SelectionRules(
        name="spleen-ct", modality="CT", body_part_patterns=("ABDOMEN*", "CHEST*", "*ABD*"),
        accept_missing_body_part=True,
        exclude_series_description_patterns=(r"\bscout\b", r"\blocali[sz]er\b", r"dose\s*report"),
        min_slices=16)),
)


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


@dataclass(frozen=True, kw_only=True, slots=True)
class JobOutcome:
    """What one job produced."""

    job_id: int
    result: AIResult | None
    note: str
    seconds: float


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
    pipelines : sequence of PipelineSpec
        Tasks served and their selection rules.
    name : str
        Thread name (``worker-1``).
    max_memory_bytes : int
        Memory budget of one inference, bytes (0: none): a series predicted over it
        is refused before it starts, once, with one line (``max_memory_gb``).
    """

    def __init__(self, *, archive: Archive, jobs: JobQueue, results: ResultStore, sender: Sender,
                 destinations: Sequence[Destination], pipelines: Sequence[PipelineSpec] = DEFAULT_PIPELINES,
                 name: str = "worker-1", max_memory_bytes: int = 0) -> None:
        self.archive = archive
        self.jobs = jobs
        self.results = results
        self.sender = sender
        self.destinations = tuple(destinations)
        self.pipelines = {p.task: p for p in pipelines}
        self.name = name
        self.max_memory_bytes = int(max_memory_bytes)
        self._run_series = _pipeline_runner()
        self._models: dict[str, LoadedModel] = {}
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    # ----------------------------------------------------------------- one job
    def _model(self, task: str, manufacturer: str, model_name: str) -> LoadedModel:
        if self._registry is None:  # one connection per thread (registry.store.Registry)
            self._registry = Registry(self.archive.data_dir)
        version = self._registry.resolve(task, manufacturer, model_name)  # NoActiveModelError
        if version.version not in self._models:
            self._models[version.version] = load_model(version, registry=self._registry)
        return self._models[version.version]

    def run(self, job: Job) -> JobOutcome:
        """Run one claimed job to its result (or raise).

        Raises
        ------
        JobRefused
            The pipeline refuses the series (retrying cannot help).
        Exception
            Anything else; the queue retries the job.
        """
        t0 = time.perf_counter()
        overlay = any("overlay" in d.send for d in self.destinations) or not self.destinations
        done = self.results.by_job_key(job.key)
        if done is not None:  # a re-run after a crash between recording and completing
            self.sender.enqueue(done, self.destinations)
            if overlay and not done.series_uids("overlay"):
                done = self._recover_overlay(job, done)
            return JobOutcome(job_id=job.id, result=done, note="already recorded",
                              seconds=time.perf_counter() - t0)
        spec = self.pipelines.get(job.task)
        if spec is None:
            raise JobRefused(f"task {job.task!r} is not served by this node")
        files = self.archive.series_files(job.series_uid)
        if not files:
            raise JobRefused("the series has no current instances")
        manufacturer, model_name = _scanner(files[0])
        loaded = self._model(job.task, manufacturer, model_name)
        predecessors = self._predecessor_srs(job)
        t_load = time.perf_counter()
        try:
            # the overlay is built after the SEG and SR are on their way (below)
            outcome = self._run_series(files, loaded, rules=spec.rules,
                                       options=WriterOptions(write_overlay=False),
                                       predecessors=predecessors,
                                       max_memory_bytes=self.max_memory_bytes)
        except MemoryBudgetError as exc:  # retrying would hit the same wall
            raise JobRefused(str(exc)) from exc
        except EmptyResultError as exc:
            return JobOutcome(job_id=job.id, result=None, seconds=time.perf_counter() - t0,
                              note=f"nothing found, nothing sent ({exc})")
        except SeriesGeometryError as exc:
            raise JobRefused(str(exc)) from exc
        t_run = time.perf_counter()
        datasets = outcome.results
        objects: list[tuple[str, Any]] = [("seg", datasets.seg), ("sr", datasets.sr)]
        # every object is checked before it may be sent; an invalid one is kept in the
        # twin but held back from every destination, with the reason
        held = invalid(validate_results(datasets))
        timings = _timings(outcome)
        timings["model_load_s"] = t_load - t0
        timings["pipeline_s"] = t_run - t_load
        result = self.results.record(
            job_key=job.key, patient_key=job.patient_key, study_uid=job.study_uid,
            source_series_uid=job.series_uid, source_last_received=job.series_last_received,
            source_instances=len(files), task=job.task, model_name=_model_name(outcome, loaded),
            model_version=loaded.version.version, backend=str(loaded.backend.value),
            segments=tuple(SegmentMeasure(name=s.name, volume_ml=round(float(s.volume_ml), 3))
                           for s in outcome.segments),
            timings=timings, objects=objects,
        )
        self.sender.enqueue(result, self.destinations, held=held)
        t_seg_sr = time.perf_counter()
        self._log_held(job, held)
        if overlay:
            result = self._add_overlay(job, result, outcome,
                                       {"seg_sr_store_s": t_seg_sr - t_run})
        seconds = time.perf_counter() - t0
        LOG.info("job %d: series %s -> result %d (%s %s on %s): %s; %.1f s (pipeline %.1f s, "
                 "SEG+SR stored and queued %.2f s, overlay %.2f s)", job.id, job.series_uid,
                 result.id, result.model_name, result.model_version, result.backend,
                 ", ".join(f"{s.name} {s.volume_ml:.1f} mL" for s in result.segments) or "no segment",
                 seconds, t_run - t_load, t_seg_sr - t_run, time.perf_counter() - t_seg_sr)
        return JobOutcome(job_id=job.id, result=result, note="", seconds=seconds)

    def _add_overlay(self, job: Job, result: AIResult, outcome: Any,
                     timings: dict[str, float]) -> AIResult:
        """Build, check, store and queue the overlay series of a recorded result.

        Runs after the SEG and SR are queued, so that they do not wait for it. Its
        instances are checked with :func:`~pipelines.validation.validate_series`
        (Python checks on each, ``dciodvfy`` on the first); an invalid one is held.
        """
        t0 = time.perf_counter()
        try:
            images = build_overlay(outcome.volume, outcome.segments, outcome.model,
                                   options=WriterOptions(write_overlay=True))
        except EmptyResultError:
            return result
        t1 = time.perf_counter()
        held = invalid(validate_series(images, "overlay"))
        t2 = time.perf_counter()
        timings = {**timings, "overlay_write_s": t1 - t0, "overlay_validate_s": t2 - t1}
        result = self.results.add_objects(result.id, [("overlay", ds) for ds in images],
                                          timings=timings)
        self.sender.enqueue(result, self.destinations, held=held)
        self._log_held(job, held)
        LOG.info("job %d: overlay of %d image(s): built %.2f s, checked %.2f s, stored and "
                 "queued %.2f s", job.id, len(images), t1 - t0, t2 - t1, time.perf_counter() - t2)
        return result

    def _recover_overlay(self, job: Job, done: AIResult) -> AIResult:
        """The node stopped after the SEG and SR of ``done`` were recorded but before its
        overlay was: run the pipeline again and add the overlay, if (and only if) it
        finds the same segments (names and volumes) as the recorded result."""
        spec = self.pipelines.get(job.task)
        files = self.archive.series_files(job.series_uid)
        if spec is None or not files:
            return done
        loaded = self._model(job.task, *_scanner(files[0]))
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
        return self._add_overlay(job, done, outcome, {})

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
        self.current = job
        LOG.info("job %d: %s on series %s (%d instance(s)), attempt %d of %d", job.id, job.task,
                 job.series_uid, job.instances, job.attempts, job.max_attempts)
        try:
            outcome = self.run(job)
        except JobRefused as exc:
            self.jobs.fail(job.id, str(exc), permanent=True)
            LOG.error("job %d failed, not retried: %s", job.id, exc)
            return None
        except Exception as exc:
            state = self.jobs.fail(job.id, f"{type(exc).__name__}: {exc}")
            LOG.exception("job %d attempt %d failed (%s)", job.id, job.attempts,
                          "will be retried" if state.value == "queued" else "no attempts left")
            return None
        finally:
            self.current = None
        self.jobs.complete(job.id, result_id=outcome.result.id if outcome.result else None,
                           note=outcome.note)
        if outcome.result is None:
            LOG.info("job %d done: %s", job.id, outcome.note)
        return outcome

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Work in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                outcome = self.run_one()
            except Exception:
                LOG.exception("%s: could not take a job; trying again shortly", self.name)
                outcome = None
            if outcome is None and not self._stop.is_set():
                self.jobs.wakeup.wait(1.0)
                self.jobs.wakeup.clear()
        if self._registry is not None:
            self._registry.close()

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
