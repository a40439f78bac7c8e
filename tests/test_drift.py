"""Drift per scanner (issue 16 item 4): figures of served series keyed by scanner, PSI
against each scanner's baseline, ``dicom-node drift``, ``/metrics``, named once.

Three phantom "scanners" (same Manufacturer and model, Station Name CT-1, CT-2, CT-3)
send series that are written as DICOM files and go through the worker's hook
(:class:`dicom_node.learning.live_learning.LiveLearning`, the empty-result path, which reads
the series back from its files); CT-3's later series have a shifted contrast (native
phase, darker spleen). CT-1 and CT-2 stay stable; CT-3 is named in the journal, once.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest

from dicom_node.learning.drift import DriftConfig, psi
from dicom_node.queue.jobs import JobQueue
from dicom_node.learning.live_learning import LiveLearning
from dicom_node.wire.metrics import NodeMetrics
from dicom_node.runtime.observability import NodeCollector, build_registry
from learning_helpers import geometry
from loop_helpers import install_model, write_files
from node_harness import DICOM_NODE, REPO
from pipelines import phantom as ph
from pipelines.inference import load_model
from registry.store import Registry
from twin_archive import Archive

SHIFTED = ph.SiteStyle(name="shifted", phase=(0.0, 0.1), spleen_hu_offset=-10.0)
CONFIG = DriftConfig(baseline_series=3, window_series=3, psi_threshold=0.25)


def test_psi_is_zero_for_equal_and_large_for_moved_distributions() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([50, 50, 0], [0, 50, 50]) > 1.0
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_two_stable_scanners_and_one_with_shifted_contrast_named_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    Archive(data).close()  # the index, migrated
    install_model(data)
    with Registry(data) as reg:
        loaded = load_model(reg.active("spleen-ct"), registry=reg)  # type: ignore[arg-type]
    jobs = JobQueue(data)
    live = LiveLearning(data, drift=CONFIG)
    g = geometry()
    plan = [("CT-1", None)] * 6 + [("CT-2", None)] * 6 + [("CT-3", None)] * 3 + [("CT-3", SHIFTED)] * 3
    caplog.set_level(logging.WARNING, logger="dicom_node.learning.drift")
    try:
        for i, (station, style) in enumerate(plan):
            info = ph.StudyInfo(patient_id=f"DR-{i}", station_name=station)
            datasets = ph.ct_series(ph.Anatomy.random(500 + i, style), g, info)
            files = write_files(datasets, tmp_path / f"s{i}")
            job = jobs.enqueue(series_uid=info.series_uid, study_uid=info.study_uid,
                               patient_key="k", task="spleen-ct", series_last_received=f"t{i}",
                               instances=len(files))
            assert job is not None
            live.served(job=job, files=files, rules=None, loaded=loaded, outcome=None, result=None)
    finally:
        live.close()
        jobs.close()
    named = [r.getMessage() for r in caplog.records if "drift: scanner" in r.getMessage()]
    assert len(named) == 1 and "CT-3 moved for task spleen-ct" in named[0], named
    assert "hu_body PSI" in named[0]

    out = subprocess.run([*DICOM_NODE, "--data-dir", str(data), "drift", "spleen-ct", "--json"],
                         capture_output=True, text=True, cwd=REPO, check=True, timeout=120)
    by_station = {d["scanner"]["station"]: d for d in json.loads(out.stdout)}
    assert set(by_station) == {"CT-1", "CT-2", "CT-3"}
    # with the defaults (20 + 20 series) every scanner is still collecting its baseline
    assert {d["status"] for d in by_station.values()} == {"collecting"}
    assert by_station["CT-3"]["named_at"] is not None  # named when the node's config said so
    # with the node's configuration of this test (3 + 3 series)
    cfg = tmp_path / "node.toml"
    cfg.write_text("drift_baseline_series = 3\ndrift_window_series = 3\n")
    out = subprocess.run([*DICOM_NODE, "--config", str(cfg), "--data-dir", str(data), "drift",
                          "--json"], capture_output=True, text=True, cwd=REPO, check=True,
                         timeout=120)
    by_station = {d["scanner"]["station"]: d for d in json.loads(out.stdout)}
    assert by_station["CT-1"]["status"] == by_station["CT-2"]["status"] == "stable"
    assert by_station["CT-3"]["status"] == "moved" and "hu_body" in by_station["CT-3"]["moved"]
    figs = {f["name"]: f for f in by_station["CT-3"]["figures"]}
    for name in ("hu_p50", "spacing_row_mm", "spacing_slice_mm", "slices", "kvp", "empty"):
        assert name in figs, name
    assert figs["hu_body"]["psi"] > 0.25 and figs["slices"]["psi"] == 0.0
    assert figs["kvp"]["baseline_mean"] == 120.0 and figs["empty"]["window_mean"] == 1.0
    assert figs["hu_p50"]["psi"] is None  # fewer than 10 series a side: n/a, said so
    text = subprocess.run([*DICOM_NODE, "--config", str(cfg), "--data-dir", str(data), "drift"],
                          capture_output=True, text=True, cwd=REPO, check=True, timeout=120).stdout
    assert "CT-3: 6 series, MOVED: hu_body" in text
    assert "PSI" in text and "named in the journal" in text

    # /metrics exports it
    body = generate_latest(build_registry(NodeCollector(NodeMetrics(), data, drift=CONFIG))).decode()
    moved = [line for line in body.splitlines() if line.startswith("dicom_node_drift_moved{")]
    assert len(moved) == 3
    assert any('CT-3' in line and line.endswith(" 1.0") for line in moved)
    assert all(line.endswith(" 0.0") for line in moved if "CT-3" not in line)
    assert 'dicom_node_drift_psi{figure="hu_body"' in body

    # named once: another shifted series does not name it again
    caplog.clear()
    jobs, live = JobQueue(data), LiveLearning(data, drift=CONFIG)
    try:
        info = ph.StudyInfo(patient_id="DR-X", station_name="CT-3")
        files = write_files(ph.ct_series(ph.Anatomy.random(999, SHIFTED), g, info), tmp_path / "x")
        job = jobs.enqueue(series_uid=info.series_uid, study_uid=info.study_uid, patient_key="k",
                           task="spleen-ct", series_last_received="tx", instances=len(files))
        live.served(job=job, files=files, rules=None, loaded=loaded, outcome=None, result=None)
    finally:
        live.close()
        jobs.close()
    assert not [r for r in caplog.records if "drift: scanner" in r.getMessage()]
    assert np.isfinite(figs["hu_body"]["psi"])
