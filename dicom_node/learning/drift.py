"""Drift per scanner: what each scanner sends, and what the model makes of it, over time.

For every served series the worker records (:func:`series_figures`, no patient data):

* input figures - HU percentiles inside the body (voxels above -500 HU: p5, p25, p50,
  p75, p95), a histogram of those HU values on fixed bins, the spacing (mm), the
  slice count and the kVp where the series has one;
* output figures - each segment's volume (mL) and whether the result was empty;

keyed by scanner (Manufacturer, Manufacturer's Model Name, Station Name) and task.

**The test, stated.** For each scanner and task, the *baseline* is its first
``drift_baseline_series`` served series and the *window* its latest
``drift_window_series`` (after the baseline). Each figure is compared with the
population stability index,

    PSI = sum over bins (w - b) * ln(w / b)

where ``b`` and ``w`` are the shares of the baseline and of the window in a bin (each
share at least 1e-4, so that an empty bin does not give infinity):

* the HU histogram (``hu_body``): the pooled voxel shares of the fixed HU bins
  :data:`HU_EDGES` (many voxels per series, so a few series suffice);
* figures that take few values (spacing, slices, kVp, empty): one bin per value;
* continuous per-series figures (HU percentiles, volumes): the baseline's deciles as
  bin edges, computed only when both sides hold at least :data:`MIN_SERIES_CONTINUOUS`
  series (with fewer, deciles are noise) - shown as ``n/a`` until then.

A figure *moved* when its PSI exceeds ``drift_psi_threshold`` (default 0.25, the
customary "significant shift"; 0.1-0.25 is "moderate"). A scanner whose figures
moved is named in the journal once (``drift_named`` in the archive index).

Written by hand (a few lines of numpy): the PSI is a one-line formula, and the
drift libraries on PyPI (evidently, nannyml, alibi-detect) bring dashboards, pandas
and model servers for what the node needs at one function.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin_archive.learning import FigureRow, FigureStore, Scanner

LOG = logging.getLogger(__name__)

#: Bin edges (HU) of the histogram of HU values inside the body.
HU_EDGES: tuple[float, ...] = (-500.0, -150.0, -100.0, -50.0, 0.0, 25.0, 50.0, 75.0, 100.0,
                               125.0, 150.0, 200.0, 300.0, 500.0, 1000.0, 4000.0)
#: Body: voxels above this, HU.
BODY_HU = -500.0
PERCENTILES = (5, 25, 50, 75, 95)
#: Figures that take few distinct values: compared value by value.
DISCRETE = ("spacing_row_mm", "spacing_col_mm", "spacing_slice_mm", "slices", "kvp", "empty")
#: Fewest series on each side for a PSI of a continuous per-series figure.
MIN_SERIES_CONTINUOUS = 10
_EPS = 1e-4


@dataclass(frozen=True, kw_only=True, slots=True)
class DriftConfig:
    """How drift is judged (``drift_*`` settings).

    Raises
    ------
    ValueError
        Sizes below 2 or a threshold that is not positive.
    """

    baseline_series: int = 20
    window_series: int = 20
    psi_threshold: float = 0.25

    def __post_init__(self) -> None:
        if self.baseline_series < 2 or self.window_series < 2:
            raise ValueError("baseline_series and window_series must be >= 2")
        if not self.psi_threshold > 0:
            raise ValueError(f"psi_threshold must be > 0, got {self.psi_threshold}")


def config_of(settings: Any) -> DriftConfig:
    """The ``drift_*`` settings of a :class:`~dicom_node.settings.Settings`."""
    return DriftConfig(baseline_series=settings.drift_baseline_series,
                       window_series=settings.drift_window_series,
                       psi_threshold=settings.drift_psi_threshold)


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesFigures:
    """The figures of one served series."""

    figures: Mapping[str, float]
    histogram: tuple[float, ...]


def series_figures(array: np.ndarray, affine: np.ndarray, *, kvp: float | None,
                   volumes_ml: Mapping[str, float], empty: bool) -> SeriesFigures:
    """Input and output figures of one series.

    Parameters
    ----------
    array : numpy.ndarray
        HU, (slices, rows, columns).
    affine : numpy.ndarray
        4x4, index (k, i, j) -> LPS mm.
    kvp : float or None
        The series' KVP, when it has one.
    volumes_ml : mapping of str to float
        Each segment's volume (mL); empty when the result was empty.
    empty : bool
        The model found nothing.
    """
    hu = np.asarray(array, dtype=np.float32)
    body = hu[hu > BODY_HU]
    figures: dict[str, float] = {}
    if body.size:
        for p, v in zip(PERCENTILES, np.percentile(body, PERCENTILES)):
            figures[f"hu_p{p}"] = round(float(v), 1)
    counts, _ = np.histogram(np.clip(body, HU_EDGES[0], HU_EDGES[-1] - 1), bins=HU_EDGES)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    figures["spacing_slice_mm"] = round(float(spacing[0]), 2)
    figures["spacing_row_mm"] = round(float(spacing[1]), 2)
    figures["spacing_col_mm"] = round(float(spacing[2]), 2)
    figures["slices"] = float(hu.shape[0])
    if kvp is not None:
        figures["kvp"] = float(kvp)
    for name, ml in volumes_ml.items():
        figures[f"volume_ml_{name}"] = round(float(ml), 2)
    figures["empty"] = 1.0 if empty else 0.0
    return SeriesFigures(figures=figures, histogram=tuple(float(c) for c in counts))


def psi(baseline: Sequence[float] | np.ndarray, window: Sequence[float] | np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (shares or counts)."""
    b = np.asarray(baseline, dtype=np.float64)
    w = np.asarray(window, dtype=np.float64)
    if b.shape != w.shape or b.ndim != 1 or not b.size:
        raise ValueError("baseline and window must be 1-D and of the same length")
    b = np.maximum(b / max(b.sum(), 1e-12), _EPS)
    w = np.maximum(w / max(w.sum(), 1e-12), _EPS)
    return float(np.sum((w - b) * np.log(w / b)))


