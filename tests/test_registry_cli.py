"""``dicom-node models ...`` through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from registry_bundles import spleen_bundle


def run(capsys: pytest.CaptureFixture[str], data: Path, *argv: str) -> tuple[int, str, str]:
    rc = main(["--data-dir", str(data), "models", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_models_cli_import_list_show_promote_rollback_retire(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    bundle = spleen_bundle(tmp_path / "spleen_ct_segmentation")
    rc, out, _ = run(capsys, data, "list")
    assert rc == 0 and "no model versions" in out
    rc, out, _ = run(capsys, data, "import", str(bundle), "--task", "spleen-ct", "--activate",
                     "--by", "alice")
    assert rc == 0 and out.startswith("imported spleen-ct-v1 (active, scope all scanners)")
    rc, out, _ = run(capsys, data, "import", str(bundle), "--task", "spleen-ct",
                     "--manufacturer", "GE MEDICAL SYSTEMS", "--scanner-model", "HiSpeed Dual")
    assert rc == 0 and "spleen-ct-v2 (candidate, scope GE MEDICAL SYSTEMS / HiSpeed Dual)" in out
    rc, out, _ = run(capsys, data, "import", str(bundle), "--task", "spleen-ct", "--by", "alice")
    rc, out, _ = run(capsys, data, "promote", "spleen-ct-v3", "--by", "bob", "--reason", "better")
    assert rc == 0 and "spleen-ct-v3 is now active for spleen-ct (all scanners)" in out
    rc, out, _ = run(capsys, data, "list", "--json")
    rows = {r["version"]: r for r in json.loads(out)}
    assert {v: r["status"] for v, r in rows.items()} == {
        "spleen-ct-v1": "retired", "spleen-ct-v2": "candidate", "spleen-ct-v3": "active"}
    assert rows["spleen-ct-v1"]["labels"][0]["code"]["value"] == "78961009"
    assert rows["spleen-ct-v1"]["serving_backend"] == "pytorch-cpu"
    rc, out, _ = run(capsys, data, "rollback", "spleen-ct", "--by", "carol", "--reason", "regression")
    assert rc == 0 and "spleen-ct-v1 is active again" in out
    rc, out, _ = run(capsys, data, "show", "spleen-ct-v1")
    assert rc == 0 and "label 1       spleen (SCT 78961009 'Spleen')" in out
    assert "rollback  spleen-ct-v1 (prev spleen-ct-v3) by carol: regression" in out
    assert "CT, spacing 1.5 x 1.5 x 2 mm, intensity HU [-57, 164] -> [0, 1] clipped" in out
    rc, out, _ = run(capsys, data, "show", "spleen-ct-v1", "--json")
    shown = json.loads(out)
    # entries that name it as the version or as the one it replaced
    assert [a["action"] for a in shown["audit"]] == ["import", "promote", "supersede", "promote",
                                                     "rollback"]
    assert shown["artifacts"][0]["kind"] == "pytorch"
    rc, out, _ = run(capsys, data, "retire", "spleen-ct-v2", "--reason", "not needed")
    assert rc == 0 and "spleen-ct-v2 retired" in out
    rc, out, err = run(capsys, data, "promote", "spleen-ct-v9")
    assert rc == 1 and "model version 'spleen-ct-v9' is not registered" in err


def test_models_cli_refuses_broken_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = spleen_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    rc, _, err = run(capsys, tmp_path / "data", "import", str(bundle), "--task", "spleen-ct")
    assert rc == 1 and "models/model.pt: missing weights" in err


def test_models_cli_optimize_and_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    run(capsys, data, "import", str(spleen_bundle(tmp_path / "b")), "--task", "spleen-ct",
        "--activate")
    rc, out, _ = run(capsys, data, "optimize", "spleen-ct-v1", "--repeats", "1")
    assert rc == 0
    assert "onnxruntime-cpu" in out and "verified" in out and "argmax agreement" in out
    assert ("TensorRT not available: " in out and out.rstrip().endswith("; keeping ONNX")) \
        or "TensorRT " in out
    rc, out, _ = run(capsys, data, "benchmark", "spleen-ct-v1", "--size", "96", "96", "64",
                     "--repeats", "1", "--warmup", "0", "--no-compile", "--json")
    assert rc == 0
    result = json.loads(out)
    assert tuple(result["model_grid"]) == (96, 96, 64)
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["pytorch-eager"]["ratio_to_eager"] == 1.0
    assert rows["onnxruntime-cpu"]["median_ms"] > 0
    assert rows["onnxruntime-cpu"]["argmax_agreement"] > 0.999
    assert rows["tensorrt"]["median_ms"] is None or rows["tensorrt"]["median_ms"] > 0
