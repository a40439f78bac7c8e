"""Inference on a Triton Inference Server (``backend = "triton"``).

Pre- and post-processing stay in the node: :func:`load_triton_model` gives a
:class:`~pipelines.inference.LoadedModel` whose network is a :class:`TritonRunner`,
the callable MONAI's sliding-window inferer hands each batch of windows to; the
runner sends the batch to Triton over gRPC (PyPI ``tritonclient``) and returns the
logits. The Triton model is the version's ONNX export, written by
``dicom-node models export-triton`` (:mod:`pipelines.export.triton_repository`): ``<version>`` (ONNX
Runtime backend, TensorRT on the GPU) or ``<version>-python`` (Python backend).

Triton down, or the model not loaded there, is :class:`TritonUnavailableError`:
the job waits and is tried again with back-off (:mod:`dicom_node.runtime.worker`); there is
never a silent fallback to local inference. A request that fails on a lost
connection is tried again a few times within ``retry_s`` before that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pipelines.errors import PipelineError
from pipelines.export.onnx import INPUT_NAME, OUTPUT_NAME
from pipelines.export.triton_repository import triton_model_name
from pipelines.inference import LoadedModel, ModelLoadError
from registry.bundle import open_bundle
from registry.records import Backend, ModelVersion

LOG = logging.getLogger(__name__)

#: gRPC status codes that mean "the server or the model is not there now" (wait),
#: as opposed to a request Triton refuses (fail).
_WAIT_CODES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED",
               "StatusCode.NOT_FOUND", "StatusCode.CANCELLED", "StatusCode.UNKNOWN")
VARIANTS = ("onnx", "python")


class TritonUnavailableError(PipelineError, ConnectionError):
    """The Triton server cannot be reached or does not serve the model now.

    Parameters
    ----------
    url : str
    model : str
        The Triton model name.
    problem : str
    """

    def __init__(self, url: str, model: str, problem: str) -> None:
        self.url = url
        self.model = model
        self.problem = problem
        super().__init__(f"waiting for Triton at {url} (model {model}): {problem}")


@dataclass(frozen=True, kw_only=True, slots=True)
class TritonTarget:
    """Where and how to reach Triton.

    Parameters
    ----------
    url : str
        gRPC address ``HOST:PORT`` (Triton's default port is 8001).
    variant : str
        ``onnx`` (model ``<version>``) or ``python`` (model ``<version>-python``).
    timeout_s : float
        Deadline of one inference request, seconds (> 0).
    retry_s : float
        How long a failing request is tried again within the job before the job
        waits in the queue, seconds (>= 0).
    """

    url: str
    variant: str = "onnx"
    timeout_s: float = 60.0
    retry_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or ":" not in self.url or any(c.isspace() for c in self.url):
            raise ValueError(f"url must be HOST:PORT (gRPC), got {self.url!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.retry_s >= 0:
            raise ValueError(f"retry_s must be >= 0, got {self.retry_s}")

    def model_name(self, version: str) -> str:
        """The Triton model serving ``version``."""
        return triton_model_name(version, self.variant)


def _waits(exc: InferenceServerException) -> bool:
    status = str(exc.status() or "")
    text = str(exc.message() or "").lower()
    return status in _WAIT_CODES or "unknown model" in text or "not ready" in text \
        or "not found" in text or "failed to connect" in text or "unavailable" in text


class TritonRunner:
    """A Triton model usable as a network by MONAI inferers.

    Parameters
    ----------
    target : TritonTarget
    model : str
        Triton model name.
    out_channels : int
        Output channels the model must give (labels + background).
    """

    def __init__(self, target: TritonTarget, model: str, out_channels: int) -> None:
        self.target = target
        self.model = model
        self.out_channels = out_channels
        self.client = grpcclient.InferenceServerClient(url=target.url)
        self.requests = 0

    def check_ready(self, in_dims: tuple[int, ...]) -> None:
        """The server is live and the model is loaded with the input the bundle makes.

        Raises
        ------
        TritonUnavailableError
            The server cannot be reached, or the model is not ready.
        ModelLoadError
            The model's input or output does not fit the bundle.
        """
        t = self.target
        try:
            if not self.client.is_server_live(client_timeout=t.timeout_s):
                raise TritonUnavailableError(t.url, self.model, "the server is not live")
            if not self.client.is_model_ready(self.model, client_timeout=t.timeout_s):
                raise TritonUnavailableError(t.url, self.model, "the model is not loaded there "
                                             "(dicom-node models export-triton writes it)")
            meta = self.client.get_model_metadata(self.model, as_json=True,
                                                  client_timeout=t.timeout_s)
        except InferenceServerException as exc:
            raise TritonUnavailableError(t.url, self.model, _describe(exc)) from exc
        inputs = {i["name"]: [int(d) for d in i["shape"]] for i in meta.get("inputs", [])}
        outputs = {o["name"]: [int(d) for d in o["shape"]] for o in meta.get("outputs", [])}
        want_in, want_out = [-1, *in_dims], [-1, self.out_channels, *in_dims[1:]]
        if inputs.get(INPUT_NAME) != want_in or outputs.get(OUTPUT_NAME) != want_out:
            raise ModelLoadError(self.model, f"Triton at {t.url} serves it with inputs {inputs} "
                                 f"and outputs {outputs}; the bundle needs {INPUT_NAME} {want_in} "
                                 f"-> {OUTPUT_NAME} {want_out}")

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits of a batch ``x`` (N, C, X, Y, Z), float32, on ``x``'s device.

        Raises
        ------
        TritonUnavailableError
            The server or the model went away (after tries within ``retry_s``).
        PipelineError
            Triton refused the request for another reason.
        """
        t = self.target
        arr = np.ascontiguousarray(x.detach().to("cpu", dtype=torch.float32).numpy())
        deadline = time.monotonic() + t.retry_s
        pause = 0.25
        while True:
            inp = grpcclient.InferInput(INPUT_NAME, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            try:
                res = self.client.infer(self.model, [inp],
                                        outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                                        client_timeout=t.timeout_s)
                break
            except InferenceServerException as exc:
                if not _waits(exc):
                    raise PipelineError(f"Triton at {t.url} refused a batch of model "
                                        f"{self.model}: {_describe(exc)}") from exc
                if time.monotonic() + pause > deadline:
                    raise TritonUnavailableError(t.url, self.model, _describe(exc)) from exc
                LOG.warning("Triton at %s: %s; trying again in %.2f s", t.url, _describe(exc), pause)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
        self.requests += 1
        out = res.as_numpy(OUTPUT_NAME)
        if out is None or out.shape[0] != arr.shape[0] or out.shape[1] != self.out_channels:
            raise PipelineError(f"Triton model {self.model} answered {None if out is None else out.shape}"
                                f" for a batch of {arr.shape}")
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True)).to(x.device)

    def close(self) -> None:
        """Close the gRPC channel."""
        self.client.close()


