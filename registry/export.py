"""Optimised artifacts of a model version: ONNX export, TensorRT engines, and their
checks against PyTorch.

:func:`optimize` exports the version's network to ONNX with a dynamic batch axis,
runs PyTorch and every available backend on the same sliding-window batch, and records
for each the largest absolute logit difference, the argmax agreement and the median
time of one batch. Only backends that pass are *verified*; serving picks the fastest
verified one (:func:`pipelines.inference.load_model`).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dicom_node.database import utc_now
from registry.bundle import open_bundle
from registry.errors import ExportError
from registry.records import Artifact, ArtifactKind, Backend, Verification
from registry.store import Registry, sha256_file
from registry.tensorrt import (
    INPUT_NAME,
    OUTPUT_NAME,
    TensorRTRunner,
    build_engine,
    engine_key,
    tensorrt_status,
)

LOG = logging.getLogger(__name__)

ONNX_OPSET = 17
#: FP32 backends must match PyTorch to this (times max(1, max |logit|)) ...
FP32_ATOL = 1e-3
#: ... and agree on the argmax of at least this fraction of voxels.
FP32_MIN_AGREEMENT = 0.999
#: FP16 engines (TensorRT): looser, relative to the logit range.
FP16_RTOL = 5e-2
FP16_MIN_AGREEMENT = 0.99

Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class Agreement:
    """How closely a backend's logits follow PyTorch's on the same input.

    Parameters
    ----------
    max_abs_diff : float
        Largest absolute difference of any logit.
    argmax_agreement : float
        Fraction of voxels with the same argmax channel, in [0, 1].
    """

    max_abs_diff: float
    argmax_agreement: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.argmax_agreement <= 1.0:
            raise ValueError(f"argmax_agreement must be in [0, 1], got {self.argmax_agreement}")


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


def compare(reference: np.ndarray, candidate: np.ndarray) -> Agreement:
    """Max abs difference and argmax agreement (over axis 1, channels) of two outputs.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    diff = float(np.max(np.abs(reference.astype(np.float64) - candidate.astype(np.float64))))
    agree = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return Agreement(max_abs_diff=diff, argmax_agreement=agree)


def cuda_device_name() -> str:
    """CUDA device 0's name, '' without a GPU."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def device_name(backend: Backend | str) -> str:
    """The device a backend runs on here: ``cpu`` or the GPU's name."""
    return cuda_device_name() if Backend(backend).needs_cuda else "cpu"


def available_backends() -> tuple[Backend, ...]:
    """The backends this host can run (libraries and devices present)."""
    out = [Backend.TORCH_CPU, Backend.ORT_CPU]
    if torch.cuda.is_available():
        out.append(Backend.TORCH_CUDA)
        if "CUDAExecutionProvider" in ort.get_available_providers():
            out.append(Backend.ORT_CUDA)
        if tensorrt_status().available:
            out.append(Backend.TENSORRT)
    return tuple(out)


class OnnxRunner:
    """An ONNX Runtime session usable as a network by MONAI inferers.

    Parameters
    ----------
    path : pathlib.Path
        The ONNX file (input ``image``, output ``pred``).
    cuda : bool
        Use the CUDA execution provider (CUDA tensors are bound without copies).
    out_channels : int
        Output channels (to allocate the output on the GPU).
    threads : int, optional
        Intra-op threads on CPU (default: ONNX Runtime's choice).

    Raises
    ------
    RuntimeError
        If ``cuda`` is asked for and the CUDA execution provider is missing.
    """

    def __init__(self, path: Path, *, cuda: bool = False, out_channels: int = 0,
                 threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("ONNX Runtime has no CUDAExecutionProvider here "
                               f"(providers: {ort.get_available_providers()})")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.cuda = cuda
        self.out_channels = out_channels

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits of a batch ``x`` (N, C, X, Y, Z), float32, on ``x``'s device."""
        if self.cuda and x.is_cuda and self.out_channels:
            x = x.to(dtype=torch.float32).contiguous()
            out = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=torch.float32,
                              device=x.device)
            binding = self.session.io_binding()
            idx = x.device.index or 0
            binding.bind_input(INPUT_NAME, "cuda", idx, np.float32, tuple(x.shape), x.data_ptr())
            binding.bind_output(OUTPUT_NAME, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
            torch.cuda.current_stream(x.device).synchronize()
            self.session.run_with_iobinding(binding)
            return out
        arr = x.detach().to("cpu", dtype=torch.float32).contiguous().numpy()
        y = self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]
        return torch.from_numpy(y).to(x.device)


