#!/usr/bin/env python3
"""Results the moment the series ends: MPPS and learned completeness, end to end (issue 29).

The node (``dicom-node serve``, a subprocess, the shipped demo model, one inference
worker) sends SEG, SR and overlay to a real Orthanc. Each series is an 80-slice 512x512
CT (``pipelines.phantom``, a new study each), sent with dcmtk ``storescu``
(``TCP_NODELAY=1``) from one scanner (calling AE ``BENCHSCU``, Station Name
``CT-BENCH``, one protocol).

* ``mpps``: the quiet period is set long (``--stable-after``, default 60 s); pynetdicom as
  the scanner's MPPS SCU sends N-CREATE (IN PROGRESS), the images, then N-SET COMPLETED
  listing every instance. The clock starts just before the N-SET and stops when the
  node's send queue records the SEG and the SR as acknowledged by Orthanc
  (``sends.sent_at``). One warm-up series first (the worker loads the model on its
  first job), then ``--rounds`` measured ones.
* ``learned``: the quiet period is ``--learn-stable-after`` (default 10 s); the first two
  series are complete by it (the node learns the size: 80), the next ``--rounds`` are
  complete by size after ``early_guard_s`` (0.5 s). The clock starts when ``storescu``
  exits (every instance acknowledged) and stops at SEG and SR acknowledged.

The breakdown is from the node's own rows: until the job is queued (the monitor), queue
wait, the worker's run, the SEG/SR sends. Load average before and after each mode.

Usage::

    .venv/bin/python benchmarks/completeness.py                   # both modes, 3 rounds
    .venv/bin/python benchmarks/completeness.py --mode mpps --rounds 1 --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import os
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
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import end_to_end as e2e  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence as DicomSequence  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # noqa: E402

from orthanc.server import OrthancServer, free_ports  # noqa: E402
from pipelines.demo_model import ensure_demo_model  # noqa: E402
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402
from registry.store import Registry  # noqa: E402

STATION, PROTOCOL = "CT-BENCH", "Abdomen 2.5mm"


def write_series(folder: Path, slices: int, seed: int) -> list[Path]:
    """A new study of one ``slices``-slice 512x512 CT series from the bench scanner."""
    folder.mkdir(parents=True, exist_ok=True)
    info = StudyInfo(patient_id=f"COMPLETE-{seed}", patient_name="Bench^Complete",
                     station_name=STATION, series_description=PROTOCOL)
    paths = []
    for i, ds in enumerate(ct_series(Anatomy.random(seed), SliceGeometry(slices=slices), info)):
        p = folder / f"ct{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _mpps(port: int, step: str, ds: Dataset, create: bool) -> int:
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
    try:
        send = assoc.send_n_create if create else assoc.send_n_set
        status, _ = send(ds, ModalityPerformedProcedureStep, step)
    finally:
        assoc.release()
    return int(status.Status)


def mpps_messages(paths: list[Path]) -> tuple[Dataset, Dataset, str]:
    """N-CREATE and N-SET COMPLETED (listing every instance) for one series, and its study."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.PerformedStationName = STATION
    item = Dataset()
    item.StudyInstanceUID = headers[0].StudyInstanceUID
    create.ScheduledStepAttributesSequence = DicomSequence([item])
    create.PerformedSeriesSequence = DicomSequence([])
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    series = Dataset()
    series.SeriesInstanceUID = headers[0].SeriesInstanceUID
    refs = []
    for h in headers:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = h.SOPClassUID, h.SOPInstanceUID
        refs.append(ref)
    series.ReferencedImageSequence = DicomSequence(refs)
    done.PerformedSeriesSequence = DicomSequence([series])
    return create, done, str(headers[0].StudyInstanceUID)


def storescu(port: int, paths: list[Path], timeout: float) -> datetime:
    """Send; return when the last instance was acknowledged (storescu exited)."""
    subprocess.run(["storescu", "-aet", "BENCHSCU", "-aec", "DICOM_NODE", "127.0.0.1", str(port),
                    *map(str, paths)], check=True, env=e2e.DCMTK_ENV, capture_output=True,
                   timeout=timeout)
    return datetime.now(timezone.utc)


