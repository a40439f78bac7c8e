#!/usr/bin/env python3
"""GPU figures, in one prepared run for whenever a CUDA GPU machine is at hand.

1. Sliding-window inference per backend, with the demo model and with the MONAI Model
   Zoo whole-body bundle's configuration (SegResNet, 104 labels, 1.5 mm): PyTorch CUDA
   eager, ``torch.compile`` (FP32 and FP16 autocast), ONNX Runtime CUDA where its
   execution provider exists, a TensorRT FP16 engine where ``tensorrt`` imports; each
   backend checked against PyTorch first (``models optimize``) and its argmax agreement
   with PyTorch eager reported (:func:`pipelines.backend_benchmark.benchmark`).
2. The 200-slice end to end (``benchmarks/end_to_end.py``: last CT instance acknowledged
   -> SEG and SR acknowledged by a real Orthanc) with the demo model and with the
   whole-body bundle, the node serving the fastest verified backend.

The whole-body bundle ships configurations only (nothing is downloaded): its network is
built from ``configs/inference.json`` with seeded random weights, so its figures are
timings (and memory), not segmentation quality; its SEG then carries whatever the
random network labels.

Without a CUDA GPU (or with a CPU build of torch) it measures nothing, says why on one
line and exits 0: there are no CPU figures here to pass for GPU ones.

Needs on the GPU machine: a CUDA build of torch, ``pip install -e '.[gpu]'``
(``onnxruntime-gpu`` replaces ``onnxruntime``: uninstall that first), dcmtk and
Orthanc for part 2 (``scripts/setup.sh``).

Usage::

    .venv/bin/python benchmarks/gpu.py --json gpu.json
    .venv/bin/python benchmarks/gpu.py --only backends --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WHOLEBODY = REPO.parent / "shared" / "reference" / "monai-bundles" / "wholeBody_ct_segmentation"
if not WHOLEBODY.is_dir():
    WHOLEBODY = Path("/work/shared/reference/monai-bundles/wholeBody_ct_segmentation")


def environment() -> dict[str, Any]:
    """What this machine offers: torch and its CUDA, the GPU, ONNX Runtime, TensorRT."""
    import onnxruntime as ort
    import torch

    from pipelines.export.tensorrt import tensorrt_status

    cuda = torch.cuda.is_available()
    trt = tensorrt_status()
    return {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else "",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if cuda else 0.0,
        "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
        "tensorrt": trt.version, "tensorrt_available": trt.available,
        "tensorrt_reason": trt.reason,
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }


def no_gpu_reason(env: dict[str, Any]) -> str:
    """Why nothing can be measured here ('' when a CUDA GPU is usable)."""
    if env["cuda_available"]:
        return ""
    if not env["torch_cuda"]:
        return f"torch {env['torch']} is a CPU build (no CUDA)"
    return f"torch {env['torch']} (CUDA {env['torch_cuda']}) sees no CUDA GPU"


def wholebody_bundle(dest: Path, seed: int = 0) -> Path:
    """The whole-body bundle's configs with seeded random weights built from its own
    ``network_def`` (``models/model.pt``)."""
    import torch
    from monai.bundle import ConfigParser

    if not (WHOLEBODY / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"no whole-body bundle configuration at {WHOLEBODY}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(WHOLEBODY / "configs", dest / "configs")
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.json"))
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    (dest / "models").mkdir()
    torch.save(net.state_dict(), dest / "models" / "model.pt")
    return dest


def backends(bundles: dict[str, Path | None], scratch: Path, *, repeats: int,
             size: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Part 1: one table per bundle."""
    from dicom_node.cli.models import phantom_volume
    from pipelines.demo_model import ensure_demo_model
    from pipelines.export.optimize import optimize
    from pipelines.backend_benchmark import benchmark
    from registry.store import Registry

    out = []
    for name, bundle in bundles.items():
        with Registry(scratch / f"backends-{name}") as reg:
            mv = (reg.import_bundle(bundle, task="spleen-ct", activate=True, by="benchmark")
                  if bundle else ensure_demo_model(reg))
            report = optimize(reg, mv.version, repeats=repeats)
            array, affine = phantom_volume(mv, size)
            grid, rows = benchmark(mv, array, affine, registry=reg, repeats=repeats, warmup=1,
                                   compile_=True)
        out.append({
            "bundle": name, "version": mv.version, "labels": len(mv.labels),
            "model_grid": list(grid), "tensorrt": report.tensorrt,
            "checks": [{"backend": c.backend.value, "device": c.device_name,
                        "max_abs_diff": c.max_abs_diff, "argmax_agreement": c.argmax_agreement,
                        "median_ms_per_batch": c.median_ms, "verified": c.verified}
                       for c in report.checks],
            "rows": [{"backend": r.name, "device": r.device, "median_ms": r.median_ms,
                      "runs": r.runs, "argmax_agreement": r.argmax_agreement, "note": r.note}
                     for r in rows]})
        print_backends(out[-1])
    return out


