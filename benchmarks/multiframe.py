#!/usr/bin/env python3
"""Multi-frame vs single-frame benchmark: the same phantom as one Legacy Converted Enhanced CT.

Issue 24's goal: on the same phantom the multi-frame series gives the same SEG as the
single-frame series (Dice at least 0.99 per segment, volume within 1 %), at most 10 %
slower and with no more memory (300 frames of 512 x 512).

One generated abdominal CT (``pipelines.phantom``, 512 x 512, ``--slices`` slices) is
written twice: as single-frame CT files, and as ONE Legacy Converted Enhanced CT made
from the same data sets by highdicom's converter. Each is run through
:func:`pipelines.run.run_series` with the shipped demo model (``spleen-ct``) in a fresh
child process, alternately, ``--repeats`` times each: the clock is run_series from the
paths (reading the files, selection, volume, inference, SEG/SR/overlay); memory is the
child's peak resident set (``ru_maxrss``) minus its resident set after the model is
loaded, so the model and torch do not hide the series' share. The masks of each run are
compared segment by segment (Dice on the volume grid, volume in mL).

Usage::

    .venv/bin/python benchmarks/multiframe.py                # 300 slices, 2 repeats
    .venv/bin/python benchmarks/multiframe.py --slices 100 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_inputs(folder: Path, slices: int) -> tuple[list[Path], Path]:
    """The phantom as single-frame files and as one Legacy Converted Enhanced CT."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series

    geometry = SliceGeometry(rows=512, columns=512, slices=slices, slice_spacing=1.5)
    datasets = ct_series(Anatomy.random(7), geometry, StudyInfo(patient_id="BENCH-MF"))
    single = []
    (folder / "single").mkdir(parents=True)
    for i, ds in enumerate(datasets):
        path = folder / "single" / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        single.append(path)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1)
    multi = folder / "multi.dcm"
    mf.save_as(multi, enforce_file_format=True)
    return single, multi


def child(args: argparse.Namespace) -> int:
    """One run in this process: model, then run_series on the paths; JSON on stdout."""
    from dicom_node.tasks import default_tasks
    from pipelines.inference import load_model
    from pipelines.run import run_series
    from registry.store import Registry

    with Registry(Path(args.data)) as reg:
        model = load_model(reg.active("spleen-ct"), registry=reg)
    paths = [Path(p) for p in json.loads(Path(args.paths).read_text())]
    base = _rss_mib()
    t0 = time.perf_counter()
    outcome = run_series(paths, model, rules=default_tasks()[0].rules)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.savez_compressed(args.masks, **{s.name: s.mask for s in outcome.segments})
    print(json.dumps({"wall_s": wall, "timings": outcome.timings.as_dict(),
                      "peak_mib": peak, "model_rss_mib": base,
                      "series_mib": peak - base,
                      "volumes_ml": {s.name: s.volume_ml for s in outcome.segments},
                      "seg_frames": int(outcome.results.seg.NumberOfFrames)}))
    return 0


def _run(mode: str, paths: list[Path], data: Path, scratch: Path, n: int) -> dict[str, Any]:
    listing = scratch / f"{mode}.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    masks = scratch / f"{mode}-{n}.npz"
    out = subprocess.run([sys.executable, __file__, "--child", "--data", str(data), "--paths",
                          str(listing), "--masks", str(masks)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["masks"] = str(masks)
    return result


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    from pipelines.demo_model import ensure_demo_model
    from registry.store import Registry

    with tempfile.TemporaryDirectory(prefix="bench-mf-") as tmp:
        scratch = Path(tmp)
        with Registry(scratch / "data") as reg:
            ensure_demo_model(reg)
        t0 = time.perf_counter()
        single, multi = write_inputs(scratch, args.slices)
        print(f"inputs: {args.slices} slices 512x512 written in {time.perf_counter() - t0:.1f} s "
              f"(multi-frame file {multi.stat().st_size / 2**20:.0f} MiB)", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"single": [], "multi": []}
        for n in range(args.repeats):
            for mode, paths in (("single", single), ("multi", [multi])):
                runs[mode].append(_run(mode, paths, scratch / "data", scratch, n))
                r = runs[mode][-1]
                print(f"{mode:6s} run {n + 1}: {r['wall_s']:.2f} s (load {r['timings']['load_s']:.2f} s, "
                      f"write {r['timings']['write_s']:.2f} s), peak {r['peak_mib']:.0f} MiB, "
                      f"series {r['series_mib']:.0f} MiB", flush=True)
        report = summarise(runs, args.slices, os.getloadavg())
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def summarise(runs: dict[str, list[dict[str, Any]]], slices: int,
              load: tuple[float, float, float]) -> dict[str, Any]:
    """Best time and memory of each mode, and the agreement of their masks."""
    best = {m: min(rs, key=lambda r: r["wall_s"]) for m, rs in runs.items()}
    a, b = np.load(best["single"]["masks"]), np.load(best["multi"]["masks"])
    agreement = {}
    for name in a.files:
        va, vb = best["single"]["volumes_ml"][name], best["multi"]["volumes_ml"][name]
        agreement[name] = {"dice": _dice(a[name], b[name]), "single_ml": va, "multi_ml": vb,
                           "volume_diff_pct": 100.0 * abs(va - vb) / va if va else 0.0}
    return {
        "slices": slices, "loadavg": load, "cpus": os.cpu_count(),
        "single_wall_s": best["single"]["wall_s"], "multi_wall_s": best["multi"]["wall_s"],
        "slower_pct": 100.0 * (best["multi"]["wall_s"] / best["single"]["wall_s"] - 1),
        "single_load_s": best["single"]["timings"]["load_s"],
        "multi_load_s": best["multi"]["timings"]["load_s"],
        "single_write_s": best["single"]["timings"]["write_s"],
        "multi_write_s": best["multi"]["timings"]["write_s"],
        "single_peak_mib": min(r["peak_mib"] for r in runs["single"]),
        "multi_peak_mib": min(r["peak_mib"] for r in runs["multi"]),
        "single_series_mib": min(r["series_mib"] for r in runs["single"]),
        "multi_series_mib": min(r["series_mib"] for r in runs["multi"]),
        "segments": agreement,
    }


if __name__ == "__main__":
    sys.exit(main())
