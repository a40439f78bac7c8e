#!/usr/bin/env python3
"""Issue 26 benchmark: what the comparison with a prior costs a result.

``--mode twin`` (in process): a 512x512 phantom patient with a prior result in the twin
(real SEG file); times what the comparison adds to a result: finding the prior and
reading its SEG's headers (``JobPriors.lookup``), comparing, the SR's extra groups
(``write_results`` with and without the comparison, SEG+SR only) and the chart image.

``--mode retrieve`` (real node and Orthanc, subprocesses): ``--rounds`` patients, each
with its prior study (``--slices`` slices of 512x512) only in Orthanc; today's study of
the patient is sent to the node with dcmtk ``storescu``. The clock starts when
``storescu`` exits (every instance acknowledged) and stops when Orthanc holds today's
SR; the stage times come from the node's tables (the jobs' times, the results'
timings) and its log. One node serves every round: the first pays the model's load.

Usage::

    .venv/bin/python benchmarks/priors.py --mode twin --rounds 5
    .venv/bin/python benchmarks/priors.py --mode retrieve --slices 80 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

from pipelines import phantom as ph  # noqa: E402


def _study(anatomy: ph.Anatomy, date: str, slices: int, pid: str = "BENCH-PRIOR") -> list:
    g = ph.SliceGeometry(rows=512, columns=512, slices=slices, pixel_spacing=(0.78, 0.78),
                         slice_spacing=5.0)
    dss = ph.ct_series(anatomy, g, ph.StudyInfo(patient_id=pid))
    for ds in dss:
        ds.StudyDate = date
    return dss


def _grown(anatomy: ph.Anatomy, factor: float) -> ph.Anatomy:
    spleen = anatomy.organs[-1]
    s = factor ** (1 / 3)
    return dataclasses.replace(anatomy, organs=(*anatomy.organs[:-1], dataclasses.replace(
        spleen, radii=tuple(r * s for r in spleen.radii))))


def twin_mode(slices: int, rounds: int) -> None:
    from dicom_node.runtime.prior_results import JobPriors, volume_points
    from node_harness import incoming
    from pipelines.comparison import compare
    from pipelines.postprocess import split_labels
    from pipelines.types import ModelInfo, WriterOptions
    from pipelines.volume import load_series
    from pipelines.writers import write_results
    from pipelines.writers.history_plot import history_image
    from pipelines.writers.overlay import build_overlay
    from pipelines.writers.sr import build_sr
    from pipelines.writers.sr_prior import with_prior
    from twin_archive import Archive
    from twin_archive.history import HistoryStore
    from twin_archive.results import ResultStore, SegmentMeasure

    model = ModelInfo(name="spleen", version="v1", backend="cpu", source="bench", task="spleen-ct",
                      device_uid="2.25.1")
    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    try:
        archive, results = Archive(work / "data"), ResultStore(work / "data")
        a1 = ph.Anatomy.random(5)
        runs = []
        for date, anatomy, key in (("20251203", a1, "k1"), ("20261203", _grown(a1, 1.3), "k2")):
            dss = _study(anatomy, date, slices)
            for ds in dss:
                archive.ingest.store(incoming(ds))
            vol = load_series(dss)
            grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1)
            segs = split_labels(ph.truth_at(anatomy, vol.index_to_lps(grid)), vol, ph.LABELS)
            runs.append((dss, vol, segs))
        dss1, vol1, segs1 = runs[0]
        r1 = write_results(vol1, segs1, model, options=WriterOptions(write_overlay=False))
        twin = archive.twins.find_twin_keys("BENCH-PRIOR")[0]
        results.record(job_key="k1", patient_key=twin, study_uid=vol1.study_instance_uid,
                       source_series_uid=vol1.series_instance_uid, source_last_received="x",
                       source_instances=slices, task="spleen-ct", model_name="spleen",
                       model_version="v1", backend="cpu",
                       segments=tuple(SegmentMeasure(name=s.name, volume_ml=s.volume_ml)
                                      for s in segs1),
                       timings={}, objects=[("seg", r1.seg), ("sr", r1.sr)])
        dss2, vol2, segs2 = runs[1]
        results.record(job_key="k2", patient_key=twin, study_uid=vol2.study_instance_uid,
                       source_series_uid=vol2.series_instance_uid, source_last_received="x",
                       source_instances=slices, task="spleen-ct", model_name="spleen",
                       model_version="v1", backend="cpu",
                       segments=tuple(SegmentMeasure(name=s.name, volume_ml=s.volume_ml)
                                      for s in segs2), timings={}, objects=())
        history = HistoryStore(work / "data")
        priors = JobPriors(history, None)
        overlay = build_overlay(vol2, segs2, model)
        figures: dict[str, list[float]] = {k: [] for k in ("lookup", "compare", "sr_plain",
                                                           "sr_compared", "chart", "with_prior")}
        paths = archive.twins.series_files(vol2.series_instance_uid)
        seg2 = write_results(vol2, segs2, model, options=WriterOptions(write_overlay=False)).seg
        for _ in range(rounds):
            t0 = time.perf_counter()
            found = priors.lookup(patient_key=twin, task="spleen-ct",
                                  study_uid=vol2.study_instance_uid,
                                  series_uid=vol2.series_instance_uid, files=paths, rules=None,
                                  run_prior=lambda uid: None)  # type: ignore[arg-type]
            t1 = time.perf_counter()
            c = compare([(s.name, s.volume_ml) for s in segs2], dt.date(2026, 12, 3), found.prior)
            t2 = time.perf_counter()
            build_sr(vol2, seg2, segs2, model)
            t3 = time.perf_counter()
            build_sr(vol2, seg2, segs2, model, comparison=c)
            t4 = time.perf_counter()
            history_image(volume_points(history, twin, "spleen-ct"), overlay)
            t5 = time.perf_counter()
            groups, items = _groups(vol2, seg2, segs2, model)  # today's, as build_sr makes them
            t6 = time.perf_counter()
            with_prior(groups, [seg2], c, items, vol2.study_instance_uid)
            t7 = time.perf_counter()
            for k, v in (("lookup", t1 - t0), ("compare", t2 - t1), ("sr_plain", t3 - t2),
                         ("sr_compared", t4 - t3), ("chart", t5 - t4), ("with_prior", t7 - t6)):
                figures[k].append(v)
        print(f"{slices} slices of 512x512, {rounds} rounds, load {os.getloadavg()[0]:.1f}:")
        for k, v in figures.items():
            print(f"  {k:<11} median {statistics.median(v) * 1000:7.1f} ms  "
                  f"(min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
        added = sum(statistics.median(figures[k]) for k in ("lookup", "compare", "chart",
                                                             "with_prior"))
        print(f"  added by the comparison (lookup + compare + SR time points and prior groups "
              f"+ chart, medians): {added * 1000:.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _groups(vol, seg, segs, model):  # noqa: ANN001, ANN202 - a benchmark's shortcut
    """Today's measurement groups and SEG items, built as ``build_sr`` builds them."""
    import highdicom as hd

    from pipelines.writers import sr as sr_mod
    from pipelines.writers.seg import written_segments

    kept = written_segments(vol, segs)
    items = [i for i in seg.SegmentSequence if int(i.SegmentNumber) != 0]
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    return sr_mod._measurement_groups(vol, seg, items, kept, algorithm), items


