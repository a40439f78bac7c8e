"""The prior time point in the TID 1500 report (issue 26): the SR's part of a comparison.

How DICOM says "this organ measured X now and Y at the prior study" (PS3.16): each
measurement group carries a TID 1502 *Time Point Context* (HAS OBS CONTEXT: (C2348792,
UMLS, "Time Point") the study date and (126070, DCM, "Subject Time Point Identifier")
the Study Instance UID of that time point; (126073, DCM, "Time Point Order") is left
out: PixelMed's DicomSRValidator reads that NUM in a measurement group as a TID 1419
measurement with the wrong relationship, an Error), and the prior's volume is a TID 1411 Volumetric ROI group of its
own with the *same* Tracking UID and Tracking ID as today's group of that segment
(TID 4108: one finding tracked over time), referencing the segment of the prior SEG
((121232, DCM, "Source Series for Segmentation") its source series) and measured with
the prior's model version. The prior SEG is evidence of the report: highdicom files
an instance of another study in the Pertinent Other Evidence Sequence (0040,A385).

PS3.16 has no concept for "change of a volume since a time point" in this template
(the nearest, (125314, DCM, "Fractional Change"), belongs to CID 12303 *Echo
Measurement Type*), so the change itself is not coded: a reader (or a viewer)
derives it from the two groups of one Tracking UID, and the node shows it in the
overlay banner, ``twin history`` and its log.

Kept apart from :mod:`pipelines.writers.sr` on purpose: ``build_sr`` calls
:func:`with_prior` once, after its own groups are built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset

from pipelines.codes import MILLILITER, VOLUME, segment_coding
from pipelines.comparison import Comparison

def time_point(study_date: str, study_uid: str) -> hd.sr.TimePointContext:
    """TID 1502 Time Point Context of one study: its date and identifier."""
    return hd.sr.TimePointContext(time_point=study_date,
                                  subject_time_point_identifier=study_uid)


def add_time_point(group: Any, context: hd.sr.TimePointContext) -> None:
    """Put ``context`` into a built measurement group where TID 1411/1410 have it:
    after the algorithm identification, before the first measurement (NUM)."""
    content = group[0].ContentSequence
    at = next((i for i, item in enumerate(content) if item.ValueType == "NUM"), len(content))
    for offset, item in enumerate(context):
        content.insert(at + offset, item)


def with_prior(groups: Sequence[Any], evidence: Sequence[Dataset], comparison: Comparison,
               current_items: Sequence[Dataset], study_uid: str
               ) -> tuple[list[Any], list[Dataset]]:
    """Today's groups with their time point, the prior's groups, and the evidence with
    the prior SEG.

    Parameters
    ----------
    groups : sequence of highdicom measurement groups
        Today's groups, as :func:`pipelines.writers.sr.build_sr` built them (changed in
        place: each gains its time point).
    evidence : sequence of Dataset
        Today's evidence (source images and SEG).
    comparison : Comparison
    current_items : sequence of Dataset
        Today's SEG segment items (their Tracking UIDs, in segment order).
    study_uid : str
        Today's Study Instance UID.
    """
    today = time_point(comparison.study_date.isoformat(), study_uid)
    for group in groups:
        add_time_point(group, today)
    prior_seg = comparison.prior.seg
    if prior_seg is None:
        return list(groups), list(evidence)
    extra = prior_groups(comparison, prior_seg, current_items)
    return [*groups, *extra], ([*evidence, prior_seg] if extra else list(evidence))


def prior_groups(comparison: Comparison, prior_seg: Dataset,
                 current_items: Sequence[Dataset]) -> list[Any]:
    """One TID 1411 group per compared segment: the prior's volume on the prior SEG,
    tracked as today's segment, at the prior's time point."""
    prior = comparison.prior
    context = time_point(prior.study_date.isoformat(), prior.study_uid)
    numbers = {str(i.SegmentLabel).lower(): int(i.SegmentNumber)
               for i in prior_seg.SegmentSequence if int(i.SegmentNumber) != 0}
    source = _source_series(prior_seg)
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(prior_seg.get("ManufacturerModelName", "") or "model")[:64],
        version=prior.model_version or str(prior_seg.get("SoftwareVersions", "") or "unknown"))
    out: list[Any] = []
    for index, item in enumerate(current_items):
        change = comparison.change(str(item.SegmentLabel))
        number = numbers.get(str(item.SegmentLabel).lower())
        if change is None or number is None or source is None:
            continue
        coding = segment_coding(change.name, index)
        out.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID),
                                                          identifier=str(item.TrackingID)),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=str(prior_seg.SOPClassUID),
                sop_instance_uid=str(prior_seg.SOPInstanceUID), segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(source)),
            finding_type=coding.type, finding_category=coding.category,
            algorithm_id=algorithm, time_point_context=context,
            measurements=[hd.sr.Measurement(name=VOLUME, value=round(change.prior_volume_ml, 3),
                                            unit=MILLILITER, algorithm_id=algorithm)]))
    return out


def _source_series(seg: Dataset) -> str | None:
    """The Series Instance UID the SEG was derived from (its Referenced Series Sequence)."""
    for item in seg.get("ReferencedSeriesSequence", []):
        uid = str(item.get("SeriesInstanceUID", "") or "")
        if uid:
            return uid
    return None
