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

* and, when tasks are configured (:class:`TaskLabelIntake`), its segments name a
  structure of at least one configured task: by name (case, ``_`` and ``-`` ignored) or
  by the code value of its Segmented Property Type. A task's structures are those it
  declares (``[[tasks]] segments``) and the labels of its active model versions (of its
  newest registered version when none is active). The label is recorded for each such
  task (a SEG of spleen and liver is a label of ``spleen-ct`` and of ``liver-ct``).

A SEG that passes every check but names no configured task's structure is kept as an
*unclaimed* label, with the reason (:mod:`twin_archive.labels`): no label is lost for
want of a task. It is claimed - made a label of the tasks it names - when a task or a
model that names its segments appears: on SIGHUP and at start
(:meth:`TaskLabelIntake.set_tasks`, :meth:`TaskLabelIntake.rescan`), after ``models
import`` and by ``labels rescan`` (:func:`claim_unclaimed`).

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
from registry.records import LabelSpec, ModelVersion, code_for_label
from registry.store import Registry
from twin_archive import audit
from twin_archive.labels import Label, LabelRefusedError, LabelStore

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class IntakeDecision:
    """What label intake did with one SEG series."""

    decision: str  # "label", "unclaimed" (kept for no task yet) or "ignored"
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


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskTerms:
    """What names a task's labels: the structures it declares and its models' labels.

    Parameters
    ----------
    task : str
    names : frozenset of str
        Structure names, normalised (lower case; ``_``, ``-`` and runs of spaces as one
        space).
    codes : frozenset of str
        Code values (``78961009``) of its structures.
    described : str
        Where they come from, in words (for an unclaimed label's reason).
    """

    task: str
    names: frozenset[str]
    codes: frozenset[str]
    described: str

    def matches(self, names: Sequence[str], codes: Sequence[str | None]) -> bool:
        """Whether one of a SEG's segments (by name or code) is one of these structures."""
        return any(_key(n) in self.names for n in names) or any(
            c in self.codes for c in codes if c)


def task_terms(task: Task, versions: Sequence[ModelVersion]) -> TaskTerms:
    """The structures of ``task``: its ``segments`` and the labels of its active versions
    among ``versions`` (all of the task's registered versions, oldest first), or of
    the newest one when none is active."""
    active = [v for v in versions if v.status.value == "active"]
    specs: list[LabelSpec] = []
    for mv in active or list(versions)[-1:]:
        specs.extend(s for s in mv.labels if s not in specs)
    names = {_key(s.name) for s in task.segments} | {_key(s.name) for s in specs}
    codes = {s.value for s in task.segments if s.value} | {
        c.value for c in ((s.code or code_for_label(s.name)) for s in specs) if c}
    parts = []
    if task.segments:
        parts.append(f"declares {task.describe_segments()}")
    if specs:
        parts.append(f"model labels {', '.join(s.name for s in specs)}")
    described = "; ".join(parts) or "no segments declared, no model registered"
    return TaskTerms(task=task.name, names=frozenset(names), codes=frozenset(codes),
                     described=described)


def registry_terms(data_dir: Path | str, tasks: Sequence[Task]) -> tuple[TaskTerms, ...]:
    """:func:`task_terms` of every task, with their versions read from the registry."""
    with Registry(data_dir) as reg:
        return tuple(task_terms(t, reg.list(t.name)) for t in tasks)


def tasks_named(terms: Sequence[TaskTerms], names: Sequence[str],
                codes: Sequence[str | None]) -> tuple[str, ...]:
    """The tasks whose structures a SEG's segments name, sorted."""
    return tuple(sorted(t.task for t in terms if t.matches(names, codes)))


def unclaimed_reason(terms: Sequence[TaskTerms], names: Sequence[str]) -> str:
    """Why a SEG of segments ``names`` is a label of no configured task, in words."""
    have = "; ".join(f"{t.task}: {t.described}" for t in terms) or "no task configured"
    return f"its segments {list(names)} name no structure of a configured task ({have})"


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimReport:
    """What :func:`claim_unclaimed` did: labels claimed (id, tasks), labels left
    unclaimed (id, reason)."""

    claimed: tuple[tuple[int, tuple[str, ...]], ...] = ()
    unclaimed: tuple[tuple[int, str], ...] = ()

    def summary(self) -> str:
        """One line for the journal and the CLI."""
        if not self.claimed and not self.unclaimed:
            return "no unclaimed labels"
        done = ", ".join(f"label {i} for {', '.join(t)}" for i, t in self.claimed)
        return (f"{len(self.claimed)} unclaimed label(s) claimed{': ' + done if done else ''};"
                f" {len(self.unclaimed)} still unclaimed")


def claim_unclaimed(labels: LabelStore, terms: Sequence[TaskTerms], *, via: str,
                    by: str = "dicom-node") -> ClaimReport:
    """Claim each unclaimed label whose segments a task's structures now name; say
    anew why the others stay unclaimed. Each claim is audited (``label-imported``,
    ``via: claimed ...``).

    Parameters
    ----------
    labels : LabelStore
    terms : sequence of TaskTerms
        The configured tasks' structures (:func:`registry_terms`).
    via : str
        What triggered it (``SIGHUP``, ``models import``, ``labels rescan``, ``start``).
    by : str
        Who, for the audit trail.
    """
    claimed: list[tuple[int, tuple[str, ...]]] = []
    left: list[tuple[int, str]] = []
    for label in labels.unclaimed():
        tasks = tasks_named(terms, label.segments, label.segment_codes)
        if not tasks:
            reason = unclaimed_reason(terms, label.segments)
            if reason != label.unclaimed:
                labels.set_unclaimed_reason(label.id, reason)
            left.append((label.id, reason))
            continue
        got, now = labels.claim(label.id, tasks)
        if now:
            _audit_claim(labels, got, label.unclaimed, via, by)
            claimed.append((got.id, got.tasks))
    report = ClaimReport(claimed=tuple(claimed), unclaimed=tuple(left))
    if claimed or left:
        LOG.info("unclaimed labels (%s): %s", via, report.summary())
    return report


