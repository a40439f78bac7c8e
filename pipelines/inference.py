"""Running a registered model on a CT volume.

:func:`load_model` builds the network from the version's MONAI bundle and picks the
backend: the fastest *verified* one available on this host (PyTorch CPU/CUDA, ONNX
Runtime CPU/CUDA, TensorRT), by the timings :func:`pipelines.export.optimize.optimize`
recorded; the choice is logged. :meth:`LoadedModel.segment` applies the bundle's own
preprocessing (every transform after ``LoadImaged``/``EnsureChannelFirstd``) to a
MONAI ``MetaTensor`` built from the volume (``Spacingd`` resampling in float32), runs
the bundle's sliding-window inferer, carries the class probabilities back onto the
SOURCE grid by linear interpolation through the two grids' affines (what MONAI's
inverse of ``Orientationd``/``Spacingd`` does, without its dense sampling grid; see
:func:`labels_on_source_grid`) and returns the argmax label map there.

Geometry: the volume is a float32 HU array in (slices, rows, columns) order with a
4x4 affine mapping index (k, i, j) to LPS mm. MONAI (like NIfTI) reads affines as
RAS, so the affine handed to MONAI is ``diag(-1, -1, 1, 1) @ affine``; the axis order
of the array is kept (MONAI's ``Orientationd`` permutes as the bundle asks, and its
inverse permutes back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from pipelines.backends import choose_backend
from pipelines.errors import PipelineError
from pipelines.memory import MemoryEstimate, activation_bytes, estimate_memory
from pipelines.stitching import WindowSettings, stream_sliding_window
from pipelines.export.checks import available_backends, device_name
from pipelines.export.onnx import OnnxRunner
from pipelines.export.tensorrt import TensorRTRunner
from registry.bundle import OpenBundle, open_bundle
from registry.records import Artifact, ArtifactKind, Backend, LabelSpec, ModelVersion
from registry.store import Registry

LOG = logging.getLogger(__name__)

#: LPS <-> RAS: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ModelLoadError(PipelineError, RuntimeError):
    """A registered model cannot be loaded for inference.

    Parameters
    ----------
    version : str
    problem : str
    """

    def __init__(self, version: str, problem: str) -> None:
        self.version = version
        super().__init__(f"model {version}: {problem}")


class InferenceInputError(PipelineError, ValueError):
    """The volume handed to a model does not fit it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StageTimings:
    """Wall time of each stage of one inference, seconds.

    Parameters
    ----------
    preprocess_s : float
        MetaTensor construction and the bundle's preprocessing.
    inference_s : float
        Sliding-window inference.
    postprocess_s : float
        Activation, resampling onto the source grid, argmax.
    """

    preprocess_s: float
    inference_s: float
    postprocess_s: float

    def __post_init__(self) -> None:
        for name in ("preprocess_s", "inference_s", "postprocess_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def total_s(self) -> float:
        """Sum of the stages, seconds."""
        return self.preprocess_s + self.inference_s + self.postprocess_s


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class InferenceResult:
    """A label map on the source grid and how it was made.

    Parameters
    ----------
    labels : numpy.ndarray
        uint8 label map, (slices, rows, columns) of the input; values are
        :class:`~registry.records.LabelSpec` values, 0 = background.
    affine : numpy.ndarray
        The input's 4x4 LPS affine (index (k, i, j) -> mm), unchanged.
    label_specs : tuple of LabelSpec
        The model's labels (names, SNOMED CT codes).
    version : str
        Model version.
    device_uid : str
        The model version's Device UID (for Contributing Equipment).
    backend : Backend
        The backend that ran it.
    model_grid_shape : tuple of int
        Spatial shape after the bundle's preprocessing (the grid the network saw).
    timings : StageTimings
    """

    labels: np.ndarray
    affine: np.ndarray
    label_specs: tuple[LabelSpec, ...]
    version: str
    device_uid: str
    backend: Backend
    model_grid_shape: tuple[int, ...]
    timings: StageTimings

    def __post_init__(self) -> None:
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype not in (np.uint8, np.uint16) \
                or self.labels.ndim != 3:
            raise TypeError("labels must be a 3-D uint8 numpy array")
        object.__setattr__(self, "backend", Backend(self.backend))


class LoadedModel:
    """A model version ready to segment volumes with one backend.

    Made by :func:`load_model`. Not thread-safe: one per worker.
    """

    def __init__(self, version: ModelVersion, bundle: OpenBundle, backend: Backend,
                 network: object, device: torch.device) -> None:
        self.version = version
        self.bundle = bundle
        self.backend = backend
        self.network = network
        self.device = device
        self._pre = _float32_resampling(bundle.preprocessing())
        self._inferer = bundle.inferer()
        self._key = bundle.image_key
        self._activation: int | None = None

    def memory_estimate(self, shape: tuple[int, ...], affine: np.ndarray, *,
                        baseline_bytes: int | None = None) -> MemoryEstimate:
        """Predicted peak memory of segmenting a volume of ``shape`` (slices, rows,
        columns) with index -> LPS ``affine``; see :mod:`pipelines.memory`.

        The network's activations are measured once per loaded model (one forward
        pass on half a window) and kept.
        """
        info = self.bundle.info
        if self._activation is None:
            import torch.nn as nn

            net = self.network if isinstance(self.network, nn.Module) else self.bundle.network("cpu")
            self._activation = activation_bytes(net, info.roi_size, info.in_channels,
                                                device=self.device if net is self.network else "cpu")
        try:
            window = WindowSettings.from_inferer(self._inferer)
            roi, batch = window.roi_size, window.sw_batch_size
        except ValueError:
            roi, batch = info.roi_size, info.sw_batch_size
        return estimate_memory(source_shape=shape, source_affine=affine,
                               model_spacing_mm=info.input_spacing, roi_size=roi,
                               sw_batch_size=batch, channels=len(self.version.labels) + 1,
                               activation=self._activation, baseline_bytes=baseline_bytes)

    def preprocess(self, array: np.ndarray, affine: np.ndarray) -> MetaTensor:
        """The bundle's preprocessing of a volume: a channel-first MetaTensor on the
        model grid (its ``applied_operations`` allow inversion).

        Raises
        ------
        InferenceInputError
            If the array or affine is malformed.
        """
        arr = np.asarray(array)
        aff = np.asarray(affine, dtype=np.float64)
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise InferenceInputError(f"array must be 3-D (slices, rows, columns), got {arr.shape}")
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or not np.allclose(aff[3], (0, 0, 0, 1)) \
                or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise InferenceInputError("affine must be a finite invertible 4x4 matrix with last "
                                      "row (0, 0, 0, 1)")
        img = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None],
                         affine=torch.as_tensor(LPS_TO_RAS @ aff, dtype=torch.float64),
                         meta={"space": "RAS", "original_channel_dim": "no_channel"})
        return self._pre({self._key: img})[self._key]

    def to_source_grid(self, probs: torch.Tensor, img: MetaTensor, shape: tuple[int, ...],
                       affine: np.ndarray) -> np.ndarray:
        """Carry per-channel probabilities (C, X, Y, Z) on the model grid of ``img`` back
        to the source grid by (tri)linear interpolation, and take the argmax there.

        The model grid is known by its affine (``img.affine``, RAS), which MONAI keeps
        up to date through every spatial transform of the preprocessing; the source
        voxel centres are mapped into model-grid index space and interpolated, with
        border values outside (as MONAI's ``Spacingd`` inverse, padding "border").
        This gives the labels MONAI's inverse would, up to float rounding, without its
        dense sampling grid (3 floats per source voxel) or full-resolution channels:
        see :func:`labels_on_source_grid`.

        Returns
        -------
        numpy.ndarray
            uint8 label map of ``shape`` (the source grid).

        Raises
        ------
        PipelineError
            If the model grid's affine is not invertible or the shapes do not fit.
        """
        model_affine = np.asarray(img.affine, dtype=np.float64)
        if probs.ndim != 4 or tuple(probs.shape[1:]) != tuple(img.shape[1:]):
            raise PipelineError(f"model {self.version.version}: probabilities of shape "
                                f"{tuple(probs.shape)} do not fit the model grid "
                                f"{tuple(img.shape[1:])}")
        if model_affine.shape != (4, 4) or abs(np.linalg.det(model_affine[:3, :3])) < 1e-9:
            raise PipelineError(f"model {self.version.version}: the model grid's affine is not "
                                "invertible; the bundle's preprocessing cannot be inverted")
        source_ras = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        return labels_on_source_grid(probs.numpy(), np.linalg.inv(model_affine) @ source_ras,
                                     tuple(shape))

    def segment(self, array: np.ndarray, affine: np.ndarray, *, modality: str | None = None
                ) -> InferenceResult:
        """Segment a volume; the label map comes back on the input's grid.

        Parameters
        ----------
        array : numpy.ndarray
            HU values, (slices, rows, columns); converted to float32 (not modified).
        affine : numpy.ndarray
            4x4, index (k, i, j) -> LPS mm.
        modality : str, optional
            The series' Modality, checked against the bundle's metadata when given.

        Returns
        -------
        InferenceResult

        Raises
        ------
        InferenceInputError
            Malformed input, or a modality the model is not for.
        PipelineError
            If the inverted result does not land on the source grid.
        """
        mv = self.version
        if modality and mv.modality and modality.upper() != mv.modality.upper():
            raise InferenceInputError(f"model {mv.version} is for {mv.modality}, the series is "
                                      f"{modality}")
        t0 = time.perf_counter()
        img = self.preprocess(array, affine)
        t1 = time.perf_counter()
        try:
            window = WindowSettings.from_inferer(self._inferer)
        except ValueError:
            window = None
        if window is not None and len(window.roi_size) == img.ndim - 1:
            labels, t2 = self._segment_streamed(img, window, np.shape(array), affine)
        else:  # not a sliding-window inferer: MONAI's whole-image output, as before
            with torch.inference_mode():
                logits = self._inferer(img.as_tensor()[None].to(self.device), self.network)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                logits = logits[0].float().cpu()
            t2 = time.perf_counter()
            labels = self.to_source_grid(self._activate(logits), img, np.shape(array), affine)
        t3 = time.perf_counter()
        timings = StageTimings(preprocess_s=t1 - t0, inference_s=t2 - t1, postprocess_s=t3 - t2)
        LOG.info("%s on %s: input %s -> model grid %s -> %s; %.2f s pre, %.2f s infer, %.2f s post",
                 mv.version, self.backend.value, tuple(np.shape(array)), tuple(img.shape[1:]),
                 labels.shape, timings.preprocess_s, timings.inference_s, timings.postprocess_s)
        return InferenceResult(labels=labels, affine=np.array(affine, dtype=np.float64, copy=True),
                               label_specs=mv.labels, version=mv.version,
                               device_uid=mv.device_uid, backend=self.backend,
                               model_grid_shape=tuple(img.shape[1:]), timings=timings)

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bundle.activation == "softmax":
            return torch.softmax(logits, dim=0)
        if self.bundle.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    def _segment_streamed(self, img: MetaTensor, window: WindowSettings, shape: tuple[int, ...],
                          affine: np.ndarray) -> tuple[np.ndarray, float]:
        """Sliding-window inference stitched band by band (:mod:`pipelines.stitching`),
        each finished slab reduced at once to what the return to the source grid needs:

        * two channels: the map ``p1 - p0`` of the activated output (float32, one value
          per model-grid voxel), carried back by linear interpolation and thresholded
          at 0, as before (exactly the argmax of the interpolated probabilities);
        * more: the argmax label map (uint8, uint16 beyond 255 labels), carried back by
          nearest neighbour in slabs - what the bundle's own post-processing does
          (``AsDiscreted(argmax)`` then ``Invertd(nearest_interp=True)``).

        Memory: one band of the stitcher plus one model-grid map, never channels x
        voxels. Returns the source-grid labels and the time inference ended.
        """
        grid = tuple(int(s) for s in img.shape[1:])
        state: dict[str, np.ndarray] = {}
        expected = len(self.version.labels) + 1

        def emit(start: int, stop: int, values: torch.Tensor) -> None:
            channels = int(values.shape[0])
            if channels != expected:
                raise PipelineError(f"model {self.version.version}: the network gives {channels} "
                                    f"channels, its labels need {expected}")
            idx = [slice(None)] * 3
            idx[axis_of[0]] = slice(start, stop)
            if channels == 2:
                probs = self._activate(values)
                out = state.setdefault("score", np.empty(grid, dtype=np.float32))
                out[tuple(idx)] = (probs[1] - probs[0]).numpy()
            else:
                dtype = np.uint8 if channels <= 256 else np.uint16
                out = state.setdefault("labels", np.empty(grid, dtype=dtype))
                out[tuple(idx)] = torch.argmax(values, dim=0).numpy().astype(dtype, copy=False)

        from pipelines.stitching import band_axis

        padded = [max(g, r) for g, r in zip(grid, window.roi_size, strict=True)]
        axis_of = [band_axis(padded)]
        with torch.inference_mode():
            x = img.as_tensor()[None]
            stream_sliding_window(x, self.network, window, emit, device=self.device)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        model_affine = np.asarray(img.affine, dtype=np.float64)
        if model_affine.shape != (4, 4) or abs(np.linalg.det(model_affine[:3, :3])) < 1e-9:
            raise PipelineError(f"model {self.version.version}: the model grid's affine is not "
                                "invertible; the bundle's preprocessing cannot be inverted")
        index_map = np.linalg.inv(model_affine) @ LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        if "score" in state:
            labels = _resample_argmax([state.pop("score")], index_map, tuple(shape))
        else:
            labels = nearest_labels_on_source_grid(state.pop("labels"), index_map, tuple(shape))
        return labels, t2


