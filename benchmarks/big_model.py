"""The whole-body CT bundle (104 labels) on generated 512 x 512 CTs: peak memory and time per stage.

The MONAI Model Zoo ``wholeBody_ct_segmentation`` configs as published (SegResNet,
105 output channels, 1.5 mm, 96^3 Gaussian sliding window) with seeded random
weights, imported into a fresh registry, run through :func:`pipelines.run.run_series`
(the path ``dicom-node infer`` and the node's worker take) on phantom CTs of 512 x 512
pixels of 0.8 mm and 2.5 mm slices (150, 300, 500 slices by default), each in its own
child process. Per case it prints:

* the time of each stage (load, preprocess, inference, postprocess, write) and the
  peak resident memory during it (a sampler thread reads VmRSS every 50 ms), the
  process's peak (``ru_maxrss``) and the memory the pipeline predicted before it
  started (:mod:`pipelines.memory`);
* with CUDA: the peak GPU memory (``torch.cuda.max_memory_allocated``) too.

Random weights give no anatomy, so the label map is whatever the network makes of
the CT; the writers still see up to 105 labels (every channel wins somewhere).

    .venv/bin/python benchmarks/big_model.py --slices 150,300        # CPU, ~minutes per window
    .venv/bin/python benchmarks/big_model.py --slices 500 --json out.json
    .venv/bin/python benchmarks/big_model.py --small --slices 40     # small network, seconds

State the machine's load with any figure (printed at the start and end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Resident memory every ``period`` s, as (time, MB) pairs."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak(self, t0: float, t1: float) -> float:
        return max((mb for t, mb in self.samples if t0 <= t <= t1), default=0.0)


def write_ct(folder: Path, slices: int) -> None:
    import pydicom

    from pipelines import phantom as ph

    g = ph.SliceGeometry(rows=512, columns=512, slices=slices, pixel_spacing=(0.8, 0.8),
                         slice_spacing=2.5)
    info = ph.StudyInfo(body_part="CHESTABDOMEN", series_description=f"Body {slices}x2.5mm")
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(ph.ct_series(ph.Anatomy.random(7), g, info)):
        pydicom.dcmwrite(folder / f"{k:04d}.dcm", ds, enforce_file_format=True)


def child(data_dir: Path, ct_dir: Path) -> dict:
    import torch

    from pipelines.inference import load_model
    from pipelines.run import run_series
    from pipelines.types import WriterOptions
    from registry.store import Registry

    cuda = torch.cuda.is_available()
    reg = Registry(data_dir)
    t_start = time.perf_counter()
    loaded = load_model(reg.resolve("wholebody-ct", "", ""), registry=reg)
    t_model = time.perf_counter() - t_start
    files = sorted(ct_dir.glob("*.dcm"))
    import pydicom

    from pipelines.memory import series_geometry

    shape, affine = series_geometry([pydicom.dcmread(f, stop_before_pixels=True) for f in files])
    estimate = loaded.memory_estimate(shape, affine)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    outcome = run_series(files, loaded, options=WriterOptions(write_overlay=True))
    t_end = time.perf_counter()
    sampler.stop()
    t = outcome.timings
    stages = {}
    edge = t0
    for name, seconds in t.as_dict().items():
        stages[name[:-2]] = {"s": round(seconds, 2), "peak_rss_mb": round(sampler.peak(edge, edge + seconds), 0)}
        edge += seconds
    found = sum(1 for s in outcome.segments if not s.is_empty)
    return {
        "slices": shape[0], "model_grid": list(outcome.model_grid_shape), "backend": outcome.backend,
        "model_load_s": round(t_model, 2), "pipeline_s": round(t_end - t0, 2), "stages": stages,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "sampled_peak_rss_mb": round(sampler.peak(t0, t_end), 0),
        "predicted_peak_mb": round(estimate.peak_bytes / 2**20, 0),
        "prediction": estimate.summary(),
        "segments_found": found, "seg_frames": int(outcome.results.seg.NumberOfFrames),
        "overlay_images": len(outcome.results.overlay),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 0) if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", default="150,300,500")
    ap.add_argument("--small", action="store_true", help="small network (tests' bundle), for a smoke run")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, metavar=("DATA_DIR", "CT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return 0
    from registry_bundles import wholebody_bundle

    from registry.store import Registry

    work = args.work or Path(tempfile.mkdtemp(prefix="big-model-"))
    rows = []
    failed = False
    load = os.getloadavg()
    print(f"# {os.cpu_count()} CPUs, load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    try:
        bundle = work / "bundle"
        if not bundle.exists():
            wholebody_bundle(bundle, small=args.small)
        data = work / "data"
        if not data.exists():
            with Registry(data) as reg:
                reg.import_bundle(bundle, task="wholebody-ct", activate=True, by="benchmark")
        for n in (int(x) for x in args.slices.split(",")):
            ct = work / f"ct-{n}"
            if not ct.exists():
                write_ct(ct, n)
            proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(ct)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{n:4d} slices FAILED: {proc.stderr.strip().splitlines()[-3:]}")
                failed = True
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["load_average_after"] = os.getloadavg()
            rows.append(row)
            st = row["stages"]
            print(f"{n:4d} slices -> model grid {'x'.join(map(str, row['model_grid']))} on "
                  f"{row['backend']}: peak RSS {row['peak_rss_mb']:.0f} MB (predicted "
                  f"{row['predicted_peak_mb']:.0f} MB), pipeline {row['pipeline_s']:.1f} s, "
                  f"{row['segments_found']} segments, {row['seg_frames']} SEG frames, "
                  f"{row['overlay_images']} overlay images"
                  + (f", GPU {row['gpu']} peak {row['gpu_peak_mb']:.0f} MB" if row["gpu"] else ""))
            print("     " + ", ".join(f"{k} {v['s']:.1f} s / {v['peak_rss_mb']:.0f} MB"
                                      for k, v in st.items())
                  + f"; load average after {row['load_average_after'][0]:.2f}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
