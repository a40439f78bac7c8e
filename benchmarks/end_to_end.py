#!/usr/bin/env python3
"""End-to-end benchmark: a CT study sent to the node, until its SEG and SR are in the PACS.

One generated abdominal CT series (``pipelines.phantom``, 512x512, ``--slices`` slices)
is sent with dcmtk ``storescu`` (``TCP_NODELAY=1``) to ``dicom-node serve`` running as
a subprocess with a real Orthanc (``orthanc/server.py``) as its only destination and
the shipped demo model active. The clock starts when ``storescu`` exits (every
instance acknowledged) and stops when the node's send queue records the SEG and the
SR as acknowledged by Orthanc (``sends.sent_at``); the overlay series is reported too.

The quiet period (``--stable-after``) is part of the wall time but is reported apart:
"from job queued" excludes it (the job is queued when the series has been quiet for
``stable_after`` seconds). The node's own records give the breakdown: job rows
(queued, started, finished), the result's stage timings (model load, load,
preprocess, inference, post-process, SEG/SR writing), the time to check and record
the SEG and SR and queue their sends, the sends' queue and acknowledgement times,
and the overlay's stages, which the worker runs after the SEG and SR are queued. Peak memory is the
node process' ``VmHWM`` (``/proc/<pid>/status``) read after the results are sent.

Usage::

    .venv/bin/python benchmarks/end_to_end.py                  # 200 slices
    .venv/bin/python benchmarks/end_to_end.py --slices 500     # the 4 GB memory target
    .venv/bin/python benchmarks/end_to_end.py --json /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom_node.foundation.database import connect  # noqa: E402
from orthanc.server import OrthancServer, free_ports, set_pdeathsig  # noqa: E402
from pipelines.demo_model import ensure_demo_model  # noqa: E402
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402
from registry.store import Registry  # noqa: E402

NODE = [sys.executable, "-m", "dicom_node"]
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
STAGES = ("load_s", "preprocess_s", "inference_s", "postprocess_s", "write_s")


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident set size of a process (``VmHWM``), MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def write_series(folder: Path, slices: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    info = StudyInfo(patient_id="E2E-BENCH", patient_name="Bench^Mark")
    paths = []
    for i, ds in enumerate(ct_series(Anatomy.random(seed), SliceGeometry(slices=slices), info)):
        p = folder / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def start_node(data: Path, config: Path, port: int, stable_after: float, log: Path
               ) -> subprocess.Popen[bytes]:
    args = [*NODE, "--config", str(config), "--data-dir", str(data), "serve", "--port", str(port),
            "--ae-title", "DICOM_NODE", "--bind", "127.0.0.1", "--stable-after", str(stable_after)]
    with log.open("ab") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=set_pdeathsig)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        # the listener, then its inference worker (loading torch): start-up is not measured
        if "ready: listening" in text and "ready for jobs" in text:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("node not ready after 120 s")


def wait_results(data: Path, study_uid: str, timeout: float) -> dict[str, Any]:
    """Poll the node's queue until the study's job is done and its sends are all sent."""
    conn = connect(data / "queue.sqlite", timeout_s=30, readonly=True).conn
    deadline = time.monotonic() + timeout
    try:
        while True:
            job = conn.execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
                               (study_uid,)).fetchone()
            if job is not None and job["state"] == "failed":
                raise RuntimeError(f"job failed: {job['error']}")
            if job is not None and job["state"] == "done" and job["result_id"]:
                sends = conn.execute("SELECT kind, state, enqueued_at, sent_at FROM sends WHERE result_id = ?",
                                     (job["result_id"],)).fetchall()
                if sends and all(s["state"] == "sent" for s in sends):
                    return {"job": dict(job), "sends": [dict(s) for s in sends]}
                if any(s["state"] == "failed" for s in sends):
                    raise RuntimeError("a send failed; see `dicom-node sends`")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no results after {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        conn.close()


def result_row(data: Path, result_id: int) -> dict[str, Any]:
    conn = connect(data / "index.sqlite", timeout_s=30, readonly=True).conn
    try:
        row = dict(conn.execute("SELECT * FROM ai_results WHERE id = ?", (result_id,)).fetchone())
    finally:
        conn.close()
    row["timings"] = json.loads(row["timings"])
    row["segments"] = json.loads(row["segments"])
    return row


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    print(f"end_to_end: rendering a {args.slices}-slice 512x512 CT ...", flush=True)
    paths = write_series(scratch / "series", args.slices, args.seed)
    import pydicom

    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    data = scratch / "data"
    with Registry(data) as reg:
        bundle = getattr(args, "bundle", None)  # benchmarks/gpu.py: the whole-body bundle
        model = (reg.import_bundle(bundle, task="spleen-ct", activate=True, by="benchmark",
                                   reason="end-to-end benchmark").version if bundle
                 else ensure_demo_model(reg).version)
        if getattr(args, "optimize", False):  # ONNX / TensorRT checked, so serving may pick them
            from pipelines.export.optimize import optimize

            optimize(reg, model, repeats=1)
    with OrthancServer(scratch / "orthanc") as orthanc:
        config = scratch / "node.toml"
        config.write_text("send_backoff_initial_s = 0.5\nsend_backoff_max_s = 5.0\n"
                          "[[destinations]]\n"
                          f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                          f'port = {orthanc.dicom_port}\nsend = ["seg", "sr", "overlay"]\n')
        [port] = free_ports(1)
        log = scratch / "node.log"
        node = start_node(data, config, port, args.stable_after, log)
        try:
            print(f"end_to_end: sending {len(paths)} instances to the node ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run(["storescu", "-aet", "BENCHSCU", "-aec", "DICOM_NODE", "127.0.0.1",
                            str(port), *map(str, paths)], check=True, env=DCMTK_ENV,
                           capture_output=True, timeout=args.timeout)
            acked = datetime.now(timezone.utc)
            send_s = time.perf_counter() - t0
            done = wait_results(data, study_uid, args.timeout)
            peak_mib = vm_hwm_mib(node.pid)
            worker_peaks = [vm_hwm_mib(int(w["pid"])) for w in json.loads(
                (data / "serve.json").read_text()).get("workers", []) if w.get("pid")]
            in_orthanc = orthanc.count_instances()
        finally:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
    job, sends = done["job"], done["sends"]
    res = result_row(data, int(job["result_id"]))
    t = res["timings"]
    sent = {k: max(_ts(s["sent_at"]) for s in sends if s["kind"] == k)
            for k in {s["kind"] for s in sends}}
    queued, started, finished = (_ts(job[k]) for k in ("enqueued_at", "started_at", "finished_at"))
    seg_sr = max(sent["seg"], sent["sr"])
    pipeline = float(t.get("pipeline_s", sum(t.get(k, 0.0) for k in STAGES)))
    model_load = float(t.get("model_load_s", 0.0))
    worker = (finished - started).total_seconds()
    queued_seg_sr = max(_ts(s["enqueued_at"]) for s in sends if s["kind"] in ("seg", "sr"))
    # the worker queues the SEG and SR first, then builds and queues the overlay
    seg_sr_store = float(t.get("seg_sr_store_s", max(0.0, worker - model_load - pipeline)))
    overlay = {k: float(t.get(k, 0.0)) for k in ("overlay_write_s", "overlay_validate_s")}
    overlay_store = max(0.0, worker - model_load - pipeline - seg_sr_store - sum(overlay.values()))
    breakdown = {
        "quiet period + monitor (last ack -> job queued)": (queued - acked).total_seconds(),
        "queue wait (job queued -> started)": (started - queued).total_seconds(),
        "model load + scanner lookup (first job)": model_load,
        **{f"{k.removesuffix('_s')}": float(t.get(k, 0.0)) for k in STAGES},
        "check + record SEG/SR + queue their sends": seg_sr_store,
        "send SEG+SR (queued -> acknowledged)": (seg_sr - queued_seg_sr).total_seconds(),
        "after SEG/SR: overlay build": overlay["overlay_write_s"],
        "after SEG/SR: overlay check": overlay["overlay_validate_s"],
        "after SEG/SR: overlay record + queue": overlay_store if "seg_sr_store_s" in t else 0.0,
    }
    out = {
        "slices": args.slices, "instances": len(paths), "stable_after_s": args.stable_after,
        "model": model, "backend": res["backend"], "segments": res["segments"],
        "storescu_s": send_s,
        "ack_to_seg_sr_s": (seg_sr - acked).total_seconds(),
        "ack_to_all_s": (max(sent.values()) - acked).total_seconds(),
        "queued_to_seg_sr_s": (seg_sr - queued).total_seconds(),
        "queued_to_all_s": (max(sent.values()) - queued).total_seconds(),
        "breakdown_s": breakdown, "timings_recorded": t,
        "objects_sent": {k: sum(1 for s in sends if s["kind"] == k) for k in sent},
        "orthanc_instances": in_orthanc, "node_peak_rss_mib": peak_mib,
        "worker_peak_rss_mib": worker_peaks,
        "conditions": {"cpus": os.cpu_count(), "machine": platform.machine(),
                       "kernel": platform.release(), "python": platform.python_version(),
                       "torch_threads": _torch_threads(), "loadavg": os.getloadavg()},
    }
    return out


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def report(r: dict[str, Any]) -> None:
    print()
    print(f"end_to_end: {r['instances']} x 512x512 CT -> SEG + SR + {r['objects_sent'].get('overlay', 0)} "
          f"overlay images in Orthanc; model {r['model']} on {r['backend']}; "
          + ", ".join(f"{s['name']} {s['volume_ml']:.1f} mL" for s in r["segments"]))
    print(f"  storescu (all instances acknowledged): {r['storescu_s']:.1f} s")
    print(f"  last ack -> SEG+SR acknowledged by Orthanc: {r['ack_to_seg_sr_s']:.1f} s "
          f"(overlay too: {r['ack_to_all_s']:.1f} s)")
    print(f"  quiet period excluded (job queued -> SEG+SR acknowledged): {r['queued_to_seg_sr_s']:.1f} s "
          f"(overlay too: {r['queued_to_all_s']:.1f} s)")
    print("  breakdown:")
    for k, v in r["breakdown_s"].items():
        print(f"    {k:<50} {v:7.2f} s")
    peak = r["node_peak_rss_mib"]
    print(f"  node peak RSS (VmHWM): listener {peak:.0f} MiB" if peak else "  node peak RSS: unknown",
          "; inference worker(s) " + ", ".join(f"{w:.0f} MiB" for w in r["worker_peak_rss_mib"] if w))
    c = r["conditions"]
    print(f"  conditions: {c['cpus']} CPU(s), torch threads {c['torch_threads']}, "
          f"load average {c['loadavg'][0]:.1f}, stable_after {r['stable_after_s']} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=200, help="slices of the CT (default 200)")
    ap.add_argument("--stable-after", type=float, default=2.0, metavar="S",
                    help="the node's quiet period (default 2 s; reported apart)")
    ap.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after S seconds")
    ap.add_argument("--scratch", type=Path, default=None, help="work here (kept) instead of a temp dir")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="serve this MONAI bundle instead of the demo model")
    ap.add_argument("--optimize", action="store_true",
                    help="run `models optimize` first (the node serves the fastest verified backend)")
    args = ap.parse_args(argv)
    if not shutil.which("storescu"):
        print("end_to_end: dcmtk storescu is required (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
        r = run(args, args.scratch)
    else:
        with tempfile.TemporaryDirectory(prefix="dicom-node-e2e-") as tmp:
            r = run(args, Path(tmp))
    report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
