"""Series -> volume: sorting, geometry in LPS, rescale, codecs, resampling and refusals.

Everything runs on small phantoms from :mod:`pipelines.phantom` whose truth is known
in patient coordinates, so a misaligned volume shows up as labels that disagree.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from pipelines import phantom as ph
from pipelines.errors import (
    DuplicatePositionError,
    EmptySeriesError,
    GantryTiltError,
    InconsistentGeometryError,
    MissingAttributeError,
    MissingSlicesError,
    MixedOrientationError,
    MixedSeriesError,
    PipelineError,
    SeriesGeometryError,
    TooFewSlicesError,
    UnsupportedImageError,
)
from pipelines.types import Volume
from pipelines.volume import GeometryTolerances, load_series, to_source_slices

ANATOMY = ph.Anatomy.random(7)
SQ = 1 / np.sqrt(2)
_c, _s = np.cos(np.radians(25)), np.sin(np.radians(25))
ORIENTATIONS = {
    "axial": ((1, 0, 0), (0, 1, 0)),
    "axial-flipped-lr": ((-1, 0, 0), (0, 1, 0)),  # normal -z: slices run caudal
    "axial-flipped-both": ((-1, 0, 0), (0, -1, 0)),
    "coronal": ((1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, 1, 0), (0, 0, -1)),
    "oblique": ((_c, _s, 0), (-_s * SQ, _c * SQ, -SQ)),
}


def _geometry(orient: str = "axial", slices: int = 24, spacing: float = 6.0,
              rows: int = 48, cols: int = 56, centre=(10.0, 20.0, 30.0)) -> ph.SliceGeometry:
    r, c = ORIENTATIONS[orient]
    return ph.SliceGeometry(rows=rows, columns=cols, slices=slices, pixel_spacing=(6.5, 6.0),
                            slice_spacing=spacing, row_direction=tuple(map(float, r)),
                            column_direction=tuple(map(float, c)), centre=centre)


def _series(geometry: ph.SliceGeometry, seed: int = 0, info: ph.StudyInfo | None = None):
    dss = ph.ct_series(ANATOMY, geometry, info)
    random.Random(seed).shuffle(dss)
    return dss


def _stored_hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("orient", sorted(ORIENTATIONS))
def test_any_orientation_maps_voxels_to_truth_in_patient_coordinates(orient: str) -> None:
    g = _geometry(orient)
    dss = _series(g, seed=len(orient))
    vol = load_series(dss)
    assert vol.shape == (g.slices, g.rows, g.columns)
    np.testing.assert_allclose(vol.spacing_mm, (6.0, 6.5, 6.0), atol=1e-3)
    np.testing.assert_allclose(vol.voxel_volume_ml, 6.0 * 6.5 * 6.0 / 1000, rtol=1e-4)
    # every voxel centre, mapped through the affine, has the truth label of that point
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    labels_at_affine = ph.truth_at(ANATOMY, vol.index_to_lps(grid))
    assert labels_at_affine.any()
    by_uid = {str(ds.SOPInstanceUID): ds for ds in dss}
    truth = ph.truth_labels(ANATOMY, g)
    for k, uid in enumerate(vol.sop_instance_uids):
        src = by_uid[uid]
        np.testing.assert_array_equal(vol.array[k], _stored_hu(src))  # slice k is that image
        np.testing.assert_array_equal(labels_at_affine[k], truth[int(src.InstanceNumber) - 1])
    # sorted along the normal, whichever way the normal points
    offsets = [np.dot(np.asarray(ds.ImagePositionPatient, float), vol.slice_normal)
               for ds in vol.source_images]
    assert np.all(np.diff(offsets) > 0)
    np.testing.assert_allclose(vol.slice_normal, g.normal, atol=1e-6)
    # intensities agree with the organs found through the affine
    spleen = labels_at_affine == 1
    assert abs(float(vol.array[spleen].mean()) - ANATOMY.organs[-1].hu) < 8
    assert vol.lps_to_index(vol.index_to_lps(np.array([3.0, 4.0, 5.0]))) == pytest.approx([3, 4, 5])


def test_volume_is_read_only_and_inputs_are_not_modified() -> None:
    dss = _series(_geometry(slices=6))
    before = [(ds.SOPInstanceUID, list(ds.ImagePositionPatient), len(ds.PixelData)) for ds in dss]
    vol = load_series(dss)
    assert [(ds.SOPInstanceUID, list(ds.ImagePositionPatient), len(ds.PixelData)) for ds in dss] == before
    assert not vol.array.flags.writeable
    assert all("PixelData" not in h for h in vol.source_images)
    assert vol.is_source_grid and vol.source_grid_positions == tuple(float(k) for k in range(6))
    assert vol.frame_of_reference_uid == str(dss[0].FrameOfReferenceUID)
    assert vol.series_instance_uid == str(dss[0].SeriesInstanceUID)


def test_paths_and_resent_duplicates(tmp_path) -> None:
    dss = _series(_geometry(slices=8))
    paths = []
    for n, ds in enumerate(dss):
        p = tmp_path / f"{n}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    vol = load_series([*paths, str(paths[0])])  # the same instance twice: kept once
    assert vol.shape[0] == 8
    ref = load_series(dss)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_array_equal(vol.affine, ref.affine)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_decode_to_the_same_hu(syntax) -> None:
    dss = _series(_geometry(slices=5, rows=32, cols=32))
    ref = load_series(dss)
    packed = []
    for ds in dss:
        c = copy.deepcopy(ds)
        c.compress(syntax)
        packed.append(c)
    assert packed[0].file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(packed).array, ref.array)


def test_per_slice_rescale_and_padding() -> None:
    dss = _series(_geometry(slices=6, rows=32, cols=32))
    ref = load_series(dss)
    changed = []
    for n, ds in enumerate(dss):
        c = copy.deepcopy(ds)
        if n % 2:  # stored = 2 * (HU + 2048): slope 0.5, intercept -2048
            hu = _stored_hu(ds)
            c.BitsStored, c.HighBit = 16, 15
            c.RescaleSlope, c.RescaleIntercept = "0.5", "-2048"
            stored = np.rint((hu + 2048) * 2).astype(np.uint16)
            stored[0, :3] = 0
            c.PixelPaddingValue = 0
            c.PixelData = stored.tobytes()
        changed.append(c)
    vol = load_series(changed)
    for k, uid in enumerate(vol.sop_instance_uids):
        n = [str(d.SOPInstanceUID) for d in dss].index(uid)
        if n % 2:
            assert (vol.array[k, 0, :3] == -1000).all()  # padding -> air
            np.testing.assert_array_equal(vol.array[k, 1:], ref.array[k, 1:])
        else:
            np.testing.assert_array_equal(vol.array[k], ref.array[k])


def test_uneven_spacing_is_resampled_onto_a_regular_grid() -> None:
    fine = _geometry(slices=61, spacing=1.0, rows=40, cols=40)
    dss = sorted(ph.ct_series(ANATOMY, fine), key=lambda d: int(d.InstanceNumber))
    picks = [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27, 30, 32, 35, 37, 40, 42, 45, 47, 50,
             52, 55, 57, 60]  # gaps of 2 and 3 mm
    chosen = [dss[i] for i in picks]
    random.Random(3).shuffle(chosen)
    vol = load_series(chosen)
    assert not vol.is_source_grid
    step = vol.spacing_mm[0]
    assert step == pytest.approx(60 / round(60 / 2.5)) or step == pytest.approx(60 / round(60 / 2.0)) \
        or step == pytest.approx(60 / round(60 / 3.0))
    assert vol.shape[0] == round(60 / step) + 1
    # grid slices coinciding with a source slice carry its pixels; others interpolate linearly
    by_uid = {str(d.SOPInstanceUID): d for d in chosen}
    for n, pos in enumerate(vol.source_grid_positions):
        src_hu = _stored_hu(by_uid[vol.sop_instance_uids[n]])
        if abs(pos - round(pos)) < 1e-6:
            np.testing.assert_allclose(vol.array[round(pos)], src_hu, atol=1e-3)
    # every grid voxel lies where the affine says: truth at the affine vs. fine truth
    truth_fine = ph.truth_labels(ANATOMY, fine)
    offsets_mm = np.arange(vol.shape[0]) * step
    for k in range(vol.shape[0]):
        lps = vol.index_to_lps(np.stack(np.meshgrid([k], np.arange(40), np.arange(40),
                                                    indexing="ij"), -1)[0])
        exact = ph.truth_at(ANATOMY, lps)
        if abs(offsets_mm[k] - round(offsets_mm[k])) < 1e-6:
            np.testing.assert_array_equal(exact, truth_fine[round(offsets_mm[k])])
    # a mask on the grid maps back onto the source slices (nearest grid slice)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    mask = ph.truth_at(ANATOMY, vol.index_to_lps(grid)) == 2
    back = to_source_slices(vol, mask)
    assert back.shape == (len(picks), 40, 40)
    src_truth = np.stack([truth_fine[int(by_uid[u].InstanceNumber) - 1] for u in vol.sop_instance_uids]) == 2
    dice = 2 * (back & src_truth).sum() / (back.sum() + src_truth.sum())
    assert dice > 0.95


def test_small_position_jitter_is_not_resampled() -> None:
    dss = _series(_geometry(slices=10))
    jittered = []
    for n, ds in enumerate(dss):
        c = copy.deepcopy(ds)
        p = [float(v) for v in c.ImagePositionPatient]
        p[2] += 0.05 * (-1) ** n
        c.ImagePositionPatient = [f"{v:.4f}" for v in p]
        jittered.append(c)
    vol = load_series(jittered)
    assert vol.is_source_grid
    assert to_source_slices(vol, np.zeros(vol.shape, bool)).shape == vol.shape


# ----------------------------------------------------------------------------- refusals

def _refuses(dss, error: type[SeriesGeometryError], *words: str) -> SeriesGeometryError:
    with pytest.raises(error) as info:
        load_series(dss)
    msg = str(info.value)
    assert isinstance(info.value, PipelineError) and isinstance(info.value, ValueError)
    for w in words:
        assert w in msg, msg
    return info.value


def test_refuses_mixed_orientation() -> None:
    info = ph.StudyInfo()
    axial = _series(_geometry(slices=10), info=info)
    localiser = ph.ct_series(ANATOMY, _geometry("coronal", slices=1), info)
    err = _refuses(axial + localiser, MixedOrientationError, "2 different", "10 slice(s)",
                   "1 slice(s)", "localiser")
    assert sum(err.counts.values()) == 11


def test_refuses_missing_slices() -> None:
    dss = sorted(ph.ct_series(ANATOMY, _geometry(slices=12)), key=lambda d: int(d.InstanceNumber))
    del dss[5:7]
    err = _refuses(dss, MissingSlicesError, "gap of 18.000 mm", "median spacing 6.000 mm",
                   "incomplete")
    assert err.end_mm - err.start_mm == pytest.approx(18.0)


def test_refuses_two_acquisitions_at_the_same_positions() -> None:
    first = _series(_geometry(slices=6))
    second = []
    for ds in first:
        c = copy.deepcopy(ds)
        c.SOPInstanceUID = c.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        c.AcquisitionNumber = 2
        second.append(c)
    _refuses(first + second, DuplicatePositionError, "AcquisitionNumber", "own series")


def test_refuses_gantry_tilt() -> None:
    g = _geometry(slices=12)
    tilted = []
    for ds in ph.ct_series(ANATOMY, g):
        c = copy.deepcopy(ds)
        p = [float(v) for v in c.ImagePositionPatient]
        k = int(c.InstanceNumber) - 1
        p[1] += k * g.slice_spacing * np.tan(np.radians(15))  # 15 degree tilt about x
        c.ImagePositionPatient = [f"{v:.4f}" for v in p]
        tilted.append(c)
    err = _refuses(tilted, GantryTiltError, "gantry tilt", "tilt correction")
    assert err.angle_deg == pytest.approx(15.0, abs=0.01)


def test_refuses_inconsistent_pixel_spacing_and_matrix() -> None:
    dss = _series(_geometry(slices=5))
    odd = copy.deepcopy(dss[2])
    odd.PixelSpacing = ["7.0", "6.0"]
    _refuses([*dss[:2], odd, *dss[3:]], InconsistentGeometryError, "PixelSpacing")
    info = ph.StudyInfo(series_uid=str(dss[0].SeriesInstanceUID), study_uid=str(dss[0].StudyInstanceUID),
                        frame_of_reference_uid=str(dss[0].FrameOfReferenceUID))
    small = ph.ct_series(ANATOMY, _geometry(slices=2, rows=32, cols=32, centre=(0, 0, 200)), info)
    _refuses(dss + small, InconsistentGeometryError, "Rows/Columns")


def test_refuses_mixed_series_and_frames_of_reference() -> None:
    a = _series(_geometry(slices=4))
    b = _series(_geometry(slices=4, centre=(0, 0, 100)))
    _refuses(a + b, MixedSeriesError, "SeriesInstanceUID", "exactly one series")
    c = [copy.deepcopy(ds) for ds in b]
    for ds in c:
        ds.SeriesInstanceUID, ds.StudyInstanceUID = a[0].SeriesInstanceUID, a[0].StudyInstanceUID
    _refuses(a + c, MixedSeriesError, "FrameOfReferenceUID")


def test_refuses_too_few_empty_multiframe_and_missing_attributes() -> None:
    with pytest.raises(EmptySeriesError):
        load_series([])
    dss = _series(_geometry(slices=3))
    _refuses(dss[:1], TooFewSlicesError, "at least 2")
    mf = copy.deepcopy(dss[0])
    mf.NumberOfFrames = 2
    _refuses([mf, *dss[1:]], UnsupportedImageError, "multi-frame")
    no_pos = copy.deepcopy(dss[1])
    del no_pos.ImagePositionPatient
    err = _refuses([dss[0], no_pos, dss[2]], MissingAttributeError, "ImagePositionPatient")
    assert err.sop_instance_uid == str(no_pos.SOPInstanceUID)
    broken = copy.deepcopy(dss[1])
    broken.PixelData = broken.PixelData[:100]
    _refuses([dss[0], broken, dss[2]], UnsupportedImageError, "cannot be decoded")


def test_tolerances_and_volume_validation() -> None:
    with pytest.raises(ValueError, match="gap_factor"):
        GeometryTolerances(gap_factor=1.0)
    vol = load_series(_series(_geometry(slices=3)))
    with pytest.raises(TypeError, match="float32"):
        Volume(array=vol.array.astype(np.float64), affine=vol.affine,
               frame_of_reference_uid=vol.frame_of_reference_uid,
               study_instance_uid=vol.study_instance_uid, series_instance_uid=vol.series_instance_uid,
               source_images=vol.source_images, source_grid_positions=vol.source_grid_positions)
    with pytest.raises(ValueError, match="frame_of_reference_uid"):
        Volume(array=vol.array, affine=vol.affine, frame_of_reference_uid="1.2.x",
               study_instance_uid=vol.study_instance_uid, series_instance_uid=vol.series_instance_uid,
               source_images=vol.source_images, source_grid_positions=vol.source_grid_positions)
    with pytest.raises(ValueError, match="mask has shape"):
        to_source_slices(vol, np.zeros((2, 2, 2), bool))
