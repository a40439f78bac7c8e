"""Sliding-window inference whose memory does not grow with channels x voxels.

MONAI's ``sliding_window_inference`` (and so the ``SlidingWindowInferer`` of every
Model Zoo bundle) allocates its output for the whole image at once: channels x
voxels in the input's dtype, plus a count map. For the whole-body CT bundle (105
channels) on a 512 x 512 x 300 CT at 1.5 mm (273 x 273 x 500 voxels) that is 15.7 GB
of float32 before anything is done with it. MONAI has no switch that avoids it (its
``buffer_steps`` buffers windows on the GPU but still writes into the full output),
so this module stitches the windows itself, by hand, with the same arithmetic:

* the same windows (``monai.data.utils.dense_patch_slices`` with MONAI's scan interval
  ``int(roi * (1 - overlap))``), the same padding of an image smaller than the window,
  the same importance map (``monai.data.utils.compute_importance_map``, Gaussian or
  constant), the same weighted average;
* but windows run in order along the longest axis (the *band axis*), and the
  weighted sums are kept only for a band one window deep along it. A stretch of the
  band axis is final as soon as no later window reaches it; it is averaged, handed to
  the caller in thin slabs (``emit``) and forgotten.

The result is exact (the average of every window covering a voxel, as MONAI
computes it), not a running argmax: with overlapping Gaussian-weighted windows the
argmax of a weighted sum cannot be updated window by window. Memory is one band,
``channels x (voxels / band-axis length) x roi`` elements, plus one batch of windows.
The band is accumulated in float32 when that fits in :data:`FLOAT32_BAND_BYTES`,
otherwise in float16 (105 channels: 1.5 GB instead of 3 GB for a 273 x 273 in-plane
grid); the sums are averaged in float32. Half precision moves the average by at most
about 1e-3 of its size, which can only change the argmax where two channels are
within that of each other (a few voxels on a boundary; see the tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

LOG = logging.getLogger(__name__)

#: Largest band accumulated in float32, bytes; a larger one is kept in float16.
FLOAT32_BAND_BYTES = 512 * 2**20
#: Band-axis thickness of the slabs handed to ``emit`` (bounds the float32 average).
EMIT_SLAB = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowSettings:
    """A sliding-window inferer's settings (those of MONAI's ``SlidingWindowInferer``).

    Parameters
    ----------
    roi_size : tuple of int
        Window size, voxels, one per spatial axis.
    sw_batch_size : int
        Windows run through the network at once.
    overlap : tuple of float
        Fraction of the window shared with the next one, per axis, in [0, 1).
    mode : str
        ``gaussian`` or ``constant`` blending.
    sigma_scale : float or tuple of float
        Gaussian sigma as a fraction of the window size.
    padding_mode : str
        How an image smaller than the window is padded (``constant``, ``replicate`` ...).
    cval : float
        Constant padding value.
    """

    roi_size: tuple[int, ...]
    sw_batch_size: int = 1
    overlap: tuple[float, ...] = (0.25, 0.25, 0.25)
    mode: str = "constant"
    sigma_scale: float | tuple[float, ...] = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    def __post_init__(self) -> None:
        if not self.roi_size or any(int(r) < 1 for r in self.roi_size):
            raise ValueError(f"roi_size must be positive, got {self.roi_size}")
        if len(self.overlap) != len(self.roi_size) or any(not 0 <= o < 1 for o in self.overlap):
            raise ValueError(f"overlap must be one value in [0, 1) per axis, got {self.overlap}")
        if int(self.sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {self.sw_batch_size}")

    @classmethod
    def from_inferer(cls, inferer: Any) -> WindowSettings:
        """Read the settings of a MONAI ``SlidingWindowInferer``.

        Raises
        ------
        ValueError
            If ``inferer`` has no ``roi_size`` (not a sliding-window inferer).
        """
        roi = tuple(int(r) for r in (getattr(inferer, "roi_size", None) or ()))
        if not roi:
            raise ValueError(f"{type(inferer).__name__} is not a sliding-window inferer")
        overlap = getattr(inferer, "overlap", 0.25)
        overlap_t = tuple(float(o) for o in overlap) if isinstance(overlap, Sequence) \
            else (float(overlap),) * len(roi)
        sigma = getattr(inferer, "sigma_scale", 0.125)
        sigma_v = tuple(float(s) for s in sigma) if isinstance(sigma, Sequence) else float(sigma)
        return cls(roi_size=roi, sw_batch_size=int(getattr(inferer, "sw_batch_size", 1) or 1),
                   overlap=overlap_t, mode=str(getattr(getattr(inferer, "mode", "constant"), "value",
                                                          getattr(inferer, "mode", "constant"))),
                   sigma_scale=sigma_v,
                   padding_mode=str(getattr(getattr(inferer, "padding_mode", "constant"), "value",
                                            getattr(inferer, "padding_mode", "constant"))),
                   cval=float(getattr(inferer, "cval", 0.0) or 0.0))


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, ...]:
    """MONAI's step between windows: ``int(roi * (1 - overlap))`` (at least 1), or the
    whole axis when the window is as large as the image."""
    out = []
    for size, roi, o in zip(image_size, roi_size, overlap, strict=True):
        out.append(int(roi) if roi == size else max(1, int(roi * (1 - o))))
    return tuple(out)


def band_bytes(channels: int, spatial: Sequence[int], roi_size: Sequence[int]) -> tuple[int, int]:
    """Bytes of the accumulation band and of one element in it, for an image of
    ``spatial`` size (after padding to the window) and ``channels`` outputs."""
    padded = [max(int(s), int(r)) for s, r in zip(spatial, roi_size, strict=True)]
    axis = band_axis(padded)
    elements = channels * math.prod(padded) // padded[axis] * int(roi_size[axis])
    itemsize = 4 if elements * 4 <= FLOAT32_BAND_BYTES else 2
    return elements * itemsize, itemsize


def band_axis(spatial: Sequence[int]) -> int:
    """The axis the band moves along: the longest (ties: the last)."""
    longest = max(spatial)
    return max(i for i, s in enumerate(spatial) if s == longest)


def stream_sliding_window(image: torch.Tensor, predictor: Callable[[torch.Tensor], Any],
                          settings: WindowSettings,
                          emit: Callable[[int, int, torch.Tensor], None], *,
                          device: torch.device | str = "cpu", slab: int = EMIT_SLAB) -> int:
    """Run ``predictor`` over ``image`` in windows and hand out the blended output in slabs.

    Parameters
    ----------
    image : torch.Tensor
        (1, C_in, *spatial) on the CPU (the model grid).
    predictor : callable
        Takes (n, C_in, *roi) on ``device`` and returns (n, C_out, *roi) (or a
        tuple/list whose first item is that, as MONAI networks may).
    settings : WindowSettings
    emit : callable
        ``emit(start, stop, values)`` with ``values`` (C_out, *spatial) except that
        the band axis holds ``stop - start`` elements: the float32 weighted average of
        the windows for band-axis indices ``start:stop`` of ``image``. Called in
        order, each index exactly once.
    device : torch.device or str
        Where the predictor runs; the band is kept on the CPU.
    slab : int
        Band-axis thickness of the pieces given to ``emit``.

    Returns
    -------
    int
        The band axis (0-based among the spatial axes).

    Raises
    ------
    ValueError
        If the image and the window do not have the same number of spatial axes.
    """
    if image.ndim != len(settings.roi_size) + 2 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, *spatial) with {len(settings.roi_size)} spatial "
                         f"axes, got {tuple(image.shape)}")
    roi = tuple(int(r) for r in settings.roi_size)
    spatial = tuple(int(s) for s in image.shape[2:])
    image, lead = _pad_to_window(image, roi, settings)
    size = tuple(int(s) for s in image.shape[2:])
    axis = band_axis(size)
    windows = dense_patch_slices(size, roi, scan_interval(size, roi, settings.overlap))
    windows = sorted(windows, key=lambda w: w[axis].start)  # stable: MONAI's order within a row
    weight = compute_importance_map(roi, mode=settings.mode, sigma_scale=settings.sigma_scale,
                                    device="cpu", dtype=torch.float32)
    band = _Band(axis=axis, roi=roi, spatial=spatial, size=size, lead=lead, slab=slab,
                 emit=emit, windows=len(windows))
    batch = max(1, int(settings.sw_batch_size))
    i = 0
    while i < len(windows):
        start = windows[i][axis].start
        band.finish(start)
        group = [w for w in windows[i:] if w[axis].start == start]
        i += len(group)
        for g in range(0, len(group), batch):
            chunk = group[g:g + batch]
            x = torch.cat([image[(slice(None), slice(None), *w)] for w in chunk]).to(device)
            out = predictor(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            band.add(chunk, out.detach().to("cpu", torch.float32), weight)
            del out, x
    band.finish(size[axis])
    return axis


def _pad_to_window(image: torch.Tensor, roi: tuple[int, ...],
                   settings: WindowSettings) -> tuple[torch.Tensor, list[int]]:
    """Pad axes shorter than the window (as MONAI does); returns the image and the
    padding before each spatial axis."""
    spatial = tuple(int(s) for s in image.shape[2:])
    pad: list[int] = []  # F.pad order: last axis first
    for k in range(len(spatial) - 1, -1, -1):
        diff = max(roi[k] - spatial[k], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        mode = {"replicate": "replicate", "reflect": "reflect", "circular": "circular"}.get(
            settings.padding_mode, "constant")
        image = F.pad(image, pad=pad, mode=mode, value=settings.cval) if mode == "constant" \
            else F.pad(image, pad=pad, mode=mode)
    return image, [pad[2 * (len(spatial) - 1 - k)] for k in range(len(spatial))]


class _Band:
    """The accumulation band of :func:`stream_sliding_window`: one window deep along
    ``axis``, weighted sums and weights, emitted in slabs once no window reaches them."""

    def __init__(self, *, axis: int, roi: tuple[int, ...], spatial: tuple[int, ...],
                 size: tuple[int, ...], lead: list[int], slab: int,
                 emit: Callable[[int, int, torch.Tensor], None], windows: int) -> None:
        self.axis, self.roi, self.spatial, self.size, self.lead = axis, roi, spatial, size, lead
        self.slab, self.emit, self.windows = slab, emit, windows
        self.depth = roi[axis]
        self.acc: torch.Tensor | None = None  # made with the first output (its channels)
        self.count = torch.zeros((1, *[self.depth if a == axis else size[a]
                                       for a in range(len(size))]), dtype=torch.float32)
        self.lo = 0  # band-axis index of acc's first plane
        self.done = 0  # band-axis indices below this have been emitted

    def _along(self, t: torch.Tensor, start: int, stop: int) -> tuple[slice, ...]:
        idx = [slice(None)] * t.ndim
        idx[1 + self.axis] = slice(start, stop)
        return tuple(idx)

    def add(self, chunk: list[tuple[slice, ...]], out: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the weighted outputs (n, C_out, *roi) of the windows ``chunk``."""
        if self.acc is None:
            channels = int(out.shape[1])
            _, itemsize = band_bytes(channels, self.spatial, self.roi)
            dtype = torch.float32 if itemsize == 4 else torch.float16
            self.acc = torch.zeros((channels, *self.count.shape[1:]), dtype=dtype)
            LOG.debug("band of %s x %s %s (%.0f MB), %d windows", channels,
                      tuple(self.count.shape[1:]), dtype, self.acc.numel() * itemsize / 1e6,
                      self.windows)
        for w, o in zip(chunk, out, strict=True):
            o.mul_(weight)
            local = list(w)
            local[self.axis] = slice(w[self.axis].start - self.lo, w[self.axis].stop - self.lo)
            self.acc[(slice(None), *local)] += o
            self.count[(slice(None), *local)] += weight

    def finish(self, upto: int) -> None:
        """Emit band-axis indices [done, upto) and move the band to start at ``upto``."""
        if self.acc is None:
            return
        self._emit_until(self.acc, upto)
        self._move_to(self.acc, upto)

    def _emit_until(self, acc: torch.Tensor, upto: int) -> None:
        axis, lead, spatial = self.axis, self.lead, self.spatial
        while self.done < upto:
            stop = min(upto, self.done + self.slab)
            a, b = self.done - self.lo, stop - self.lo
            values = acc[self._along(acc, a, b)].to(torch.float32)
            values /= self.count[self._along(self.count, a, b)]
            crop = [slice(None)] + [slice(lead[k], lead[k] + spatial[k]) if k != axis
                                    else slice(None) for k in range(len(self.size))]
            # band-axis indices inside the unpadded image
            s0, s1 = max(self.done, lead[axis]), min(stop, lead[axis] + spatial[axis])
            if s1 > s0:
                crop[1 + axis] = slice(s0 - self.done, s1 - self.done)
                self.emit(s0 - lead[axis], s1 - lead[axis], values[tuple(crop)])
            self.done = stop

    def _move_to(self, acc: torch.Tensor, upto: int) -> None:
        shift = upto - self.lo
        if shift <= 0:
            return
        depth, count, along = self.depth, self.count, self._along
        keep = depth - shift
        if keep > 0:
            acc[along(acc, 0, keep)] = acc[along(acc, shift, depth)].clone()
            count[along(count, 0, keep)] = count[along(count, shift, depth)].clone()
        acc[along(acc, max(keep, 0), depth)] = 0
        count[along(count, max(keep, 0), depth)] = 0
        self.lo = upto
