"""How much memory a series will need with a model, and the budget it must fit.

:func:`estimate_memory` predicts the peak resident memory of one series through
:func:`pipelines.run.run_series` from its headers alone (slices, matrix, spacing) and
the model's bundle (resampling, window, channels), before any pixel is read. The
pipeline's memory is bounded by design (see the README, "Memory"): the terms are

* the source: stored pixels held by the caller (2 bytes/voxel) and the HU volume
  (float32), ``S`` source voxels;
* pre-processing: MONAI's resampling onto the model grid (``M`` voxels) and its
  intensity steps, about ``8 S + 12 M`` bytes at their peak;
* inference: the image on the model grid, one band of the stitcher
  (:func:`pipelines.stitching.band_bytes`: channels x in-plane x window depth), one
  batch of window outputs (channels x window, twice), the network's activations on
  one batch (measured once per loaded model with forward hooks, see
  :func:`activation_bytes`) and one model-grid map;
* post-processing and writers: label maps and crops, a few bytes per source voxel.

The peak is the process's resident memory when the estimate is made (libraries,
weights) plus the source terms plus the largest of the stages. It is a prediction,
not a measurement: ``benchmarks/big_model.py`` prints both side by side.

:func:`default_max_memory_bytes` is the budget when ``max_memory_gb`` is 0: 80 % of
the machine's memory, or of the cgroup's limit when that is lower (a container or a
systemd ``MemoryMax=``). This module imports no torch at load time, so the listener
can resolve the budget without it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError

LOG = logging.getLogger(__name__)

GB = 1e9
#: Share of the machine's (or cgroup's) memory a study may use when no budget is set.
DEFAULT_SHARE = 0.8


class MemoryBudgetError(PipelineError, MemoryError):
    """A series is predicted not to fit the memory budget; it is refused before it starts.

    Parameters
    ----------
    series_uid : str
    version : str
        Model version.
    needed_bytes, budget_bytes : int
    detail : str
        What drives the estimate (model grid, channels), in words.
    """

    def __init__(self, series_uid: str, version: str, needed_bytes: int, budget_bytes: int,
                 detail: str) -> None:
        self.series_uid = series_uid
        self.version = version
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        super().__init__(
            f"series {series_uid} refused before inference: model {version} would need about "
            f"{needed_bytes / GB:.1f} GB ({detail}) and max_memory_gb is "
            f"{budget_bytes / GB:.1f}; raise max_memory_gb or serve it on a larger machine "
            f"(not retried)")


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """Predicted peak memory of one series through one model.

    Parameters
    ----------
    peak_bytes : int
        Predicted peak resident memory of the process, bytes.
    baseline_bytes : int
        Resident memory before the series (libraries, weights), bytes.
    stages : tuple of (str, int)
        Bytes each stage adds on top of the baseline and the source, in order.
    source_bytes : int
        Stored pixels and the HU volume, bytes.
    model_grid : tuple of int
        Predicted model-grid shape.
    channels : int
        Output channels (labels + background).
    """

    peak_bytes: int
    baseline_bytes: int
    stages: tuple[tuple[str, int], ...]
    source_bytes: int
    model_grid: tuple[int, ...]
    channels: int

    def __post_init__(self) -> None:
        if self.peak_bytes < 0 or self.baseline_bytes < 0 or self.source_bytes < 0:
            raise ValueError("byte counts must be >= 0")

    @property
    def detail(self) -> str:
        """What drives it, in words (for the refusal line)."""
        top = max(self.stages, key=lambda s: s[1])
        grid = "x".join(str(g) for g in self.model_grid)
        return f"{self.channels} channels on a {grid} model grid, {top[0]} the largest stage"

    def summary(self) -> str:
        """One line: peak and each stage, GB."""
        parts = ", ".join(f"{name} {b / GB:.2f}" for name, b in self.stages)
        return (f"predicted peak {self.peak_bytes / GB:.2f} GB = baseline "
                f"{self.baseline_bytes / GB:.2f} + source {self.source_bytes / GB:.2f} + largest "
                f"of ({parts}) GB")


def model_grid_shape(source_shape: Sequence[int], source_affine: Any,
                     model_spacing_mm: Sequence[float] | None) -> tuple[int, ...]:
    """The grid a resampling to ``model_spacing_mm`` (per RAS axis, as a bundle's
    ``Spacingd`` pixdim) makes of the source, voxels per source axis.

    Each source axis is resampled to the spacing of the patient axis it runs along
    most (``Orientationd`` only permutes and flips axes).
    """
    import numpy as np

    aff = np.asarray(source_affine, dtype=np.float64)
    if model_spacing_mm is None:
        return tuple(int(s) for s in source_shape)
    pix = [float(p) for p in model_spacing_mm]
    pix = (pix * 3)[:3] if len(pix) == 1 else pix
    out = []
    for k, n in enumerate(source_shape):
        column = aff[:3, k]
        step = float(np.linalg.norm(column))
        axis = int(np.argmax(np.abs(column)))
        out.append(max(1, math.ceil(n * step / pix[axis])))
    return tuple(out)


def series_geometry(datasets: Sequence[Any]) -> tuple[tuple[int, int, int], Any]:
    """(slices, rows, columns) and an approximate index -> LPS affine of a series, from
    its headers (no pixel data read).

    Raises
    ------
    ValueError
        If a header lacks Rows/Columns/PixelSpacing/ImageOrientationPatient/ImagePositionPatient.
    """
    import numpy as np

    if not datasets:
        raise ValueError("no data sets")
    first = datasets[0]
    try:
        rows, cols = int(first.Rows), int(first.Columns)
        iop = np.array([float(v) for v in first.ImageOrientationPatient])
        spacing = [float(v) for v in first.PixelSpacing]
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"series headers lack geometry ({exc})") from exc
    normal = np.cross(iop[:3], iop[3:])
    offsets = positions @ normal
    n = len({round(float(o), 3) for o in offsets}) or 1
    step = (float(offsets.max() - offsets.min()) / (n - 1)) if n > 1 else 1.0
    affine = np.eye(4)
    affine[:3, 0] = normal * max(step, 1e-3)
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = iop[:3] * spacing[1]
    return (n, rows, cols), affine


def activation_bytes(network: Any, roi_size: Sequence[int], in_channels: int = 1,
                     device: Any = "cpu") -> int:
    """Peak activation memory of one window through ``network``, bytes (estimate).

    Runs the network once on a window of half the size per axis (an eighth of the
    work) and scales the result by the voxel ratio. On Linux the process's resident
    high-water mark is reset first (``/proc/self/clear_refs``, value 5) and read after
    (``VmHWM``), which measures what the forward pass really allocated; elsewhere, or
    when that is not allowed, the largest output of any leaf module (forward hooks)
    times 5 is used (the whole-body SegResNet: 1.7 GB measured for a 96^3 window,
    4.6 times its 105-channel output). A network that is not a ``torch.nn.Module``
    (ONNX Runtime, TensorRT) gives 0; measure its bundle's PyTorch network instead.
    """
    import torch

    if not isinstance(network, torch.nn.Module):
        return 0
    half = [max(16, (int(r) // 2) // 16 * 16) for r in roi_size]
    scale = math.prod(int(r) for r in roi_size) / math.prod(half)
    largest = 0

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        nonlocal largest
        outs = output if isinstance(output, (tuple, list)) else (output,)
        for o in outs:
            if isinstance(o, torch.Tensor):
                largest = max(largest, o.numel() * o.element_size())

    handles = [m.register_forward_hook(hook) for m in network.modules()
               if not any(True for _ in m.children())]
    measured = 0
    try:
        before = _reset_peak_rss()
        with torch.inference_mode():
            network(torch.zeros((1, in_channels, *half), device=device))
        if before is not None and str(device).startswith("cpu"):
            measured = max(0, _status_kib("VmHWM") * 1024 - before)
    except Exception as exc:  # noqa: BLE001 - a network that needs other sizes: fall back
        LOG.debug("activation measurement failed (%s)", exc)
    finally:
        for h in handles:
            h.remove()
    return int(max(measured, 5 * largest) * scale) if measured else int(5 * largest * scale)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int | None:
    """Reset this process's resident high-water mark; return the resident bytes now
    (``None`` where that is not possible)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, ValueError):
        return None