def _describe(exc: InferenceServerException) -> str:
    status = str(exc.status() or "").replace("StatusCode.", "")
    message = " ".join(str(exc.message() or exc).split())[:300]
    return f"{status}: {message}" if status else message


def load_triton_model(model_version: ModelVersion, target: TritonTarget) -> LoadedModel:
    """A model version that segments with Triton doing the sliding-window batches.

    Raises
    ------
    ModelLoadError
        The bundle cannot be opened, or Triton's model does not fit it.
    TritonUnavailableError
        Triton is down or does not serve the model (the job waits).
    """
    mv = model_version
    try:
        bundle = open_bundle(mv.path)
    except Exception as exc:  # BundleError or an OS error on the version directory
        raise ModelLoadError(mv.version, f"cannot open its bundle ({exc})") from exc
    info = bundle.info
    if info.in_channels != 1:
        raise ModelLoadError(mv.version, f"takes {info.in_channels} input channels; only "
                             "single-channel (one series) models are served")
    runner = TritonRunner(target, target.model_name(mv.version), len(info.labels) + 1)
    try:
        runner.check_ready((info.in_channels, *info.roi_size))
    except BaseException:
        runner.close()
        raise
    LOG.info("model %s: serving with Triton at %s (model %s); pre- and post-processing here",
             mv.version, target.url, runner.model)
    return LoadedModel(mv, bundle, Backend.TRITON, runner, torch.device("cpu"))
