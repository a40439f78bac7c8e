"""TensorRT engines built from a version's ONNX export (import-guarded).

TensorRT is optional (``pip install dicom-node[gpu]`` on a GPU host). Where the
``tensorrt`` package or a CUDA GPU is absent, :func:`tensorrt_status` says why, and
callers keep the ONNX artifact: nothing here pretends to have built an engine.

An engine is built with FP16 enabled and one optimisation profile covering the
sliding-window batch (1 .. ``sw_batch_size`` patches of ``roi_size``). The registry
keeps engines as artifacts of the version (``<version-dir>/tensorrt/<key>.plan``), the
key (:func:`engine_key`) being a hash of the GPU name, the TensorRT version, the ONNX
file's SHA-256 and the profile, so that a driver or GPU change never loads a stale plan.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.export.onnx import INPUT_NAME, OUTPUT_NAME

LOG = logging.getLogger(__name__)

try:  # optional dependency: import-guarded on purpose (DESIGN decision 9)
    import tensorrt as trt
    _IMPORT_ERROR = ""
except ImportError as _exc:  # pragma: no cover - depends on the host
    trt = None
    _IMPORT_ERROR = f"the tensorrt Python package is not installed ({_exc})"


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorRTStatus:
    """Whether TensorRT engines can be built and run on this host.

    Parameters
    ----------
    available : bool
    reason : str
        Why not, in words ('' when available).
    version : str
        TensorRT version ('' when not installed).
    gpu_name : str
        CUDA device 0's name ('' without a GPU).
    """

    available: bool
    reason: str = ""
    version: str = ""
    gpu_name: str = ""

    def __post_init__(self) -> None:
        if not self.available and not self.reason:
            raise ValueError("reason must say why TensorRT is not available")


def tensorrt_status() -> TensorRTStatus:
    """Probe for the ``tensorrt`` package and a CUDA GPU."""
    version = getattr(trt, "__version__", "") if trt is not None else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    if trt is None:
        return TensorRTStatus(available=False, reason=_IMPORT_ERROR, gpu_name=gpu)
    if not gpu:
        return TensorRTStatus(available=False, version=version, reason="no CUDA GPU "
                              "(torch.cuda.is_available() is False)")
    return TensorRTStatus(available=True, version=version, gpu_name=gpu)


def engine_key(*, gpu_name: str, trt_version: str, onnx_sha256: str,
               min_batch: int, opt_batch: int, max_batch: int, patch_shape: tuple[int, ...]) -> str:
    """Cache key of an engine: hex SHA-256 (first 32 digits) of what the plan depends on."""
    text = "|".join([gpu_name, trt_version, onnx_sha256, f"{min_batch}/{opt_batch}/{max_batch}",
                     "x".join(str(s) for s in patch_shape), "fp16"])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_engine(onnx_path: Path, plan_path: Path, *, patch_shape: tuple[int, ...],
                 max_batch: int, opt_batch: int | None = None, workspace_gib: float = 4.0) -> Path:
    """Build an FP16 TensorRT engine from an ONNX file (dynamic batch on axis 0).

    Parameters
    ----------
    onnx_path : pathlib.Path
        ONNX model with input ``image`` (N, C, X, Y, Z) and output ``pred``.
    plan_path : pathlib.Path
        Where to write the serialised engine (the registry places it: see
        :meth:`registry.store.Registry.write_artifact_file`).
    patch_shape : tuple of int
        (C, X, Y, Z) of one sliding-window patch.
    max_batch, opt_batch : int
        Optimisation profile: batch 1 .. ``max_batch``, tuned for ``opt_batch``
        (default ``max_batch``).
    workspace_gib : float
        Builder workspace limit, GiB.

    Returns
    -------
    pathlib.Path
        ``plan_path``.

    Raises
    ------
    RuntimeError
        If TensorRT is not available, the ONNX cannot be parsed, or the build fails.
    """
    status = tensorrt_status()
    if not status.available:
        raise RuntimeError(f"TensorRT not available: {status.reason}")
    assert trt is not None
    opt_batch = opt_batch or max_batch
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # the parser owns the network's weights: it lives until the engine is built
    network, _parser = _parse_onnx(builder, logger, onnx_path)
    config = _builder_config(builder, patch_shape=patch_shape, opt_batch=opt_batch,
                             max_batch=max_batch, workspace_gib=workspace_gib)
    LOG.info("building TensorRT %s engine from %s (batch 1..%d, opt %d, patch %s)",
             trt.__version__, onnx_path, max_batch, opt_batch, patch_shape)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    with open(plan_path, "wb") as f:
        f.write(memoryview(plan))
    return plan_path


def _parse_onnx(builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """A TensorRT network definition parsed from the ONNX file, and its parser.

    Raises
    ------
    RuntimeError
        If TensorRT cannot parse the file.
    """
    assert trt is not None
    major = int(str(trt.__version__).split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    return network, parser


def _builder_config(builder: Any, *, patch_shape: tuple[int, ...], opt_batch: int,
                    max_batch: int, workspace_gib: float) -> Any:
    """The build configuration: workspace limit, FP16 where the GPU has it fast, and one
    optimisation profile for batch 1 .. ``max_batch`` of ``patch_shape``."""
    assert trt is not None
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        LOG.warning("this GPU has no fast FP16; building an FP32 engine")
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *patch_shape), (opt_batch, *patch_shape),
                      (max_batch, *patch_shape))
    config.add_optimization_profile(profile)
    return config


class TensorRTRunner:
    """Runs a serialised engine on CUDA tensors; a drop-in network for MONAI inferers.

    Parameters
    ----------
    plan_path : pathlib.Path
        The engine file (built on this GPU with this TensorRT version).

    Raises
    ------
    RuntimeError
        If TensorRT is not available or the plan cannot be deserialised.
    """

    def __init__(self, plan_path: Path) -> None:
        status = tensorrt_status()
        if not status.available:
            raise RuntimeError(f"TensorRT not available: {status.reason}")
        assert trt is not None
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self._engine is None:
            raise RuntimeError(f"cannot deserialise TensorRT engine {plan_path} (built for "
                               "another GPU or TensorRT version?)")
        self._context = self._engine.create_execution_context()
        self.device = torch.device("cuda", torch.cuda.current_device())

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits of a batch ``x`` (N, C, X, Y, Z); returned on the GPU, float32."""
        src_device = x.device
        x = x.to(self.device, dtype=torch.float32).contiguous()
        ctx = self._context
        ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
        out = torch.empty(tuple(ctx.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32,
                          device=self.device)
        ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out if src_device == self.device else out.to(src_device)
