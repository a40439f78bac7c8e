"""RT Structure Set of a result: per segment an ROI of closed planar contours.

For planning systems and PACS that read contours but not SEG. Per non-empty segment
(the SEG's segments, in the same order and numbers) one ROI: its name, colour (the
SEG's display colour), its anatomic code (RT ROI Identification Code Sequence in the
RT ROI Observations, with the SEG's property type), the model as generation
algorithm, and on each source image where the segment is present one CLOSED_PLANAR
contour per boundary: the outer boundary of each island and the boundary of each
hole. Planning systems combine the contours of one ROI on one plane by the even-odd
rule (a hole's contour inside an island's cuts it out); CLOSEDPLANAR_XOR, which says
so explicitly, is not yet known to the validators (dicom3tools 2022).

Contours are traced with contourpy (marching squares at 0.5 on the segment's
bounding-box crop of that slice, padded with background): vertices lie halfway
between pixel centres, so the pixel centres inside a contour (even-odd) are exactly
the segment's pixels; collinear vertices are dropped (same polygon, fewer points).
Coordinates are patient LPS (mm) on the source image's plane. No library writes
RTSTRUCT through highdicom; rt-utils (the usual one) takes one whole-volume mask per
ROI (8 GB for 104 segments of a 512 x 512 x 300 CT) and needs OpenCV, so the data
set is built here with pydicom, its contour data written as ready-encoded DS text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import contourpy
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from dicom_node.foundation.clock import utc_now
from pipelines.codes import segment_coding
from pipelines.types import (
    NODE_MANUFACTURER,
    NODE_MODEL_NAME,
    NODE_SOFTWARE_VERSION,
    ModelInfo,
    SegmentResult,
    Volume,
    WriterOptions,
)
from pipelines.uids import new_uid
from pipelines.writers.seg import contributing_equipment, image_reference, written_segments

LOG = logging.getLogger(__name__)

#: RT Structure Set Storage (PS3.4 B.5).
RTSTRUCT_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.481.3")
#: The Referenced SOP Class of the RT Referenced Study Sequence, as written by planning
#: systems (Detached Study Management, retired; PS3.3 C.8.8.5.1 names no other).
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)
#: Longest value of a DS element in Explicit VR (a 16-bit length, PS3.5 7.1.2): about
#: 2,700 contour points at 0.01 mm.
MAX_DS_BYTES = 0xFFFE
#: Segmented Property Categories whose ROIs are organs (Anatomical Structure, Body Structure).
_ANATOMY_CATEGORIES = ("91723000", "123037004")
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_rtstruct(volume: Volume, segments: Sequence[SegmentResult], model: ModelInfo, *,
                   options: WriterOptions | None = None) -> Dataset:
    """Write the segments as an RT Structure Set on the source images.

    Parameters
    ----------
    volume : Volume
        The source volume (its Frame of Reference, study, series and images are
        referenced); masks are on its grid, each source image contoured on its
        nearest grid slice.
    segments : sequence of SegmentResult
        The masks; empty ones are left out (ROI numbers are the SEG's segment numbers).
    model : ModelInfo
        The ROIs' generation algorithm.
    options : WriterOptions, optional
        Series number and description prefix.

    Returns
    -------
    pydicom.dataset.Dataset
        RT Structure Set Storage, with file meta, Explicit VR Little Endian.

    Raises
    ------
    EmptyResultError
        If every segment is empty.
    ValueError
        If a mask does not fit the volume or labels repeat.
    """
    opts = options or WriterOptions()
    kept = written_segments(volume, segments)
    ds = _header(volume, model, opts)
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(volume)]
    rois, contours, observations = [], [], []
    for number, s in enumerate(kept, start=1):
        coding = segment_coding(s.name, number - 1)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        roi.ROIName = s.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{model.name} {model.version}"[:64]
        rois.append(roi)
        item = Dataset()
        item.ROIDisplayColor = list(coding.rgb)
        item.ContourSequence = DicomSequence(_contour_items(volume, s))
        item.ReferencedROINumber = number
        contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIIdentificationCodeSequence = [_code(coding.type)]
        observation.RTROIInterpretedType = "ORGAN" if str(coding.category.CodeValue) in \
            _ANATOMY_CATEGORIES else ""
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    LOG.info("RTSTRUCT for series %s: %d ROI(s), %d contour(s)", volume.series_instance_uid,
             len(kept), sum(len(c.ContourSequence) for c in contours))
    return ds


def _header(volume: Volume, model: ModelInfo, opts: WriterOptions) -> Dataset:
    """Patient, study, RT series, equipment, structure set label and SOP common."""
    first = volume.source_images[0]
    now = utc_now().astimezone()  # the node's one clock, in local time as DICOM dates are
    uid = new_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.StudyInstanceUID = volume.study_instance_uid
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid  # Frame of Reference module
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""
    for keyword in _PATIENT_STUDY:  # type 2 in the Patient and General Study modules
        setattr(ds, keyword, first.get(keyword, "") or "")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = new_uid()
    ds.SeriesNumber = opts.rtstruct_series_number
    ds.SeriesDescription = f"{opts.series_description_prefix} RTSTRUCT {model.name}".strip()[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = NODE_MANUFACTURER
    ds.ManufacturerModelName = NODE_MODEL_NAME
    ds.SoftwareVersions = NODE_SOFTWARE_VERSION
    ds.ContributingEquipmentSequence = contributing_equipment("AI structure set", model)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "AI_CONTOURS"
    ds.StructureSetName = f"{model.name} {model.version}"[:64]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime
    return ds


def _referenced_frame_of_reference(volume: Volume) -> Dataset:
    """The Frame of Reference, its study, the source series and every source image."""
    images = []
    for n, src in enumerate(volume.source_images):
        images.append(image_reference(src, volume.source_frame(n)))
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ContourImageSequence = DicomSequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study.ReferencedSOPInstanceUID = volume.study_instance_uid
    study.RTReferencedSeriesSequence = [series]
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = [study]
    return frame


def _code(concept: Dataset) -> Dataset:
    item = Dataset()
    for keyword in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"):
        setattr(item, keyword, getattr(concept, keyword))
    return item


def _contour_items(volume: Volume, segment: SegmentResult) -> list[Dataset]:
    """One Contour Sequence item per boundary of ``segment`` on each source image."""
    items = []
    for n, k, polygon in segment_contours(volume, segment):
        item = Dataset()
        item.ContourImageSequence = [image_reference(volume.source_images[n],
                                                      volume.source_frame(n))]
        item.ContourGeometricType = "CLOSED_PLANAR"
        lps = volume.index_to_lps(np.column_stack(
            [np.full(len(polygon), k), polygon[:, 1], polygon[:, 0]]))
        text = _ds_text(lps.ravel())
        while len(text) > MAX_DS_BYTES and len(lps) > 3:  # a ragged outline of a big region
            LOG.warning("segment %r: a contour of %d points is too long for one DS element; "
                        "keeping every second point", segment.name, len(lps))
            lps = lps[::2]
            text = _ds_text(lps.ravel())
        item.NumberOfContourPoints = len(lps)
        item[_CONTOUR_DATA] = RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, False, True,
                                             True, False)
        items.append(item)
    return items


def segment_contours(volume: Volume, segment: SegmentResult
                     ) -> list[tuple[int, float, np.ndarray]]:
    """The closed boundaries of ``segment`` on each source image where it is present.

    Returns
    -------
    list of (int, float, numpy.ndarray)
        Source image index ``n``, its (fractional) grid slice index, and an (m, 2)
        array of (column, row) grid pixel coordinates of one closed polygon (first
        point not repeated), pixel centres at integers.
    """
    grid_index = volume.source_grid_slices()
    present = segment.present_slices()
    box = segment.box
    offset = np.array([box[2].start - 1.0, box[1].start - 1.0])  # padded crop -> grid
    out = []
    for n, k in enumerate(grid_index):
        if not present[k]:
            continue
        plane = segment.crop[k - box[0].start]
        for polygon in plane_contours(plane):
            out.append((n, float(volume.source_grid_positions[n]), polygon + offset))
    return out


def plane_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed polygons around the islands and holes of a 2-D bool ``plane``.

    Coordinates are (column, row) of the plane padded by one pixel of background
    (subtract 1 for the plane's own); the first point is not repeated; collinear
    points are dropped.
    """
    padded = np.zeros((plane.shape[0] + 2, plane.shape[1] + 2))
    padded[1:-1, 1:-1] = plane
    lines = cast("list[np.ndarray]",  # line_type Separate: one (n, 2) array per line
                 contourpy.contour_generator(z=padded, line_type="Separate").lines(0.5))
    out = []
    for line in lines:
        if len(line) > 1 and np.array_equal(line[0], line[-1]):
            line = line[:-1]
        if len(line) < 3:
            continue
        before = line - np.roll(line, 1, axis=0)
        after = np.roll(line, -1, axis=0) - line
        turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
        straight = (turn == 0) & ((before * after).sum(axis=1) > 0)
        out.append(line[~straight])
    return out


def _ds_text(values: np.ndarray) -> bytes:
    """DS values (mm) encoded as text at once, not as one pydicom object per number.

    Contour data of 104 segments are millions of numbers; pydicom's DS objects would be
    created and validated one by one. Each value is written with 2 decimals (0.01 mm,
    far below a pixel; at most 16 characters), the text padded to even length.
    """
    text = (("%.2f\\" * len(values))[:-1] % tuple(values.tolist())).encode("ascii")
    return text + b" " if len(text) % 2 else text