def print_backends(t: dict[str, Any]) -> None:
    eager = next((r["median_ms"] for r in t["rows"] if r["backend"] == "pytorch-eager"), None)
    print(f"\n{t['bundle']} ({t['version']}, {t['labels']} labels): whole sliding-window "
          f"inference on a phantom, model grid {t['model_grid']}")
    print(f"  {'BACKEND':<18} {'DEVICE':<26} {'MEDIAN ms':>10} {'x EAGER':>8} {'ARGMAX=':>8}  NOTE")
    for r in t["rows"]:
        ms = f"{r['median_ms']:.1f}" if r["median_ms"] is not None else "-"
        ratio = f"{r['median_ms'] / eager:.2f}" if (r["median_ms"] and eager) else "-"
        agree = f"{r['argmax_agreement']:.4f}" if r["argmax_agreement"] is not None else "-"
        print(f"  {r['backend']:<18} {r['device'][:26]:<26} {ms:>10} {ratio:>8} {agree:>8}  "
              f"{r['note']}")
    print(f"  {t['tensorrt']}")


def end_to_end(bundles: dict[str, Path | None], scratch: Path, *, slices: int,
               timeout: float) -> list[dict[str, Any]]:
    """Part 2: the 200-slice end to end per bundle."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import end_to_end as e2e

    out = []
    for name, bundle in bundles.items():
        args = argparse.Namespace(slices=slices, stable_after=2.0, seed=7, timeout=timeout,
                                  bundle=bundle, optimize=True)
        work = scratch / f"e2e-{name}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            r = e2e.run(args, work)
        except Exception as exc:  # noqa: BLE001 - one bundle failing is a result to report
            print(f"\nend to end with {name}: FAILED ({type(exc).__name__}: {exc})")
            out.append({"bundle": name, "failed": f"{type(exc).__name__}: {exc}"})
            continue
        print(f"\nend to end with {name}:")
        e2e.report(r)
        out.append({"bundle": name, **r})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("backends", "e2e", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per backend (default 3)")
    ap.add_argument("--size", type=int, nargs=3, default=(256, 256, 200), metavar=("X", "Y", "Z"),
                    help="phantom size on the model grid for part 1 (default 256 256 200)")
    ap.add_argument("--slices", type=int, default=200, help="slices of the end-to-end CT")
    ap.add_argument("--no-wholebody", action="store_true", help="the demo model only")
    ap.add_argument("--timeout", type=float, default=900.0, help="end to end: give up after S s")
    ap.add_argument("--scratch", type=Path, default=None, help="work here (kept)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    env = environment()
    reason = no_gpu_reason(env)
    result: dict[str, Any] = {"environment": env, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                           time.gmtime())}
    if reason:
        print(f"gpu: no CUDA GPU here: {reason}; nothing measured, no figures written "
              "(run this script on a GPU machine)")
        result["skipped"] = reason
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return 0
    print(f"gpu: {env['gpu']} ({env['gpu_memory_gib']} GiB), torch {env['torch']} CUDA "
          f"{env['torch_cuda']}, onnxruntime {env['onnxruntime']} {env['ort_providers']}, "
          f"TensorRT {env['tensorrt'] or '-'} ({'usable' if env['tensorrt_available'] else env['tensorrt_reason']})")
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="dicom-node-gpu-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        bundles: dict[str, Path | None] = {"demo": None}
        if not args.no_wholebody:
            bundles["wholebody (random weights)"] = wholebody_bundle(scratch / "wholebody")
        if args.only in ("backends", "all"):
            result["backends"] = backends(bundles, scratch, repeats=args.repeats,
                                          size=tuple(args.size))
        if args.only in ("e2e", "all"):
            result["end_to_end"] = end_to_end(bundles, scratch, slices=args.slices,
                                              timeout=args.timeout)
    finally:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
