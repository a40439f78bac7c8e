"""From the model's grid back to the source grid: the label map on the images' own voxels.

The model sees the series resampled to its spacing; the SEG, the SR's volumes and the
overlay are on the source images. :func:`labels_on_source_grid` resamples the class
probabilities (trilinear, separable when the grids are axis-aligned, chunked to bound
memory) and takes the argmax there; :func:`nearest_labels_on_source_grid` maps a label
map by nearest neighbour (what a big model that returns labels only allows).
"""

from __future__ import annotations

import numpy as np
from typing import Any

#: Source slices resampled at a time (bounds the post-processing memory: a chunk of
#: 16 x 512 x 512 float32 is 16 MiB per intermediate).
RESAMPLE_CHUNK = 16


def labels_on_source_grid(probs: np.ndarray, index_map: np.ndarray, shape: tuple[int, ...],
                          *, chunk: int = RESAMPLE_CHUNK) -> np.ndarray:
    """Argmax label map on a source grid of per-channel maps on a model grid.

    Parameters
    ----------
    probs : numpy.ndarray
        (C, X, Y, Z) per-channel probabilities (or logits) on the model grid. Not modified.
    index_map : numpy.ndarray
        4x4 affine taking a source index (k, i, j) to a model-grid index (x, y, z)
        (voxel centres at integers).
    shape : tuple of int
        Source grid shape (slices, rows, columns).
    chunk : int
        Source slices done at a time (memory is O(chunk x rows x columns)).

    Returns
    -------
    numpy.ndarray
        uint8 labels, ``shape``; ties go to the lower channel (as ``torch.argmax``).

    Notes
    -----
    Linear interpolation commutes with differences, so with two channels the one map
    ``p1 - p0`` is resampled and thresholded at 0 (the argmax); with more, each channel
    is resampled and a running maximum kept. Outside the model grid the border value
    is used. When the grids are axis-aligned (any permutation and flips: the index
    map's 3x3 part has one non-zero per row), trilinear interpolation is separable and
    done one axis at a time on slabs of source slices; otherwise (oblique) the model
    grid is sampled at each slab's mapped coordinates with
    :func:`scipy.ndimage.map_coordinates` (order 1).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4 or len(shape) != 3:
        raise ValueError(f"probs must be (C, X, Y, Z) and shape 3-D, got {probs.shape}, {shape}")
    if probs.shape[0] == 2:
        maps = [probs[1] - probs[0]]
    else:
        maps = [probs[c] for c in range(probs.shape[0])]
    return resample_argmax(maps, index_map, shape, chunk=chunk)


def _is_axis_aligned(index_map: np.ndarray) -> bool:
    rot = np.asarray(index_map, dtype=np.float64)[:3, :3]
    nonzero = np.abs(rot) > 1e-6 * np.abs(rot).max()
    return bool(np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1))


def resample_argmax(maps: list[np.ndarray], index_map: np.ndarray, shape: tuple[int, ...], *,
                     chunk: int = RESAMPLE_CHUNK) -> np.ndarray:
    """Linear resampling of per-channel maps onto the source grid, argmax there (one map:
    thresholded at 0). See :func:`labels_on_source_grid`."""
    sample = _separable_sampler(maps, index_map, shape) if _is_axis_aligned(index_map) \
        else _oblique_sampler(maps, index_map, shape)
    labels = np.empty(shape, dtype=np.uint8)
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        values = sample(k0, k1)
        if len(maps) == 1:
            np.greater(values[0], 0, out=labels[k0:k1], casting="unsafe")
            continue
        best = values[0]
        out = np.zeros(best.shape, dtype=np.uint8)
        for c in range(1, len(values)):
            better = values[c] > best
            out[better] = c
            np.maximum(best, values[c], out=best)
        labels[k0:k1] = out
    return labels


def nearest_labels_on_source_grid(labels: np.ndarray, index_map: np.ndarray,
                                  shape: tuple[int, ...], *, chunk: int = RESAMPLE_CHUNK
                                  ) -> np.ndarray:
    """A model-grid label map carried onto the source grid by nearest neighbour.

    Parameters
    ----------
    labels : numpy.ndarray
        (X, Y, Z) integer labels on the model grid. Not modified.
    index_map : numpy.ndarray
        4x4 affine from a source index (k, i, j) to a model-grid index (x, y, z).
    shape : tuple of int
        Source grid shape (slices, rows, columns).
    chunk : int
        Source slices done at a time (oblique grids only; aligned ones are one gather).

    Returns
    -------
    numpy.ndarray
        Labels on the source grid, the dtype of ``labels``; outside the model grid
        the nearest border voxel's label.

    Notes
    -----
    Axis-aligned grids (any permutation and flips) take one index per source
    axis, so the result is ``labels`` gathered with three 1-D index arrays (no
    coordinate array at all); oblique ones sample each slab's rounded coordinates.
    """
    m = np.asarray(index_map, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.ndim != 3 or len(shape) != 3:
        raise ValueError(f"labels must be 3-D and shape 3-D, got {lab.shape}, {shape}")
    out = np.empty(shape, dtype=lab.dtype)
    if _is_axis_aligned(m):
        src_of = [int(np.argmax(np.abs(m[a, :3]))) for a in range(3)]
        model_of = [src_of.index(s) for s in range(3)]
        view = np.transpose(lab, model_of)  # source axis order (a view)
        idx = []
        for s in range(3):
            a = model_of[s]
            t = np.arange(shape[s], dtype=np.float64)
            idx.append(np.clip(np.rint(m[a, s] * t + m[a, 3]), 0, lab.shape[a] - 1).astype(np.intp))
        for k0 in range(0, shape[0], chunk):
            k1 = min(shape[0], k0 + chunk)
            out[k0:k1] = view[np.ix_(idx[0][k0:k1], idx[1], idx[2])]
        return out
    ii, jj = np.meshgrid(np.arange(shape[1], dtype=np.float64),
                         np.arange(shape[2], dtype=np.float64), indexing="ij")
    plane = [m[a, 1] * ii + m[a, 2] * jj + m[a, 3] for a in range(3)]
    for k0 in range(0, shape[0], chunk):
        k1 = min(shape[0], k0 + chunk)
        k = np.arange(k0, k1, dtype=np.float64)[:, None, None]
        coords = [np.clip(np.rint(plane[a][None] + m[a, 0] * k), 0, lab.shape[a] - 1)
                  .astype(np.intp) for a in range(3)]
        out[k0:k1] = lab[coords[0], coords[1], coords[2]]
    return out


def _linear_weights(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower/upper neighbour indices and upper weight for 1-D linear interpolation at
    ``coords`` on ``size`` samples, clamped to the border."""
    c = np.clip(coords, 0.0, size - 1.0)
    lo = np.minimum(np.floor(c).astype(np.intp), max(size - 2, 0))
    hi = np.minimum(lo + 1, size - 1)
    return lo, hi, (c - lo).astype(np.float32)


