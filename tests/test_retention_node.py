"""Retention in a real node with a real Orthanc (issue 23).

``retention_days = 0``: a non-donor's images go once the results are in Orthanc and
never before (Orthanc down: nothing pruned until the sends settle); a donor's stay.
Disk watermarks: a node on a small tmpfs with a stream of studies is never answered
A700 while anything is prunable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from loop_helpers import install_model, jobs_now, node_json, queued_sends, results_in_orthanc, \
    small_study, storescu, write_files
from node_harness import NodeProcess, free_port
from orthanc.server import OrthancServer
from waiting import wait_until

pytestmark = pytest.mark.orthanc

RESULT_TIMEOUT = 120.0


def _files(data_dir: Path, patient_key: str) -> list[Path]:
    return [p for p in (data_dir / "archive").rglob("*.dcm") if patient_key in str(p)]


def _complete(orthanc: OrthancServer, study_uid: str) -> bool:
    found = results_in_orthanc(orthanc, study_uid)
    return bool(found["seg"] and found["sr"] and found["overlay"])


def _config(orthanc: OrthancServer, extra: str = "", retention_days: int = 0) -> str:
    return (f"retention_days = {retention_days}\nprune_every_min = 0.02\nsend_backoff_initial_s = 0.5\n"
            f"send_backoff_max_s = 2\n{extra}[[destinations]]\n"
            f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')


def test_retention_zero_prunes_a_non_donor_only_once_orthanc_has_the_results(
        tmp_path: Path) -> None:
    first = OrthancServer(tmp_path / "orthanc").start()
    ports = (first.dicom_port, first.http_port)
    first.stop()  # the PACS is down: the sends cannot settle
    data = tmp_path / "data"
    data.mkdir()
    install_model(data)
    node = NodeProcess(data, config=_config(first), extra_args=["--stable-after", "1.5"]).start()
    try:
        donor = write_files(small_study("RET-DON", slices=20, size=64), tmp_path / "don")
        storescu(node.port, donor, node.ae_title)
        node.cli("twin", "consent", "RET-DON", "--donate", "--by", "dpo")
        datasets = small_study("RET-NON", slices=20, size=64, seed=9)
        storescu(node.port, write_files(datasets, tmp_path / "non"), node.ae_title)
        study_uid = str(datasets[0].StudyInstanceUID)
        non_key = node_json(node, "twin", "show", "RET-NON")["twin"]["patient_key"]
        don_key = node_json(node, "twin", "show", "RET-DON")["twin"]["patient_key"]
        wait_until("a failed send attempt", lambda: "kept in the queue" in node.log(), RESULT_TIMEOUT)
        wait_until("both jobs done", lambda: [j.state.value for j in jobs_now(data)]
                   == ["done", "done"], RESULT_TIMEOUT)
        time.sleep(3.0)  # several scheduled prunes (every 1.2 s) while the sends are open
        assert len(_files(data, non_key)) == 20, "pruned before the results were delivered"
        assert node.cli("archive", "prune", "--dry-run").stdout.startswith(
            "archive prune: nothing to remove")
        with OrthancServer(tmp_path / "orthanc", dicom_port=ports[0], http_port=ports[1]) as back:
            wait_until("results in Orthanc", lambda: _complete(back, study_uid), 60)
            wait_until("no send left queued", lambda: not queued_sends(data), 60)
            wait_until("the non-donor's images pruned", lambda: not _files(data, non_key), 30)
        assert len(_files(data, don_key)) == 20  # the donor's stay
        show = node.cli("twin", "show", "RET-NON").stdout
        assert "20 instance(s) PRUNED" in show and "non-donor" in show, show
        detail = node_json(node, "twin", "show", "RET-NON")
        assert detail["results"] and detail["results"][0]["segments"]  # results kept (default)
        verify = node.cli("archive", "verify", check=False)
        assert verify.returncode == 0, verify.stdout
        assert "archive prune: removed 20 file(s)" in node.log()
        events = [json.loads(line) for line in node.cli("audit", "--json").stdout.splitlines()]
        pruned = [e for e in events if e["event_type"] == "archive-pruned"]
        assert pruned and non_key in pruned[0]["detail"]["patient_keys"]
        status = node_json(node, "status", "--json")["storage"]
        assert status["bytes"]["source_donors"] > 0 and status["bytes"]["source_non_donors"] == 0
    finally:
        node.stop()


def _tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test runs as root): {done.stderr.strip()}")


def test_a_stream_of_studies_at_high_water_is_never_refused_while_anything_is_prunable(
        tmp_path: Path) -> None:
    data = tmp_path / "disk"
    _tmpfs(data, 40)
    try:
        install_model(data)
        with OrthancServer(tmp_path / "orthanc") as orthanc:
            # a small disk: the results go too once delivered (they are in the PACS)
            metrics_port = free_port()
            extra = (f"metrics_port = {metrics_port}\nresult_retention_days = 0\nmin_free_mb = 6\ndisk_high_water_pct = 60\n"
                     "disk_low_water_pct = 45\n")
            node = NodeProcess(data, config=_config(orthanc, extra, retention_days=30),
                               extra_args=["--stable-after", "1"]).start()
            try:
                for i in range(16):  # 1.4 MB of images a study (and 5 MB of results, pruned once sent)
                    paths = write_files(small_study(f"WM-{i}", slices=40, size=128, seed=i),
                                        tmp_path / f"s{i}")
                    storescu(node.port, paths, node.ae_title)  # raises on any refusal
                    shutil.rmtree(tmp_path / f"s{i}")
                    wait_until(f"study {i} settled", lambda: not queued_sends(data)
                               and all(j.state.value in ("done", "failed")
                                       for j in jobs_now(data)), RESULT_TIMEOUT)
                log = node.log()
                assert "above the high water mark" in log
                assert "under disk pressure" in log
                assert "A700" not in log and "out of resources" not in log.lower()
                usage = shutil.disk_usage(data)
                assert 100 * (usage.total - usage.free) / usage.total < 90
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                    metrics = r.read().decode()
                for name in ('dicom_node_storage_bytes{kind="source_non_donors"}',
                             'dicom_node_prunable_bytes{when="under_pressure"}',
                             "dicom_node_disk_nothing_prunable", "dicom_node_days_to_full",
                             "dicom_node_pruned_bytes_total"):
                    assert name in metrics, name
            finally:
                node.stop()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
