"""A result set against the patient's prior one: per segment, the change since then.

Pure computation on value objects: the shell finds the prior (in the twin, or after
retrieving it from the PACS) and hands it over as a :class:`PriorResult`; the writers
put the comparison into the SR (:mod:`pipelines.writers.sr_prior`) and the overlay
(a banner line, :func:`banner_line`; the volumes over time, :mod:`pipelines.writers.history_plot`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorSegment:
    """One segment of the prior result: its name and volume (mL)."""

    name: str
    volume_ml: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: empty")
        if not math.isfinite(self.volume_ml) or self.volume_ml < 0:
            raise ValueError(f"volume_ml must be a finite volume >= 0 mL, got {self.volume_ml!r}")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PriorResult:
    """The patient's most recent prior result of the same task.

    Parameters
    ----------
    study_uid : str
        Its study (the prior study, referenced as evidence in the SR).
    study_date : datetime.date
        Its Study Date.
    segments : tuple of PriorSegment
        Its volumes.
    seg : pydicom.dataset.Dataset or None
        Headers of its SEG (the SR references the prior's segments in it); None when
        the SEG file is gone (retention): the SR then carries no prior group, the
        banner and the record still compare.
    model_version : str
        The model version that measured it.
    """

    study_uid: str
    study_date: dt.date
    segments: tuple[PriorSegment, ...]
    seg: Dataset | None = None
    model_version: str = ""

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("study_uid: empty")
        if not isinstance(self.study_date, dt.date):
            raise TypeError("study_date must be a datetime.date")
        if self.seg is not None and str(self.seg.get("StudyInstanceUID", "")) != self.study_uid:
            raise ValueError("seg is not of the prior study")


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentChange:
    """One segment now and at the prior: volumes (mL), change (mL and %), interval (days).

    ``change_pct`` is None when the prior volume was 0 (no relative change).
    """

    name: str
    volume_ml: float
    prior_volume_ml: float
    change_ml: float
    change_pct: float | None
    interval_days: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    """A result compared with its prior, segment by segment (segments in both only)."""

    prior: PriorResult
    study_date: dt.date
    interval_days: int
    changes: tuple[SegmentChange, ...]

    def change(self, name: str) -> SegmentChange | None:
        """The change of segment ``name`` (case-insensitive), if it is in both results."""
        return next((c for c in self.changes if c.name.lower() == name.lower()), None)


def volume_change(volume_ml: float, prior_ml: float) -> tuple[float, float | None]:
    """The change from ``prior_ml`` to ``volume_ml``: (mL, rounded to 0.001; %, rounded to
    0.1, None when the prior was 0), as the SR, the banner and ``twin history`` show it."""
    return (round(float(volume_ml) - prior_ml, 3),
            round((float(volume_ml) - prior_ml) / prior_ml * 100.0, 1) if prior_ml > 0 else None)


def compare(segments: Sequence[tuple[str, float]], study_date: dt.date,
            prior: PriorResult) -> Comparison:
    """Compare today's volumes with the prior's, segment by segment.

    Parameters
    ----------
    segments : sequence of (name, volume in mL)
        Today's segments (empty ones, 0 mL, are left out: nothing was found).
    study_date : datetime.date
        Today's Study Date.
    prior : PriorResult

    Raises
    ------
    ValueError
        If the prior is not earlier than ``study_date``.
    """
    if not prior.study_date < study_date:
        raise ValueError(f"prior: dated {prior.study_date}, not before {study_date}")
    days = (study_date - prior.study_date).days
    before = {p.name.lower(): p.volume_ml for p in prior.segments}
    changes = []
    for name, volume in segments:
        old = before.get(name.lower())
        if old is None or volume <= 0:
            continue
        change_ml, change_pct = volume_change(volume, old)
        changes.append(SegmentChange(
            name=name, volume_ml=float(volume), prior_volume_ml=old, change_ml=change_ml,
            change_pct=change_pct, interval_days=days))
    return Comparison(prior=prior, study_date=study_date, interval_days=days,
                      changes=tuple(changes))


def banner_line(comparison: Comparison | None, *, note: str = "") -> str:
    """The overlay's comparison line: ``Spleen +28 % since 2025-12-03`` (several segments
    joined by ``; ``), or ``note`` when there is no comparison (why there is none)."""
    if comparison is None:
        return note
    parts = []
    for c in comparison.changes:
        change = (f"{c.change_pct:+.0f} %" if c.change_pct is not None
                  else f"{c.change_ml:+.1f} mL")
        parts.append(f"{c.name} {change}")
    if not parts:
        return f"no segment in common with the prior of {comparison.prior.study_date.isoformat()}"
    return f"{'; '.join(parts)} since {comparison.prior.study_date.isoformat()}"


def study_date_of(ds: Dataset) -> dt.date | None:
    """The Study Date of a data set, or None when absent or invalid.

    Read as the twin reads it when it picks the prior (:func:`twin_archive.history.study_day`:
    ``YYYYMMDD``, also ``YYYY-MM-DD`` and the old ``YYYY.MM.DD``), so that a prior the twin
    found for a series is compared, not dropped for the form of the series' date.
    """
    text = str(ds.get("StudyDate", "") or "").strip().replace("-", "").replace(".", "")
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None
