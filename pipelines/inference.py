"""Running a registered model on a CT volume.

:func:`load_model` builds the network from the version's MONAI bundle and picks the
backend: the fastest *verified* one available on this host (PyTorch CPU/CUDA, ONNX
Runtime CPU/CUDA, TensorRT), by the timings :func:`registry.export.optimize`
recorded; the choice is logged. :meth:`LoadedModel.segment` applies the bundle's own
preprocessing (every transform after ``LoadImaged``/``EnsureChannelFirstd``) to a
MONAI ``MetaTensor`` built from the volume, runs the bundle's sliding-window inferer,
inverts the spatial transforms (``Orientationd``, ``Spacingd``) on the class
probabilities and returns the argmax label map on the SOURCE grid.

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

import numpy as np
import torch
from monai.data import MetaTensor

from pipelines.errors import PipelineError
from registry.bundle import OpenBundle, open_bundle
from registry.export import OnnxRunner, available_backends, device_name
from registry.records import ArtifactKind, Backend, LabelSpec, ModelVersion
from registry.store import Registry, sha256_file
from registry.tensorrt import TensorRTRunner

LOG = logging.getLogger(__name__)

#: LPS <-> RAS: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Preference when no timings were recorded (fastest first, by kind of hardware).
STATIC_PREFERENCE = (Backend.TENSORRT, Backend.ORT_CUDA, Backend.TORCH_CUDA, Backend.ORT_CPU,
                     Backend.TORCH_CPU)


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
        Activation, inversion of the spatial transforms, argmax.
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
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.uint8 \
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
        self._pre = bundle.preprocessing()
        self._inferer = bundle.inferer()
        self._key = bundle.image_key

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
        """Invert the preprocessing's spatial transforms on per-channel probabilities
        (C, X, Y, Z) on the model grid of ``img``, and take the argmax.

        Returns
        -------
        numpy.ndarray
            uint8 label map of ``shape`` (the source grid).

        Raises
        ------
        PipelineError
            If the result does not land on the source grid (shape or affine).
        """
        # Two channels: argmax is "channel 1 above channel 0", and resampling is linear, so
        # resampling the one difference map and thresholding it at 0 gives the same labels
        # as resampling both channels and taking the argmax, at half the cost.
        two = probs.shape[0] == 2
        data = probs[1:2] - probs[0:1] if two else probs
        pred = MetaTensor(data, affine=img.affine, meta=dict(img.meta),
                          applied_operations=list(img.applied_operations))
        inv = torch.as_tensor(self._pre.inverse({self._key: pred})[self._key])
        labels = (inv[0] > 0).numpy().astype(np.uint8) if two else _argmax0(inv)
        mv = self.version
        if labels.shape != tuple(shape):
            raise PipelineError(f"model {mv.version}: inverted result has shape {labels.shape}, "
                                f"the source grid is {tuple(shape)}; the bundle's "
                                "preprocessing is not invertible")
        inv_affine = np.asarray(inv.affine, dtype=np.float64)
        if not np.allclose(LPS_TO_RAS @ inv_affine, np.asarray(affine, np.float64), atol=1e-3):
            raise PipelineError(f"model {mv.version}: inverted result's affine differs from the "
                                "source grid's")
        return labels

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
        with torch.inference_mode():
            logits = self._inferer(img[None].as_tensor().to(self.device), self.network)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            logits = logits[0].float().cpu()
        t2 = time.perf_counter()
        if self.bundle.activation == "softmax":
            probs = torch.softmax(logits, dim=0)
        elif self.bundle.activation == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = logits
        labels = self.to_source_grid(probs, img, np.shape(array), affine)
        t3 = time.perf_counter()
        timings = StageTimings(preprocess_s=t1 - t0, inference_s=t2 - t1, postprocess_s=t3 - t2)
        LOG.info("%s on %s: input %s -> model grid %s -> %s; %.2f s pre, %.2f s infer, %.2f s post",
                 mv.version, self.backend.value, tuple(np.shape(array)), tuple(img.shape[1:]),
                 labels.shape, timings.preprocess_s, timings.inference_s, timings.postprocess_s)
        return InferenceResult(labels=labels, affine=np.array(affine, dtype=np.float64, copy=True),
                               label_specs=mv.labels, version=mv.version,
                               device_uid=mv.device_uid, backend=self.backend,
                               model_grid_shape=tuple(img.shape[1:]), timings=timings)


def _argmax0(t: torch.Tensor) -> np.ndarray:
    """Argmax over the first axis as uint8 (first maximum wins, as ``torch.argmax``).

    One pass per channel: ``torch.argmax(dim=0)`` on the inverted, non-contiguous
    probabilities took seconds per 100 slices on a CPU.
    """
    best = t[0].clone()
    labels = torch.zeros(best.shape, dtype=torch.uint8)
    for c in range(1, t.shape[0]):
        better = t[c] > best
        labels[better] = c
        best = torch.maximum(best, t[c])
    return labels.numpy()


def choose_backend(version: ModelVersion, registry: Registry | None) -> tuple[Backend, str]:
    """The fastest verified backend available here, and why it was chosen.

    PyTorch is the reference and always counts as verified; other backends count
    only with a passing check recorded for this device and their artifact file intact
    (SHA-256 as registered). Recorded median times decide; without any, the static
    order TensorRT > ONNX Runtime CUDA > PyTorch CUDA > ONNX Runtime CPU > PyTorch CPU.
    """
    here = available_backends()
    usable: dict[Backend, float | None] = {b: None for b in here
                                           if b in (Backend.TORCH_CPU, Backend.TORCH_CUDA)}
    if registry is not None:
        intact = {a.kind: a for a in registry.artifacts(version.version)
                  if a.path.is_file() and (a.kind is not ArtifactKind.TENSORRT
                                           or a.path.stem == a.key)}
        for v in registry.verifications(version.version):
            if v.backend not in here or v.device_name != device_name(v.backend):
                continue
            if not v.verified:
                continue  # PyTorch stays usable (it is the reference); others are not added
            art = intact.get(v.backend.artifact)
            if v.backend.artifact is not ArtifactKind.PYTORCH:
                if art is None or sha256_file(art.path) != art.sha256:
                    continue
            usable[v.backend] = v.median_ms
    timed = {b: ms for b, ms in usable.items() if ms is not None}
    if timed:
        best = min(timed, key=lambda b: timed[b])
        others = ", ".join(f"{b.value} {ms:.0f} ms" for b, ms in sorted(timed.items(),
                                                                         key=lambda kv: kv[1]))
        return best, f"fastest verified on {device_name(best)} ({others} per batch)"
    best = next(b for b in STATIC_PREFERENCE if b in usable)
    return best, "no timings recorded; static preference among verified backends"


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
    from registry.export import time_batches

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    base = load_model(model_version, registry=registry, backend=Backend.TORCH_CPU)
    img = base.preprocess(array, affine)
    grid = tuple(int(s) for s in img.shape[1:])
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dname = device_name(Backend.TORCH_CUDA if cuda else Backend.TORCH_CPU)
    x = img[None].as_tensor().to(dev)
    inferer = base.bundle.inferer()
    rows: list[BenchmarkRow] = []
    ref: np.ndarray | None = None

    def run_one(name: str, net: object, device: str, note: str = "",
                autocast: bool = False, inp: torch.Tensor | None = None) -> None:
        nonlocal ref
        xin = x if inp is None else inp
        out: list[torch.Tensor] = []

        def once() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                        enabled=autocast):
                y = inferer(xin, net)
            out[:] = [y]
        try:
            ms = time_batches(once, repeats=repeats, warmup=warmup, cuda=cuda)
        except Exception as exc:  # noqa: BLE001 - a backend failing is a benchmark result
            LOG.warning("benchmark %s failed: %s", name, exc)
            rows.append(BenchmarkRow(name=name, device=device, median_ms=None,
                                     note=f"failed: {str(exc).splitlines()[0][:120]}"))
            return
        lab = torch.argmax(out[0][0].float(), dim=0).cpu().numpy()
        if ref is None:
            ref = lab
        rows.append(BenchmarkRow(name=name, device=device, median_ms=ms, runs=repeats,
                                 argmax_agreement=float(np.mean(lab == ref)), note=note))
        LOG.info("benchmark %s on %s: %.1f ms (median of %d)", name, device, ms, repeats)

    eager = base.bundle.network(dev)
    run_one("pytorch-eager", eager, dname, "fp32")
    if compile_:
        run_one("torch.compile", torch.compile(eager), dname, "fp32, first call compiles (warm-up)")
        if cuda:
            run_one("torch.compile", torch.compile(eager), dname, "fp16 autocast", autocast=True)
    here = available_backends()
    onnx_arts = [a for a in (registry.artifacts(model_version.version) if registry else [])
                 if a.kind is ArtifactKind.ONNX and a.path.is_file()]
    out_ch = len(model_version.labels) + 1
    for b in (Backend.ORT_CPU, Backend.ORT_CUDA):
        if b not in here:
            rows.append(BenchmarkRow(name=b.value, device="-", median_ms=None,
                                     note="not available on this host"))
        elif not onnx_arts:
            rows.append(BenchmarkRow(name=b.value, device=device_name(b), median_ms=None,
                                     note=f"no ONNX artifact: run `dicom-node models optimize "
                                          f"{model_version.version}`"))
        else:
            runner = OnnxRunner(onnx_arts[-1].path, cuda=b is Backend.ORT_CUDA, out_channels=out_ch)
            run_one(b.value, runner, device_name(b), f"onnxruntime {_ort_version()}",
                    inp=x.cpu() if b is Backend.ORT_CPU else x)
    from registry.tensorrt import tensorrt_status

    status = tensorrt_status()
    trt_arts = [a for a in (registry.artifacts(model_version.version) if registry else [])
                if a.kind is ArtifactKind.TENSORRT and a.path.is_file() and a.path.stem == a.key]
    if not status.available:
        rows.append(BenchmarkRow(name=Backend.TENSORRT.value, device="-", median_ms=None,
                                 note=f"TensorRT not available: {status.reason}"))
    elif not trt_arts:
        rows.append(BenchmarkRow(name=Backend.TENSORRT.value, device=status.gpu_name,
                                 median_ms=None, note="no engine: run `dicom-node models "
                                 f"optimize {model_version.version}`"))
    else:
        run_one(Backend.TENSORRT.value, TensorRTRunner(trt_arts[-1].path), status.gpu_name,
                f"TensorRT {status.version} fp16")
    return grid, tuple(rows)


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)
