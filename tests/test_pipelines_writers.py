"""SEG / SR / overlay writers: dciodvfy-clean, read back with highdicom, right in LPS.

The "model output" is the phantom's exact truth sampled through the volume's affine, so
every check of a written voxel against the truth is a check of the writers' geometry.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from pipelines import phantom as ph
from pipelines.codes import LOCAL_SCHEME, MILLILITER, VOLUME, segment_coding
from pipelines.errors import EmptyResultError, PipelineError
from pipelines.postprocess import largest_components, mask_volume_ml, split_labels
from pipelines.types import (
    NODE_MANUFACTURER,
    OVERLAY_BANNER,
    ModelInfo,
    SegmentResult,
    Volume,
    WriterOptions,
)
from pipelines.volume import load_series, to_source_slices
from pipelines.writers import build_seg, save_results, write_results

ANATOMY = ph.Anatomy.random(5)
MODEL = ModelInfo(name="abdomen_ct_segmentation", version="0.3.1", backend="torch-cpu",
                  source="dicom-node demo")
SQ = 1 / np.sqrt(2)
ORIENTATIONS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "axial-flipped": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique": ((SQ, SQ, 0.0), (0.0, 0.0, -1.0)),
}

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"  # dicom3tools: fail, never skip


def _geometry(orient: str) -> ph.SliceGeometry:
    r, c = ORIENTATIONS[orient]
    return ph.SliceGeometry(rows=40, columns=48, slices=24, pixel_spacing=(8.0, 7.5),
                            slice_spacing=9.0, row_direction=r, column_direction=c,
                            centre=(5.0, 10.0, 0.0))


def _model_output(vol: Volume) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    return ph.truth_at(ANATOMY, vol.index_to_lps(grid))


def _banner_height(px: np.ndarray) -> int:
    """Rows at the top of an overlay image that are mostly banner red."""
    red = ((px == (200, 0, 0)).all(axis=2)).mean(axis=1) > 0.5
    return int(np.argmin(red)) if not red.all() else len(red)


def _dciodvfy(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


@pytest.fixture(scope="module", params=sorted(ORIENTATIONS))
def written(request, tmp_path_factory):
    g = _geometry(request.param)
    dss = ph.ct_series(ANATOMY, g)
    random.Random(len(request.param)).shuffle(dss)
    vol = load_series(dss)
    segments = split_labels(_model_output(vol), vol, ph.LABELS,
                            keep_components={"spleen": 1, "kidney": 2})
    results = write_results(vol, segments, MODEL)
    out = tmp_path_factory.mktemp(request.param)
    paths = save_results(results, out)
    return request.param, g, dss, vol, segments, results, paths


def test_every_output_validates_with_dciodvfy(written) -> None:
    *_, results, paths = written
    assert len(paths) == 2 + len(results.overlay)
    for p in paths:
        assert _dciodvfy(p) == [], p.name
        ds = pydicom.dcmread(p)
        assert ds.Manufacturer == NODE_MANUFACTURER
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_seg_reads_back_with_the_written_masks_on_the_source_images(written) -> None:
    orient, g, dss, vol, segments, results, paths = written
    seg = hd.seg.segread(paths[0])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == vol.study_instance_uid
    assert seg.FrameOfReferenceUID == vol.frame_of_reference_uid
    assert seg.SeriesInstanceUID != vol.series_instance_uid
    # highdicom lists the source's acquisition equipment, then ours as processing equipment
    # and the algorithm (IHE AIR "Processing Algorithm"; tests/test_ai_results_conformance.py)
    purposes = [e.PurposeOfReferenceCodeSequence[0].CodeValue
                for e in seg.ContributingEquipmentSequence if e.Manufacturer == NODE_MANUFACTURER]
    assert purposes == [codes.DCM.ProcessingEquipment.value, "Newcode1"]
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["spleen", "liver", "kidney", "spine"]
    for number, s in enumerate(segments, start=1):
        desc = seg.get_segment_description(number)
        coding = segment_coding(s.name)
        assert desc.segmented_property_type == coding.type
        assert desc.segmented_property_category == coding.category
        alg = desc.algorithm_identification[0]
        assert alg.AlgorithmName == MODEL.name and alg.AlgorithmVersion == MODEL.version
        assert alg.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    uids = list(vol.sop_instance_uids)
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3, 4])
    for number, s in enumerate(segments, start=1):
        np.testing.assert_array_equal(back[..., number - 1].astype(bool), s.mask)
    # only non-empty frames are stored
    expected = sum(int(s.mask.any(axis=(1, 2)).sum()) for s in segments)
    assert int(seg.NumberOfFrames) == expected
    # the SEG's own frame geometry puts every set pixel inside the right organ (LPS truth)
    iop = np.array(seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                   .ImageOrientationPatient, float)
    sp = np.array(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing, float)
    pixels = seg.pixel_array if int(seg.NumberOfFrames) > 1 else seg.pixel_array[None]
    by_uid = {str(d.SOPInstanceUID): d for d in dss}
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src_uid = str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ipp = np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, np.array(by_uid[src_uid].ImagePositionPatient, float), atol=1e-3)
        i, j = np.nonzero(pixels[f])
        lps = ipp + j[:, None] * sp[1] * iop[:3] + i[:, None] * sp[0] * iop[3:]
        assert (ph.truth_at(ANATOMY, lps) == number).all(), (orient, number)


def test_sr_reads_back_volumes_units_and_references(written) -> None:
    orient, g, dss, vol, segments, results, paths = written
    seg = pydicom.dcmread(paths[0])
    sr = hd.sr.srread(paths[1])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == vol.study_instance_uid
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    content = sr.content
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    groups = content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 4
    by_tracking = {str(i.TrackingUID): (n, i) for n, i in enumerate(seg.SegmentSequence, start=1)}
    for group, s in zip(groups, segments, strict=True):
        number, item = by_tracking[group.tracking_uid]
        assert str(item.SegmentLabel) == s.name
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == seg.SOPClassUID
        assert list(ref.referenced_segment_numbers) == [number]
        sources = {str(i.referenced_sop_instance_uid) for i in ref.source_images_for_segmentation}
        assert sources == {vol.sop_instance_uids[k] for k in np.flatnonzero(s.mask.any(axis=(1, 2)))}
        assert group.finding_type == segment_coding(s.name).type
        (m,) = group.get_measurements(name=VOLUME)
        assert m.unit == MILLILITER and m.unit.scheme_designator == "UCUM"
        assert m.value == pytest.approx(s.volume_ml, abs=1e-3)
        assert s.volume_ml == pytest.approx(int(s.mask.sum()) * vol.voxel_volume_ml)
    # observer is the device (the model), the procedure is the source's CT (CID 100)
    (observer,) = content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = {str(i.ConceptNameCodeSequence[0].CodeMeaning): i.value
                  for i in observer.observer_identifying_attributes}
    assert attributes["Device Observer Name"] == MODEL.name
    assert attributes["Device Observer Manufacturer"] == NODE_MANUFACTURER
    assert attributes["Device Observer Model Name"] == f"{MODEL.name} {MODEL.version}"
    procedure = content[0].ContentSequence.find(codes.DCM.ProcedureReported)
    assert procedure[0].value == hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
    texts = {str(e.value) for e in sr.iterall() if e.keyword == "TextValue"}
    assert {"backend=torch-cpu", MODEL.name, MODEL.version} <= texts  # algorithm identification
    evidence = {str(i.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for i in series.ReferencedSOPSequence}
    assert set(vol.sop_instance_uids) <= evidence and str(seg.SOPInstanceUID) in evidence


def test_overlay_images_burn_in_banner_and_contours(written) -> None:
    orient, g, dss, vol, segments, results, paths = written
    slices_with_any = [n for n in range(vol.shape[0]) if any(s.mask[n].any() for s in segments)]
    assert len(results.overlay) == len(slices_with_any) > 0
    letters = {"axial": ("L", "P"), "axial-flipped": ("R", "A"), "coronal": ("L", "F"),
               "oblique": ("LP", "F")}[orient]
    for n, ov in zip(slices_with_any, results.overlay, strict=True):
        assert ov.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ov.BurnedInAnnotation == "YES" and ov.PhotometricInterpretation == "RGB"
        assert ov.StudyInstanceUID == vol.study_instance_uid and ov.PatientID == dss[0].PatientID
        assert ov.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.sop_instance_uids[n]
        assert tuple(ov.PatientOrientation) == letters
        assert ov.ImageComments == OVERLAY_BANNER
        px = ov.pixel_array
        factor = -(-256 // vol.shape[2])
        banner_h = _banner_height(px)
        assert px.shape[1] == vol.shape[2] * factor and banner_h > 10
        assert px.shape[0] > banner_h + vol.shape[1] * factor  # legend strip below
        band = px[:banner_h].reshape(-1, 3)
        assert (band == (200, 0, 0)).all(axis=1).mean() > 0.6  # red banner ...
        assert (band == (255, 255, 255)).all(axis=1).any()  # ... with white text
        image = px[banner_h:banner_h + vol.shape[1] * factor]
        for s in segments:
            if s.mask[n].any():
                colour = segment_coding(s.name).rgb
                hits = (image == colour).all(axis=2)
                assert hits.any(), s.name
                # contour pixels are on the segment (upscaled), never far outside it
                up = np.repeat(np.repeat(s.mask[n], factor, 0), factor, 1)
                assert up[hits].mean() > 0.9


def test_resampled_volume_writes_on_the_source_slices(tmp_path: Path) -> None:
    fine = ph.SliceGeometry(rows=32, columns=32, slices=41, pixel_spacing=(10.0, 10.0),
                            slice_spacing=4.0)
    dss = sorted(ph.ct_series(ANATOMY, fine), key=lambda d: int(d.InstanceNumber))
    picks = [dss[i] for i in range(0, 41) if i % 5 in (0, 2)]  # gaps of 8 and 12 mm
    vol = load_series(picks)
    assert not vol.is_source_grid
    segments = split_labels(_model_output(vol), vol, ph.LABELS)
    results = write_results(vol, segments, MODEL)
    paths = save_results(results, tmp_path)
    assert all(_dciodvfy(p) == [] for p in paths)
    seg = hd.seg.segread(paths[0])
    back = seg.get_pixels_by_source_instance(list(vol.sop_instance_uids), segment_numbers=[1, 2, 3, 4])
    for number, s in enumerate(segments, start=1):
        np.testing.assert_array_equal(back[..., number - 1].astype(bool), to_source_slices(vol, s.mask))


def test_overlapping_masks_empty_segments_and_unknown_labels(tmp_path: Path, caplog) -> None:
    g = ph.SliceGeometry(rows=24, columns=24, slices=8, pixel_spacing=(10.0, 10.0), slice_spacing=10.0)
    vol = load_series(ph.ct_series(ANATOMY, g))
    a = np.zeros(vol.shape, bool)
    a[2:6, 5:15, 5:15] = True
    b = np.zeros(vol.shape, bool)
    b[3:7, 10:20, 10:20] = True
    empty = np.zeros(vol.shape, bool)
    segs = [SegmentResult(label=1, name="liver", mask=a, volume_ml=mask_volume_ml(a, vol)),
            SegmentResult(label=2, name="Hepatic_Lesion", mask=b, volume_ml=mask_volume_ml(b, vol)),
            SegmentResult(label=3, name="spleen", mask=empty, volume_ml=0.0)]
    with caplog.at_level(logging.WARNING, logger="pipelines.codes"):
        results = write_results(vol, segs, MODEL, options=WriterOptions(write_overlay=False))
    assert "Hepatic_Lesion" in caplog.text and LOCAL_SCHEME in caplog.text
    assert results.overlay == ()
    paths = save_results(results, tmp_path)
    assert all(_dciodvfy(p) == [] for p in paths)
    seg = hd.seg.segread(paths[0])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "Hepatic_Lesion"]
    desc = seg.get_segment_description(2)
    assert desc.segmented_property_type.scheme_designator == LOCAL_SCHEME
    assert desc.segmented_property_category.meaning == "Tissue"
    back = seg.get_pixels_by_source_instance(list(vol.sop_instance_uids), segment_numbers=[1, 2])
    np.testing.assert_array_equal(back[..., 0].astype(bool), a)
    np.testing.assert_array_equal(back[..., 1].astype(bool), b)
    assert len(hd.sr.srread(paths[1]).content.get_volumetric_roi_measurement_groups()) == 2
    with pytest.raises(EmptyResultError) as info:
        build_seg(vol, segs[2:], MODEL)
    assert isinstance(info.value, PipelineError) and "nothing found" in str(info.value)
    with pytest.raises(ValueError, match="distinct labels"):
        build_seg(vol, [segs[0], segs[0]], MODEL)


def test_known_codes_agree_with_pydicom_code_dictionary() -> None:
    for name, keyword in (("spleen", "Spleen"), ("liver", "Liver"), ("kidney", "Kidney"),
                          ("spine", "Spine"), ("vertebral_column", "Spine"), ("Pancreas", "Pancreas"),
                          ("gall-bladder", "Gallbladder"), ("aorta", "Aorta"), ("IVC", "InferiorVenaCava")):
        c = segment_coding(name)
        ref = getattr(codes.SCT, keyword)
        assert (c.type.value, c.type.scheme_designator) == (ref.value, "SCT"), name
        assert c.category == hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
        assert c.standard
    assert segment_coding("spine").type.value == "421060004"
    assert VOLUME.value == codes.SCT.Volume.value == "118565006"


def test_postprocess_components_and_volume_in_ml() -> None:
    spleen = next(o for o in ANATOMY.organs if o.name == "spleen")
    g = ph.SliceGeometry(rows=60, columns=60, slices=40, pixel_spacing=(2.5, 2.5),
                         slice_spacing=3.0, centre=spleen.centre)
    vol = load_series(ph.ct_series(ANATOMY, g))
    labels = _model_output(vol)
    labels[0, 0, 0] = 1  # a stray voxel, not connected to the spleen
    before = labels.copy()
    (raw,) = split_labels(labels, vol, {1: "spleen"})
    (clean,) = split_labels(labels, vol, {1: "spleen"}, keep_components={"spleen": 1})
    assert int(raw.mask.sum()) == int(clean.mask.sum()) + 1
    np.testing.assert_array_equal(labels, before)  # the caller's array is untouched
    exact = 4 / 3 * np.pi * np.prod(spleen.radii) / 1000  # mL
    assert clean.volume_ml == pytest.approx(exact, rel=0.03)
    two = np.zeros((5, 5, 9), bool)
    two[2, 2, 0:2] = two[2, 2, 4:7] = two[2, 2, 8] = True
    assert largest_components(two, 2).sum() == 5 and largest_components(two, 1).sum() == 3
    with pytest.raises(ValueError, match="keep_components"):
        split_labels(labels, vol, {1: "spleen"}, keep_components={"liver": 1})
    with pytest.raises(ValueError, match="shape"):
        split_labels(labels[:-1], vol, {1: "spleen"})


def test_value_objects_validate() -> None:
    with pytest.raises(ValueError, match="name"):
        ModelInfo(name="", version="1")
    with pytest.raises(ValueError, match="version"):
        ModelInfo(name="m", version="x" * 65)
    with pytest.raises(TypeError, match="bool"):
        SegmentResult(label=1, name="liver", mask=np.zeros((2, 2, 2), np.uint8), volume_ml=0.0)
    with pytest.raises(ValueError, match="label"):
        SegmentResult(label=0, name="liver", mask=np.zeros((2, 2, 2), bool), volume_ml=0.0)
    with pytest.raises(ValueError, match="seg_series_number"):
        WriterOptions(seg_series_number=0)
    with pytest.raises(ValueError, match="contour_width_px"):
        WriterOptions(contour_width_px=3)