def one_series(args: argparse.Namespace, data: Path, port: int, paths: list[Path], *,
               mpps: bool) -> dict[str, Any]:
    """Send one series (with its MPPS when ``mpps``); the figures from the clock's start."""
    study = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    if mpps:
        create, done, study = mpps_messages(paths)
        step = generate_uid()
        assert _mpps(port, step, create, True) == 0
        storescu(port, paths, args.timeout)
        start = datetime.now(timezone.utc)
        assert _mpps(port, step, done, False) == 0
    else:
        start = storescu(port, paths, args.timeout)
    found = e2e.wait_results(data, study, args.timeout)
    job, sends = found["job"], found["sends"]
    seg_sr = max(e2e._ts(s["sent_at"]) for s in sends if s["kind"] in ("seg", "sr"))
    queued_sends = max(e2e._ts(s["enqueued_at"]) for s in sends if s["kind"] in ("seg", "sr"))
    queued, started = e2e._ts(job["enqueued_at"]), e2e._ts(job["started_at"])
    timings = e2e.result_row(data, int(job["result_id"]))["timings"]
    return {"to_seg_sr_s": (seg_sr - start).total_seconds(),
            "until_job_queued_s": (queued - start).total_seconds(),
            "queue_wait_s": (started - queued).total_seconds(),
            "worker_to_seg_sr_queued_s": (queued_sends - started).total_seconds(),
            "pipeline_s": float(timings.get("pipeline_s", 0.0)),
            "send_seg_sr_s": (seg_sr - queued_sends).total_seconds()}


def run_mode(args: argparse.Namespace, scratch: Path, mode: str) -> dict[str, Any]:
    data = scratch / f"data-{mode}"
    with Registry(data) as reg:
        ensure_demo_model(reg)
    stable = args.stable_after if mode == "mpps" else args.learn_stable_after
    warm = 1 if mode == "mpps" else 2
    series = [write_series(scratch / f"{mode}-{i}", args.slices, args.seed + i)
              for i in range(warm + args.rounds)]
    load_before = os.getloadavg()
    with OrthancServer(scratch / f"orthanc-{mode}") as orthanc:
        config = scratch / f"node-{mode}.toml"
        config.write_text("send_backoff_initial_s = 0.5\nsend_backoff_max_s = 5.0\n"
                          "[[destinations]]\n"
                          f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                          f'port = {orthanc.dicom_port}\nsend = ["seg", "sr", "overlay"]\n')
        [port] = free_ports(1)
        node = e2e.start_node(data, config, port, stable, scratch / f"node-{mode}.log")
        rounds = []
        try:
            for i, paths in enumerate(series):
                r = one_series(args, data, port, paths, mpps=mode == "mpps")
                r["measured"] = i >= warm
                rounds.append(r)
                print(f"completeness: {mode} series {i + 1}{'' if i >= warm else ' (warm-up)'}: "
                      f"{r['to_seg_sr_s']:.2f} s to SEG+SR in Orthanc", flush=True)
                e2e.wait_results(data, str(dcmread(paths[0], stop_before_pixels=True)
                                           .StudyInstanceUID), args.timeout)
                time.sleep(1.0)  # the overlay of this series is sent before the next begins
        finally:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
    return {"mode": mode, "stable_after_s": stable, "rounds": rounds,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def report(r: dict[str, Any]) -> None:
    measured = [x for x in r["rounds"] if x["measured"]]
    start = "N-SET COMPLETED" if r["mode"] == "mpps" else "last instance acknowledged"
    print(f"\ncompleteness [{r['mode']}]: {start} -> SEG+SR acknowledged by Orthanc, "
          f"80x512x512 CT, quiet period {r['stable_after_s']:g} s")
    for k in ("to_seg_sr_s", "until_job_queued_s", "queue_wait_s", "worker_to_seg_sr_queued_s",
              "pipeline_s", "send_seg_sr_s"):
        print(f"  {k:<28} " + "  ".join(f"{x[k]:6.2f}" for x in measured))
    print(f"  load average before {r['loadavg_before'][0]:.2f}, after {r['loadavg_after'][0]:.2f};"
          f" {os.cpu_count()} CPU(s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("mpps", "learned", "both"), default="both")
    ap.add_argument("--slices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3, help="measured series per mode (default 3)")
    ap.add_argument("--stable-after", type=float, default=60.0,
                    help="quiet period in the mpps mode (default 60 s: never reached)")
    ap.add_argument("--learn-stable-after", type=float, default=10.0,
                    help="quiet period in the learned mode (the first two series wait for it)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not shutil.which("storescu"):
        print("completeness: dcmtk storescu is required", file=sys.stderr)
        return 2
    modes = ("mpps", "learned") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory(prefix="dicom-node-complete-") as tmp:
        results = [run_mode(args, Path(tmp), mode) for mode in modes]
    for r in results:
        report(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
