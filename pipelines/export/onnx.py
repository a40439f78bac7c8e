"""A network as an ONNX file, and an ONNX Runtime session that serves it.

The exported graph has one input, ``image`` (N, C, X, Y, Z) float32, and one output,
``pred`` (N, labels + 1, X, Y, Z) logits, with a dynamic batch axis so that the last,
smaller batch of a sliding window runs too. TensorRT engines and Triton models are
built from this file and use the same tensor names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pipelines.errors import ExportError

INPUT_NAME = "image"
OUTPUT_NAME = "pred"
ONNX_OPSET = 17


def export_onnx(network: torch.nn.Module, path: Path, *, example: torch.Tensor, version: str,
                opset: int = ONNX_OPSET) -> Path:
    """Export ``network`` to ONNX with a dynamic batch axis (input ``image``, output
    ``pred``) and check it with the ONNX checker.

    Parameters
    ----------
    network : torch.nn.Module
        In eval mode, on the CPU.
    path : pathlib.Path
        Where to write the file (the registry places it: see
        :meth:`registry.store.Registry.write_artifact_file`).
    example : torch.Tensor
        An input batch (N, C, X, Y, Z).
    version : str
        The model version, for the error message.
    opset : int

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ExportError
        If the export or the check fails.
    """
    try:
        with torch.no_grad():
            # The TorchScript-based exporter: the dynamo exporter needs onnxscript,
            # which the node does not depend on.
            torch.onnx.export(network, (example,), str(path), dynamo=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        raise ExportError(version, "onnx", f"export failed ({exc})") from exc
    return path


class OnnxRunner:
    """An ONNX Runtime session usable as a network by MONAI inferers.

    Parameters
    ----------
    path : pathlib.Path
        The ONNX file (input ``image``, output ``pred``).
    cuda : bool
        Use the CUDA execution provider (CUDA tensors are bound without copies).
    out_channels : int
        Output channels (to allocate the output on the GPU).
    threads : int, optional
        Intra-op threads on CPU (default: ONNX Runtime's choice).

    Raises
    ------
    RuntimeError
        If ``cuda`` is asked for and the CUDA execution provider is missing.
    """

    def __init__(self, path: Path, *, cuda: bool = False, out_channels: int = 0,
                 threads: int | None = None) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("ONNX Runtime has no CUDAExecutionProvider here "
                               f"(providers: {ort.get_available_providers()})")
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.cuda = cuda
        self.out_channels = out_channels

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits of a batch ``x`` (N, C, X, Y, Z), float32, on ``x``'s device."""
        if self.cuda and x.is_cuda and self.out_channels:
            x = x.to(dtype=torch.float32).contiguous()
            out = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=torch.float32,
                              device=x.device)
            binding = self.session.io_binding()
            idx = x.device.index or 0
            binding.bind_input(INPUT_NAME, "cuda", idx, np.float32, tuple(x.shape), x.data_ptr())
            binding.bind_output(OUTPUT_NAME, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
            torch.cuda.current_stream(x.device).synchronize()
            self.session.run_with_iobinding(binding)
            return out
        arr = x.detach().to("cpu", dtype=torch.float32).contiguous().numpy()
        y = self.session.run([OUTPUT_NAME], {INPUT_NAME: arr})[0]
        return torch.from_numpy(y).to(x.device)
