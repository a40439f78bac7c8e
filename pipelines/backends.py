"""Which backend serves a registered model on this host, and why.

Kept apart from :mod:`pipelines.inference` so that asking (``dicom-node models list`` /
``show``) costs the PyTorch and ONNX Runtime imports that the device probe needs, not
MONAI's and the inference pipeline's (about 2 s of a core against 7 s).
"""

from __future__ import annotations

from pipelines.export.checks import available_backends, device_name
from registry.artifacts import sha256_file
from registry.records import ArtifactKind, Backend, ModelVersion
from registry.store import Registry

#: Preference when no timings were recorded (fastest first, by kind of hardware).
STATIC_PREFERENCE = (Backend.TENSORRT, Backend.ORT_CUDA, Backend.TORCH_CUDA, Backend.ORT_CPU,
                     Backend.TORCH_CPU)


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
