"""DICOM Segmentation (BINARY or LABELMAP) of a result, built with highdicom.

One segment per non-empty label, frames only where a segment is present, frame ``n``
on source image ``n`` (so any orientation, flipped or oblique, is written on the
source's own grid), same study and Frame of Reference as the source, new series. On a
multi-frame source (Enhanced CT/MR/PET), each SEG frame names its source frame
(Derivation Image Sequence with Referenced Frame Number, written by highdicom).

Many segments: the segments (bounding-box crops, :class:`~pipelines.types.SegmentResult`)
are pasted into ONE label map on the source slices (uint8, uint16 beyond 255
segments) and highdicom is given that label map, never a stack of one whole-volume
mask per segment. ``WriterOptions(seg_type="labelmap")`` writes highdicom's LABELMAP
type (Label Map Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.7: one frame per
source slice whatever the number of segments), for destinations that take it;
overlapping segments (only possible when a caller builds them by hand) are written
as BINARY whatever was asked, since a label map cannot hold them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.codes import PROCESSING_ALGORITHM, UNPAIRED_BODY_REGIONS, segment_coding
from pipelines.errors import EmptyResultError
from pipelines.multiframe import read_frames
from pipelines.types import (
    NODE_DEVICE_SERIAL,
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    NODE_SOFTWARE_VERSION,
    ModelInfo,
    SegmentResult,
    Volume,
    WriterOptions,
)
from pipelines.uids import new_uid
from pipelines.writers.highdicom_speedups import segmentation
from pipelines.volume import to_source_slices

LOG = logging.getLogger(__name__)


def written_segments(volume: Volume, segments: Sequence[SegmentResult]) -> tuple[SegmentResult, ...]:
    """The segments a SEG holds, in order: non-empty ones, ascending label value.

    Segment number ``n`` of the SEG is element ``n - 1`` of the result.

    Raises
    ------
    ValueError
        If a mask does not have the volume's shape or two segments share a label.
    EmptyResultError
        If every segment is empty.
    """
    labels = [s.label for s in segments]
    if len(set(labels)) != len(labels):
        raise ValueError(f"segments must have distinct labels, got {labels}")
    for s in segments:
        if s.shape != volume.shape:
            raise ValueError(f"segment {s.name!r}: mask shape {s.shape} differs from the "
                             f"volume's {volume.shape}")
    kept = tuple(sorted((s for s in segments if not s.is_empty), key=lambda s: s.label))
    for s in segments:
        if s.is_empty:
            LOG.info("series %s: segment %r is empty and is not written",
                     volume.series_instance_uid, s.name)
    if not kept:
        raise EmptyResultError(volume.series_instance_uid, tuple(s.name for s in segments))
    return kept


def image_reference(src: Dataset, frame: int | None) -> Dataset:
    """A reference to a source image (an RTSTRUCT's Contour Image, an overlay's Source
    Image item): its SOP class and instance and, when multi-frame, its frame."""
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item


def algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (family "Artificial Intelligence") of ``model``."""
    params = {"backend": model.backend} if model.backend else None
    return hd.AlgorithmIdentificationSequence(
        name=model.name, version=model.version, family=codes.cid7162.ArtificialIntelligence,
        source=model.source or None, parameters=params)


def contributing_equipment(description: str, model: ModelInfo | None = None
                           ) -> list[hd.ContributingEquipment]:
    """Contributing Equipment items of a result object.

    The node as Processing Equipment (the marker :func:`is_node_output` recognises),
    then, when ``model`` is given, the algorithm as IHE AIR wants it: Purpose of
    Reference (Newcode1, 99IHE, "Processing Algorithm"), Manufacturer, Manufacturer's
    Model Name (the task), Software Versions (the model version) and the model
    version's Device UID (0018,1002).
    """
    items = [hd.ContributingEquipment(
        manufacturer=NODE_MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=NODE_MODEL_NAME, software_versions=NODE_SOFTWARE_VERSION,
        contribution_description=description[:64])]
    if model is not None:
        algorithm = hd.ContributingEquipment(
            manufacturer=NODE_MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=model.model_name, software_versions=model.version,
            contribution_description=f"{model.name} {model.version}"[:64])
        # highdicom accepts only CID 7005 purposes; IHE AIR's code is set afterwards
        algorithm.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
        algorithm.DeviceUID = model.algorithm_device_uid
        items.append(algorithm)
    return items