def _psi_discrete(base: Sequence[float], win: Sequence[float]) -> float:
    values = sorted(set(base) | set(win))
    return psi([sum(1 for x in base if x == v) for v in values],
               [sum(1 for x in win if x == v) for v in values])


def _psi_deciles(base: Sequence[float], win: Sequence[float]) -> float:
    edges = np.unique(np.quantile(np.asarray(base), np.linspace(0.1, 0.9, 9)))
    nb = len(edges) + 1
    return psi(np.bincount(np.searchsorted(edges, base, side="right"), minlength=nb),
               np.bincount(np.searchsorted(edges, win, side="right"), minlength=nb))


@dataclass(frozen=True, kw_only=True, slots=True)
class FigureDrift:
    """One figure of one scanner: baseline and window means, and the PSI (``None``: n/a)."""

    name: str
    part: str  # input or output
    baseline_mean: float | None
    window_mean: float | None
    psi: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannerDrift:
    """A scanner's recent window beside its baseline, for one task."""

    task: str
    scanner: Scanner
    series: int
    baseline_series: int
    window_series: int
    status: str  # collecting, stable or moved
    figures: tuple[FigureDrift, ...] = ()
    moved: tuple[str, ...] = ()
    named_at: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"task": self.task, "scanner": {"manufacturer": self.scanner.manufacturer,
                                               "model_name": self.scanner.model_name,
                                               "station": self.scanner.station},
                "series": self.series, "baseline_series": self.baseline_series,
                "window_series": self.window_series, "status": self.status,
                "moved": list(self.moved), "named_at": self.named_at,
                "figures": [{"name": f.name, "part": f.part, "baseline_mean": f.baseline_mean,
                             "window_mean": f.window_mean, "psi": f.psi} for f in self.figures]}


def _part(name: str) -> str:
    return "output" if name.startswith("volume_ml_") or name == "empty" else "input"


