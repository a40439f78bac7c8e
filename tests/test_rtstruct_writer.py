"""RTSTRUCT writer: dciodvfy-clean, and its contours, rasterised back, are the SEG's segments.

Phantom CT, organs drawn by hand on its grid so that every case is there: an organ with
a hole (a ring), one of two islands, a ring with an island in its hole, one touching
the image border, and the phantom's own organs. The RTSTRUCT is read back with pydicom
and each contour mapped to its referenced image's pixels through that image's own
position, orientation and spacing (not the writer's volume), filled by the even-odd
rule at pixel centres; Dice against the SEG read back with highdicom must be >= 0.95.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pipelines import phantom as ph
from pipelines.codes import segment_coding
from pipelines.postprocess import split_labels
from pipelines.selection import is_node_output
from pipelines.types import ModelInfo, SegmentResult, WriterOptions
from pipelines.volume import load_series
from pipelines.writers import build_seg
from pipelines.writers.rtstruct import RTSTRUCT_SOP_CLASS, build_rtstruct, plane_contours

ANATOMY = ph.Anatomy.random(11)
MODEL = ModelInfo(name="abdomen_ct_segmentation", version="0.3.1", backend="torch-cpu")


def _disc(shape: tuple[int, int, int], k: range, ci: float, cj: float, r: float) -> np.ndarray:
    kk, ii, jj = np.ogrid[:shape[0], :shape[1], :shape[2]]
    inside = (ii - ci) ** 2 + (jj - cj) ** 2 <= r ** 2
    return inside & (kk >= k.start) & (kk < k.stop)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    g = ph.SliceGeometry(rows=64, columns=72, slices=12, pixel_spacing=(2.0, 1.8), slice_spacing=3.0)
    vol = load_series(ph.ct_series(ANATOMY, g))
    shape = vol.shape
    ring = _disc(shape, range(2, 10), 20, 20, 14) & ~_disc(shape, range(2, 10), 20, 20, 7)
    islands = _disc(shape, range(3, 9), 46, 14, 6) | _disc(shape, range(3, 9), 46, 46, 8)
    nested = (_disc(shape, range(1, 6), 20, 52, 11) & ~_disc(shape, range(1, 6), 20, 52, 7)) \
        | _disc(shape, range(1, 6), 20, 52, 3)
    border = _disc(shape, range(6, 12), 63, 71, 9)
    drawn = [("liver", ring), ("kidney", islands), ("stomach", nested), ("spleen", border)]
    segments = [SegmentResult(label=n, name=name, mask=m, volume_ml=float(m.sum()) * vol.voxel_volume_ml)
                for n, (name, m) in enumerate(drawn, start=1)]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    truth = ph.truth_at(ANATOMY, vol.index_to_lps(grid))
    truth[np.any([m for _, m in drawn], axis=0)] = 0
    names = {v: f"phantom_{name}" for v, name in ph.LABELS.items()}
    segments += [SegmentResult(label=10 + s.label, name=s.name, crop=s.crop, origin=s.origin,
                               grid_shape=s.grid_shape, volume_ml=s.volume_ml)
                 for s in split_labels(truth, vol, names) if not s.is_empty]
    out = tmp_path_factory.mktemp("rtstruct")
    seg, rt = build_seg(vol, segments, MODEL), build_rtstruct(vol, segments, MODEL)
    paths = out / "seg.dcm", out / "rt.dcm"
    seg.save_as(paths[0], enforce_file_format=True)
    rt.save_as(paths[1], enforce_file_format=True)
    return vol, segments, paths


def test_rtstruct_validates_with_dciodvfy_and_is_recognised_as_ours(written) -> None:
    vol, segments, (_, path) = written
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert [ln for ln in lines if ln.startswith("Error")] == [], lines
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS and ds.Modality == "RTSTRUCT"
    assert is_node_output(ds)
    assert ds.StudyInstanceUID == vol.study_instance_uid
    assert ds.SeriesInstanceUID != vol.series_instance_uid


def test_rois_carry_name_colour_code_and_the_referenced_frame_series_and_images(written) -> None:
    vol, segments, (_, path) = written
    ds = pydicom.dcmread(path)
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == vol.frame_of_reference_uid
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == vol.study_instance_uid
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == vol.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == \
        list(vol.sop_instance_uids)
    assert [r.ROIName for r in ds.StructureSetROISequence] == [s.name for s in segments]
    for number, (roi, contour, obs, s) in enumerate(zip(
            ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence,
            segments, strict=True), start=1):
        coding = segment_coding(s.name, number - 1)
        assert roi.ROINumber == contour.ReferencedROINumber == obs.ReferencedROINumber == number
        assert roi.ReferencedFrameOfReferenceUID == vol.frame_of_reference_uid
        assert list(contour.ROIDisplayColor) == list(coding.rgb)
        code = obs.RTROIIdentificationCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == \
            (coding.type.CodeValue, coding.type.CodingSchemeDesignator)
        for c in contour.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            assert len(c.ContourData) == 3 * int(c.NumberOfContourPoints)


def test_rasterised_contours_match_the_seg_dice_at_least_095(written) -> None:
    vol, segments, (seg_path, rt_path) = written
    seg = hd.seg.segread(seg_path)
    uids = list(vol.sop_instance_uids)
    numbers = list(range(1, len(segments) + 1))
    truth = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers).astype(bool)
    drawn = _rasterise(pydicom.dcmread(rt_path), vol, len(segments))
    for number, s in enumerate(segments, start=1):
        a, b = truth[..., number - 1], drawn[number - 1]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.95, (s.name, dice)
    # the hole, the islands and the island in the hole are there, not just outlines
    ring, islands, nested = drawn[0], drawn[1], drawn[2]
    assert not ring[5, 20, 20] and ring[5, 20, 30]
    assert islands[5, 46, 14] and islands[5, 46, 46] and not islands[5, 46, 30]
    assert nested[3, 20, 52] and not nested[3, 20, 57] and nested[3, 20, 61]


def _rasterise(ds: pydicom.Dataset, vol, n_rois: int) -> np.ndarray:
    """(ROIs, images, rows, columns): each contour filled even-odd at pixel centres, the
    contours of one ROI on one image combined by XOR, through each image's own geometry."""
    by_uid = {str(d.SOPInstanceUID): (i, d) for i, d in enumerate(vol.source_images)}
    rows, cols = vol.shape[1:]
    out = np.zeros((n_rois, len(by_uid), rows, cols), dtype=bool)
    y, x = np.mgrid[0:rows, 0:cols].astype(float)
    for item in ds.ROIContourSequence:
        for c in item.ContourSequence:
            n, img = by_uid[str(c.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            ipp = np.array(img.ImagePositionPatient, float)
            iop = np.array(img.ImageOrientationPatient, float)
            dy, dx = (float(v) for v in img.PixelSpacing)
            pts = np.array(c.ContourData, float).reshape(-1, 3) - ipp
            assert np.allclose(pts @ np.cross(iop[:3], iop[3:]), 0, atol=1e-3)  # on the plane
            poly = np.column_stack([pts @ iop[:3] / dx, pts @ iop[3:] / dy])
            out[int(item.ReferencedROINumber) - 1, n] ^= _inside(poly, x, y)
    return out


def _inside(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def test_plane_contours_trace_islands_and_holes_exactly() -> None:
    plane = np.zeros((20, 24), dtype=bool)
    plane[2:12, 2:12] = True
    plane[5:8, 5:8] = False   # a hole
    plane[6, 6] = True        # an island in the hole
    plane[14:19, 15:23] = True  # a second island touching nothing
    plane[0, 23] = True       # a single pixel in the corner
    polys = plane_contours(plane)
    assert len(polys) == 5
    y, x = np.mgrid[0:22, 0:26].astype(float)
    filled = np.zeros(x.shape, dtype=bool)
    for p in polys:
        assert not np.array_equal(p[0], p[-1])  # closed implicitly, first point not repeated
        filled ^= _inside(p, x, y)
    np.testing.assert_array_equal(filled[1:-1, 1:-1], plane)
    square = plane_contours(np.pad(np.ones((4, 4), dtype=bool), 2))[0]
    assert len(square) <= 8  # straight runs keep their ends only


def test_series_number_and_empty_segments(written) -> None:
    vol, segments, _ = written
    empty = SegmentResult(label=99, name="gallbladder", mask=np.zeros(vol.shape, bool), volume_ml=0.0)
    rt = build_rtstruct(vol, [*segments[:2], empty], MODEL,
                        options=WriterOptions(rtstruct_series_number=77))
    assert rt.SeriesNumber == 77
    assert [r.ROIName for r in rt.StructureSetROISequence] == [s.name for s in segments[:2]]
    with pytest.raises(ValueError):
        WriterOptions(rtstruct_series_number=0)


def test_written_file_round_trips(written, tmp_path: Path) -> None:
    *_, (_, path) = written
    ds = pydicom.dcmread(path)
    ds.save_as(tmp_path / "again.dcm", enforce_file_format=True)
    again = pydicom.dcmread(tmp_path / "again.dcm")
    assert again.ROIContourSequence[0].ContourSequence[0].ContourData == \
        ds.ROIContourSequence[0].ContourSequence[0].ContourData


def test_a_resampled_volume_is_contoured_on_the_source_images(tmp_path: Path) -> None:
    """Source slices 8 and 12 mm apart, resampled to a regular grid: each contour lies on
    its source image's plane and fills what the SEG holds for that image."""
    fine = ph.SliceGeometry(rows=32, columns=32, slices=41, pixel_spacing=(10.0, 10.0),
                            slice_spacing=4.0)
    dss = sorted(ph.ct_series(ANATOMY, fine), key=lambda d: int(d.InstanceNumber))
    vol = load_series([dss[i] for i in range(0, 41) if i % 5 in (0, 2)])
    assert not vol.is_source_grid
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = [s for s in split_labels(ph.truth_at(ANATOMY, vol.index_to_lps(grid)), vol,
                                        ph.LABELS) if not s.is_empty]
    seg, rt = build_seg(vol, segments, MODEL), build_rtstruct(vol, segments, MODEL)
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(tmp_path / "rt.dcm")], capture_output=True, text=True,
                         timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
    truth = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        list(vol.sop_instance_uids), segment_numbers=list(range(1, len(segments) + 1))).astype(bool)
    drawn = _rasterise(pydicom.dcmread(tmp_path / "rt.dcm"), vol, len(segments))
    for number, s in enumerate(segments, start=1):
        a, b = truth[..., number - 1], drawn[number - 1]
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.95, s.name


def test_a_contour_too_long_for_one_ds_element_is_thinned_and_still_encodes(tmp_path: Path) -> None:
    """A DS element holds at most 65,534 bytes in Explicit VR (16-bit length): a ragged
    outline of a 1024 x 1024 image's big region is thinned (every second point) until
    it fits, and the file is written, read back and validated."""
    g = ph.SliceGeometry(rows=1024, columns=1024, slices=2, pixel_spacing=(0.4, 0.4),
                         slice_spacing=5.0)
    vol = load_series(ph.ct_series(ANATOMY, g))
    rng = np.random.default_rng(0)
    mask = np.zeros(vol.shape, dtype=bool)
    for i in range(20, 1000):  # both sides ragged, every row
        mask[0, i, 10 + rng.integers(0, 5):1000 + rng.integers(0, 5)] = True
    s = SegmentResult(label=1, name="liver", mask=mask, volume_ml=1.0)
    rt = build_rtstruct(vol, [s], MODEL)
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "rt.dcm")
    (contour,) = back.ROIContourSequence[0].ContourSequence
    assert 3 <= int(contour.NumberOfContourPoints) == len(contour.ContourData) // 3
    assert len(plane_contours(mask[0])[0]) > int(contour.NumberOfContourPoints)  # thinned
    run = subprocess.run(["dciodvfy", str(tmp_path / "rt.dcm")], capture_output=True, text=True,
                         timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
    img = vol.source_images[0]  # every point on the region's edge: within a pixel of its box
    pts = np.array(contour.ContourData, float).reshape(-1, 3) - np.array(img.ImagePositionPatient, float)
    iop = np.array(img.ImageOrientationPatient, float)
    cols, rows = pts @ iop[:3] / 0.4, pts @ iop[3:] / 0.4
    assert rows.min() >= 19 and rows.max() <= 1000 and cols.min() >= 9 and cols.max() <= 1005


def test_on_a_multiframe_source_each_contour_names_its_frame(tmp_path: Path) -> None:
    """An Enhanced MR (frames stored in a random order): every Contour Image item names
    the multi-frame instance and the frame the contour lies on, and the frames that
    carry contours are those where a segment is present."""
    from tests.test_multiframe import _mr, _truth

    mf = _mr()
    vol = load_series([mf])
    segments = [s for s in split_labels(_truth(vol), vol, ph.LABELS) if not s.is_empty]
    rt = build_rtstruct(vol, segments, MODEL)
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    run = subprocess.run(["dciodvfy", str(tmp_path / "rt.dcm")], capture_output=True, text=True,
                         timeout=120)
    assert [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")] == []
    series = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert [(i.ReferencedSOPInstanceUID, int(i.ReferencedFrameNumber))
            for i in series.ContourImageSequence] == \
        [(mf.SOPInstanceUID, f) for f in vol.source_frame_numbers]
    for item, s in zip(rt.ROIContourSequence, segments, strict=True):
        refs = {(c.ContourImageSequence[0].ReferencedSOPInstanceUID,
                 int(c.ContourImageSequence[0].ReferencedFrameNumber)) for c in item.ContourSequence}
        present = s.present_slices()[vol.source_grid_slices()]
        assert refs == {(mf.SOPInstanceUID, f)
                        for f, here in zip(vol.source_frame_numbers, present, strict=True) if here}


def test_the_result_check_finds_a_broken_rtstruct(written) -> None:
    """What the worker holds back: an RTSTRUCT that names an ROI without its observation,
    or a contour whose point count is not its data's, fails the Python checks."""
    from pipelines.validation import validate_dataset

    *_, (_, path) = written
    good = pydicom.dcmread(path)
    assert validate_dataset(good, "rtstruct", dciodvfy=False).ok
    no_observation = pydicom.dcmread(path)
    del no_observation.RTROIObservationsSequence[-1]
    report = validate_dataset(no_observation, "rtstruct", dciodvfy=False)
    assert not report.ok and "RTROIObservationsSequence does not name each ROI once" in report.reason
    miscounted = pydicom.dcmread(path)
    contour = miscounted.ROIContourSequence[0].ContourSequence[0]
    contour.NumberOfContourPoints = int(contour.NumberOfContourPoints) + 1
    report = validate_dataset(miscounted, "rtstruct", dciodvfy=False)
    assert not report.ok and "contour data and point count differ" in report.reason
    no_rois = pydicom.dcmread(path)
    no_rois.StructureSetROISequence = []
    assert "RTSTRUCT has no ROI" in validate_dataset(no_rois, "rtstruct", dciodvfy=False).reason