def _utc(text: str) -> float:
    """An ISO 8601 UTC time of the node's tables as seconds since the epoch."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _round(data: Path, orthanc, node, prior_slices: list, today: list, work: Path) -> dict:  # noqa: ANN001
    """One patient: today's study sent to the node, timed to its SR in Orthanc."""
    from loop_helpers import jobs_now, results_in_orthanc, storescu, write_files
    from twin_archive.results import ResultStore
    from waiting import wait_until

    paths = write_files(today, work)
    study = str(today[0].StudyInstanceUID)
    load0 = os.getloadavg()[0]
    t_first = time.time()
    storescu(node.port, paths, node.ae_title)
    t0, wall0 = time.monotonic(), time.time()
    wait_until("today's SR in Orthanc", lambda: results_in_orthanc(orthanc, study)["sr"], 600,
               poll=0.05)
    took = time.monotonic() - t0
    load1 = os.getloadavg()[0]
    wait_until("today's job done", lambda: any(
        j.state.value == "done" and j.study_uid == study and j.kind.value == "series"
        for j in jobs_now(data)), 300)
    jobs = [j for j in jobs_now(data) if j.study_uid == study]
    asked = [j for j in jobs if j.kind.value == "priors"]
    series_job = [j for j in jobs if j.kind.value == "series"][0]
    store = ResultStore(data)
    try:
        mine = store.for_series(str(today[0].SeriesInstanceUID))[0]
        prior = store.for_series(str(prior_slices[0].SeriesInstanceUID))
    finally:
        store.close()
    out = {"took": took, "load": (load0, load1), "arrival": wall0 - t_first,
           "today": mine.timings, "prior": prior[0].timings if prior else {},
           "queued": _utc(series_job.enqueued_at) - wall0,
           "started": _utc(series_job.started_at) - wall0,
           "finished": _utc(series_job.finished_at) - wall0,
           "change": [(s.name, s.volume_ml) for s in mine.segments],
           "note": series_job.error}
    if asked:
        out["priors_job"] = (_utc(asked[0].started_at) - wall0,
                             _utc(asked[0].finished_at) - wall0, asked[0].error)
    return out


