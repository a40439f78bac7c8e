#!/usr/bin/env python3
"""Throughput under a burst: many CT studies at once, for ``workers`` 1, 2, 4.

``--studies`` generated abdominal CT studies (512x512, ``--slices`` slices each; one
phantom rendered once, each study a copy with its own patient, study, series and
instance UIDs) are sent at once by ``--associations`` parallel dcmtk ``storescu``
lanes (``TCP_NODELAY=1``; study k goes on lane k mod N, one association per study, a
lane's studies one after another) to ``dicom-node serve`` running as a subprocess with
a real Orthanc (``orthanc/server.py``) as its destination and the shipped demo model
active. For each ``--workers`` value the node starts afresh (new data directory, new
Orthanc) and waits until its workers are ready before the burst.

Measured, per run:

* **makespan**: from the start of the burst until every study's SEG and SR are
  acknowledged by Orthanc (the node's send queue, ``sends.sent_at``; checked against
  Orthanc's own instance count at the end);
* **per study**: last instance acknowledged (its ``storescu`` exited) -> SEG and SR
  acknowledged, with the quiet period, the wait in the job queue and the job's run
  time apart (job rows: queued, started, finished).

``--backend`` passes through to the node's ``backend`` setting (the ``triton`` branch
adds a Triton backend; without the option the setting is left out: the local
backend). Conditions (CPUs, load average before and after, torch threads per worker)
are printed with the figures.

Usage::

    .venv/bin/python benchmarks/burst.py                                  # 10 x 200 slices, workers 1 2 4
    .venv/bin/python benchmarks/burst.py --studies 4 --slices 100 --workers 1 2
    .venv/bin/python benchmarks/burst.py --backend triton --triton-url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.end_to_end import start_node  # noqa: E402
from dicom_node.foundation.database import connect  # noqa: E402
from orthanc.server import OrthancServer, free_ports  # noqa: E402
from pipelines.demo_model import ensure_demo_model  # noqa: E402
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402
from registry.store import Registry  # noqa: E402

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def write_studies(folder: Path, studies: int, slices: int, seed: int) -> list[list[Path]]:
    """``studies`` copies of one rendered series, each with its own patient and UIDs."""
    from pydicom.uid import generate_uid

    template = ct_series(Anatomy.random(seed), SliceGeometry(slices=slices),
                         StudyInfo(patient_id="BURST-0", patient_name="Burst^Bench"))
    out = []
    for k in range(studies):
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        sub = folder / f"study{k:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, src in enumerate(template):
            ds = copy.deepcopy(src)
            ds.PatientID, ds.AccessionNumber = f"BURST-{k:02d}", f"BURST{k:02d}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            p = sub / f"ct{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
        out.append(paths)
    return out


def _study_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _workers_ready(data: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = json.loads((data / "serve.json").read_text()).get("workers", [])
        except (OSError, ValueError):
            workers = []
        if len(workers) == n and all(w["state"] == "ready" for w in workers):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{n} worker(s) not ready after {timeout:.0f} s")


def _send_lanes(port: int, studies: list[list[Path]], lanes: int, timeout: float
                ) -> dict[int, datetime]:
    """Send every study, ``lanes`` associations at once; return each study's last ack time."""
    acked: dict[int, datetime] = {}
    errors: list[str] = []

    def lane(i: int) -> None:
        for k in range(i, len(studies), lanes):
            out = subprocess.run(["storescu", "-aet", f"BURST{i}", "-aec", "DICOM_NODE",
                                  "127.0.0.1", str(port), *map(str, studies[k])],
                                 env=DCMTK_ENV, capture_output=True, timeout=timeout)
            if out.returncode != 0:
                errors.append(f"study {k}: storescu exit {out.returncode}: {out.stderr[-500:]!r}")
            acked[k] = datetime.now(timezone.utc)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(min(lanes, len(studies)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    return acked


def _wait_all(data: Path, study_uids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll the queue until every study's job is done and its SEG and SR are sent."""
    conn = connect(data / "queue.sqlite", timeout_s=30, readonly=True).conn
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    try:
        while len(done) < len(study_uids):
            for uid in study_uids:
                if uid in done:
                    continue
                job = conn.execute("SELECT * FROM jobs WHERE study_uid = ? ORDER BY id DESC LIMIT 1",
                                   (uid,)).fetchone()
                if job is None:
                    continue
                if job["state"] == "failed":
                    raise RuntimeError(f"job {job['id']} failed: {job['error']}")
                if job["state"] != "done" or not job["result_id"]:
                    continue
                sends = conn.execute("SELECT kind, state, sent_at FROM sends WHERE result_id = ?"
                                     " AND kind IN ('seg', 'sr')", (job["result_id"],)).fetchall()
                if {s["kind"] for s in sends} == {"seg", "sr"} and all(
                        s["state"] == "sent" for s in sends):
                    done[uid] = {"job": dict(job),
                                 "seg_sr_acked": max(_ts(s["sent_at"]) for s in sends)}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(done)} of {len(study_uids)} studies done after {timeout:.0f} s")
            time.sleep(0.1)
    finally:
        conn.close()
    return done


def _orthanc_seg_sr(orthanc: OrthancServer, study_uids: list[str]) -> int:
    """Studies with at least one SEG and one SR in Orthanc."""
    found = 0
    for uid in study_uids:
        mods = {s.get("MainDicomTags", {}).get("Modality") for s in orthanc.post_json(
            "/tools/find", {"Level": "Series", "Expand": True,
                            "Query": {"StudyInstanceUID": uid}}) or []}
        found += {"SEG", "SR"} <= mods
    return found


def run_once(args: argparse.Namespace, scratch: Path, studies: list[list[Path]],
             workers: int) -> dict[str, Any]:
    data = scratch / f"data-w{workers}"
    with Registry(data) as reg:
        model = ensure_demo_model(reg).version
    uids = [_study_uid(s) for s in studies]
    with OrthancServer(scratch / f"orthanc-w{workers}") as orthanc:
        config = scratch / f"node-w{workers}.toml"
        extra = f'backend = "{args.backend}"\n' if args.backend else ""
        extra += f'triton_url = "{args.triton_url}"\n' if args.triton_url else ""
        config.write_text(f"workers = {workers}\n{extra}"
                          "send_backoff_initial_s = 0.5\nsend_backoff_max_s = 5.0\n"
                          "[[destinations]]\n"
                          f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                          f'port = {orthanc.dicom_port}\nsend = ["seg", "sr"]\n')
        [port] = free_ports(1)
        log = scratch / f"node-w{workers}.log"
        node = start_node(data, config, port, args.stable_after, log)
        try:
            _workers_ready(data, workers, 600)
            load_before = os.getloadavg()
            print(f"burst: workers={workers}: {len(studies)} studies x {args.slices} slices, "
                  f"{args.associations} associations at once ...", flush=True)
            start = datetime.now(timezone.utc)
            t0 = time.perf_counter()
            acked = _send_lanes(port, studies, args.associations, args.timeout)
            send_s = time.perf_counter() - t0
            done = _wait_all(data, uids, args.timeout)
            load_after = os.getloadavg()
            in_orthanc = _orthanc_seg_sr(orthanc, uids)
        finally:
            node.terminate()
            try:
                node.wait(90)
            except subprocess.TimeoutExpired:
                node.kill()
    per_study = []
    for k, uid in enumerate(uids):
        d = done[uid]
        job = d["job"]
        queued, started, finished = (_ts(job[c]) for c in ("enqueued_at", "started_at", "finished_at"))
        per_study.append({
            "study": k, "ack_to_seg_sr_s": (d["seg_sr_acked"] - acked[k]).total_seconds(),
            "quiet_s": (queued - acked[k]).total_seconds(),
            "queue_wait_s": (started - queued).total_seconds(),
            "job_s": (finished - started).total_seconds(),
            "attempts": job["attempts"], "worker": job["worker"]})
    latencies = [s["ack_to_seg_sr_s"] for s in per_study]
    return {
        "workers": workers, "studies": len(studies), "slices": args.slices,
        "associations": args.associations, "backend": args.backend or "local (default)",
        "model": model, "stable_after_s": args.stable_after, "send_s": send_s,
        "makespan_s": (max(d["seg_sr_acked"] for d in done.values()) - start).total_seconds(),
        "latency_median_s": statistics.median(latencies), "latency_max_s": max(latencies),
        "latency_min_s": min(latencies), "job_s_median": statistics.median(
            s["job_s"] for s in per_study),
        "studies_with_seg_and_sr_in_orthanc": in_orthanc, "per_study": per_study,
        "loadavg_before": load_before, "loadavg_after": load_after,
    }


def report(runs: list[dict[str, Any]], conditions: dict[str, Any]) -> None:
    print()
    print(f"burst: {runs[0]['studies']} studies x {runs[0]['slices']} slices (512x512) sent by "
          f"{runs[0]['associations']} associations at once; backend {runs[0]['backend']}; "
          f"quiet period {runs[0]['stable_after_s']} s (in the latencies)")
    print(f"  {'workers':>7} {'makespan':>9} {'send':>6} {'latency median':>15} {'min':>6} "
          f"{'max':>6} {'job median':>11} {'in Orthanc':>11} {'load before/after':>18}")
    for r in runs:
        print(f"  {r['workers']:>7} {r['makespan_s']:>8.1f}s {r['send_s']:>5.1f}s "
              f"{r['latency_median_s']:>14.1f}s {r['latency_min_s']:>5.1f}s {r['latency_max_s']:>5.1f}s "
              f"{r['job_s_median']:>10.1f}s {r['studies_with_seg_and_sr_in_orthanc']:>5}/{r['studies']:<5}"
              f" {r['loadavg_before'][0]:>8.1f}/{r['loadavg_after'][0]:.1f}")
    print(f"  conditions: {conditions['cpus']} CPU(s), {conditions['machine']}, Python "
          f"{conditions['python']}; torch threads per worker: cpus // workers (at least 1)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=10, help="studies in the burst (default 10)")
    ap.add_argument("--slices", type=int, default=200, help="slices per study (default 200)")
    ap.add_argument("--associations", type=int, default=4, help="parallel associations (default 4)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4],
                    help="the node's workers setting, one run each (default 1 2 4)")
    ap.add_argument("--backend", default=None,
                    help="the node's backend setting (default: left out, the local backend)")
    ap.add_argument("--triton-url", default=None, help="the node's triton_url setting")
    ap.add_argument("--stable-after", type=float, default=2.0, metavar="S",
                    help="the node's quiet period (default 2 s)")
    ap.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up after S seconds")
    ap.add_argument("--scratch", type=Path, default=None, help="work here (kept) instead of a temp dir")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = ap.parse_args(argv)
    if not shutil.which("storescu"):
        print("burst: dcmtk storescu is required (scripts/setup.sh installs it)", file=sys.stderr)
        return 2
    conditions = {"cpus": os.cpu_count(), "machine": platform.machine(),
                  "kernel": platform.release(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="dicom-node-burst-") as tmp:
        scratch = args.scratch or Path(tmp)
        scratch.mkdir(parents=True, exist_ok=True)
        print(f"burst: rendering {args.studies} studies x {args.slices} slices (512x512) ...",
              flush=True)
        studies = write_studies(scratch / "studies", args.studies, args.slices, args.seed)
        runs = [run_once(args, scratch, studies, w) for w in args.workers]
    report(runs, conditions)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "conditions": conditions}, indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