def estimate_memory(*, source_shape: Sequence[int], source_affine: Any,
                    model_spacing_mm: Sequence[float] | None, roi_size: Sequence[int],
                    sw_batch_size: int, channels: int, activation: int,
                    baseline_bytes: int | None = None) -> MemoryEstimate:
    """Predict the peak memory of one series (see the module docstring for the terms).

    Parameters
    ----------
    source_shape : sequence of int
        (slices, rows, columns).
    source_affine : array-like
        4x4 index (k, i, j) -> LPS mm of the source.
    model_spacing_mm : sequence of float or None
        The bundle's ``Spacingd`` pixdim (``None``: no resampling).
    roi_size : sequence of int
        Sliding window, voxels.
    sw_batch_size : int
    channels : int
        Output channels, background included.
    activation : int
        Activations of one window, bytes (:func:`activation_bytes`).
    baseline_bytes : int, optional
        Resident memory before the series; default: this process's now.

    Returns
    -------
    MemoryEstimate

    Raises
    ------
    ValueError
        If a shape or spacing is not positive.
    """
    if len(source_shape) != 3 or min(source_shape) < 1:
        raise ValueError(f"source_shape must be 3 positive sizes, got {tuple(source_shape)}")
    from pipelines.stitching import band_bytes  # torch: imported where inference runs

    s = math.prod(int(x) for x in source_shape)
    grid = model_grid_shape(source_shape, source_affine, model_spacing_mm)
    m = math.prod(grid)
    roi_vox = math.prod(int(r) for r in roi_size)
    padded = [max(g, 1) for g in grid]
    band, _ = band_bytes(channels, padded, roi_size)
    window = 3 * sw_batch_size * channels * roi_vox * 2  # the output, and its float16 cast into the band
    grid_map = m * (4 if channels == 2 else 1)
    stages = (
        ("preprocess", 8 * s + 12 * m),
        ("inference", 4 * m + band + window + sw_batch_size * activation + grid_map),
        ("return to source grid", grid_map + 2 * s),
        ("post-processing", 3 * s),
        ("writers", 5 * s),
    )
    source = 6 * s
    base = current_rss_bytes() if baseline_bytes is None else int(baseline_bytes)
    peak = base + source + max(b for _, b in stages)
    return MemoryEstimate(peak_bytes=int(peak), baseline_bytes=base, stages=stages,
                          source_bytes=source, model_grid=grid, channels=channels)


def check_budget(estimate: MemoryEstimate, budget_bytes: int, *, series_uid: str,
                 version: str) -> None:
    """Refuse a series whose predicted peak exceeds ``budget_bytes``.

    Raises
    ------
    MemoryBudgetError
        With the one line that says what was refused and what to do.
    """
    if budget_bytes > 0 and estimate.peak_bytes > budget_bytes:
        raise MemoryBudgetError(series_uid, version, estimate.peak_bytes, budget_bytes,
                                estimate.detail)
    LOG.debug("series %s with %s: %s (budget %.1f GB)", series_uid, version, estimate.summary(),
              budget_bytes / GB)


def current_rss_bytes() -> int:
    """This process's resident memory now, bytes (0 where /proc is not readable)."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup (v2 or v1) limit when lower, bytes."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def default_max_memory_bytes() -> int:
    """The budget when none is configured: :data:`DEFAULT_SHARE` of :func:`machine_memory_bytes`."""
    return int(DEFAULT_SHARE * machine_memory_bytes())


def budget_bytes(max_memory_gb: float) -> int:
    """``max_memory_gb`` (0: derived from the machine) as bytes."""
    return default_max_memory_bytes() if not max_memory_gb else int(max_memory_gb * GB)