def retrieve_mode(slices: int, stable_after: float, rounds: int) -> None:
    """Each round a new patient: its prior only in Orthanc, today's study sent to the
    node; the clock from the last instance acknowledged to today's SR in Orthanc. One
    node for all rounds (the first pays the model's load)."""
    from loop_helpers import install_model, pacs, storescu, write_files
    from node_harness import NodeProcess
    from waiting import wait_until

    work = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    try:
        data = work / "data"
        install_model(data)
        node = NodeProcess(data, extra_args=["--stable-after", str(stable_after)])
        with pacs(work / "orthanc", known_modalities={"node": (node.ae_title, "127.0.0.1",
                                                               node.port)}) as orthanc:
            node.config = ("priors_years = 5\n[[destinations]]\n"
                           f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
                           f"port = {orthanc.dicom_port}\nquery = true\n")
            studies = []
            for i in range(rounds):
                a1 = ph.Anatomy.random(5 + i)
                prior = _study(a1, "20251203", slices, pid=f"BENCH-PRIOR-{i}")
                storescu(orthanc.dicom_port, write_files(prior, work / f"prior{i}"), orthanc.aet)
                studies.append((prior, _study(_grown(a1, 1.3), "20261203", slices,
                                              pid=f"BENCH-PRIOR-{i}")))
            node.start()
            try:
                wait_until("the worker ready", lambda: "ready for jobs" in node.log(), 120,
                           poll=0.1)
                figures = [_round(data, orthanc, node, prior, today, work / f"today{i}")
                           for i, (prior, today) in enumerate(studies)]
                lines = [ln for ln in node.log_path.read_text().splitlines()
                         if "priors" in ln or "-> result" in ln or "compared with" in ln]
            finally:
                node.stop()
        _report(slices, stable_after, figures)
        print("\n".join(ln[:260] for ln in lines))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(slices: int, stable_after: float, figures: list[dict]) -> None:
    """Each round's figures and the medians (seconds; times relative to the last
    instance acknowledged, negative: before it)."""
    print(f"{slices} slices of 512x512, stable_after {stable_after} s, {len(figures)} round(s)")
    for i, f in enumerate(figures):
        pj = f.get("priors_job")
        pt, tt = f["prior"], f["today"]
        print(f"round {i + 1}: load {f['load'][0]:.1f} -> {f['load'][1]:.1f}; today's SR in "
              f"Orthanc {f['took']:.1f} s after its last instance (sent in {f['arrival']:.1f} s)"
              + (f"; priors job {pj[0]:+.1f} -> {pj[1]:+.1f} s ({pj[2]})" if pj else "")
              + f"; prior's model load {pt.get('model_load_s', 0):.1f} s, pipeline "
              f"{pt.get('pipeline_s', 0):.1f} s; today's job queued {f['queued']:+.1f}, "
              f"begun {f['started']:+.1f}, done {f['finished']:+.1f} s (model load "
              f"{tt.get('model_load_s', 0):.1f}, prior found {tt.get('prior_s', 0):.2f}, pipeline "
              f"{tt.get('pipeline_s', 0):.1f}: read {tt.get('load_s', 0):.1f}, preprocess "
              f"{tt.get('preprocess_s', 0):.1f}, inference {tt.get('inference_s', 0):.1f}, "
              f"postprocess {tt.get('postprocess_s', 0):.1f}, SEG+SR {tt.get('write_s', 0):.1f}); "
              f"{f['change']} {f['note']}")
    took = [f["took"] for f in figures]
    print(f"median {statistics.median(took):.1f} s (min {min(took):.1f}, max {max(took):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("twin", "retrieve"), default="twin")
    ap.add_argument("--slices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stable-after", type=float, default=2.0)
    args = ap.parse_args()
    if args.mode == "twin":
        twin_mode(args.slices, args.rounds)
    else:
        retrieve_mode(args.slices, args.stable_after, args.rounds)


if __name__ == "__main__":
    main()