def export_onnx(network: torch.nn.Module, path: Path, *, example: torch.Tensor,
                opset: int = ONNX_OPSET) -> Path:
    """Export ``network`` to ONNX with a dynamic batch axis (input ``image``, output
    ``pred``), check it with the ONNX checker, and write it atomically.

    Parameters
    ----------
    network : torch.nn.Module
        In eval mode, on the CPU.
    path : pathlib.Path
    example : torch.Tensor
        An input batch (N, C, X, Y, Z).
    opset : int

    Raises
    ------
    ExportError
        If the export or the check fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    try:
        with torch.no_grad():
            # The TorchScript-based exporter: the dynamo exporter needs onnxscript,
            # which the node does not depend on.
            torch.onnx.export(network, (example,), str(tmp), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        tmp.unlink(missing_ok=True)
        raise ExportError(path.parent.parent.name, "onnx", f"export failed ({exc})") from exc
    tmp.replace(path)
    return path


def time_batches(run: Callable[[], Any], *, repeats: int, warmup: int = 1,
                 cuda: bool = False) -> float:
    """Median wall time of ``run()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def check_input(batch: int, patch_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A fixed input batch (N, C, X, Y, Z), uniform in [0, 1) like scaled CT."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *patch_shape), generator=g, dtype=torch.float32)


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
    mv = registry.get(version)
    bundle = open_bundle(mv.path)
    info = bundle.info
    net = bundle.network("cpu")
    n = batch or info.sw_batch_size
    patch = (info.in_channels, *info.roi_size)
    x = check_input(n, patch)
    out_channels = len(info.labels) + 1
    checks: list[Verification] = []

    def record(backend: Backend, y: np.ndarray, ms: float, fp16: bool = False,
               extra: str = "") -> Verification:
        a = compare(ref, y)
        scale = max(1.0, float(np.abs(ref).max()))
        atol, need = (FP16_RTOL * scale, FP16_MIN_AGREEMENT) if fp16 else (FP32_ATOL * scale,
                                                                           FP32_MIN_AGREEMENT)
        ok = a.max_abs_diff <= atol and a.argmax_agreement >= need
        v = Verification(version=version, backend=backend, device_name=device_name(backend),
                         max_abs_diff=a.max_abs_diff, argmax_agreement=a.argmax_agreement,
                         median_ms=ms, shape=tuple(x.shape), verified=ok, measured_at=utc_now(),
                         detail=(f"max abs diff <= {atol:.3g} and argmax agreement >= {need}"
                                 + (f"; {extra}" if extra else "")))
        registry.record_verification(v)
        checks.append(v)
        LOG.info("%s %s on %s: max abs diff %.3g, argmax agreement %.6f, %.1f ms/batch -> %s",
                 version, backend.value, v.device_name, a.max_abs_diff, a.argmax_agreement, ms,
                 "verified" if ok else "NOT verified")
        return v

    with torch.no_grad():
        ref = net(x).numpy()
        ms = time_batches(lambda: net(x), repeats=repeats)
    record(Backend.TORCH_CPU, ref, ms, extra="reference")

    onnx_path = export_onnx(net, mv.path / "onnx" / "model.onnx", example=x)
    onnx_sha = sha256_file(onnx_path)
    registry.add_artifact(Artifact(version=version, kind=ArtifactKind.ONNX, path=onnx_path,
                                   sha256=onnx_sha, created_at=utc_now(),
                                   detail=f"opset {ONNX_OPSET}, dynamic batch, torch {torch.__version__}"))
    runner = OnnxRunner(onnx_path, out_channels=out_channels)
    y = runner(x).numpy()
    record(Backend.ORT_CPU, y, time_batches(lambda: runner(x), repeats=repeats),
           extra=f"onnxruntime {ort.__version__}")

    if torch.cuda.is_available():
        xc = x.cuda()
        net_c = bundle.network("cuda")
        with torch.no_grad():
            y = net_c(xc).cpu().numpy()
            ms = time_batches(lambda: net_c(xc), repeats=repeats, cuda=True)
        record(Backend.TORCH_CUDA, y, ms)
        bundle.network("cpu")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            runner_c = OnnxRunner(onnx_path, cuda=True, out_channels=out_channels)
            y = runner_c(xc).cpu().numpy()
            record(Backend.ORT_CUDA, y, time_batches(lambda: runner_c(xc), repeats=repeats,
                                                     cuda=True))

    status = tensorrt_status()
    if not status.available:
        message = f"TensorRT not available: {status.reason}; keeping ONNX"
        LOG.warning("%s: %s", version, message)
    else:
        key = engine_key(gpu_name=status.gpu_name, trt_version=status.version,
                         onnx_sha256=onnx_sha, min_batch=1, opt_batch=n, max_batch=n,
                         patch_shape=patch)
        plan = mv.path / "tensorrt" / f"{key}.plan"
        try:
            cached = plan.is_file()
            if not cached:
                build_engine(onnx_path, plan, patch_shape=patch, max_batch=n, opt_batch=n)
            trt_runner = TensorRTRunner(plan)
            xc = x.cuda()
            y = trt_runner(xc).cpu().numpy()
            ms = time_batches(lambda: trt_runner(xc), repeats=repeats, cuda=True)
        except RuntimeError as exc:
            message = f"TensorRT engine failed: {exc}; keeping ONNX"
            LOG.warning("%s: %s", version, message)
        else:
            detail = (f"TensorRT {status.version} fp16 on {status.gpu_name}; ONNX sha256 "
                      f"{onnx_sha[:16]}; batch 1..{n}; patch {patch}")
            registry.add_artifact(Artifact(version=version, kind=ArtifactKind.TENSORRT, path=plan,
                                           sha256=sha256_file(plan), created_at=utc_now(),
                                           detail=detail, key=key))
            v = record(Backend.TENSORRT, y, ms, fp16=True, extra=detail)
            message = (f"TensorRT {status.version} engine {'reused from cache' if cached else 'built'}"
                       f" ({plan.name}); {'verified' if v.verified else 'NOT verified; keeping ONNX'}")
    return OptimizeReport(version=version, onnx_path=onnx_path, checks=tuple(checks),
                          tensorrt=message)
