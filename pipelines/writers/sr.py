"""TID 1500 Measurement Report (Comprehensive 3D SR) of a SEG: one volume per segment.

Each measurement group (TID 1411 Volumetric ROI Measurements) references its SEG
segment (and through it the source images), shares the segment's Tracking UID /
Tracking ID, names the finding with the segment's property type and records the model
as algorithm and as device observer (UID: the model version's Device UID). The
Procedure Reported is the imaging procedure of the source study, not the algorithm.
A report that supersedes an earlier one lists it in the Predecessor Documents Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.codes import MILLILITER, VOLUME, procedure_reported, segment_coding
from pipelines.types import NODE_MANUFACTURER, ModelInfo, SegmentResult, Volume, WriterOptions
from pipelines.uids import new_uid
from pipelines.writers.seg import contributing_equipment, written_segments

LOG = logging.getLogger(__name__)


def build_sr(volume: Volume, seg: Dataset, segments: Sequence[SegmentResult], model: ModelInfo, *,
             options: WriterOptions | None = None, predecessors: Sequence[Dataset] = ()
             ) -> Dataset:
    """Write the segments' volumes as a TID 1500 Comprehensive 3D SR.

    Parameters
    ----------
    volume : Volume
        The source volume (its images become evidence).
    seg : pydicom.dataset.Dataset
        The SEG written by :func:`pipelines.writers.seg.build_seg` from ``segments``.
    segments : sequence of SegmentResult
        The same segments given to ``build_seg``; volumes (mL) come from here.
    model : ModelInfo
        Device observer and algorithm of every measurement.
    options : WriterOptions, optional
        Series number, description prefix and the procedure reported (default: the
        source's imaging procedure, :func:`pipelines.codes.procedure_reported`).
    predecessors : sequence of pydicom.dataset.Dataset, optional
        Earlier SRs of the same series and task that this one supersedes; each goes
        into the Predecessor Documents Sequence (0040,A360).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A pydicom data set; Completion COMPLETE, Verification UNVERIFIED, Preliminary.

    Raises
    ------
    ValueError
        If ``seg`` does not hold exactly the non-empty ``segments`` (by label name)
        or is not of the same Frame of Reference, or a predecessor is not an SR of
        the same study.
    """
    opts = options or WriterOptions()
    kept = written_segments(volume, segments)
    # a LABELMAP SEG also describes its background as segment 0 (highdicom adds it)
    items = [i for i in seg.SegmentSequence if int(i.SegmentNumber) != 0]
    if [str(i.SegmentLabel) for i in items] != [s.name for s in kept]:
        raise ValueError("seg does not hold the non-empty segments: "
                         f"{[str(i.SegmentLabel) for i in items]} vs {[s.name for s in kept]}")
    if str(seg.FrameOfReferenceUID) != volume.frame_of_reference_uid:
        raise ValueError("seg and volume have different Frames of Reference")
    for old in predecessors:
        if str(old.get("Modality", "")) != "SR" or \
                str(old.get("StudyInstanceUID", "")) != volume.study_instance_uid:
            raise ValueError("predecessors must be SR documents of the source study")

    version_text = f"{model.name} {model.version}"[:64]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.algorithm_device_uid,
        name=model.name, manufacturer_name=NODE_MANUFACTURER, model_name=version_text)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version,
        parameters=[f"backend={model.backend}"] if model.backend else None)

    groups = []
    for number, (item, s) in enumerate(zip(items, kept, strict=True), start=1):
        coding = segment_coding(s.name, number - 1)
        measurement = hd.sr.Measurement(name=VOLUME, value=round(s.volume_ml, 3), unit=MILLILITER,
                                        algorithm_id=algorithm)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(item.TrackingUID),
                                                          identifier=str(item.TrackingID)),
            referenced_segment=_referenced_segment(seg, number, volume, s),
            finding_type=coding.type, finding_category=coding.category,
            algorithm_id=algorithm, measurements=[measurement]))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=(hd.sr.CodedConcept(*opts.procedure_code) if opts.procedure_code
                            else procedure_reported(volume.source_images[0])),
        imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*volume.source_images, seg], content=report,
        series_instance_uid=new_uid(), series_number=opts.sr_series_number,
        sop_instance_uid=new_uid(), instance_number=1, manufacturer=NODE_MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        previous_versions=list(predecessors) or None,
        contributing_equipment=contributing_equipment("AI measurement report", model),
        series_description=f"{opts.series_description_prefix} SR {model.name}".strip()[:64])
    sr.ManufacturerModelName = seg.ManufacturerModelName
    sr.SoftwareVersions = seg.SoftwareVersions
    LOG.info("SR for series %s: %d volume measurement(s)", volume.series_instance_uid, len(groups))
    return sr


def _referenced_segment(seg: Dataset, number: int, volume: Volume, segment: SegmentResult
                        ) -> hd.sr.ReferencedSegment:
    """Segment ``number`` of ``seg`` and the source images its frames were derived from.

    The source images are those of the slices where the segment is present, read
    from the segment's crop: the SEG's frames are derived from exactly those
    images, and reading them back from the SEG's per-frame items (highdicom's
    ``ReferencedSegment.from_segmentation``) scans every frame once per segment
    (104 segments x thousands of frames), and cannot work for a LABELMAP SEG, whose
    frames do not name a segment.
    """
    if not any(int(i.SegmentNumber) == number for i in seg.SegmentSequence):
        raise ValueError(f"seg has no segment {number}")
    grid_index = np.clip(np.rint(np.asarray(volume.source_grid_positions)), 0,
                         volume.shape[0] - 1).astype(np.intp)
    present = segment.present_slices()[grid_index]
    sources = [hd.sr.SourceImageForSegmentation(
        referenced_sop_class_uid=str(src.SOPClassUID),
        referenced_sop_instance_uid=str(src.SOPInstanceUID))
        for src, here in zip(volume.source_images, present, strict=True) if here]
    return hd.sr.ReferencedSegment(sop_class_uid=str(seg.SOPClassUID),
                                   sop_instance_uid=str(seg.SOPInstanceUID),
                                   segment_number=number, source_images=sources)
