"""Every backend of a model timed on one volume (``dicom-node models optimize``,
``benchmarks/gpu.py``): PyTorch, ONNX Runtime and TensorRT side by side, each checked."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.export.checks import available_backends, device_name, time_batches
from pipelines.export.onnx import OnnxRunner
from pipelines.export.tensorrt import TensorRTRunner, tensorrt_status
from pipelines.inference import load_model
from registry.records import Artifact, ArtifactKind, Backend, ModelVersion
from registry.store import Registry

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchmarkRow:
    """One backend's sliding-window time on the benchmark volume.

    Parameters
    ----------
    name : str
        ``pytorch-eager``, ``torch.compile``, ``onnxruntime-cpu`` ...
    device : str
        ``cpu`` or the GPU name.
    median_ms : float or None
        Median wall time of one whole sliding-window inference, ms (``None`` if skipped).
    runs : int
        Timed runs.
    argmax_agreement : float or None
        Fraction of model-grid voxels with PyTorch eager's argmax label.
    note : str
        Why it was skipped, or what it ran with.
    """

    name: str
    device: str
    median_ms: float | None
    runs: int = 0
    argmax_agreement: float | None = None
    note: str = ""


def benchmark(model_version: ModelVersion, array: np.ndarray, affine: np.ndarray, *,
              registry: Registry | None = None, repeats: int = 3, warmup: int = 1,
              compile_: bool = True) -> tuple[tuple[int, ...], tuple[BenchmarkRow, ...]]:
    """Time the bundle's sliding-window inference on one volume with every backend
    available here: PyTorch eager, ``torch.compile``, ONNX Runtime CPU/CUDA, TensorRT.

    The volume goes through the bundle's preprocessing once; each backend then runs
    the bundle's inferer on the same model-grid tensor ``warmup`` + ``repeats`` times.

    Parameters
    ----------
    model_version : ModelVersion
    array, affine : numpy.ndarray
        HU volume (slices, rows, columns) and its (k, i, j) -> LPS mm affine.
    registry : Registry, optional
        For the ONNX and TensorRT artifacts (skipped without it).
    repeats, warmup : int
    compile_ : bool
        Include ``torch.compile`` (its first call compiles; counted as warm-up).

    Returns
    -------
    (tuple of int, tuple of BenchmarkRow)
        The model-grid shape (X, Y, Z) and one row per backend, eager first.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    base = load_model(model_version, registry=registry, backend=Backend.TORCH_CPU)
    img = base.preprocess(array, affine)
    grid = tuple(int(s) for s in img.shape[1:])
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dname = device_name(Backend.TORCH_CUDA if cuda else Backend.TORCH_CPU)
    bench = _Bench(inferer=base.bundle.inferer(), x=img.as_tensor()[None].to(dev), cuda=cuda,
                   repeats=repeats, warmup=warmup)
    eager = base.bundle.network(dev)
    bench.run("pytorch-eager", eager, dname, "fp32")
    if compile_:
        bench.run("torch.compile", torch.compile(eager), dname,
                  "fp32, first call compiles (warm-up)")
        if cuda:
            bench.run("torch.compile", torch.compile(eager), dname, "fp16 autocast",
                      autocast=True)
    artifacts = registry.artifacts(model_version.version) if registry else []
    _bench_onnx(bench, model_version, artifacts)
    _bench_tensorrt(bench, model_version, artifacts)
    return grid, tuple(bench.rows)


class _Bench:
    """The rows of :func:`benchmark` so far; runs one backend on the model-grid tensor."""

    def __init__(self, *, inferer: Any, x: torch.Tensor, cuda: bool, repeats: int,
                 warmup: int) -> None:
        self.inferer, self.x, self.cuda = inferer, x, cuda
        self.repeats, self.warmup = repeats, warmup
        self.rows: list[BenchmarkRow] = []
        self.ref: np.ndarray | None = None  # the first backend's label map

    def skip(self, name: str, device: str, note: str) -> None:
        """A row for a backend that cannot run here."""
        self.rows.append(BenchmarkRow(name=name, device=device, median_ms=None, note=note))

    def run(self, name: str, net: object, device: str, note: str = "",
            autocast: bool = False, inp: torch.Tensor | None = None) -> None:
        """Time ``net`` under the bundle's inferer; a failure is a row, not an error."""
        xin = self.x if inp is None else inp
        out: list[torch.Tensor] = []

        def once() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                        enabled=autocast):
                y = self.inferer(xin, net)
            out[:] = [y]
        try:
            ms = time_batches(once, repeats=self.repeats, warmup=self.warmup, cuda=self.cuda)
        except Exception as exc:  # noqa: BLE001 - a backend failing is a benchmark result
            LOG.warning("benchmark %s failed: %s", name, exc)
            self.skip(name, device, f"failed: {str(exc).splitlines()[0][:120]}")
            return
        lab = torch.argmax(out[0][0].float(), dim=0).cpu().numpy()
        if self.ref is None:
            self.ref = lab
        self.rows.append(BenchmarkRow(name=name, device=device, median_ms=ms, runs=self.repeats,
                                      argmax_agreement=float(np.mean(lab == self.ref)),
                                      note=note))
        LOG.info("benchmark %s on %s: %.1f ms (median of %d)", name, device, ms, self.repeats)


def _bench_onnx(bench: _Bench, model_version: ModelVersion, artifacts: Sequence[Artifact]) -> None:
    """ONNX Runtime on the CPU and on CUDA, with the version's ONNX artifact."""
    here = available_backends()
    onnx_arts = [a for a in artifacts if a.kind is ArtifactKind.ONNX and a.path.is_file()]
    out_ch = len(model_version.labels) + 1
    for b in (Backend.ORT_CPU, Backend.ORT_CUDA):
        if b not in here:
            bench.skip(b.value, "-", "not available on this host")
        elif not onnx_arts:
            bench.skip(b.value, device_name(b), f"no ONNX artifact: run `dicom-node models "
                                                f"optimize {model_version.version}`")
        else:
            runner = OnnxRunner(onnx_arts[-1].path, cuda=b is Backend.ORT_CUDA, out_channels=out_ch)
            bench.run(b.value, runner, device_name(b), f"onnxruntime {_ort_version()}",
                      inp=bench.x.cpu() if b is Backend.ORT_CPU else bench.x)


def _bench_tensorrt(bench: _Bench, model_version: ModelVersion,
                    artifacts: Sequence[Artifact]) -> None:
    """TensorRT, with the version's engine built for this GPU."""
    status = tensorrt_status()
    trt_arts = [a for a in artifacts if a.kind is ArtifactKind.TENSORRT and a.path.is_file()
                and a.path.stem == a.key]
    if not status.available:
        bench.skip(Backend.TENSORRT.value, "-", f"TensorRT not available: {status.reason}")
    elif not trt_arts:
        bench.skip(Backend.TENSORRT.value, status.gpu_name, "no engine: run `dicom-node models "
                   f"optimize {model_version.version}`")
    else:
        bench.run(Backend.TENSORRT.value, TensorRTRunner(trt_arts[-1].path), status.gpu_name,
                  f"TensorRT {status.version} fp16")


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
