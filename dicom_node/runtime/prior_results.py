"""A job's prior: found in the twin, or retrieved from the PACS and measured first (issue 26).

:class:`JobPriors` does a *priors job*'s work (:meth:`JobPriors.ask`; the job is queued by
the stability monitor as a new study's first instance is filed, so this runs while the
study is still arriving): when the twin holds no earlier study within ``priors_years``
and a destination has ``query = true``, it retrieves the priors
(:class:`~dicom_node.wire.priors.PriorRetriever`), then has the worker run the task on
the series retrieved for the study that have no result yet, oldest first (also after a
restart, without asking the PACS again), recorded in the twin and not sent unless
``send_prior_results``. :meth:`JobPriors.lookup` is what a job asks before its pipeline:
the patient's most recent prior result of the task
(:meth:`HistoryStore.prior_result`), as the :class:`~pipelines.comparison.PriorResult`
the pipeline compares with, given the priors job's note (``asked``), or asking itself
when no priors job looked (a study that arrived while the node was down). What it could
not do is said in :attr:`PriorLookup.note` (``no comparison: ...``: the overlay's banner
line and the job's note): the new result never waits for a PACS that does not answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.wire.priors import PriorRetriever
from pipelines.comparison import PriorResult, PriorSegment
from pipelines.selection import SelectionRules
from pipelines.writers.history_plot import VolumePoint
from twin_archive.history import HistoryStore, PriorRecord, study_day
from twin_archive.results import SEG_TYPE_OF_CLASS

LOG = logging.getLogger(__name__)

_HEADER_TAGS = ["PatientID", "IssuerOfPatientID", "StudyDate", "StudyInstanceUID"]
#: How a note that explains a missing comparison begins.
NO_COMPARISON = "no comparison:"


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PriorLookup:
    """The prior a job is compared with (None: none), and what to say about it."""

    prior: PriorResult | None
    note: str
    seconds: float
    record: PriorRecord | None = None  # what ``prior`` was made of

    def for_seg_type(self, seg_type: str) -> PriorResult | None:
        """:attr:`prior` with the prior's SEG of ``seg_type`` (when it has one) for the SR
        of that type to reference: the SEG its destinations received."""
        if (self.prior is None or self.record is None
                or len(self.record.result.seg_types) < 2):
            return self.prior
        return as_prior_result(self.record, seg_type)


def as_prior_result(record: PriorRecord, seg_type: str = "") -> PriorResult | None:
    """The pipeline's view of a prior result (its SEG's headers read for the SR's
    reference: the SEG of ``seg_type`` when it has one of each, else its first; None
    when it has no study date)."""
    if record.study_date is None:
        return None
    seg = None
    kinds = record.result.seg_types
    wanted = SEG_TYPE_OF_CLASS.get if seg_type in kinds else None
    for obj in record.result.objects:
        if obj.kind == "seg" and (wanted is None or wanted(obj.sop_class_uid) == seg_type):
            try:
                seg = pydicom.dcmread(obj.path, stop_before_pixels=True)
            except (OSError, ValueError) as exc:  # pruned by retention, or damaged
                LOG.warning("prior result %d: SEG %s cannot be read (%s); the SR will not "
                            "reference it", record.result.id, obj.sop_instance_uid, exc)
            break
    return PriorResult(study_uid=record.result.study_uid, study_date=record.study_date,
                       segments=tuple(PriorSegment(name=s.name, volume_ml=s.volume_ml)
                                      for s in record.result.segments if s.volume_ml >= 0),
                       seg=seg, model_version=record.result.model_version)


def volume_points(history: HistoryStore, patient_key: str, task: str) -> list[VolumePoint]:
    """The twin's dated volumes of ``task`` (for the chart)."""
    out = []
    for p in history.history(patient_key, task):
        day = study_day(p.study_date)
        if day is not None:
            out.append(VolumePoint(segment=p.segment, study_date=day, volume_ml=p.volume_ml))
    return out


class JobPriors:
    """Finds (and when needed retrieves) a job's prior.

    Parameters
    ----------
    history : HistoryStore
    retriever : PriorRetriever or None
        None: never asks a PACS.
    """

    def __init__(self, history: HistoryStore, retriever: PriorRetriever | None) -> None:
        self.history = history
        self.retriever = retriever

    def lookup(self, *, patient_key: str, task: str, study_uid: str, series_uid: str,
               files: Sequence[Path], rules: SelectionRules,
               run_prior: Callable[[str], None], asked: str | None = None) -> PriorLookup:
        """The prior of a job's series (retrieving it first when the twin has none).

        ``run_prior(series_uid)`` runs the job's task on a retrieved series now and
        records its result (the worker's; it does not send it). ``asked``: the note of
        the study's priors job when one has looked for its priors already (None: none
        did, this job asks itself).
        """
        t0 = time.perf_counter()
        note = ""
        if asked is not None:
            note = asked if asked.startswith(NO_COMPARISON) else ""
        elif self.retriever is not None and not self.history.is_retrieved(series_uid):
            note = self.ask(patient_key=patient_key, study_uid=study_uid, files=files,
                            rules=rules, run_prior=run_prior)
            note = note if note.startswith(NO_COMPARISON) else ""
        record = self.history.prior_result(patient_key, task, study_uid)
        prior = as_prior_result(record) if record is not None else None
        if prior is None and not note and record is not None:
            note = f"{NO_COMPARISON} the prior study has no Study Date"
        return PriorLookup(prior=prior, note=note if prior is None else "",
                           seconds=time.perf_counter() - t0, record=record)

    def ask(self, *, patient_key: str, study_uid: str, files: Sequence[Path],
            rules: SelectionRules, run_prior: Callable[[str], None]) -> str:
        """Retrieve priors when the twin has none in the window, and run the task on the
        series retrieved for ``study_uid`` that have no result yet (after a restart too),
        oldest first. Returns what was done, or why there will be no comparison
        (``no comparison: ...``)."""
        if self.retriever is None:
            return "priors not asked for: no PACS to ask"
        head = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        today = study_day(str(head.get("StudyDate", "") or ""))
        why_not = self.retriever.wanted(patient_key, study_uid, today)
        if not why_not and today is not None:
            got = self.retriever.retrieve(
                patient_id=str(head.get("PatientID", "") or ""),
                issuer=str(head.get("IssuerOfPatientID", "") or ""), patient_key=patient_key,
                study_uid=study_uid, today=today, rules=rules)
            if not got.answered:
                LOG.warning("twin %s: the result goes out without the comparison with a prior "
                            "from the PACS: %s", patient_key, got.note)
                return f"{NO_COMPARISON} {got.note}"[:200]
            why_not = got.note or (f"{len(got.series)} series retrieved from {got.source} "
                                   f"({got.bytes / 1e6:.1f} MB)")
        else:
            LOG.debug("twin %s: priors not asked for: %s", patient_key, why_not)
            why_not = f"priors not asked for: {why_not}"
        for uid in self.history.retrieved_for(study_uid):  # skips those measured already
            run_prior(uid)
        return why_not
