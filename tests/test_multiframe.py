"""Enhanced (multi-frame) CT and MR as input, and results that point at frames (issue 24).

Two sources with known geometry:

* a Legacy Converted Enhanced CT made by highdicom's converter from the phantom's
  single-frame slices (highdicom writes its frames in reverse slice order);
* an Enhanced MR made by the project (:func:`pipelines.phantom.enhanced_mr`): two
  temporal positions x two echoes, oblique, frames stored in a random order.

The "model output" is the phantom's truth sampled through the volume's affine, so every
check of a written voxel or reference against the truth is a check of the geometry.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.foundation.errors import ConfigError
from dicom_node.tasks import Task
from pipelines import phantom as ph
from pipelines.errors import (
    AmbiguousVolumeError,
    GantryTiltError,
    MissingSlicesError,
    UnsupportedImageError,
)
from pipelines.multiframe import VolumeChoice, read_frames
from pipelines.postprocess import split_labels
from pipelines.selection import SelectionRules, matches
from pipelines.types import ModelInfo, Volume
from pipelines.volume import load_series
from pipelines.writers import save_results, write_results

ANATOMY = ph.Anatomy.random(5)
MODEL = ModelInfo(name="abdomen_ct_segmentation", version="0.3.1", backend="torch-cpu")
SQ = 1 / np.sqrt(2)
TES = (10.0, 20.0)
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"  # dicom3tools: fail, never skip


def _dciodvfy(path: Path) -> list[str]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]


def _ct_geometry() -> ph.SliceGeometry:
    return ph.SliceGeometry(rows=40, columns=48, slices=24, pixel_spacing=(8.0, 7.5),
                            slice_spacing=9.0, centre=(5.0, 10.0, 0.0))


def _mr_geometry() -> ph.SliceGeometry:
    return ph.SliceGeometry(rows=40, columns=48, slices=20, pixel_spacing=(8.0, 7.5),
                            slice_spacing=9.0, row_direction=(SQ, SQ, 0.0),
                            column_direction=(0.0, 0.0, -1.0), centre=(5.0, 10.0, 0.0))


def legacy_ct(slices: list[pydicom.Dataset]) -> pydicom.Dataset:
    return hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1)


def _mr(order_seed: int = 3) -> pydicom.Dataset:
    g = _mr_geometry()
    frames = 2 * len(TES) * g.slices
    return ph.enhanced_mr(ANATOMY, g, echo_times_ms=TES,
                          frame_order=np.random.default_rng(order_seed).permutation(frames))


def _truth(vol: Volume) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    return ph.truth_at(ANATOMY, vol.index_to_lps(grid))


@pytest.fixture(scope="module")
def ct() -> tuple[list[pydicom.Dataset], pydicom.Dataset]:
    slices = ph.ct_series(ANATOMY, _ct_geometry())
    return slices, legacy_ct(slices)


def test_legacy_converted_ct_gives_the_single_frame_volume(ct) -> None:
    slices, mf = ct
    single, multi = load_series(slices), load_series([mf])
    assert [int(f) for f in multi.source_frame_numbers] != sorted(multi.source_frame_numbers)
    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    np.testing.assert_allclose(multi.affine, _ct_geometry().affine, atol=1e-3)
    assert multi.source_instances[0].SOPInstanceUID == mf.SOPInstanceUID
    assert "PixelData" not in multi.source_instances[0]
    # highdicom's own volume of the same file: same voxels, its slices in the other order
    hv = hd.Image.from_dataset(mf, copy=False).get_volume(dtype=np.float32)
    if np.dot(hv.affine[:3, 0], multi.affine[:3, 0]) < 0:
        hv_array = hv.array[::-1]
    else:
        hv_array = hv.array
    np.testing.assert_array_equal(hv_array, multi.array)


def test_enhanced_mr_default_volume_is_first_time_first_echo(tmp_path: Path) -> None:
    mr, g = _mr(), _mr_geometry()
    vol = load_series([mr])
    np.testing.assert_allclose(vol.affine, g.affine, atol=1e-3)  # oblique, exactly
    frames = read_frames(mr)
    picked = [frames[f - 1] for f in vol.source_frame_numbers]
    assert {(f.temporal, f.echo) for f in picked} == {(1, TES[0])}
    rng = np.random.default_rng(ANATOMY.seed + 2)
    hus = [ph.render(ANATOMY, g, k, rng)[0] for k in range(g.slices)]
    expected = np.stack([ph.mr_signal(h, TES[0], 1) for h in hus]).astype(np.float32)
    np.testing.assert_array_equal(vol.array, expected)
    # the rule picks another volume: second temporal position, second echo
    other = load_series([mr], volume=VolumeChoice(temporal_position=2, echo=2))
    expected = np.stack([ph.mr_signal(h, TES[1], 2) for h in hus]).astype(np.float32)
    np.testing.assert_array_equal(other.array, expected)
    assert {(frames[f - 1].temporal, frames[f - 1].echo) for f in other.source_frame_numbers} \
        == {(2, TES[1])}


@pytest.mark.parametrize("source", ["legacy-ct", "enhanced-mr"])
def test_seg_sr_overlay_point_at_the_segmented_frames(source: str, ct, tmp_path: Path) -> None:
    mf = ct[1] if source == "legacy-ct" else _mr()
    vol = load_series([mf])
    segments = split_labels(_truth(vol), vol, ph.LABELS, keep_components={"spleen": 1})
    results = write_results(vol, segments, MODEL)
    paths = save_results(results, tmp_path)
    for p in paths:
        assert _dciodvfy(p) == [], p.name
    frames = read_frames(mf)
    chosen = set(vol.source_frame_numbers)
    # SEG: every frame derives from exactly one source frame of the volume, at its position
    seg = hd.seg.segread(paths[0])
    for item in seg.PerFrameFunctionalGroupsSequence:
        [src] = item.DerivationImageSequence[0].SourceImageSequence
        assert src.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        frame = int(src.ReferencedFrameNumber)
        assert frame in chosen
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                                   frames[frame - 1].position, atol=1e-3)
    back = seg.get_pixels_by_source_frame(
        str(mf.SOPInstanceUID), list(vol.source_frame_numbers),
        segment_numbers=list(range(1, len(seg.SegmentSequence) + 1)))
    kept = [s for s in segments if not s.is_empty]
    for n, s in enumerate(kept):
        np.testing.assert_array_equal(back[..., n].astype(bool), s.mask)
    # SR: the segment's source frames and the outline's frame
    sr = hd.sr.srread(paths[1])
    for group in sr.content.get_volumetric_roi_measurement_groups():
        [ref] = group.referenced_segment.source_images_for_segmentation
        assert ref.referenced_sop_instance_uid == mf.SOPInstanceUID
        assert set(ref.referenced_frame_numbers) <= chosen
    planar = sr.content.get_planar_roi_measurement_groups()
    assert planar  # one outline per segment, on one frame each
    for group in planar:
        region = group.roi
        [image] = [item for item in region.ContentSequence if item.ValueType == "IMAGE"]
        [ref] = image.ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) in chosen
    # overlay: one image per covered source frame, each naming its frame
    refs = [(o.SourceImageSequence[0].ReferencedSOPInstanceUID,
             int(o.SourceImageSequence[0].ReferencedFrameNumber)) for o in results.overlay]
    covered = {f for s in kept for f, here in zip(vol.source_frame_numbers,
                                                  s.present_slices(), strict=True) if here}
    assert sorted(f for _, f in refs) == sorted(covered)
    assert {u for u, _ in refs} == {mf.SOPInstanceUID}


def test_frame_geometry_is_checked_like_slices(ct) -> None:
    _, mf = ct
    tilted = copy.deepcopy(mf)
    for n, item in enumerate(tilted.PerFrameFunctionalGroupsSequence):
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        item.PlanePositionSequence[0].ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * n, ipp[2]]
    with pytest.raises(GantryTiltError):
        load_series([tilted])
    gap = copy.deepcopy(mf)
    item = gap.PerFrameFunctionalGroupsSequence[5].PlanePositionSequence[0]
    item.ImagePositionPatient = [*item.ImagePositionPatient[:2], 500.0]
    with pytest.raises(MissingSlicesError):
        load_series([gap])


def test_what_is_not_one_volume_is_refused_naming_the_dimensions() -> None:
    mr = _mr()
    # a second stack at the same positions: two volumes fit the default rule
    for n, item in enumerate(mr.PerFrameFunctionalGroupsSequence):
        item.FrameContentSequence[0].StackID = "1" if n % 2 else "2"
    with pytest.raises(AmbiguousVolumeError) as err:
        load_series([mr])
    assert "2 stack(s), 2 temporal position(s), 2 echo(es) (TE 10, 20 ms)" in str(err.value)
    rules = SelectionRules(name="liver-mr", modality="MR",
                           sop_class_uids=("1.2.840.10008.5.1.4.1.1.4.1",), min_slices=5)
    decision = matches(rules, [mr])
    assert not decision.matched and "dimensions found: 80 frames, 2 stack(s)" in decision.reason
    assert "\n" not in decision.reason
    # ... until the rule names the stack
    chosen = SelectionRules(name="liver-mr", modality="MR", min_slices=5,
                            sop_class_uids=("1.2.840.10008.5.1.4.1.1.4.1",),
                            volume=VolumeChoice(stack="2"))
    assert matches(chosen, [mr]).matched
    assert "frames of a multi-frame image" in matches(chosen, [mr]).reason
    with pytest.raises(AmbiguousVolumeError, match="no frame is of image type PHASE"):
        load_series([mr], volume=VolumeChoice(stack="2", image_type=("PHASE",)))


def test_task_volume_rule_and_enhanced_sop_classes(ct) -> None:
    task = Task(name="liver-mr", modality="MR", min_slices=5,
                volume={"echo": 2, "image_type": ["original", "magnitude"]})
    assert task.volume == VolumeChoice(echo=2)
    assert "1.2.840.10008.5.1.4.1.1.4.1" in task.rules.sop_class_uids
    assert task.to_dict()["volume"]["echo"] == 2 and "echo 2" in task.describe_rules()
    with pytest.raises(ConfigError, match="tasks.liver-mr.volume.echo"):
        Task(name="liver-mr", modality="MR", volume={"echo": 0})
    with pytest.raises(ConfigError, match="tasks.liver-mr.volume.phase"):
        Task(name="liver-mr", modality="MR", volume={"phase": 1})
    spleen = Task(name="spleen-ct", modality="CT", accept_missing_body_part=True,
                  body_parts=("ABDOMEN*",))
    decision = matches(spleen.rules, [ct[1]])
    assert decision.matched, decision.reason
    assert "24 frames of a multi-frame image" in decision.reason


def test_tasks_explain_names_dimensions_and_the_chosen_volume(tmp_path: Path, capsys) -> None:
    from dicom_node.cli.tasks import cmd_explain, explain

    mr = _mr()
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    tasks = (Task(name="liver-mr", modality="MR", min_slices=5, volume={"echo": 2}),
             Task(name="spleen-ct", modality="CT"))
    [report] = explain(tmp_path, tasks)
    assert report["instances"] == 1 and report["selected_by"] == ["liver-mr"]
    assert report["multiframe"]["dimensions"].startswith(
        "80 frames, 1 stack(s), 2 temporal position(s), 2 echo(es) (TE 10, 20 ms)")
    assert report["multiframe"]["volumes"] == {
        "liver-mr": "the only stack, temporal position 1, echo 2, image type ORIGINAL/MAGNITUDE "
                    "(20 frames)"}

    class Args:
        series_dir, json = tmp_path, False

    class Settings:
        pass

    Settings.tasks = tasks  # type: ignore[attr-defined]
    assert cmd_explain(Args(), Settings()) == 0  # type: ignore[arg-type]
    text = capsys.readouterr().out
    assert "multi-frame: 80 frames" in text and "liver-mr segments: the only stack" in text


def test_seg_on_a_multiframe_source_becomes_a_label_and_nifti_keeps_the_geometry(
        ct, tmp_path: Path) -> None:
    from trainer.labelmaps import mask_from_nifti, mask_from_seg, nifti_affine, to_nifti

    slices, mf = ct
    vol = load_series([mf])
    truth = _truth(vol)
    # a radiologist's SEG made elsewhere (highdicom) on the multi-frame CT, frame order
    # as the file stores it
    order = np.asarray(vol.source_frame_numbers) - 1
    on_frames = np.zeros((int(mf.NumberOfFrames), *vol.shape[1:]), dtype=np.uint8)
    on_frames[order] = (truth == 1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[mf], pixel_array=on_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Spleen",
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("78961009", "SCT", "Spleen"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=77, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="VIEWER", manufacturer_model_name="Viewer",
        software_versions="1", device_serial_number="1")
    path = tmp_path / "label.dcm"
    seg.save_as(path, enforce_file_format=True)
    label = mask_from_seg(path, vol, {1: "spleen", 2: "liver"})
    np.testing.assert_array_equal(label, (truth == 1).astype(np.uint8))
    # NIfTI of the multi-frame volume: the single-frame series' affine, and it reads back
    single = load_series(slices)
    img = to_nifti(vol.array, vol.affine)
    np.testing.assert_allclose(img.affine, nifti_affine(single.affine), atol=1e-6)
    np.testing.assert_array_equal(mask_from_nifti(to_nifti(label, vol.affine), vol), label)


def test_volume_rule_survives_the_training_subprocess_request() -> None:
    # trainer.child.run_in_subprocess sends the rules as JSON (dataclasses.asdict)
    import dataclasses
    import json

    rules = SelectionRules(name="liver-mr", modality="MR",
                           volume=VolumeChoice(stack="2", echo=2, image_type=("WATER",)))
    back = SelectionRules.from_dict(json.loads(json.dumps(dataclasses.asdict(rules))))
    assert back == rules and back.volume.image_type == ("WATER",)


def test_legacy_converted_pet_with_per_frame_rescale_for_a_pt_task() -> None:
    from pydicom.uid import PositronEmissionTomographyImageStorage

    g = ph.SliceGeometry(rows=40, columns=48, slices=20, pixel_spacing=(8.0, 7.5),
                         slice_spacing=9.0)
    slices = ph.ct_series(ANATOMY, g, ph.StudyInfo(modality="PT", body_part="ABDOMEN"))
    for k, ds in enumerate(slices):  # a slope per slice, as PET writes them
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = \
            PositronEmissionTomographyImageStorage
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{0.5 + 0.01 * k:.2f}", "0", "BQML"
        ds.Units, ds.DecayCorrection = "BQML", "START"
        del ds.KVP
    mf = hd.legacy.LegacyConvertedEnhancedPETImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1)
    assert "PixelValueTransformationSequence" in mf.PerFrameFunctionalGroupsSequence[0]
    single, multi = load_series(slices), load_series([mf])
    np.testing.assert_allclose(multi.array, single.array, rtol=1e-6)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    decision = matches(Task(name="liver-pt", modality="PT", body_parts=("ABDOMEN",)).rules, [mf])
    assert decision.matched, decision.reason


def test_magnitude_is_the_default_and_phase_is_chosen_by_image_type() -> None:
    g = _mr_geometry()
    frames = 2 * len(TES) * 2 * g.slices
    mr = ph.enhanced_mr(ANATOMY, g, echo_times_ms=TES, components=("MAGNITUDE", "PHASE"),
                        frame_order=np.random.default_rng(8).permutation(frames))
    info = read_frames(mr)
    magnitude = load_series([mr])
    assert {info[f - 1].image_type[-1] for f in magnitude.source_frame_numbers} == {"MAGNITUDE"}
    assert float(magnitude.array.max()) > 1000  # anatomy, not the phase ramp
    phase = load_series([mr], volume=VolumeChoice(image_type=("PHASE",)))
    assert {info[f - 1].image_type[-1] for f in phase.source_frame_numbers} == {"PHASE"}
    np.testing.assert_allclose(phase.array[0, :, 0], np.linspace(0, 4095, g.rows).astype(np.uint16))
    rules = SelectionRules(name="liver-mr", modality="MR", min_slices=5,
                           sop_class_uids=("1.2.840.10008.5.1.4.1.1.4.1",),
                           volume=VolumeChoice(image_type=("ORIGINAL",)))
    decision = matches(rules, [mr])  # ORIGINAL alone leaves magnitude and phase
    assert not decision.matched and "image types differ" in decision.reason
    assert "2 image type(s)" in decision.reason


def test_memory_budget_is_checked_on_the_chosen_volume_s_frames(ct, tmp_path: Path) -> None:
    from loop_helpers import install_model
    from pipelines.inference import load_model
    from pipelines.memory import MemoryBudgetError
    from pipelines.run import check_series_budget
    from registry.store import Registry

    install_model(tmp_path)
    with Registry(tmp_path) as reg:
        model = load_model(reg.active("spleen-ct"), registry=reg)
    slices, mf = ct
    mf.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    header = pydicom.dcmread(tmp_path / "mf.dcm", stop_before_pixels=True)  # headers suffice
    multi = check_series_budget([header], model, 10**12)
    single = check_series_budget(slices, model, 10**12)
    assert multi.peak_bytes == single.peak_bytes > 0  # not the "no geometry" estimate
    with pytest.raises(MemoryBudgetError):
        check_series_budget([header], model, 1000)


def test_malformed_functional_groups_are_one_refusal_not_a_crash(ct) -> None:
    _, mf = ct
    bad = copy.deepcopy(mf)
    bad.PerFrameFunctionalGroupsSequence[3].FrameContentSequence[0].TemporalPositionIndex = None
    bad.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0].ImagePositionPatient = \
        ["1", "2"]
    with pytest.raises(UnsupportedImageError, match="frame 4: position has 2 values, not 3"):
        load_series([bad])
    short = copy.deepcopy(mf)
    del short.PerFrameFunctionalGroupsSequence[5]
    decision = matches(SelectionRules(name="spleen-ct", accept_missing_body_part=True), [short])
    assert not decision.matched and "23 per-frame functional group items for 24 frames" \
        in decision.reason
