"""A model version as a model repository for NVIDIA Triton Inference Server.

:func:`export_triton` writes two Triton models of one registered version into a
model repository folder, both serving the version's *verified* ONNX export (input
``image`` (N, C, X, Y, Z) float32, output ``pred`` (N, labels + 1, X, Y, Z) logits, the
bundle's sliding-window patch):

* ``<version>``: Triton's ONNX Runtime backend (``platform: "onnxruntime_onnx"``),
  GPU instances with TensorRT as the GPU execution accelerator (FP16), dynamic
  batching; ``cpu=True`` writes CPU instances without an accelerator;
* ``<version>-python``: Triton's Python backend running the same ONNX file with ONNX
  Runtime (``model.py``), for servers without the ONNX Runtime backend (PyTriton's
  ``tritonserver``) or to pin the ONNX Runtime version; the Python environment of the
  server needs ``onnxruntime`` (``onnxruntime-gpu`` for GPU instances) and ``numpy``.

The configuration is written as text in Triton's ``config.pbtxt`` format (a protobuf
``ModelConfig`` in text form) by hand: Triton's own Python packages have no writer for
it, and the few fields are plain. The tests parse each file back with the
``ModelConfig`` protobuf that ``tritonclient`` ships.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from dicom_node.foundation.durable import replace_durably
from pipelines.errors import ExportError
from pipelines.export.onnx import INPUT_NAME, OUTPUT_NAME
from registry.artifacts import sha256_file
from registry.bundle import BundleInfo, open_bundle
from registry.records import ArtifactKind, Backend, ModelVersion
from registry.store import Registry

LOG = logging.getLogger(__name__)

#: Suffix of the Python-backend variant's model name.
PYTHON_SUFFIX = "-python"
#: The Triton model version folder the export writes.
MODEL_VERSION_DIR = "1"

_PYTHON_MODEL = '''\
"""Triton Python backend: the dicom-node model {version} with ONNX Runtime.

Written by `dicom-node models export-triton`; runs the ONNX file beside it
(sha256 {sha256}). The server's Python environment needs numpy and onnxruntime
(onnxruntime-gpu for GPU instances).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "{input_name}"
OUTPUT_NAME = "{output_name}"


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and \\
                "CUDAExecutionProvider" in ort.get_available_providers():
            device = int(args.get("model_instance_device_id") or 0)
            providers = [("CUDAExecutionProvider", {{"device_id": device}}), "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), sess_options=opts,
                                            providers=providers)

    def execute(self, requests):
        # dynamic batching hands several requests at once: one ONNX Runtime run for all
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        batch = np.ascontiguousarray(np.concatenate(arrays, axis=0), dtype=np.float32)
        out = self.session.run([OUTPUT_NAME], {{INPUT_NAME: batch}})[0]
        responses = []
        start = 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(OUTPUT_NAME, out[start:start + n])]))
            start += n
        return responses