def _lerp(a: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, w: np.ndarray) -> np.ndarray:
    shape = [1] * a.ndim
    shape[axis] = w.size
    wb = w.reshape(shape)
    low = np.take(a, lo, axis=axis)
    out = np.take(a, hi, axis=axis)
    out -= low
    out *= wb
    out += low
    return out


def _separable_sampler(maps: list[np.ndarray], index_map: np.ndarray, shape: tuple[int, ...]
                       ) -> Any:
    m = np.asarray(index_map, dtype=np.float64)
    # model axis a is driven by source axis src_of[a]
    src_of = [int(np.argmax(np.abs(m[a, :3]))) for a in range(3)]
    model_of = [src_of.index(s) for s in range(3)]
    # the maps with their axes in source order, contiguous (model-grid sized: a
    # gather along a strided axis of a transposed view was 100x slower)
    views = [np.ascontiguousarray(np.transpose(x, model_of)) for x in maps]
    weights = []
    for s in range(3):
        a = model_of[s]
        t = np.arange(shape[s], dtype=np.float64)
        weights.append(_linear_weights(m[a, s] * t + m[a, 3], maps[0].shape[a]))

    def sample(k0: int, k1: int) -> list[np.ndarray]:
        lo, hi, w = (x[k0:k1] for x in weights[0])
        out = []
        for v in views:
            part = _lerp(v, 0, lo, hi, w)
            part = _lerp(part, 1, *weights[1])
            out.append(_lerp(part, 2, *weights[2]))
        return out

    return sample


def _oblique_sampler(maps: list[np.ndarray], index_map: np.ndarray, shape: tuple[int, ...]
                     ) -> Any:
    from scipy.ndimage import map_coordinates

    m = np.asarray(index_map, dtype=np.float64)
    ii, jj = np.meshgrid(np.arange(shape[1], dtype=np.float64),
                         np.arange(shape[2], dtype=np.float64), indexing="ij")
    plane = [m[a, 1] * ii + m[a, 2] * jj + m[a, 3] for a in range(3)]

    def sample(k0: int, k1: int) -> list[np.ndarray]:
        k = np.arange(k0, k1, dtype=np.float64)[:, None, None]
        coords = np.stack([(plane[a][None] + m[a, 0] * k).astype(np.float32) for a in range(3)])
        return [map_coordinates(x, coords, order=1, mode="nearest", prefilter=False)
                for x in maps]

    return sample
