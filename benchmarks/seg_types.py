#!/usr/bin/env python3
"""Issue 25 item 4 benchmark: what a job costs more when its destinations ask for a
BINARY and a LABELMAP SEG (a SEG and an SR of each type) than when they agree.

In process: one data directory, the shipped demo model, a real worker (job queue,
result store, sender; the destinations are never reached: the sends stay queued). Each
round stores two new phantom studies (``--slices`` slices of 512 x 512, the same
anatomy, a patient each) and runs the job of one in each mode, alternating which goes
first (a first job, not counted, loads the model):

* ``one``: two destinations that both take BINARY: one SEG, one SR (as before);
* ``two``: one BINARY, one LABELMAP destination: a SEG and an SR of each type.

Reported per mode (medians): the job's wall time; ``other_seg_types_s`` (building
the further SEG and SR, the worker's timing); ``seg_sr_store_s`` (checking, with
``dciodvfy``, recording and queueing the SEG(s) and SR(s)). The extra cost of a job is
``other_seg_types_s`` plus the difference of ``seg_sr_store_s``; the job's wall time
carries the inference's noise on a shared machine.

Usage::

    .venv/bin/python benchmarks/seg_types.py --slices 80 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from dicom_node.queue.jobs import JobQueue
    from dicom_node.queue.monitor import StabilityMonitor
    from dicom_node.queue.sender import Sender
    from dicom_node.runtime.worker import Worker
    from dicom_node.settings import Destination
    from dicom_node.tasks import default_tasks
    from learning_helpers import store_all
    from loop_helpers import install_model
    from pipelines import phantom as ph
    from twin_archive import Archive
    from twin_archive.results import ResultStore

    work = Path(tempfile.mkdtemp(prefix="bench-seg-types-"))
    data = work / "data"
    try:
        install_model(data)
        archive, jobs, results = Archive(data), JobQueue(data), ResultStore(data)
        sender = Sender(data, ae_title="DICOM_NODE")
        monitor = StabilityMonitor(archive, jobs, default_tasks(), stable_after_s=0.01)
        pacs = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=9, confirm="none")
        modes = {"one": (pacs, replace(pacs, name="pacs2", ae_title="PACS2")),
                 "two": (pacs, replace(pacs, name="research", ae_title="RESEARCH",
                                       seg_type="labelmap"))}
        worker = Worker(archive=archive, jobs=jobs, results=results, sender=sender,
                        destinations=modes["one"], tasks=default_tasks())
        figures: dict[str, dict[str, list[float]]] = {m: {"job_s": [], "other_seg_types_s": [],
                                                          "seg_sr_store_s": []} for m in modes}
        loads = [os.getloadavg()[0]]
        for r in range(-1, args.rounds):  # round -1: loads the model, not counted
            order = ("one",) if r < 0 else ("one", "two") if r % 2 == 0 else ("two", "one")
            for mode in order:
                g = ph.SliceGeometry(rows=512, columns=512, slices=args.slices,
                                     pixel_spacing=(0.78, 0.78), slice_spacing=5.0)
                study = ph.ct_series(ph.Anatomy.random(5), g,
                                     ph.StudyInfo(patient_id=f"BENCH-SEGTYPE-{r}-{mode}"))
                store_all(archive, study)
                uid = str(study[0].SeriesInstanceUID)
                while not [d for d in monitor.poll() if d.series_uid == uid]:
                    time.sleep(0.05)
                job = jobs.claim()
                worker.destinations = modes[mode]
                out = worker.run(job)
                t = out.result.timings
                if r < 0:
                    continue
                figures[mode]["job_s"].append(out.seconds)
                figures[mode]["other_seg_types_s"].append(t.get("other_seg_types_s", 0.0))
                figures[mode]["seg_sr_store_s"].append(t["seg_sr_store_s"])
                loads.append(os.getloadavg()[0])
                print(f"round {r} {mode}: job {out.seconds:.2f} s, further SEG+SR "
                      f"{t.get('other_seg_types_s', 0.0):.2f} s, SEG(s)+SR(s) checked, stored "
                      f"and queued {t['seg_sr_store_s']:.2f} s, SEG types "
                      f"{'/'.join(out.result.seg_types)} (load {loads[-1]:.1f})", flush=True)
        print(f"{args.slices} slices of 512 x 512, {args.rounds} rounds, load average "
              f"{min(loads):.1f}-{max(loads):.1f}; medians:")
        for mode, f in figures.items():
            print(f"  {mode}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in f.items()))
        one, two = figures["one"], figures["two"]
        extra = (statistics.median(two["other_seg_types_s"])
                 + statistics.median(two["seg_sr_store_s"]) - statistics.median(one["seg_sr_store_s"]))
        print(f"  extra cost of a second SEG type: {extra:.2f} s (job wall time difference "
              f"{statistics.median(two['job_s']) - statistics.median(one['job_s']):+.2f} s)")
        for closeable in (sender, results, jobs, archive):
            closeable.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
