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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from pipelines.backends import choose_backend
from pipelines.errors import PipelineError
from pipelines.grid import labels_on_source_grid, nearest_labels_on_source_grid, resample_argmax
from pipelines.memory import MemoryEstimate, activation_bytes, estimate_memory
from pipelines.stitching import WindowSettings, stream_sliding_window
from pipelines.export.checks import available_backends
from pipelines.export.onnx import OnnxRunner
from pipelines.export.tensorrt import TensorRTRunner
from registry.bundle import OpenBundle, open_bundle
from registry.records import ArtifactKind, Backend, LabelSpec, ModelVersion
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
            self._check_channels(int(logits.shape[0]))
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

    def _check_channels(self, channels: int) -> None:
        """The network must give one channel per label and the background.

        Raises
        ------
        PipelineError
            If it gives another number of channels.
        """
        expected = len(self.version.labels) + 1
        if channels != expected:
            raise PipelineError(f"model {self.version.version}: the network gives {channels} "
                                f"channels, its labels need {expected}")

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

        def emit(start: int, stop: int, values: torch.Tensor) -> None:
            channels = int(values.shape[0])
            self._check_channels(channels)
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
            labels = resample_argmax([state.pop("score")], index_map, tuple(shape))
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
        # The registry ran the network on a whole window when it took the version in
        # (intake); the inference checks the channels of every window it runs, so the
        # version is not run a second time here (as much work as one window of the
        # inference; benchmarks/README.md, infer_vs_deploy.py).
        bundle = open_bundle(mv.path, run_network=False)
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
