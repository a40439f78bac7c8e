"""Optimised forms of a registered model, built and checked on the compute side.

The registry keeps the artifact files and their records (where a file goes, its
SHA-256, its row); this package makes them: the ONNX export and the runner that serves
it (:mod:`.onnx`), TensorRT engines (:mod:`.tensorrt`), the checks of every backend
against PyTorch (:mod:`.checks`), the ``models optimize`` job that ties them together
(:mod:`.optimize`) and the model repository for a Triton Inference Server
(:mod:`.triton_repository`).
"""
