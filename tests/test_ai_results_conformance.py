"""IHE AI Results conformance of SEG, SR and overlay: dciodvfy and PixelMed, read-back.

Results are written from a phantom CT with its exact truth as the "model output"
(real writers on a real volume; no model needed). Both validators run on every object
type: ``dciodvfy`` (dicom3tools) and PixelMed (``DicomSRValidator`` for the SR,
``DicomInstanceValidator`` for the others). They fail, never skip, when not installed
(``scripts/setup.sh`` installs dicom3tools, libpixelmed-java and default-jre-headless).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from scipy import ndimage

from pipelines import phantom as ph
from pipelines.codes import MILLILITER, PROCESSING_ALGORITHM, VOLUME
from pipelines.postprocess import split_labels
from pipelines.types import NODE_MANUFACTURER, ModelInfo
from pipelines.validation import validate_dataset, validate_results, validate_series
from pipelines.volume import load_series
from pipelines.writers import save_results, write_results
from registry.store import Registry
from tests.registry_bundles import spleen_bundle

PIXELMED = "/usr/share/java/pixelmed.jar"
JAVA = ["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
        "-Djdk.xml.xpathTotalOpLimit=0", "-cp", PIXELMED]
ANATOMY = ph.Anatomy.random(7)
DEVICE_UID = "2.25.301234567890123456789012345678901234"
MODEL = ModelInfo(name="spleen_ct_segmentation", version="0.5.8", backend="torch-cpu",
                  source="dicom-node registry", task="spleen-ct", device_uid=DEVICE_UID)


def _pixelmed(validator: str, path: Path) -> list[str]:
    run = subprocess.run([*JAVA, f"com.pixelmed.validate.{validator}", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return (run.stdout + run.stderr).splitlines()


def _dciodvfy(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    g = ph.SliceGeometry(rows=40, columns=48, slices=14, pixel_spacing=(8.0, 7.5), slice_spacing=9.0)
    vol = load_series(ph.ct_series(ANATOMY, g))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1)
    segments = split_labels(ph.truth_at(ANATOMY, vol.index_to_lps(grid)), vol, ph.LABELS)
    first = write_results(vol, segments, MODEL)
    second = write_results(vol, segments, MODEL, predecessors=[first.sr])  # supersedes
    out = tmp_path_factory.mktemp("air")
    return vol, segments, first, save_results(first, out / "first"), second, \
        save_results(second, out / "second")


def test_dciodvfy_and_pixelmed_find_no_error_in_seg_sr_and_overlay(written) -> None:
    vol, segments, first, paths, second, paths2 = written
    seg, sr, overlay, sr2 = paths[0], paths[1], paths[2], paths2[1]
    for p in (seg, sr, overlay, sr2):
        assert _dciodvfy(p) == [], p.name
    for p in (sr, sr2):
        out = _pixelmed("DicomSRValidator", p)
        assert "Found Root Template TID_1500 (MeasurementReport)" in out
        assert [ln for ln in out if ln.startswith("Error")] == [], p.name
    out = _pixelmed("DicomInstanceValidator", seg)
    assert "Found Segmentation IOD" in out and [ln for ln in out if "Error" in ln] == []
    # This PixelMed (2022) has IOD rules for a few multi-frame IODs only; for Secondary
    # Capture it says so and reports nothing else, which is checked here as it is.
    out = _pixelmed("DicomInstanceValidator", overlay)
    assert [ln for ln in out if "Error" in ln] == []
    assert out == ["IOD (SOP Class) unrecognized"]


def test_every_object_names_the_algorithm_as_ihe_air_wants(written) -> None:
    vol, segments, first, paths, *_ = written
    for p in paths:
        ds = pydicom.dcmread(p)
        items = [e for e in ds.ContributingEquipmentSequence
                 if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
        assert len(items) == 1, p.name
        (alg,) = items
        code = alg.PurposeOfReferenceCodeSequence[0]
        assert (code.CodingSchemeDesignator, code.CodeMeaning) == ("99IHE", "Processing Algorithm")
        assert alg.Manufacturer == NODE_MANUFACTURER
        assert alg.ManufacturerModelName == "spleen-ct"  # the task
        assert alg.SoftwareVersions == MODEL.version
        assert alg.DeviceUID == DEVICE_UID
    seg = hd.seg.segread(paths[0])
    for n in seg.segment_numbers:
        item = seg.get_segment_description(n).algorithm_identification[0]
        assert (item.AlgorithmName, item.AlgorithmVersion) == (MODEL.name, MODEL.version)
        assert item.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert all(r.ok and "dciodvfy" in r.checked_with for r in validate_results(first))


def test_sr_reads_back_volumes_in_ucum_referencing_seg_segments_and_its_predecessor(written) -> None:
    vol, segments, first, paths, second, paths2 = written
    seg = pydicom.dcmread(paths[0])
    sr = hd.sr.srread(paths[1])
    procedure = sr.content[0].ContentSequence.find(codes.DCM.ProcedureReported)[0].value
    # the imaging procedure of the source study (CT), not the algorithm
    assert procedure == hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    kept = [s for s in segments if not s.is_empty]
    assert len(groups) == len(kept) == len(seg.SegmentSequence)
    for number, (group, s) in enumerate(zip(groups, kept, strict=True), start=1):
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert list(ref.referenced_segment_numbers) == [number]
        assert seg.SegmentSequence[number - 1].SegmentLabel == s.name
        (m,) = group.get_measurements(name=VOLUME)
        assert m.unit == MILLILITER and (m.unit.value, m.unit.scheme_designator) == ("mL", "UCUM")
        assert m.value == pytest.approx(s.volume_ml, abs=1e-3)
        assert s.volume_ml == pytest.approx(int(s.mask.sum()) * vol.voxel_volume_ml)
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    uids = [i.value for i in observer.observer_identifying_attributes
            if i.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer UID"]
    assert uids == [DEVICE_UID]
    assert "PredecessorDocumentsSequence" not in sr
    sr2 = pydicom.dcmread(paths2[1])
    (study,) = sr2.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.sr.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence] == \
        [first.sr.SOPInstanceUID]


def test_python_validation_names_what_is_missing(written) -> None:
    vol, segments, first, *_ = written
    broken = copy.deepcopy(first.sr)  # Dataset.copy shares the elements: the fixture's SR would change
    items = [e for e in broken.ContributingEquipmentSequence
             if e.PurposeOfReferenceCodeSequence[0].CodeValue != PROCESSING_ALGORITHM.value]
    broken.ContributingEquipmentSequence = items
    report = validate_dataset(broken, "sr", dciodvfy=False)
    assert not report.ok and report.checked_with == ("python",)
    assert "Processing Algorithm" in report.reason
    seg = copy.deepcopy(first.seg)
    del seg.StudyDate
    report = validate_dataset(seg, "seg")
    assert "python: StudyDate is missing" in report.errors
    assert any(e.startswith("dciodvfy:") and "<StudyDate>" in e for e in report.errors)
    assert not validate_dataset(first.overlay[0], "seg", dciodvfy=False).ok  # wrong kind


def test_an_sr_of_another_template_is_reported_as_such(written) -> None:
    """Not TID 1500: the report says so, not that highdicom cannot read it (found by mypy:
    only a TID 1500 document's content has measurement groups)."""
    _vol, _segments, first, *_ = written
    other = copy.deepcopy(first.sr)
    other.ContentTemplateSequence[0].TemplateIdentifier = "2000"
    report = validate_dataset(other, "sr", dciodvfy=False)
    assert report.errors == ("python: SR content template is ['2000'], expected TID 1500",)


def test_a_new_model_version_gets_a_new_device_uid_in_its_outputs(written, tmp_path: Path) -> None:
    vol, segments, *_ = written
    bundle = spleen_bundle(tmp_path / "bundle")
    with Registry(tmp_path / "data") as reg:
        v1 = reg.import_bundle(bundle, task="spleen-ct")
        v2 = reg.import_bundle(bundle, task="spleen-ct")  # the same files, a new version
        assert v1.version != v2.version and v1.device_uid != v2.device_uid
        assert reg.get(v1.version).device_uid == v1.device_uid  # recorded, stable
    uids = []
    for mv in (v1, v2):
        info = ModelInfo(name=mv.bundle_name or mv.task, version=mv.version, task=mv.task,
                         device_uid=mv.device_uid)
        results = write_results(vol, segments, info)
        found = {str(e.DeviceUID) for ds in results.all() for e in ds.ContributingEquipmentSequence
                 if "DeviceUID" in e}
        assert found == {mv.device_uid}
        uids.append(mv.device_uid)
    assert uids[0] != uids[1]


def test_overlay_series_check_runs_dciodvfy_on_the_first_image_and_python_on_each(written) -> None:
    _, _, first, *_ = written
    images = list(first.overlay)
    reports = validate_series(images, "overlay")
    assert [r.sop_instance_uid for r in reports] == [str(ds.SOPInstanceUID) for ds in images]
    assert all(r.ok for r in reports)
    assert reports[0].checked_with == ("python", "dciodvfy")
    assert all(r.checked_with == ("python", "dciodvfy (first instance)") for r in reports[1:])
    # a structural error dciodvfy finds in the first image holds every image back
    broken = [copy.deepcopy(ds) for ds in images]  # the fixture is shared
    del broken[0].StudyDate
    reports = validate_series(broken, "overlay")
    assert not any(r.ok for r in reports)
    assert all(any(e.startswith("dciodvfy:") and "<StudyDate>" in e for e in r.errors)
               for r in reports)
    # a Python-check error in a later image holds that image back
    broken = [copy.deepcopy(ds) for ds in images]  # the fixture is shared
    broken[-1].BurnedInAnnotation = "NO"
    reports = validate_series(broken, "overlay")
    assert [r.ok for r in reports] == [True] * (len(images) - 1) + [False]


def test_sr_outlines_each_organ_on_its_largest_slice_for_viewers_that_draw(written) -> None:
    """OHIF draws SR measurements from SCOORDs only; each segment has a TID 1410 group with
    its Tracking UID, outlining the organ where it is largest, on that source image."""
    vol, segments, first, paths, *_ = written
    sr = hd.sr.srread(paths[1])
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    kept = [s for s in segments if not s.is_empty]
    assert len(planar) == len(volumetric) == len(kept)
    by_uid = {str(g.tracking_uid): g for g in planar}
    uids = {str(vol.source_images[n].SOPInstanceUID): n for n in range(len(vol.source_images))}
    for group, s in zip(volumetric, kept, strict=True):
        outline = by_uid[str(group.tracking_uid)]
        region = outline.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        n = uids[region.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                 if "ReferencedSOPSequence" in region else
                 region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
        sizes = s.mask.reshape(s.mask.shape[0], -1).sum(axis=1)
        assert sizes[n] == sizes.max()  # the slice where the organ is largest
        pts = region.value
        assert np.allclose(pts[0], pts[-1]) and len(pts) >= 4
        drawn = _inside(pts, vol.shape[1], vol.shape[2])
        labels, _ = ndimage.label(s.mask[n])
        truth = labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])
        # pixel centres inside the outline: exactly the organ's (largest region's) pixels
        assert np.array_equal(drawn, ndimage.binary_fill_holes(truth))
        (area,) = outline.get_measurements(name=codes.SCT.Area)
        spacing = vol.spacing_mm[1] * vol.spacing_mm[2]
        assert float(area.value) == pytest.approx(truth.sum() * spacing, rel=0.2)
        assert area.unit == codes.UCUM.SquareMillimeter


def _inside(poly: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Even-odd test of every pixel centre (column + 0.5, row + 0.5) against ``poly``."""
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    inside = np.zeros((rows, cols), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly[:-1], poly[1:], strict=True):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside
