"""``models optimize``: the optimised artifacts of a model version, each checked
against PyTorch.

:func:`optimize` exports the version's network to ONNX with a dynamic batch axis,
runs PyTorch and every available backend on the same sliding-window batch, and records
for each the largest absolute logit difference, the argmax agreement and the median
time of one batch (:mod:`pipelines.export.checks`). Only backends that pass are
*verified*; serving picks the fastest verified one (:func:`pipelines.inference.load_model`).
The files and their records stay with the registry: it says where each file goes
(:meth:`registry.store.Registry.write_artifact_file`) and keeps its row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from dicom_node.foundation.clock import utc_now
from pipelines.export.checks import check_input, time_batches, verdict
from pipelines.export.onnx import ONNX_OPSET, OnnxRunner, export_onnx
from pipelines.export.tensorrt import (
    TensorRTRunner,
    TensorRTStatus,
    build_engine,
    engine_key,
    tensorrt_status,
)
from registry.bundle import OpenBundle, open_bundle
from registry.records import Artifact, ArtifactKind, Backend, Verification
from registry.store import Registry

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizeReport:
    """What :func:`optimize` built and measured.

    Parameters
    ----------
    version : str
    onnx_path : pathlib.Path
    checks : tuple of Verification
        One per backend run (PyTorch reference first).
    tensorrt : str
        What happened with TensorRT, in words (``TensorRT not available: ...;
        keeping ONNX`` where it is absent).
    """

    version: str
    onnx_path: Path
    checks: tuple[Verification, ...]
    tensorrt: str

    @property
    def onnx_verified(self) -> bool:
        """Whether ONNX Runtime (CPU) agreed with PyTorch."""
        return any(c.backend is Backend.ORT_CPU and c.verified for c in self.checks)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckBatch:
    """The one batch every backend runs in a check.

    Parameters
    ----------
    x : torch.Tensor
        The input (N, C, X, Y, Z) on the CPU (:func:`pipelines.export.checks.check_input`).
    out_channels : int
        Output channels of the network (labels + background).
    repeats : int
        Timed runs per backend.
    """

    x: torch.Tensor
    out_channels: int
    repeats: int

    @property
    def size(self) -> int:
        """Batch size N."""
        return int(self.x.shape[0])

    @property
    def patch(self) -> tuple[int, ...]:
        """One patch's shape (C, X, Y, Z)."""
        return tuple(int(s) for s in self.x.shape[1:])


class _Checks:
    """The checks of one version, recorded in the registry as they are made."""

    def __init__(self, registry: Registry, version: str, batch: CheckBatch) -> None:
        self.registry = registry
        self.version = version
        self.batch = batch
        self.reference: np.ndarray | None = None
        self.done: list[Verification] = []

    def record(self, backend: Backend, y: np.ndarray, ms: float, *, fp16: bool = False,
               extra: str = "") -> Verification:
        """Check ``y`` against the reference (the first output recorded) and keep it."""
        if self.reference is None:
            self.reference = y
        v = verdict(self.reference, y, version=self.version, backend=backend,
                    shape=tuple(self.batch.x.shape), median_ms=ms, measured_at=utc_now(),
                    fp16=fp16, extra=extra)
        self.registry.record_verification(v)
        self.done.append(v)
        LOG.info("%s %s on %s: max abs diff %.3g, argmax agreement %.6f, %.1f ms/batch -> %s",
                 self.version, backend.value, v.device_name, v.max_abs_diff, v.argmax_agreement,
                 ms, "verified" if v.verified else "NOT verified")
        return v


def optimize(registry: Registry, version: str, *, repeats: int = 3,
             batch: int | None = None) -> OptimizeReport:
    """Build and check the optimised artifacts of a version.

    Exports ONNX (dynamic batch) and checks ONNX Runtime CPU, and where present
    PyTorch CUDA, ONNX Runtime CUDA and a TensorRT FP16 engine, against PyTorch CPU
    on one sliding-window batch; records artifacts and checks in the registry.

    Parameters
    ----------
    registry : Registry
    version : str
    repeats : int
        Timed runs per backend (median reported), after one warm-up.
    batch : int, optional
        Batch size of the check (default: the bundle's ``sw_batch_size``).

    Returns
    -------
    OptimizeReport

    Raises
    ------
    VersionNotFoundError, BundleError, ExportError
    """
    bundle = open_bundle(registry.get(version).path)
    info = bundle.info
    cb = CheckBatch(x=check_input(batch or info.sw_batch_size, (info.in_channels, *info.roi_size)),
                    out_channels=len(info.labels) + 1, repeats=repeats)
    checks = _Checks(registry, version, cb)
    _check_pytorch_cpu(checks, bundle)
    onnx = _export_onnx_artifact(registry, version, bundle, cb)
    _check_onnx_cpu(checks, onnx.path)
    if torch.cuda.is_available():
        _check_cuda(checks, bundle, onnx.path)
    message = _tensorrt_engine(checks, onnx)
    return OptimizeReport(version=version, onnx_path=onnx.path, checks=tuple(checks.done),
                          tensorrt=message)