def compare(task: str, scanner: Scanner, rows: Sequence[FigureRow], config: DriftConfig,
            named_at: str | None = None) -> ScannerDrift:
    """The drift of one scanner from its rows (oldest first)."""
    n = len(rows)
    base = list(rows[:config.baseline_series])
    after = rows[config.baseline_series:]
    win = list(after[-config.window_series:])
    if len(base) < config.baseline_series or len(win) < config.window_series:
        return ScannerDrift(task=task, scanner=scanner, series=n, baseline_series=len(base),
                            window_series=len(win), status="collecting", named_at=named_at)
    figs: list[FigureDrift] = []
    hb = np.sum([r.histogram for r in base], axis=0)
    hw = np.sum([r.histogram for r in win], axis=0)
    figs.append(FigureDrift(name="hu_body", part="input", baseline_mean=None, window_mean=None,
                            psi=round(psi(hb, hw), 4)))
    names = sorted({k for r in rows for k in r.figures})
    for name in names:
        b = [float(r.figures[name]) for r in base if name in r.figures]
        w = [float(r.figures[name]) for r in win if name in r.figures]
        value: float | None = None
        if b and w:
            if name in DISCRETE:
                value = _psi_discrete(b, w)
            elif min(len(b), len(w)) >= MIN_SERIES_CONTINUOUS:
                value = _psi_deciles(b, w)
        figs.append(FigureDrift(name=name, part=_part(name),
                                baseline_mean=round(float(np.mean(b)), 3) if b else None,
                                window_mean=round(float(np.mean(w)), 3) if w else None,
                                psi=None if value is None else round(value, 4)))
    moved = tuple(f.name for f in figs if f.psi is not None and f.psi > config.psi_threshold)
    return ScannerDrift(task=task, scanner=scanner, series=n, baseline_series=len(base),
                        window_series=len(win), status="moved" if moved else "stable",
                        figures=tuple(figs), moved=moved, named_at=named_at)


def drift_report(store: FigureStore, config: DriftConfig, task: str | None = None
                 ) -> list[ScannerDrift]:
    """Every scanner's drift (of ``task``, or of every task)."""
    return [compare(t, sc, store.rows(t, sc), config, store.named(t, sc))
            for t, sc in store.scanners(task)]


def note_series(store: FigureStore, config: DriftConfig, *, job_key: str, task: str,
                scanner: Scanner, model_version: str, figures: SeriesFigures) -> ScannerDrift:
    """Record a served series' figures; name the scanner in the journal the first time
    its figures moved."""
    store.record(job_key=job_key, task=task, scanner=scanner, model_version=model_version,
                 figures=figures.figures, histogram=figures.histogram)
    d = compare(task, scanner, store.rows(task, scanner), config)
    if d.status == "moved":
        detail = ", ".join(f"{f.name} PSI {f.psi:.2f}" for f in d.figures if f.name in d.moved)
        if store.name_once(task, scanner, detail):
            LOG.warning("drift: scanner %s moved for task %s: %s (PSI > %g; its last %d series "
                        "against its first %d); a scanner-specific model may be due", scanner,
                        task, detail, config.psi_threshold, d.window_series, d.baseline_series)
    return d


@dataclass(frozen=True, kw_only=True, slots=True)
class DriftGauge:
    """One exported value: name, labels, value."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    value: float = 0.0


def drift_gauges(data_dir: Path | str, config: DriftConfig) -> Iterator[DriftGauge]:
    """The drift figures for ``/metrics`` (nothing when the archive has no figures yet)."""
    try:
        store = FigureStore(data_dir)
    except RuntimeError:  # index not migrated yet
        return
    try:
        for d in drift_report(store, config):
            base = {"task": d.task, "scanner": str(d.scanner)}
            yield DriftGauge(name="series", labels=base, value=float(d.series))
            yield DriftGauge(name="moved", labels=base, value=1.0 if d.status == "moved" else 0.0)
            for f in d.figures:
                if f.psi is not None:
                    yield DriftGauge(name="psi", labels={**base, "figure": f.name}, value=f.psi)
    finally:
        store.close()
