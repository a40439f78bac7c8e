"""Label intake: a complete SEG series from a radiologist becomes a label of its source series.

Where this runs, and why: not in the C-STORE handler, which only validates, writes
durably and indexes (STYLE rule 3, DESIGN decision 1), but in the stability monitor,
when the SEG's series has gone quiet - the same moment an image series becomes a job.
The monitor already reads the headers of every complete series to decide on it, a SEG
is a series like any other (a viewer may send a correction as several instances, and
a late one re-opens the series), and deciding here costs the sender nothing. Intake
reads headers only (no pixel data); the mask is decoded when a dataset is built.

A SEG becomes a label when

* it is a Segmentation Storage instance,
* it is not this node's own output (:func:`pipelines.selection.is_node_output`: our
  SEGs echoed back by the PACS must not become labels, DESIGN decision 4),
* it references a series that is in the archive (Referenced Series Sequence), of the
  same patient and in the same Frame of Reference.

Otherwise the series is left alone with the reason logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from pipelines.selection import is_node_output
from twin_archive import audit
from twin_archive.labels import LabelRefusedError, LabelStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class IntakeDecision:
    """What label intake did with one SEG series."""

    decision: str  # "label" or "ignored"
    reason: str
    label_ids: tuple[int, ...] = ()


def referenced_series(ds: Dataset) -> tuple[str, ...]:
    """Series Instance UIDs a SEG references (its Referenced Series Sequence, which the
    Common Instance Reference module makes mandatory for a SEG)."""
    out = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])]
    return tuple(dict.fromkeys(u for u in out if u))


def segment_names(ds: Dataset) -> tuple[str, ...]:
    """Segment Labels of a SEG in segment-number order."""
    items = sorted(ds.get("SegmentSequence", []), key=lambda it: int(it.get("SegmentNumber", 0)))
    return tuple(str(it.get("SegmentLabel", "") or "").strip() or f"segment {it.get('SegmentNumber')}"
                 for it in items)


def intake_seg_series(files: Sequence[Path], labels: LabelStore) -> IntakeDecision:
    """Record each SEG instance of a quiet series as a label, or say why not.

    Parameters
    ----------
    files : sequence of pathlib.Path
        The current instance files of one series whose Modality is SEG.
    labels : LabelStore
        Where labels are recorded.

    Returns
    -------
    IntakeDecision
    """
    recorded: list[int] = []
    reasons: list[str] = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop = str(ds.get("SOPInstanceUID", ""))
        if str(ds.get("SOPClassUID", "")) != SegmentationStorage:
            reasons.append(f"{sop}: not a Segmentation Storage instance")
            continue
        if is_node_output(ds):
            reasons.append(f"{sop}: produced by this node; not a label")
            continue
        refs = referenced_series(ds)
        if not refs:
            reasons.append(f"{sop}: references no series (Referenced Series Sequence empty)")
            continue
        names = segment_names(ds)
        creator = str(ds.get("ContentCreatorName", "") or "")
        when = f"{ds.get('ContentDate', '') or ''}{str(ds.get('ContentTime', '') or '').split('.')[0]}"
        for series_uid in refs:
            for_seg = str(ds.get("FrameOfReferenceUID", "") or "")
            for_src = labels.frame_of_reference(series_uid)
            if for_src and for_seg and for_seg != for_src:
                reasons.append(f"{sop}: its Frame of Reference differs from series {series_uid}'s")
                continue
            try:
                label, new = labels.add_seg(seg_sop_instance_uid=sop, source_series_uid=series_uid,
                                            segments=names, content_creator=creator,
                                            content_time=when)
            except LabelRefusedError as exc:
                reasons.append(f"{sop}: {exc.problem}")
                continue
            recorded.append(label.id)
            if new:
                audit.record(labels.data_dir, audit.AuditEvent.LABEL_IMPORTED,
                             audit.AuditOutcome.SUCCESS, creator or "unknown creator", series_uid,
                             {"label_id": label.id, "via": "C-STORE", "seg_sop_instance_uid": sop})
            reasons.append(f"{sop}: label {label.id} of series {series_uid}"
                           f"{'' if new else ' (already recorded)'}")
    if recorded:
        return IntakeDecision(decision="label", reason="; ".join(reasons),
                              label_ids=tuple(recorded))
    return IntakeDecision(decision="ignored", reason="; ".join(reasons) or "no instances")
