"""Checks of a backend against PyTorch: agreement of the logits, speed, and which
backends this host can run at all.

A backend is *verified* when its logits on the same batch stay within a tolerance of
PyTorch CPU's (relative to the logit range) and it picks the same argmax channel for
nearly every voxel; serving picks the fastest verified one
(:func:`pipelines.backends.choose_backend`).
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from pipelines.export.tensorrt import tensorrt_status
from registry.records import Backend, Verification

#: FP32 backends must match PyTorch to this (times max(1, max |logit|)) ...
FP32_ATOL = 1e-3
#: ... and agree on the argmax of at least this fraction of voxels.
FP32_MIN_AGREEMENT = 0.999
#: FP16 engines (TensorRT): looser, relative to the logit range.
FP16_RTOL = 5e-2
FP16_MIN_AGREEMENT = 0.99


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


def verdict(reference: np.ndarray, output: np.ndarray, *, version: str, backend: Backend,
            shape: tuple[int, ...], median_ms: float, measured_at: _dt.datetime,
            fp16: bool = False, extra: str = "") -> Verification:
    """A backend's check against the PyTorch reference on the same batch.

    Parameters
    ----------
    reference, output : numpy.ndarray
        PyTorch CPU's logits and the backend's, (N, C, X, Y, Z).
    version : str
    backend : Backend
    shape : tuple of int
        Shape of the input batch (N, C, X, Y, Z).
    median_ms : float
        Median time of one batch, ms.
    measured_at : datetime.datetime
    fp16 : bool
        The backend computes in FP16 (looser tolerance).
    extra : str
        Appended to the detail (library versions, engine).

    Returns
    -------
    Verification
        ``verified`` when the difference and the agreement are within tolerance.
    """
    a = compare(reference, output)
    scale = max(1.0, float(np.abs(reference).max()))
    atol, need = ((FP16_RTOL * scale, FP16_MIN_AGREEMENT) if fp16
                  else (FP32_ATOL * scale, FP32_MIN_AGREEMENT))
    ok = a.max_abs_diff <= atol and a.argmax_agreement >= need
    return Verification(version=version, backend=backend, device_name=device_name(backend),
                        max_abs_diff=a.max_abs_diff, argmax_agreement=a.argmax_agreement,
                        median_ms=median_ms, shape=shape, verified=ok,
                        measured_at=measured_at,
                        detail=(f"max abs diff <= {atol:.3g} and argmax agreement >= {need}"
                                + (f"; {extra}" if extra else "")))


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