def _audit_claim(labels: LabelStore, label: Label, was: str, via: str, by: str) -> None:
    audit.record(labels.data_dir, audit.AuditEvent.LABEL_IMPORTED, audit.AuditOutcome.SUCCESS,
                 by, label.series_uid, {"label_id": label.id, "via": f"claimed ({via})",
                                        "tasks": list(label.tasks), "was_unclaimed": was})


class TaskLabelIntake:
    """Label intake for the configured tasks: a SEG is a label of each task it names,
    or an unclaimed label until one names it.

    Callable as the stability monitor's ``label_intake`` (runs in its thread).

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory (its registry gives each task's model labels).
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
        """Match SEGs against ``tasks`` from now on (SIGHUP; then :meth:`rescan`)."""
        self.tasks = tuple(tasks)

    def terms(self) -> tuple[TaskTerms, ...]:
        """The configured tasks' structures, as the registry is now."""
        with self._lock:
            return registry_terms(self.data_dir, self.tasks)

    def rescan(self, *, via: str) -> ClaimReport:
        """Claim the unclaimed labels that a configured task or model names now."""
        terms = self.terms()
        with self._lock:
            return claim_unclaimed(self.labels, terms, via=via)

    def __call__(self, files: Sequence[Path]) -> IntakeDecision:
        terms = self.terms()
        return intake_seg_series(
            files, self.labels, tasks_for=lambda names, codes: tasks_named(terms, names, codes),
            none_matches=lambda names: unclaimed_reason(terms, names))


def _not_a_label(ds: Dataset) -> str:
    """Why a SEG instance cannot be a label at all ('' when it can be one)."""
    if str(ds.get("SOPClassUID", "")) != SegmentationStorage:
        return "not a Segmentation Storage instance"
    if is_node_output(ds):
        return "produced by this node; not a label"
    if not referenced_series(ds):
        return "references no series (Referenced Series Sequence empty)"
    return ""


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
        naming none is kept as an unclaimed label. Without it, the label is for any task.
    none_matches : callable, optional
        ``(segment names) -> reason`` when ``tasks_for`` names no task.

    Returns
    -------
    IntakeDecision
        ``label`` when a label of some task was recorded, ``unclaimed`` when only
        unclaimed ones were, ``ignored`` otherwise.
    """
    claimed: list[int] = []
    kept: list[int] = []
    reasons: list[str] = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop = str(ds.get("SOPInstanceUID", ""))
        problem = _not_a_label(ds)
        if problem:
            reasons.append(f"{sop}: {problem}")
            continue
        names, codes = segment_names(ds), segment_codes(ds)
        tasks: tuple[str, ...] = () if tasks_for is None else tasks_for(names, codes)
        unclaimed = ""
        if tasks_for is not None and not tasks:
            unclaimed = (none_matches(names) if none_matches else
                         f"its segments {list(names)} name no task's label")
        for series_uid in referenced_series(ds):
            label_id, text = _record(ds, series_uid, labels, names, codes, tasks, unclaimed)
            reasons.append(f"{sop}: {text}")
            if label_id is not None:
                (kept if unclaimed else claimed).append(label_id)
    decision = "label" if claimed else "unclaimed" if kept else "ignored"
    return IntakeDecision(decision=decision, reason="; ".join(reasons) or "no instances",
                          label_ids=tuple(claimed + kept))


def _record(ds: Dataset, series_uid: str, labels: LabelStore, names: tuple[str, ...],
            codes: tuple[str | None, ...], tasks: tuple[str, ...], unclaimed: str
            ) -> tuple[int | None, str]:
    """Record one SEG instance as a label of one referenced series (audited when new);
    return the label id (``None`` when refused) and what happened, in words."""
    sop = str(ds.get("SOPInstanceUID", ""))
    creator = str(ds.get("ContentCreatorName", "") or "")
    when = f"{ds.get('ContentDate', '') or ''}{str(ds.get('ContentTime', '') or '').split('.')[0]}"
    for_seg = str(ds.get("FrameOfReferenceUID", "") or "")
    for_src = labels.frame_of_reference(series_uid)
    if for_src and for_seg and for_seg != for_src:
        return None, f"its Frame of Reference differs from series {series_uid}'s"
    try:
        label, new = labels.add_seg(seg_sop_instance_uid=sop, source_series_uid=series_uid,
                                    segments=names, content_creator=creator, content_time=when,
                                    tasks=tasks, unclaimed=unclaimed, segment_codes=codes)
    except LabelRefusedError as exc:
        return None, exc.problem
    if new:
        detail = {"label_id": label.id, "via": "C-STORE", "seg_sop_instance_uid": sop,
                  "tasks": list(tasks)}
        if unclaimed:
            detail["unclaimed"] = unclaimed
        audit.record(labels.data_dir, audit.AuditEvent.LABEL_IMPORTED, audit.AuditOutcome.SUCCESS,
                     creator or "unknown creator", series_uid, detail)
    again = "" if new else " (already recorded)"
    if label.unclaimed:
        return label.id, f"label {label.id} of series {series_uid} kept unclaimed{again}: " \
                         f"{label.unclaimed}"
    return label.id, (f"label {label.id} of series {series_uid} for "
                      f"{', '.join(label.tasks) or 'any task'}{again}")
