"""ONNX export agrees with PyTorch; TensorRT absent is said, not pretended; serving
picks the fastest verified artifact and never an unverified or altered one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.export.checks import compare, verdict
from pipelines.export.optimize import optimize
from pipelines.export.tensorrt import tensorrt_status
from pipelines.backends import choose_backend
from pipelines.inference import load_model
from dicom_node.foundation.clock import utc_now
from registry.records import ArtifactKind, Backend
from registry.store import Registry
from registry_bundles import phantom_volume, spleen_bundle
from pipelines import phantom as ph


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, object]:
    root = tmp_path_factory.mktemp("exp")
    reg = Registry(root / "data")
    mv = reg.import_bundle(spleen_bundle(root / "spleen"), task="spleen-ct", activate=True, by="t")
    return reg, optimize(reg, mv.version, repeats=2)


def test_onnx_export_agrees_with_pytorch(optimized: tuple[Registry, object]) -> None:
    reg, report = optimized
    assert report.onnx_path.is_file() and report.onnx_path.name == "model.onnx"
    by = {c.backend: c for c in report.checks}
    ort_check = by[Backend.ORT_CPU]
    print(f"ONNX Runtime CPU vs PyTorch on {ort_check.shape}: max abs diff "
          f"{ort_check.max_abs_diff:.3g}, argmax agreement {ort_check.argmax_agreement:.6f}, "
          f"{ort_check.median_ms:.0f} ms vs PyTorch {by[Backend.TORCH_CPU].median_ms:.0f} ms per batch")
    assert ort_check.verified and report.onnx_verified
    assert ort_check.max_abs_diff < 1e-3 and ort_check.argmax_agreement >= 0.999
    assert ort_check.shape == (4, 1, 96, 96, 96)
    kinds = [a.kind for a in reg.artifacts("spleen-ct-v1")]
    assert kinds == [ArtifactKind.PYTORCH, ArtifactKind.ONNX]
    # dynamic batch: the sliding window's last batch may be smaller
    import onnx
    dim0 = onnx.load(str(report.onnx_path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    assert len(reg.verifications("spleen-ct-v1")) == 2


def test_without_tensorrt_optimize_says_so_and_keeps_onnx(optimized: tuple[Registry, object]) -> None:
    reg, report = optimized
    status = tensorrt_status()
    if status.available:  # a GPU host with TensorRT: the engine path ran instead
        assert report.tensorrt.startswith("TensorRT ")
        return
    assert report.tensorrt == f"TensorRT not available: {status.reason}; keeping ONNX"
    assert "tensorrt" in status.reason
    assert ArtifactKind.TENSORRT not in [a.kind for a in reg.artifacts("spleen-ct-v1")]


def test_serving_picks_fastest_verified_and_skips_altered_artifacts(
        optimized: tuple[Registry, object]) -> None:
    reg, report = optimized
    mv = reg.get("spleen-ct-v1")
    times = {c.backend: c.median_ms for c in report.checks}
    chosen, why = choose_backend(mv, reg)
    assert chosen is min((Backend.TORCH_CPU, Backend.ORT_CPU), key=lambda b: times[b])
    assert "fastest verified" in why
    # the ONNX backend segments like PyTorch on a phantom
    g = ph.SliceGeometry(rows=48, columns=48, slices=16, pixel_spacing=(5.0, 5.0), slice_spacing=8.0)
    hu, affine, _ = phantom_volume(g)
    a = load_model(mv, registry=reg, backend="pytorch-cpu").segment(hu, affine)
    b = load_model(mv, registry=reg, backend="onnxruntime-cpu").segment(hu, affine)
    assert b.backend is Backend.ORT_CPU and np.mean(a.labels == b.labels) > 0.999
    # an altered ONNX file (hash mismatch) is never served
    onnx_path = report.onnx_path
    saved = onnx_path.read_bytes()
    try:
        onnx_path.write_bytes(saved + b"\0")
        assert choose_backend(mv, reg)[0] is Backend.TORCH_CPU
    finally:
        onnx_path.write_bytes(saved)


def test_compare_reports_diff_and_agreement() -> None:
    ref = np.zeros((1, 2, 2, 2, 1), np.float32)
    ref[0, 1, 0] = 1.0
    cand = ref.copy()
    cand[0, 1, 0, 0, 0] = -0.5
    a = compare(ref, cand)
    assert a.max_abs_diff == pytest.approx(1.5) and a.argmax_agreement == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes differ"):
        compare(ref, ref[:, :1])


def test_unverified_backend_is_not_served(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "data")
    mv = reg.import_bundle(spleen_bundle(tmp_path / "s"), task="spleen-ct", by="t")
    report = optimize(reg, mv.version, repeats=1)
    from dataclasses import replace
    bad = replace(next(c for c in report.checks if c.backend is Backend.ORT_CPU),
                  verified=False, median_ms=0.001)
    reg.record_verification(bad)
    assert choose_backend(mv, reg)[0] is Backend.TORCH_CPU


def test_verdict_holds_fp32_backends_tight_and_fp16_engines_looser() -> None:
    ref = np.zeros((1, 2, 4, 4, 4), np.float32)
    ref[:, 1] = 10.0  # logit range 10: FP32 within 0.01, FP16 within 0.5
    off = ref + np.float32(0.2)
    common = dict(version="spleen-ct-v1", shape=(1, 1, 4, 4, 4), median_ms=1.0,
                  measured_at=utc_now())
    fp32 = verdict(ref, off, backend=Backend.ORT_CPU, **common)
    assert not fp32.verified and fp32.detail.startswith("max abs diff <= 0.01 and argmax")
    assert fp32.max_abs_diff == pytest.approx(0.2) and fp32.argmax_agreement == 1.0
    fp16 = verdict(ref, off, backend=Backend.TENSORRT, fp16=True, extra="engine", **common)
    assert fp16.verified and fp16.detail.endswith("argmax agreement >= 0.99; engine")
    close = ref.copy()
    close[0, 0, 0, 0, 0] = 9.9  # a voxel where the two channels are close ...
    flipped = close.copy()
    flipped[0, 0, 0, 0, 0] = 10.2  # ... flips within the FP16 tolerance: 63 of 64 agree < 99%
    v = verdict(close, flipped, backend=Backend.TENSORRT, fp16=True, **common)
    assert v.max_abs_diff == pytest.approx(0.3) and v.argmax_agreement == pytest.approx(63 / 64)
    assert not v.verified