def _check_pytorch_cpu(checks: _Checks, bundle: OpenBundle) -> Verification:
    """The reference: PyTorch on the CPU (its output is what the others must match)."""
    net = bundle.network("cpu")
    x = checks.batch.x
    with torch.no_grad():
        ref = net(x).numpy()
        ms = time_batches(lambda: net(x), repeats=checks.batch.repeats)
    return checks.record(Backend.TORCH_CPU, ref, ms, extra="reference")


def _export_onnx_artifact(registry: Registry, version: str, bundle: OpenBundle,
                         cb: CheckBatch) -> Artifact:
    """Export the network to ONNX into its place in the registry and register it.

    Raises
    ------
    ExportError
        If the export or the ONNX checker fails (nothing is registered).
    """
    net = bundle.network("cpu")
    path = registry.write_artifact_file(
        version, ArtifactKind.ONNX,
        lambda tmp: export_onnx(net, tmp, example=cb.x, version=version))
    return registry.record_artifact(
        version, ArtifactKind.ONNX, path,
        detail=f"opset {ONNX_OPSET}, dynamic batch, torch {torch.__version__}")


def _check_onnx_cpu(checks: _Checks, onnx_path: Path) -> Verification:
    """ONNX Runtime on the CPU against the reference."""
    runner = OnnxRunner(onnx_path, out_channels=checks.batch.out_channels)
    x = checks.batch.x
    y = runner(x).numpy()
    return checks.record(Backend.ORT_CPU, y,
                         time_batches(lambda: runner(x), repeats=checks.batch.repeats),
                         extra=f"onnxruntime {ort.__version__}")


def _check_cuda(checks: _Checks, bundle: OpenBundle, onnx_path: Path) -> None:
    """PyTorch CUDA, and ONNX Runtime CUDA where its provider is present, against the
    reference (the network goes back to the CPU afterwards)."""
    xc = checks.batch.x.cuda()
    repeats = checks.batch.repeats
    net_c = bundle.network("cuda")
    with torch.no_grad():
        y = net_c(xc).cpu().numpy()
        ms = time_batches(lambda: net_c(xc), repeats=repeats, cuda=True)
    checks.record(Backend.TORCH_CUDA, y, ms)
    bundle.network("cpu")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        runner_c = OnnxRunner(onnx_path, cuda=True, out_channels=checks.batch.out_channels)
        y = runner_c(xc).cpu().numpy()
        checks.record(Backend.ORT_CUDA, y, time_batches(lambda: runner_c(xc), repeats=repeats,
                                                        cuda=True))


def _tensorrt_engine(checks: _Checks, onnx: Artifact) -> str:
    """Build (or reuse) the TensorRT FP16 engine of the ONNX export, check it against
    the reference and register it; what happened, in words.

    Where TensorRT or a GPU is absent, or the engine fails, nothing is registered and
    the ONNX export stays what serves.
    """
    version = checks.version
    status = tensorrt_status()
    if not status.available:
        message = f"TensorRT not available: {status.reason}; keeping ONNX"
        LOG.warning("%s: %s", version, message)
        return message
    cb = checks.batch
    key = engine_key(gpu_name=status.gpu_name, trt_version=status.version,
                     onnx_sha256=onnx.sha256, min_batch=1, opt_batch=cb.size,
                     max_batch=cb.size, patch_shape=cb.patch)
    try:
        plan, cached = _engine_plan(checks.registry, version, onnx.path, key, cb)
        y, ms = _run_engine(plan, cb)
    except RuntimeError as exc:
        message = f"TensorRT engine failed: {exc}; keeping ONNX"
        LOG.warning("%s: %s", version, message)
        return message
    detail = _engine_detail(status, onnx.sha256, cb)
    checks.registry.record_artifact(version, ArtifactKind.TENSORRT, plan, detail=detail, key=key)
    v = checks.record(Backend.TENSORRT, y, ms, fp16=True, extra=detail)
    return (f"TensorRT {status.version} engine {'reused from cache' if cached else 'built'}"
            f" ({plan.name}); {'verified' if v.verified else 'NOT verified; keeping ONNX'}")


def _engine_plan(registry: Registry, version: str, onnx_path: Path, key: str,
                 cb: CheckBatch) -> tuple[Path, bool]:
    """The engine file of ``key`` in the registry's place, built unless it is there;
    and whether it was there (cached)."""
    plan = registry.artifact_path(version, ArtifactKind.TENSORRT, key)
    if plan.is_file():
        return plan, True
    registry.write_artifact_file(
        version, ArtifactKind.TENSORRT,
        lambda tmp: build_engine(onnx_path, tmp, patch_shape=cb.patch, max_batch=cb.size,
                                 opt_batch=cb.size),
        key=key)
    return plan, False


def _run_engine(plan: Path, cb: CheckBatch) -> tuple[np.ndarray, float]:
    """The engine's output on the check batch and its median time per batch (ms)."""
    runner = TensorRTRunner(plan)
    xc = cb.x.cuda()
    y = runner(xc).cpu().numpy()
    return y, time_batches(lambda: runner(xc), repeats=cb.repeats, cuda=True)


def _engine_detail(status: TensorRTStatus, onnx_sha256: str, cb: CheckBatch) -> str:
    return (f"TensorRT {status.version} fp16 on {status.gpu_name}; ONNX sha256 "
            f"{onnx_sha256[:16]}; batch 1..{cb.size}; patch {cb.patch}")