def build_seg(volume: Volume, segments: Sequence[SegmentResult], model: ModelInfo, *,
              options: WriterOptions | None = None) -> Dataset:
    """Write the segments as a BINARY DICOM Segmentation of the source series.

    Parameters
    ----------
    volume : Volume
        The source volume; masks are on its grid (mapped to the source slices when
        the volume was resampled).
    segments : sequence of SegmentResult
        The masks; empty ones are left out.
    model : ModelInfo
        Written as the segments' algorithm identification.
    options : WriterOptions, optional
        Series number and description prefix.

    Returns
    -------
    highdicom.seg.Segmentation
        A pydicom data set (Segmentation Storage), frames only where a segment is set.
        Each segment carries a Tracking UID and the label name as Tracking ID, which the
        SR reuses.

    Raises
    ------
    EmptyResultError
        If every segment is empty.
    ValueError
        If a mask does not fit the volume.
    """
    opts = options or WriterOptions()
    kept = written_segments(volume, segments)
    alg = algorithm_identification(model)
    descriptions = []
    for number, s in enumerate(kept, start=1):
        coding = segment_coding(s.name, number - 1)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=s.name,
            segmented_property_category=coding.category, segmented_property_type=coding.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg, tracking_uid=new_uid(), tracking_id=s.name,
            display_color=hd.color.CIELabColor.from_rgb(*coding.rgb))
        if coding.laterality is not None:  # PS3.3 C.8.20.2: inside the property type item
            description.SegmentedPropertyTypeCodeSequence[0] \
                .SegmentedPropertyTypeModifierCodeSequence = [coding.laterality]
        descriptions.append(description)
    sources, pixels, positions = _on_source_frames(volume, _pixel_array(volume, kept))
    seg_type = hd.seg.SegmentationTypeValues.BINARY
    if opts.seg_type == "labelmap":
        if pixels.ndim == 3:
            seg_type = hd.seg.SegmentationTypeValues.LABELMAP
        else:
            LOG.warning("series %s: segments overlap; a LABELMAP SEG cannot hold them, writing "
                        "BINARY", volume.series_instance_uid)
    series_description = f"{opts.series_description_prefix} SEG {model.name}".strip()[:64]
    seg = segmentation(
        source_images=sources, pixel_array=pixels, plane_positions=positions,
        segmentation_type=seg_type,
        segment_descriptions=descriptions, series_instance_uid=new_uid(),
        series_number=opts.seg_series_number, sop_instance_uid=new_uid(), instance_number=1,
        manufacturer=NODE_MANUFACTURER, manufacturer_model_name=NODE_MODEL_NAME,
        software_versions=NODE_SOFTWARE_VERSION, device_serial_number=NODE_DEVICE_SERIAL,
        content_label="AI_SEGMENTATION", content_description=f"{model.name} {model.version}"[:64],
        content_creator_name=None, omit_empty_frames=True,
        contributing_equipment=contributing_equipment("AI segmentation", model),
        series_description=series_description)
    _keep_volume_frames(seg, volume)
    _laterality(seg, volume.source_images[0])
    LOG.info("SEG (%s) for series %s: %d segment(s), %d frame(s)", seg_type.value,
             volume.series_instance_uid, len(kept), int(seg.NumberOfFrames))
    return seg


def _laterality(seg: Dataset, source: Dataset) -> None:
    """Say which side the SEG covers, in a way both dciodvfy and PixelMed accept.

    General Series Laterality (type 2C) is copied when the source has one. For an
    unpaired region (Body Part Examined ABDOMEN, CHEST, ...), dciodvfy forbids
    Laterality while PixelMed (2022) requires it unless a Frame Laterality is present;
    the region is therefore stated as a shared Frame Anatomy item (region code, Frame
    Laterality ``U`` = unpaired), which dciodvfy reports as a standard extension
    (warning) and PixelMed accepts. Otherwise nothing is written.
    """
    if source.get("Laterality"):
        seg.Laterality = source.Laterality
        return
    region = UNPAIRED_BODY_REGIONS.get(str(source.get("BodyPartExamined", "") or "").strip().upper())
    if region is None:
        return
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = "U"
    seg.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]