def _float32_resampling(pre: Any) -> Any:
    """Make every ``Spacingd`` of a preprocessing ``Compose`` resample in float32.

    MONAI's default is float64, which copies the whole source volume to float64 and
    then again to a contiguous block (500 x 512 x 512: 2 GiB on top of the float32
    volume). Its output is float32 either way; the difference is rounding far below a
    HU (about 1e-4 HU), and the labels on the phantoms are the same.
    """
    from monai.transforms import Spacingd

    for t in getattr(pre, "transforms", ()):
        if isinstance(t, Spacingd):
            t.dtype = tuple(np.float32 for _ in t.dtype)
    return pre


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
    return _resample_argmax(maps, index_map, shape, chunk=chunk)


def _is_axis_aligned(index_map: np.ndarray) -> bool:
    rot = np.asarray(index_map, dtype=np.float64)[:3, :3]
    nonzero = np.abs(rot) > 1e-6 * np.abs(rot).max()
    return bool(np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1))


def _resample_argmax(maps: list[np.ndarray], index_map: np.ndarray, shape: tuple[int, ...], *,
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


def load_model(model_version: ModelVersion, *, registry: Registry | None = None,
               backend: Backend | str | None = None) -> LoadedModel:
    """Load a registered model for inference.

    Parameters
    ----------
    model_version : ModelVersion
        From :meth:`registry.store.Registry.get` or ``resolve``.
    registry : Registry, optional
        Where the version's optimised artifacts and their checks are recorded;
        without it only PyTorch backends are considered.
    backend : Backend or str, optional
        Force a backend (it must be available; non-PyTorch ones need their artifact).

    Returns
    -------
    LoadedModel

    Raises
    ------
    ModelLoadError
        If the bundle cannot be opened, takes other than one input channel, or the
        forced backend is not available.
    """
    mv = model_version
    try:
        bundle = open_bundle(mv.path)
    except Exception as exc:  # BundleError or an OS error on the version directory
        raise ModelLoadError(mv.version, f"cannot open its bundle ({exc})") from exc
    if bundle.info.in_channels != 1:
        raise ModelLoadError(mv.version, f"takes {bundle.info.in_channels} input channels; "
                             "only single-channel (one series) models are served")
    if backend is None:
        chosen, why = choose_backend(mv, registry)
    else:
        chosen, why = Backend(backend), "asked for"
        if chosen not in available_backends():
            raise ModelLoadError(mv.version, f"backend {chosen.value} is not available here "
                                 f"(available: {[b.value for b in available_backends()]})")
    cuda = chosen.needs_cuda
    device = torch.device("cuda" if cuda else "cpu")
    network: object
    if chosen in (Backend.TORCH_CPU, Backend.TORCH_CUDA):
        network = bundle.network(device)
    else:
        kind = chosen.artifact
        arts = [a for a in (registry.artifacts(mv.version) if registry else []) if a.kind is kind]
        if kind is ArtifactKind.TENSORRT:
            arts = [a for a in arts if a.path.stem == a.key]
        if not arts or not arts[-1].path.is_file():
            raise ModelLoadError(mv.version, f"no {kind.value} artifact; run "
                                 f"`dicom-node models optimize {mv.version}`")
        path = arts[-1].path
        try:
            if kind is ArtifactKind.ONNX:
                network = OnnxRunner(path, cuda=cuda, out_channels=len(mv.labels) + 1)
            else:
                network = TensorRTRunner(path)
        except RuntimeError as exc:
            raise ModelLoadError(mv.version, f"{chosen.value}: {exc}") from exc
    LOG.info("model %s: serving with %s (%s)", mv.version, chosen.value, why)
    return LoadedModel(mv, bundle, chosen, network, device)


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
        from pipelines.export.checks import time_batches

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
    from pipelines.export.tensorrt import tensorrt_status

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
