"""``dicom-node infer INPUT_DIR --out OUT_DIR``: a folder of DICOM files through the
pipeline without a PACS, through the real command-line entry point.

The Model Zoo spleen bundle (its real configs, randomly initialised weights saved as
``models/model.pt``) imports and runs end to end; a random network may find nothing, in
which case nothing may be written and the command must say so. The shipped demo model
must find the spleen and write a SEG and an SR that validate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.cli import main
from loop_helpers import (
    dciodvfy_errors,
    install_model,
    seg_dice_against_truth,
    small_study,
    write_files,
)
from pipelines import phantom as ph
from registry_bundles import spleen_bundle


def infer(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> tuple[int, str, str]:
    rc = main(["--data-dir", str(data), "infer", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated abdominal CT series (128 x 128 x 40) plus a file that is not DICOM."""
    folder = tmp_path_factory.mktemp("ct")
    write_files(small_study("INFER-1", seed=5), folder / "series")
    (folder / "README.txt").write_text("not DICOM\n")
    return folder


@pytest.fixture(scope="module")
def small_ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small field of view around the spleen (64 x 64 x 20, 3 x 3 x 5 mm): quick to run."""
    folder = tmp_path_factory.mktemp("small")
    g = ph.SliceGeometry(rows=64, columns=64, slices=20, pixel_spacing=(3.0, 3.0),
                         slice_spacing=5.0, centre=(80.0, 30.0, 40.0))
    write_files(ph.ct_series(ph.Anatomy.random(2), g, ph.StudyInfo(patient_id="INFER-S")),
                folder / "series")
    return folder


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose active spleen-ct model is the Model Zoo spleen bundle with
    random weights, imported with ``dicom-node models import``."""
    root = tmp_path_factory.mktemp("zoo")
    bundle = spleen_bundle(root / "spleen_ct_segmentation", seed=1)
    assert main(["--data-dir", str(root / "data"), "models", "import", str(bundle), "--task",
                 "spleen-ct", "--activate"]) == 0
    return root / "data"


def _check_written(report: dict, out: Path) -> hd.seg.Segmentation:
    """The files of a written series exist, validate, and the SEG reads back."""
    files = [Path(f) for f in report["files"]]
    assert all(f.parent == out and f.is_file() for f in files)
    assert len(files) >= 3  # SEG, SR, overlay images
    assert [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files[:2]] == ["SEG", "SR"]
    for f in files[:3]:
        assert dciodvfy_errors(f) == [], f"{f.name} fails dciodvfy"
    seg = hd.seg.segread(files[0])
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["spleen"]
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == report["series_uid"]
    assert set(report["timings"]) == {"load_s", "preprocess_s", "inference_s", "postprocess_s",
                                      "write_s"}
    return seg


def test_model_zoo_spleen_bundle_with_random_weights_imports_and_runs_end_to_end(
        tmp_path: Path, zoo_data: Path, small_ct_dir: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    out = tmp_path / "out"
    rc, text, err = infer(capsys, zoo_data, str(small_ct_dir), "--out", str(out), "--json")
    assert rc == 0, err
    [report] = json.loads(text)
    assert report["task"] == "spleen-ct" and report["model_version"] == "spleen-ct-v1"
    assert report["backend"] == "pytorch-cpu" and report["instances"] == 20
    # A random network decides at random: either it marks something (then everything
    # written must be valid) or it marks nothing (then nothing is written, and it says so).
    if report["status"] == "nothing-found":
        assert report["reason"].startswith("no segment found, nothing written")
        assert not out.exists() or not any(out.iterdir())
    else:
        assert report["status"] == "written"
        _check_written(report, out)
    # The human-readable form says the same, with the stage timings.
    rc, text, _ = infer(capsys, zoo_data, str(small_ct_dir), "--out", str(tmp_path / "out2"),
                        "--no-overlay")
    assert rc == 0
    assert "task spleen-ct, model spleen-ct-v1 on pytorch-cpu" in text
    assert ("no segment found" in text) if report["status"] == "nothing-found" else (
        "stages: load" in text and "spleen:" in text and "overlay" not in text)


def test_demo_model_writes_seg_and_sr_that_match_the_phantom(
        tmp_path: Path, ct_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    version = install_model(data)
    rc, text, err = infer(capsys, data, str(ct_dir), "--out", str(out), "--json",
                          "--version", version)
    assert rc == 0, err
    [report] = json.loads(text)
    assert report["status"] == "written" and report["model_version"] == version
    seg = _check_written(report, out)
    # The SEG's voxels lie on the phantom's spleen (truth in patient coordinates).
    sources = [pydicom.dcmread(p) for p in sorted((ct_dir / "series").iterdir())]
    dice = seg_dice_against_truth(Path(report["files"][0]), sources, ph.Anatomy.random(5))
    assert dice >= 0.8, f"Dice {dice:.3f} of the demo model's SEG against the phantom's spleen"
    assert seg.number_of_segments == 1
    [measured] = report["segments"]
    assert measured["name"] == "spleen" and measured["volume_ml"] > 0


def test_folder_with_a_study_no_pipeline_takes_and_one_it_takes(
        tmp_path: Path, zoo_data: Path, small_ct_dir: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    data = zoo_data
    mixed = tmp_path / "mixed"
    write_files(small_study("INFER-MR", modality="MR", slices=20), mixed / "mr")
    rc, text, err = infer(capsys, data, str(mixed), "--out", str(tmp_path / "out"))
    assert rc == 2 and text == ""
    assert "no series in" in err and "is selected by a pipeline" in err
    assert "modality" in err and "MR" in err
    shutil.copytree(small_ct_dir / "series", mixed / "ct")
    rc, text, err = infer(capsys, data, str(mixed), "--out", str(tmp_path / "out"), "--json")
    assert rc == 0, err
    by_status = {r["status"]: r for r in json.loads(text)}
    assert by_status.keys() - {"written", "nothing-found"} == {"not-selected"}
    assert len(by_status) == 2 and by_status.get("written", by_status.get("nothing-found"))[
        "modality"] == "CT"
    assert by_status["not-selected"]["modality"] == "MR" and "modality" in by_status[
        "not-selected"]["reason"]


def test_clear_errors_no_dicom_no_model_unknown_version(
        tmp_path: Path, small_ct_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here\n")
    rc, _, err = infer(capsys, tmp_path / "data", str(empty), "--out", str(tmp_path / "out"))
    assert rc == 2 and "no DICOM files in" in err and "1 file(s) looked at, 1 not DICOM" in err
    rc, _, err = infer(capsys, tmp_path / "data", str(tmp_path / "missing"), "--out", "x")
    assert rc == 2 and "is neither a folder nor a file" in err
    rc, _, err = infer(capsys, tmp_path / "data", str(small_ct_dir), "--out", str(tmp_path / "out"))
    assert rc == 2
    assert "no active model for task 'spleen-ct'" in err
    assert "dicom-node models import BUNDLE_DIR --task spleen-ct --activate" in err
    assert "holds no model version at all" in err
    rc, _, err = infer(capsys, tmp_path / "data", str(small_ct_dir), "--out",
                       str(tmp_path / "out"), "--version", "spleen-ct-v9")
    assert rc == 2 and "model version 'spleen-ct-v9' is not registered" in err
    assert not (tmp_path / "out").exists()