def _on_source_frames(volume: Volume, pixels: np.ndarray
                      ) -> tuple[list[Dataset], np.ndarray, list[hd.PlanePositionSequence] | None]:
    """The source images, the pixels and (when needed) the plane positions as highdicom
    takes them.

    Single-frame sources: one plane per source image, as they are. A multi-frame source
    whose frames are all the volume's: one plane per frame of the image, in frame order
    (highdicom writes each SEG frame's Derivation Image with its Referenced Frame
    Number). A multi-frame source with other frames too (temporal positions, echoes):
    one plane per slice with its position from the frame's functional groups, which
    highdicom matches to the source frames at that position (see
    :func:`_keep_volume_frames`).

    Raises
    ------
    ValueError
        If the volume's frames lie in more than one multi-frame instance.
    """
    if not volume.source_frame_numbers:
        return list(volume.source_images), pixels, None
    instances = volume.source_instances
    if len(instances) != 1:
        raise ValueError(f"a SEG references one multi-frame source image, the volume has "
                         f"{len(instances)}")
    numbers = np.asarray(volume.source_frame_numbers, dtype=np.intp)
    if len(numbers) == int(instances[0].NumberOfFrames):
        return list(instances), _in_frame_order(pixels, numbers), None
    frames = read_frames(instances[0])
    positions = [hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=frames[f - 1].position) for f in numbers]
    return list(instances), pixels, positions


def _in_frame_order(pixels: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """``pixels`` (slice order) in frame order: plane ``f - 1`` is the slice of frame ``f``.

    Frames stored along the slice normal, either way (scanners and highdicom's converter
    store them so), give a view, not a copy of the label map.
    """
    ascending = np.arange(1, len(numbers) + 1)
    if np.array_equal(numbers, ascending):
        return pixels
    if np.array_equal(numbers, ascending[::-1]):
        return pixels[::-1]
    out = np.empty_like(pixels)
    out[numbers - 1] = pixels
    return out


def _keep_volume_frames(seg: Dataset, volume: Volume) -> None:
    """Leave in each SEG frame's Derivation Image only the volume's own source frame.

    highdicom references every source frame at a SEG frame's position; in a
    multi-frame image with several temporal positions or echoes those are several
    frames, of which one was segmented.
    """
    source = volume.source_instances[0]
    if not volume.source_frame_numbers or \
            len(volume.source_frame_numbers) == int(source.NumberOfFrames):
        return
    frames = read_frames(source)
    chosen = np.array([frames[f - 1].position for f in volume.source_frame_numbers], float)
    numbers = np.asarray(volume.source_frame_numbers)
    for item in seg.PerFrameFunctionalGroupsSequence:
        ipp = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        frame = int(numbers[np.argmin(np.linalg.norm(chosen - ipp, axis=1))])
        for derivation in item.get("DerivationImageSequence", []):
            derivation.SourceImageSequence = [
                src for src in derivation.SourceImageSequence
                if int(src.get("ReferencedFrameNumber", frame)) == frame]


def _pixel_array(volume: Volume, kept: Sequence[SegmentResult]) -> np.ndarray:
    """Segments on the source slices: a label map when disjoint, else a stack of masks.

    The label map is built from each segment's crop (memory: one uint8/uint16 map
    of the source slices); the stack (n_src x rows x columns x segments of bool) only
    when two segments share a voxel.
    """
    n_src = len(volume.source_images)
    shape = (n_src, *volume.shape[1:])
    dtype = np.uint8 if len(kept) < 256 else np.uint16
    grid = np.zeros(volume.shape, dtype=dtype)
    overlap = False
    for number, s in enumerate(kept, start=1):
        region = grid[s.box]
        if not overlap and np.any(region[s.crop]):
            overlap = True
        region[s.crop] = number
    if not overlap:
        return to_source_slices(volume, grid)
    del grid
    stack = np.zeros((*shape, len(kept)), dtype=bool)
    for number, s in enumerate(kept, start=1):
        stack[..., number - 1] = to_source_slices(volume, s.mask)
    return stack
