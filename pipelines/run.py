"""One series through one model: select -> volume -> infer -> post-process -> write.

:func:`run_series` glues the typed steps of the pipelines room into one call that a
test, the ``dicom-node infer`` command and the node's inference worker all use. It is
pure computation: no network, no database, nothing written to disk (see
:func:`pipelines.writers.save_results` for that).

:func:`group_series` reads a folder's worth of files and groups them by series, for
callers that start from files rather than from the archive.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pipelines.comparison import Comparison, PriorResult, compare, study_date_of
from pipelines.errors import PipelineError
from pipelines.memory import MemoryEstimate, check_budget, series_geometry
from pipelines.multiframe import VolumeChoice, expand_frames
from pipelines.postprocess import split_labels
from pipelines.selection import SelectionDecision, SelectionRules, is_node_output, matches
from pipelines.types import ModelInfo, ResultDatasets, SegmentResult, Volume, WriterOptions
from pipelines.volume import load_series
from pipelines.writers import write_results

if TYPE_CHECKING:  # torch and MONAI: a caller imports them (load_model) in its own time
    from pipelines.inference import LoadedModel

LOG = logging.getLogger(__name__)

__all__ = ["PipelineOutcome", "PipelineTimings", "SeriesFiles", "SeriesNotSelected",
           "UnreadableFile", "group_series", "run_series", "select_series"]


class SeriesNotSelected(PipelineError, ValueError):
    """A series is not for this pipeline (rules not matched, or the node's own output).

    Parameters
    ----------
    series_uid : str
        Series Instance UID of the refused series (may be empty when unknown).
    reason : str
        Why, in words (from :func:`pipelines.selection.matches`); no patient data.
    """

    def __init__(self, series_uid: str, reason: str) -> None:
        self.series_uid = series_uid
        self.reason = reason
        where = f"series {series_uid}" if series_uid else "series"
        super().__init__(f"{where} not selected: {reason}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineTimings:
    """Wall time of each stage of :func:`run_series`, seconds.

    Parameters
    ----------
    load_s : float
        Reading the files (when paths were given), selection, series to volume.
    preprocess_s : float
        The bundle's preprocessing (orientation, resampling, intensity scaling).
    inference_s : float
        Sliding-window inference on the model grid.
    postprocess_s : float
        Activation, inversion onto the source grid, argmax, one mask per label,
        largest connected component, volumes.
    write_s : float
        Building the SEG, SR and overlay data sets (in memory).

    Raises
    ------
    ValueError
        If a time is negative or not finite.
    """

    load_s: float
    preprocess_s: float
    inference_s: float
    postprocess_s: float
    write_s: float

    def __post_init__(self) -> None:
        for name in ("load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite time >= 0 s, got {value!r}")

    @property
    def total_s(self) -> float:
        """Sum of the stages, seconds."""
        return self.load_s + self.preprocess_s + self.inference_s + self.postprocess_s + self.write_s

    def as_dict(self) -> dict[str, float]:
        """``{"load_s": ..., ..., "write_s": ...}`` (seconds), in stage order."""
        return {"load_s": self.load_s, "preprocess_s": self.preprocess_s,
                "inference_s": self.inference_s, "postprocess_s": self.postprocess_s,
                "write_s": self.write_s}


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PipelineOutcome:
    """What one series produced.

    Parameters
    ----------
    volume : Volume
        The source volume (HU, LPS affine).
    segments : tuple of SegmentResult
        One per model label, on the volume's grid, with ``volume_ml`` in mL; empty
        segments are included (``volume_ml == 0``) but not written.
    results : ResultDatasets
        SEG, SR and overlay data sets (in memory).
    model : ModelInfo
        Name, version and backend as written into the results.
    model_version : str
        Registry version (``spleen-ct-v1``).
    backend : str
        Backend that ran the model (``pytorch-cpu`` ...).
    device_uid : str
        The model version's Device UID.
    model_grid_shape : tuple of int
        Spatial shape the network saw (after the bundle's preprocessing).
    selection : SelectionDecision or None
        The rules' decision (``None`` when no rules were given).
    timings : PipelineTimings
        Per-stage wall time, seconds.
    """

    volume: Volume
    segments: tuple[SegmentResult, ...]
    results: ResultDatasets
    model: ModelInfo
    model_version: str
    backend: str
    device_uid: str
    model_grid_shape: tuple[int, ...]
    selection: SelectionDecision | None
    timings: PipelineTimings
    comparison: Comparison | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.volume, Volume):
            raise TypeError("volume must be a Volume")
        if not isinstance(self.results, ResultDatasets):
            raise TypeError("results must be ResultDatasets")
        if not isinstance(self.timings, PipelineTimings):
            raise TypeError("timings must be PipelineTimings")
        if not self.segments:
            raise ValueError("segments must not be empty")
        for s in self.segments:
            if s.shape != self.volume.shape:
                raise ValueError(f"segment {s.name!r} has shape {s.shape}, the volume "
                                 f"{self.volume.shape}")

    def segment(self, name: str) -> SegmentResult:
        """The segment called ``name`` (case-insensitive).

        Raises
        ------
        KeyError
            If there is no such segment.
        """
        for s in self.segments:
            if s.name.lower() == name.lower():
                return s
        raise KeyError(f"no segment {name!r}; segments are {[s.name for s in self.segments]}")

    def summary(self) -> str:
        """One line: segments with volumes (mL), model, backend and stage times (s)."""
        segs = ", ".join(f"{s.name} {s.volume_ml:.1f} mL" for s in self.segments) or "none"
        t = self.timings
        return (f"{segs}; model {self.model_version} on {self.backend}; "
                f"load {t.load_s:.2f} s, preprocess {t.preprocess_s:.2f} s, inference "
                f"{t.inference_s:.2f} s, postprocess {t.postprocess_s:.2f} s, write "
                f"{t.write_s:.2f} s (total {t.total_s:.2f} s)")


@dataclass(frozen=True, kw_only=True, slots=True)
class UnreadableFile:
    """A file that :func:`group_series` could not use, and why (no patient data)."""

    path: Path
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesFiles:
    """The files of one series found by :func:`group_series`.

    Parameters
    ----------
    series_uid : str
        Series Instance UID.
    modality : str
        Modality of the first instance.
    series_description : str
        Series Description of the first instance (may be empty).
    paths : tuple of pathlib.Path
        The series' files, sorted by path.
    """

    series_uid: str
    modality: str
    series_description: str
    paths: tuple[Path, ...]

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths must not be empty")


def group_series(paths: Iterable[str | os.PathLike[str]]
                 ) -> tuple[tuple[SeriesFiles, ...], tuple[UnreadableFile, ...]]:
    """Read the headers of files and group them by Series Instance UID.

    Parameters
    ----------
    paths : iterable of path
        Candidate files (anything; non-DICOM files are reported, not raised).

    Returns
    -------
    (tuple of SeriesFiles, tuple of UnreadableFile)
        The series, ordered by Series Instance UID, and the files that are not DICOM
        or lack a Series Instance UID.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    bad: list[UnreadableFile] = []
    for raw in sorted(Path(p) for p in paths):
        try:
            ds = pydicom.dcmread(raw, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "Modality",
                                                "SeriesDescription", "SOPClassUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            bad.append(UnreadableFile(path=raw, reason=f"not a readable DICOM file ({exc})"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            bad.append(UnreadableFile(path=raw, reason="no Series Instance UID"))
            continue
        groups.setdefault(uid, []).append((raw, ds))
    series = tuple(SeriesFiles(series_uid=uid, modality=str(items[0][1].get("Modality", "") or ""),
                               series_description=str(items[0][1].get("SeriesDescription", "") or ""),
                               paths=tuple(p for p, _ in items))
                   for uid, items in sorted(groups.items()))
    return series, tuple(bad)


def select_series(datasets: Sequence[Dataset], rules: SelectionRules | None) -> SelectionDecision | None:
    """Apply selection rules (and the never-our-own-output rule) to one series.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        The instances (headers suffice) of one series.
    rules : SelectionRules or None
        ``None``: any series that the node did not produce itself is accepted.

    Returns
    -------
    SelectionDecision or None
        The matching decision, ``None`` when no rules were given.

    Raises
    ------
    SeriesNotSelected
        If the rules do not match, or the node produced the series.
    """
    uid = str(datasets[0].get("SeriesInstanceUID", "")) if datasets else ""
    if rules is None:
        if any(is_node_output(ds) for ds in datasets):
            raise SeriesNotSelected(uid, "produced by this node; never inferred on")
        return None
    decision = matches(rules, datasets)
    if not decision.matched:
        raise SeriesNotSelected(uid, decision.reason)
    return decision


def run_series(items: Sequence[Dataset | str | os.PathLike[str]], model: LoadedModel, *,
               rules: SelectionRules | None = None, options: WriterOptions | None = None,
               largest_component: bool = True,
               predecessors: Sequence[Dataset] = (),
               max_memory_bytes: int = 0, prior: PriorResult | None = None) -> PipelineOutcome:
    """Run one model on one series and build its SEG, SR and overlay.

    Parameters
    ----------
    items : sequence of pydicom.dataset.Dataset or path
        The instances of one series, in any order. Data sets are not modified.
    model : LoadedModel
        From :func:`pipelines.inference.load_model`.
    rules : SelectionRules, optional
        Checked first; a series that does not match raises :class:`SeriesNotSelected`.
        Without rules, only the node's own output is refused.
    options : WriterOptions, optional
        Series numbers, descriptions, whether to write the overlay.
    largest_component : bool
        Keep only the largest connected component (face connectivity) of each label.
    predecessors : sequence of pydicom.dataset.Dataset, optional
        SR(s) of the result this one supersedes (referenced by the new SR).
    max_memory_bytes : int, optional
        Memory budget of the process, bytes (0: none). A series whose predicted peak
        (:meth:`LoadedModel.memory_estimate`, from the headers) exceeds it is refused
        with :class:`~pipelines.memory.MemoryBudgetError` before its pixels are read.
    prior : PriorResult, optional
        The patient's most recent prior result of the task: today's volumes are
        compared with it (:func:`pipelines.comparison.compare`) in the SR and the
        overlay, when the series has a Study Date after the prior's.

    Returns
    -------
    PipelineOutcome
        Volume, segments (volumes in mL), result data sets, model identity, stage
        timings (s).

    Raises
    ------
    SeriesNotSelected
        The rules refuse the series (or the node produced it).
    MemoryBudgetError
        The series is predicted not to fit ``max_memory_bytes``.
    SeriesGeometryError
        The series cannot be made into a volume without risking misalignment.
    InferenceInputError
        The model is for another modality, or the volume does not fit it.
    EmptyResultError
        Every segment is empty (nothing to write).
    PipelineError
        Any other refusal of a pipeline step.
    """
    if isinstance(items, (str, os.PathLike, Dataset)):
        raise TypeError("items must be a sequence of data sets or paths, not a single one")
    t0 = time.perf_counter()
    datasets = [it if isinstance(it, Dataset) else pydicom.dcmread(os.fspath(it)) for it in items]
    decision = select_series(datasets, rules)
    if max_memory_bytes:  # a multi-frame series: the geometry of the chosen volume's frames
        check_series_budget(datasets, model, max_memory_bytes,
                            volume=rules.volume if rules is not None else None)
    volume = load_series(datasets, volume=rules.volume if rules is not None else None)
    del datasets  # their pixel data: the volume holds the pixels now (headers share elements)
    modality = str(volume.source_images[0].get("Modality", "") or "") or None
    t_load = time.perf_counter() - t0

    result = model.segment(volume.array, volume.affine, modality=modality)

    t1 = time.perf_counter()
    names = {spec.value: spec.name for spec in result.label_specs}
    keep = {name: 1 for name in names.values()} if largest_component else None
    segments = split_labels(result.labels, volume, names, keep_components=keep)
    t_split = time.perf_counter() - t1

    mv = model.version
    info = ModelInfo(name=_lo64(mv.bundle_name or mv.task), version=mv.version,
                     backend=result.backend.value, source="dicom-node registry",
                     task=_lo64(mv.task), device_uid=result.device_uid)
    t2 = time.perf_counter()
    comparison = _compare(volume, segments, prior)
    results = write_results(volume, segments, info, options=options, predecessors=predecessors,
                            comparison=comparison)
    t_write = time.perf_counter() - t2

    timings = PipelineTimings(load_s=t_load, preprocess_s=result.timings.preprocess_s,
                              inference_s=result.timings.inference_s,
                              postprocess_s=result.timings.postprocess_s + t_split,
                              write_s=t_write)
    outcome = PipelineOutcome(volume=volume, segments=segments, results=results, model=info,
                              model_version=mv.version, backend=result.backend.value,
                              device_uid=result.device_uid,
                              model_grid_shape=tuple(result.model_grid_shape),
                              selection=decision, timings=timings, comparison=comparison)
    LOG.info("series %s: %s", volume.series_instance_uid, outcome.summary())
    return outcome


def check_series_budget(datasets: Sequence[Dataset], model: LoadedModel, max_memory_bytes: int,
                        *, volume: VolumeChoice | None = None) -> MemoryEstimate:
    """Predict a series' peak memory with ``model`` from its headers and refuse it when
    over ``max_memory_bytes``.

    A multi-frame series is measured by the frames of the volume ``volume`` chooses
    (default: the first temporal position and echo, ORIGINAL magnitude).

    Raises
    ------
    MemoryBudgetError
        With the one line saying what was refused, the estimate and the budget.
    """
    uid = str(datasets[0].get("SeriesInstanceUID", "")) if datasets else ""
    try:
        shape, affine = series_geometry(expand_frames(datasets, volume or VolumeChoice()))
    except (ValueError, PipelineError):
        LOG.debug("series %s: no geometry in the headers; memory checked after loading", uid)
        return MemoryEstimate(peak_bytes=0, baseline_bytes=0, stages=(("none", 0),),
                              source_bytes=0, model_grid=(0, 0, 0), channels=0)
    estimate = model.memory_estimate(shape, affine)
    check_budget(estimate, max_memory_bytes, series_uid=uid, version=model.version.version)
    LOG.info("series %s: %s; budget %.1f GB", uid, estimate.summary(), max_memory_bytes / 1e9)
    return estimate


def _compare(volume: Volume, segments: Sequence[SegmentResult], prior: PriorResult | None
             ) -> Comparison | None:
    """Today's volumes against ``prior``; None without a prior, or when the series has
    no Study Date after the prior's (said in the log)."""
    if prior is None:
        return None
    today = study_date_of(volume.source_images[0])
    if today is None or not prior.study_date < today:
        LOG.warning("series %s: not compared with the prior of %s: its Study Date is %s",
                    volume.series_instance_uid, prior.study_date, today or "absent")
        return None
    return compare([(s.name, float(s.volume_ml)) for s in segments], today, prior)


def _lo64(text: str) -> str:
    """Fit a name into a DICOM LO value (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]

