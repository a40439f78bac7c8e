"""What the worker hands to learning after serving a series: drift figures and shadow runs.

:class:`LiveLearning` is the worker's one touch point (``Worker.run`` calls
:meth:`LiveLearning.served` after a result is recorded and queued, and after an empty
result): it records the series' figures by scanner (:mod:`dicom_node.learning.drift`) and runs
the task's shadowing candidates (:class:`ShadowRunner`, :mod:`dicom_node.learning.shadow`).
It never fails the job: anything going wrong here is logged and the served result
stands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.learning.drift import DriftConfig, config_of, note_series, series_figures
from dicom_node.learning.shadow import agreement
from pipelines.errors import EmptyResultError, PipelineError
from pipelines.inference import LoadedModel, load_model
from pipelines.types import WriterOptions
from registry.store import Registry
from twin_archive.learning import FigureStore, Scanner, ShadowResult, ShadowStore

LOG = logging.getLogger(__name__)

#: Series numbers and description prefix of shadow objects (kept in the twin only).
SHADOW_OPTIONS = WriterOptions(write_overlay=False, seg_series_number=9101,
                               sr_series_number=9102, series_description_prefix="AI SHADOW")


def scanner_of(path: Path) -> tuple[Scanner, float | None]:
    """The scanner that made a series (from one of its files) and its kVp, if any."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
        "Manufacturer", "ManufacturerModelName", "StationName", "KVP"])
    kvp: float | None
    try:
        kvp = float(ds.KVP) if "KVP" in ds and ds.KVP not in (None, "") else None
    except (TypeError, ValueError):
        kvp = None
    return Scanner(manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
                   model_name=str(ds.get("ManufacturerModelName", "") or "").strip(),
                   station=str(ds.get("StationName", "") or "").strip()), kvp


class ShadowRunner:
    """Runs the task's shadowing candidates on a served series (worker thread only).

    Parameters
    ----------
    data_dir : pathlib.Path
    run_series : callable
        :func:`pipelines.run.run_series`.
    """

    def __init__(self, data_dir: Path, run_series: Any) -> None:
        self.data_dir = Path(data_dir)
        self._run_series = run_series
        self._registry: Registry | None = None
        self._store: ShadowStore | None = None
        self._models: dict[str, LoadedModel] = {}

    def close(self) -> None:
        """Close the connections opened in the worker thread."""
        for c in (self._registry, self._store):
            if c is not None:
                c.close()
        self._registry = self._store = None

    def run(self, *, job: Any, files: Sequence[Path], rules: Any, scanner: Scanner,
            active_version: str, active_segments: Sequence[Any], active_result_id: int | None
            ) -> list[ShadowResult]:
        """Run every shadowing candidate of ``job.task`` on the series; store and compare."""
        if self._registry is None:
            self._registry = Registry(self.data_dir)
        candidates = [mv for mv in self._registry.shadowing(job.task)
                      if mv.version != active_version]
        if not candidates:
            return []
        if self._store is None:
            self._store = ShadowStore(self.data_dir)
        out = []
        for mv in candidates:
            if mv.version not in self._models:
                self._models[mv.version] = load_model(mv, registry=self._registry)
            objects: list[tuple[str, Any]] = []
            try:
                outcome = self._run_series(files, self._models[mv.version], rules=rules,
                                           options=SHADOW_OPTIONS)
                segments = outcome.segments
                objects = [("seg", outcome.results.seg), ("sr", outcome.results.sr)]
            except EmptyResultError:
                segments = ()
            except PipelineError as exc:
                LOG.warning("job %d: shadow %s could not run on the series (%s)", job.id,
                            mv.version, exc)
                continue
            agree = agreement(active_segments, segments)
            res = self._store.record_shadow(
                job_key=job.key, patient_key=job.patient_key, study_uid=job.study_uid,
                source_series_uid=job.series_uid, task=job.task, shadow_version=mv.version,
                active_version=active_version, active_result_id=active_result_id,
                scanner=scanner, agreement=agree, objects=objects)
            LOG.info("job %d: shadow %s (not sent) vs active %s: %s", job.id, mv.version,
                     active_version, ", ".join(f"{a.name} Dice {a.dice:.3f}, {a.volume_diff_ml:+.1f} mL"
                                               for a in agree))
            out.append(res)
        return out


class LiveLearning:
    """Drift figures and shadow runs of served series (one per worker; its thread only).

    Parameters
    ----------
    data_dir : pathlib.Path
    drift : DriftConfig
    run_series : callable
        :func:`pipelines.run.run_series`.
    """

    def __init__(self, data_dir: Path | str, *, drift: DriftConfig | None = None,
                 run_series: Any = None) -> None:
        self.data_dir = Path(data_dir)
        self.drift = drift or DriftConfig()
        if run_series is None:
            from pipelines.run import run_series
        self.shadow = ShadowRunner(self.data_dir, run_series)
        self._figures: FigureStore | None = None

    @staticmethod
    def from_settings(settings: Any) -> LiveLearning:
        """With the ``drift_*`` settings."""
        return LiveLearning(settings.data_dir, drift=config_of(settings))

    def served(self, *, job: Any, files: Sequence[Path], rules: Any, loaded: LoadedModel,
               outcome: Any | None, result: Any | None) -> None:
        """A series was served (``outcome`` ``None``: the model found nothing)."""
        try:
            scanner, kvp = scanner_of(files[0])
            if outcome is not None:
                volume, segments = outcome.volume, outcome.segments
            else:
                from pipelines.volume import load_series

                volume, segments = load_series(files), ()
            figures = series_figures(volume.array, volume.affine, kvp=kvp,
                                     volumes_ml={s.name: s.volume_ml for s in segments},
                                     empty=outcome is None)
            if self._figures is None:
                self._figures = FigureStore(self.data_dir)
            note_series(self._figures, self.drift, job_key=job.key, task=job.task,
                        scanner=scanner, model_version=loaded.version.version, figures=figures)
            if outcome is not None:
                self.shadow.run(job=job, files=files, rules=rules, scanner=scanner,
                                active_version=loaded.version.version,
                                active_segments=segments,
                                active_result_id=result.id if result is not None else None)
        except Exception:  # never fails the served job
            LOG.exception("job %d: drift figures or shadow run failed (the served result "
                          "stands)", job.id)

    def close(self) -> None:
        """Close the connections (worker thread)."""
        self.shadow.close()
        if self._figures is not None:
            self._figures.close()
            self._figures = None