'''


@dataclass(frozen=True, kw_only=True, slots=True)
class TritonExport:
    """What :func:`export_triton` wrote.

    Parameters
    ----------
    version : str
    repository : pathlib.Path
        The model repository folder (``tritonserver --model-repository``).
    onnx_model : str
        Name of the ONNX Runtime backend model.
    python_model : str
        Name of the Python backend model.
    input_dims, output_dims : tuple of int
        Per-request dims without the batch axis (C, X, Y, Z).
    max_batch_size : int
    instances : int
        Instances per device (GPU) or on the CPU.
    kind : str
        ``KIND_GPU`` or ``KIND_CPU``.
    onnx_sha256 : str
    """

    version: str
    repository: Path
    onnx_model: str
    python_model: str
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]
    max_batch_size: int
    instances: int
    kind: str
    onnx_sha256: str


def triton_model_name(version: str, variant: str = "onnx") -> str:
    """The Triton model name of a version: ``<version>`` for the ONNX Runtime backend
    model, ``<version>-python`` for the Python backend one.

    Raises
    ------
    ValueError
        If ``variant`` is not ``onnx`` or ``python``.
    """
    if variant == "onnx":
        return version
    if variant == "python":
        return version + PYTHON_SUFFIX
    raise ValueError(f"variant must be 'onnx' or 'python', got {variant!r}")


def _dims(values: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def model_config(*, name: str, backend: str, input_dims: tuple[int, ...],
                 output_dims: tuple[int, ...], max_batch_size: int, instances: int,
                 kind: str, tensorrt: bool, header: str) -> str:
    """``config.pbtxt`` text of one model (see the module docstring)."""
    how = 'platform: "onnxruntime_onnx"' if backend == "onnxruntime" else 'backend: "python"'
    lines = [f"# {line}" for line in header.splitlines()] + [
        f'name: "{name}"',
        how,
        f"max_batch_size: {max_batch_size}",
        "input [",
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: {_dims(input_dims)} }}',
        "]",
        "output [",
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: {_dims(output_dims)} }}',
        "]",
        f"instance_group [ {{ count: {instances} kind: {kind} }} ]",
        "dynamic_batching { max_queue_delay_microseconds: 2000 }",
    ]
    if tensorrt:
        lines += [
            "optimization { execution_accelerators {",
            "  gpu_execution_accelerator : [ {",
            '    name : "tensorrt"',
            '    parameters { key: "precision_mode" value: "FP16" }',
            '    parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            '    parameters { key: "trt_engine_cache_enable" value: "true" }',
            "  } ]",
            "} }",
        ]
    return "\n".join(lines) + "\n"


def verified_onnx(registry: Registry, version: str) -> Path:
    """The version's ONNX artifact, when ONNX Runtime's check against PyTorch passed and
    the file is intact; otherwise :func:`pipelines.export.optimize.optimize` is run first.

    Raises
    ------
    ExportError
        If the export does not pass its check.
    """
    def current() -> Path | None:
        arts = [a for a in registry.artifacts(version) if a.kind is ArtifactKind.ONNX
                and a.path.is_file()]
        ok = any(v.verified for v in registry.verifications(version)
                 if v.backend is Backend.ORT_CPU)
        if arts and ok and sha256_file(arts[-1].path) == arts[-1].sha256:
            return arts[-1].path
        return None

    path = current()
    if path is None:
        from pipelines.export.optimize import optimize

        LOG.info("%s: no verified ONNX export yet; running the optimisation check first", version)
        optimize(registry, version, repeats=1)
        path = current()
    if path is None:
        raise ExportError(version, "triton", "the ONNX export does not agree with PyTorch "
                          "(see `dicom-node models show`); nothing written")
    return path


def export_triton(registry: Registry, version: str, repository: Path | str, *,
                  max_batch_size: int | None = None, instances: int = 1,
                  cpu: bool = False) -> TritonExport:
    """Write the version's two Triton models into ``repository`` (see module docstring).

    Existing models of the same names are replaced; other models in the folder are
    left alone.

    Parameters
    ----------
    registry : Registry
    version : str
    repository : pathlib.Path or str
        The model repository folder (created when missing).
    max_batch_size : int, optional
        Largest batch Triton forms (default: twice the bundle's ``sw_batch_size``, so
        two windows' batches can be served together).
    instances : int
        Model instances per GPU (or on the CPU), >= 1.
    cpu : bool
        CPU instances and no TensorRT accelerator (a CPU-only server).

    Returns
    -------
    TritonExport

    Raises
    ------
    ValueError
        If ``max_batch_size`` or ``instances`` is < 1.
    VersionNotFoundError, BundleError, ExportError
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    mv = registry.get(version)
    info = open_bundle(mv.path).info
    onnx_path = verified_onnx(registry, version)
    ex = TritonExport(version=version, repository=Path(repository),
                      onnx_model=triton_model_name(version, "onnx"),
                      python_model=triton_model_name(version, "python"),
                      input_dims=(info.in_channels, *info.roi_size),
                      output_dims=(len(info.labels) + 1, *info.roi_size),
                      max_batch_size=max_batch_size or 2 * info.sw_batch_size,
                      instances=instances, kind="KIND_CPU" if cpu else "KIND_GPU",
                      onnx_sha256=sha256_file(onnx_path))
    ex.repository.mkdir(parents=True, exist_ok=True)
    header = _header(mv, info, ex.onnx_sha256)
    _write_model(ex, ex.onnx_model, onnx_path, model_py=None,
                 config=_config(ex, ex.onnx_model, "onnxruntime", header, tensorrt=not cpu))
    _write_model(ex, ex.python_model, onnx_path,
                 model_py=_PYTHON_MODEL.format(version=version, sha256=ex.onnx_sha256,
                                               input_name=INPUT_NAME, output_name=OUTPUT_NAME),
                 config=_config(ex, ex.python_model, "python", header, tensorrt=False))
    LOG.info("%s: Triton models %s and %s written to %s (%s, max batch %d, %d instance(s))",
             version, ex.onnx_model, ex.python_model, ex.repository, ex.kind, ex.max_batch_size,
             instances)
    return ex


def _config(ex: TritonExport, name: str, backend: str, header: str, *, tensorrt: bool) -> str:
    """``config.pbtxt`` of one of the export's models."""
    return model_config(name=name, backend=backend, input_dims=ex.input_dims,
                        output_dims=ex.output_dims, max_batch_size=ex.max_batch_size,
                        instances=ex.instances, kind=ex.kind, tensorrt=tensorrt, header=header)


def _header(mv: ModelVersion, info: BundleInfo, onnx_sha256: str) -> str:
    """The comment at the top of each ``config.pbtxt``: the model, its labels, its ONNX."""
    return (f"dicom-node model {mv.version} ({mv.task}, labels "
            f"{', '.join(lab.name for lab in info.labels)})\n"
            f"ONNX sha256 {onnx_sha256}; written by `dicom-node models export-triton`")


def _write_model(ex: TritonExport, name: str, onnx_path: Path, *, config: str,
                 model_py: str | None) -> Path:
    """One Triton model folder (``config.pbtxt``, ``1/model.onnx``, for the Python backend
    ``1/model.py``), built beside its place and renamed into it, replacing an older one.

    Raises
    ------
    ExportError
        If the ONNX file's copy does not have the export's SHA-256.
    """
    repo, version = ex.repository, ex.version
    tmp = repo / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / MODEL_VERSION_DIR).mkdir(parents=True)
    shutil.copy2(onnx_path, tmp / MODEL_VERSION_DIR / "model.onnx")
    if sha256_file(tmp / MODEL_VERSION_DIR / "model.onnx") != ex.onnx_sha256:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(version, "triton", "the ONNX file changed while it was copied")
    if model_py is not None:
        (tmp / MODEL_VERSION_DIR / "model.py").write_text(model_py, encoding="utf-8")
    (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
    final = repo / name
    if final.exists():
        shutil.rmtree(final)
    replace_durably(tmp, final)
    return final
