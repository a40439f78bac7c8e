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

* and, when tasks are configured (:class:`TaskLabelIntake`), its segments name a label
  of at least one configured task: by name (case, ``_`` and ``-`` ignored) or by the
  SNOMED CT code of its Segmented Property Type. The label is recorded for each such
  task (a SEG of spleen and liver is a label of ``spleen-ct`` and of ``liver-ct``). A
  task's label names are those of its active model versions, or of its newest
  registered version when none is active.

Otherwise the series is left alone with the reason logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from dicom_node.tasks import Task
from pipelines.selection import is_node_output
from registry.records import LabelSpec, code_for_label
from registry.store import Registry
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


def segment_codes(ds: Dataset) -> tuple[str | None, ...]:
    """Code Value of each segment's Segmented Property Type, in segment-number order."""
    items = sorted(ds.get("SegmentSequence", []), key=lambda it: int(it.get("SegmentNumber", 0)))
    out: list[str | None] = []
    for it in items:
        prop = it.get("SegmentedPropertyTypeCodeSequence")
        out.append(str(prop[0].get("CodeValue", "")) or None if prop else None)
    return tuple(out)


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def label_matches(names: Sequence[str], codes: Sequence[str | None],
                  specs: Sequence[LabelSpec]) -> bool:
    """Whether a segment (by name or SNOMED CT code) names one of the model labels ``specs``."""
    by_name = {_key(s.name) for s in specs}
    by_code = {c.value for c in ((s.code or code_for_label(s.name)) for s in specs) if c}
    return any(_key(n) in by_name for n in names) or any(c in by_code for c in codes if c)


class TaskLabelIntake:
    """Label intake for the configured tasks: a SEG is a label of each task it names.

    Callable as the stability monitor's ``label_intake`` (runs in its thread).

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory (its registry gives each task's label names).
    labels : LabelStore
        Where labels are recorded.
    tasks : sequence of Task
        The configured tasks (:meth:`set_tasks` on SIGHUP).
    """

    def __init__(self, data_dir: Path | str, labels: LabelStore, tasks: Sequence[Task]) -> None:
        self.data_dir = Path(data_dir)
        self.labels = labels
        self.tasks = tuple(tasks)
        self._lock = threading.Lock()

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Match SEGs against ``tasks`` from now on."""
        self.tasks = tuple(tasks)

    def task_labels(self) -> dict[str, tuple[LabelSpec, ...]]:
        """Each configured task's model labels (empty when no version is registered)."""
        out: dict[str, tuple[LabelSpec, ...]] = {}
        with self._lock, Registry(self.data_dir) as reg:
            for task in self.tasks:
                versions = reg.list(task.name)
                active = [v for v in versions if v.status.value == "active"]
                specs: list[LabelSpec] = []
                for mv in active or versions[-1:]:
                    specs.extend(s for s in mv.labels if s not in specs)
                out[task.name] = tuple(specs)
        return out

    def __call__(self, files: Sequence[Path]) -> IntakeDecision:
        known = self.task_labels()

        def tasks_for(names: Sequence[str], codes: Sequence[str | None]) -> tuple[str, ...]:
            return tuple(sorted(t for t, specs in known.items() if label_matches(names, codes, specs)))

        def none_matches(names: Sequence[str]) -> str:
            have = "; ".join(f"{t}: {', '.join(s.name for s in specs) or 'no model registered'}"
                             for t, specs in known.items()) or "no task configured"
            return f"its segments {list(names)} name no label of a configured task ({have})"

        return intake_seg_series(files, self.labels, tasks_for=tasks_for, none_matches=none_matches)


def intake_seg_series(files: Sequence[Path], labels: LabelStore, *,
                      tasks_for: Callable[[Sequence[str], Sequence[str | None]], tuple[str, ...]]
                      | None = None,
                      none_matches: Callable[[Sequence[str]], str] | None = None) -> IntakeDecision:
    """Record each SEG instance of a quiet series as a label, or say why not.

    Parameters
    ----------
    files : sequence of pathlib.Path
        The current instance files of one series whose Modality is SEG.
    labels : LabelStore
        Where labels are recorded.
    tasks_for : callable, optional
        ``(segment names, segment codes) -> task names`` the SEG is a label of; a SEG
        naming none is not recorded. Without it, the label is for any task.
    none_matches : callable, optional
        ``(segment names) -> reason`` when ``tasks_for`` names no task.

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
        tasks: tuple[str, ...] = ()
        if tasks_for is not None:
            tasks = tasks_for(names, segment_codes(ds))
            if not tasks:
                reasons.append(f"{sop}: " + (none_matches(names) if none_matches else
                                             f"its segments {list(names)} name no task's label"))
                continue
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
                                            content_time=when, tasks=tasks)
            except LabelRefusedError as exc:
                reasons.append(f"{sop}: {exc.problem}")
                continue
            recorded.append(label.id)
            if new:
                audit.record(labels.data_dir, audit.AuditEvent.LABEL_IMPORTED,
                             audit.AuditOutcome.SUCCESS, creator or "unknown creator", series_uid,
                             {"label_id": label.id, "via": "C-STORE", "seg_sop_instance_uid": sop,
                              "tasks": list(tasks)})
            reasons.append(f"{sop}: label {label.id} of series {series_uid}"
                           f" for {', '.join(tasks) or 'any task'}"
                           f"{'' if new else ' (already recorded)'}")
    if recorded:
        return IntakeDecision(decision="label", reason="; ".join(reasons),
                              label_ids=tuple(recorded))
    return IntakeDecision(decision="ignored", reason="; ".join(reasons) or "no instances")
