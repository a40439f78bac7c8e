"""Listener and inference workers apart (``workers = N``), with the real node.

The listener process loads no torch (its ``sys.modules`` and its memory map); two
workers run two studies at the same time, each job once, both results in a real
Orthanc; a worker killed with SIGKILL during a job while another study is being received:
every C-STORE is answered Success throughout, the worker is restarted (journal and
``status`` say so) and the job completes exactly once. The queue's give-back rules are
checked on a real ``queue.sqlite``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from dicom_client import send
from dicom_node.foundation.database import write
from dicom_node.queue.jobs import JobQueue, JobState
from dicom_node.settings import load_settings
from dicom_node.runtime.supervisor import WorkerPool
from loop_helpers import (
    install_model,
    node_json,
    pacs,
    queued_sends,
    results_in_orthanc,
    series_of,
    small_study,
    storescu,
    write_files,
)
from node_harness import REPO, NodeProcess, free_port
from orthanc.server import OrthancServer
from waiting import wait_until

RESULT_TIMEOUT = 240.0  # two workers loading torch and running on 2 shared cores


def _workers(node: NodeProcess) -> list[dict]:
    try:
        return json.loads((node.data_dir / "serve.json").read_text()).get("workers", [])
    except (OSError, ValueError):
        return []


def _ready(node: NodeProcess, n: int) -> bool:
    workers = _workers(node)
    return len(workers) == n and all(w["state"] == "ready" for w in workers)


def _node(tmp: Path, orthanc: OrthancServer, workers: int, metrics_port: int = 0) -> NodeProcess:
    data = tmp / "data"
    data.mkdir(parents=True)
    install_model(data)
    config = (f"workers = {workers}\nsend_backoff_initial_s = 0.5\nmetrics_port = {metrics_port}\n"
              "[[destinations]]\n"
              f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
    return NodeProcess(data, config=config, extra_args=["--stable-after", "1.5"])


def _complete(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]] | None:
    found = results_in_orthanc(orthanc, study_uid)
    return found if found["seg"] and found["sr"] and found["overlay"] else None


def _exactly_once(orthanc: OrthancServer, study_uid: str) -> None:
    found = results_in_orthanc(orthanc, study_uid)
    assert len(found["seg"]) == 1 and len(found["sr"]) == 1, found
    assert len(series_of(orthanc, found["overlay"])) == 1


# ---------------------------------------------------------------- the listener: no torch
_IN_PROCESS = r"""
import json, sys, time
from dicom_node.cli import build_parser
from dicom_node.runtime.node import Node
from dicom_node.settings import load_settings

build_parser()  # every command's parser, as `dicom-node serve` builds them
settings = load_settings(None, env={}, overrides={"data_dir": sys.argv[1]}).replace(
    port=0, bind_address="127.0.0.1", workers=1, train_enabled=True)
node = Node(settings)
node.start()
deadline = time.monotonic() + 180
while node.loop.workers.describe()[0].state != "ready" and time.monotonic() < deadline:
    time.sleep(0.1)
ready = node.loop.workers.describe()[0].state == "ready"
node.stop()
print(json.dumps({"ready": ready, "loaded": sorted(
    m for m in ("torch", "monai", "onnxruntime") if m in sys.modules)}))
"""


def test_the_listener_never_loads_torch_its_worker_does(tmp_path: Path) -> None:
    # In the process that runs Node (what `serve` and `demo` run), with its worker ready
    # and the nightly scheduler on: no torch, MONAI or ONNX Runtime in sys.modules.
    out = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(tmp_path / "a")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"ready": True, "loaded": []}, out.stderr[-3000:]
    # The real `serve` process: libtorch is mapped in its worker, never in the listener.
    node = NodeProcess(tmp_path / "b").start()
    try:
        wait_until("the worker ready", lambda: _ready(node, 1), 180, poll=0.2)
        [worker] = _workers(node)
        assert "libtorch" not in Path(f"/proc/{node.proc.pid}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{worker['pid']}/maps").read_text()
        status = node.cli("status").stdout
        assert f"workers:   1 of 1 running (worker-1 pid {worker['pid']}: idle)" in status
    finally:
        assert node.stop() == 0


# ---------------------------------------------------------------- the queue's give-back rules
def _enqueue(queue: JobQueue, uid: str) -> None:
    queue.enqueue(series_uid=uid, study_uid="1.2", patient_key="k", task="spleen-ct",
                  series_last_received="t1", instances=3)


def test_a_dead_workers_jobs_are_given_back_and_a_job_that_kills_every_worker_fails(
        tmp_path: Path) -> None:
    listener = JobQueue(tmp_path, max_attempts=2, retry_delay_s=0.0)
    one = JobQueue(tmp_path, worker="worker-1 pid 11")
    two = JobQueue(tmp_path, worker="worker-2 pid 12")
    _enqueue(listener, "1.1")
    _enqueue(listener, "2.2")
    a, b = one.claim(), two.claim()
    assert a is not None and b is not None and a.id != b.id
    assert (a.worker, b.worker) == ("worker-1 pid 11", "worker-2 pid 12")
    assert one.claim() is None  # each job once, whoever claims it
    # worker-1 dies: its job only goes back, the attempt counted
    [given] = listener.give_back("worker-1 pid 11", "interrupted: worker-1 died (killed by SIGKILL)")
    assert given.id == a.id and given.state is JobState.QUEUED and given.attempts == 1
    assert listener.get(b.id).state is JobState.RUNNING
    again = JobQueue(tmp_path, worker="worker-1 pid 13").claim()
    assert again is not None and again.id == a.id and again.attempts == 2
    # ... and it dies again on its last attempt: failed, with why, not queued for ever
    [failed] = listener.give_back("worker-1 pid 13", "interrupted: worker-1 died (killed by SIGKILL)")
    assert failed.state is JobState.FAILED
    assert failed.error == "interrupted: worker-1 died (killed by SIGKILL) during each of its 2 attempt(s)"
    # the node stopped worker-2: given back, its attempt not counted
    [stopped] = listener.give_back("worker-2 pid 12", "interrupted (stopped)", count_attempt=False)
    assert stopped.state is JobState.QUEUED and stopped.attempts == 0
    assert listener.give_back("worker-2 pid 12", "again") == []


# ---------------------------------------------------------------- a full disk (issue 23, part 6)
def test_a_state_write_that_fails_kills_no_thread_and_a_killed_worker_is_still_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve.json`` cannot be written (ENOSPC, injected where the node writes it): the
    reader threads live on, a worker SIGKILLed meanwhile is reaped, its job given back
    and the worker restarted; the failure is one journal line, and one more when the
    write works again (tried again by itself, so ``serve.json`` catches up)."""
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: died.append(a.thread.name))
    settings = load_settings(None, env={}, overrides={"data_dir": str(tmp_path / "data")})
    settings = settings.replace(workers=1)
    jobs = JobQueue(settings.data_dir)
    full = threading.Event()
    told: list[list[tuple[str, int | None]]] = []

    def write_state() -> None:  # what Node._write_state does, on a disk that may be full
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        told.append([(w.state, w.pid) for w in pool.describe()])

    pool = WorkerPool(settings, jobs, on_queued=lambda: None, on_change=write_state)
    caplog.set_level(logging.INFO, logger="dicom_node.runtime.supervisor")
    full.set()  # from the start: "ready" itself cannot be told
    pool.start()
    try:
        assert pool.wait_ready(180)
        [first] = pool.describe()
        with write(jobs.db) as conn:  # a job the worker runs (claimed in one go: the worker
            # itself would take a job queued first)
            held_id = conn.execute(
                "INSERT INTO jobs (series_uid, study_uid, patient_key, task, series_last_received,"
                " instances, state, attempts, max_attempts, enqueued_at, not_before, worker)"
                " VALUES ('9.9', '1.2', 'k', 'spleen-ct', 't1', 3, 'running', 1, 3, 't', 't', ?)",
                (f"worker-1 pid {first.pid}",)).lastrowid
        held = jobs.get(held_id)
        os.kill(first.pid or 0, signal.SIGKILL)
        wait_until("the killed worker reaped and restarted", lambda: (
            pool.describe()[0].restarts == 1 and pool.describe()[0].state == "ready"), 180, 0.1)
        [second] = pool.describe()
        assert second.pid != first.pid and "killed by SIGKILL" in second.last_exit
        again = jobs.get(held.id)  # given back, perhaps taken again by the new worker (and
        # failed: its series has no instances)
        assert again.state is JobState.QUEUED or again.worker == f"worker-1 pid {second.pid}"
        assert told == [] and died == []
        full.clear()  # space again: told without any new change
        wait_until("the state told again", lambda: told and told[-1] == [("ready", second.pid)],
                   10, 0.05)
    finally:
        pool.stop()
        jobs.close()
    assert died == []
    lines = [r.getMessage() for r in caplog.records if r.name == "dicom_node.runtime.supervisor"]
    failing = [m for m in lines if "could not record the workers' state" in m]
    assert len(failing) == 1 and "disk full" in failing[0], lines
    assert sum("working again (after: disk full)" in m for m in lines) == 1, lines
    assert f"job {held.id} is back in the queue (attempt 1 of 3 used)" in lines


# ---------------------------------------------------------------- with Orthanc
@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the module's tests: each looks only at its own studies in it."""
    with pacs(tmp_path_factory.mktemp("workers") / "orthanc") as server:
        yield server


@pytest.mark.orthanc
def test_two_workers_run_two_studies_at_once_each_job_once(
        tmp_path: Path, orthanc: OrthancServer) -> None:
    node = _node(tmp_path, orthanc, workers=2).start()
    try:
        wait_until("two workers ready", lambda: _ready(node, 2), 240, poll=0.2)
        studies: dict[str, list[Path]] = {}
        for pid, seed in (("W2-A", 5), ("W2-B", 6)):
            datasets = small_study(pid, seed=seed)
            studies[str(datasets[0].StudyInstanceUID)] = write_files(datasets, tmp_path / pid)
        senders = [threading.Thread(target=storescu, args=(node.port, paths, node.ae_title))
                   for paths in studies.values()]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        for study_uid in studies:
            wait_until(f"results of {study_uid} in Orthanc",
                       lambda s=study_uid: _complete(orthanc, s), RESULT_TIMEOUT)
        jobs = node_json(node, "jobs")
        assert sorted(j["study_uid"] for j in jobs) == sorted(studies)
        assert all(j["state"] == "done" and j["attempts"] == 1 for j in jobs), jobs
        # both workers took one each, and the two jobs ran at the same time
        assert {j["worker"].split(" pid ")[0] for j in jobs} == {"worker-1", "worker-2"}
        (s1, f1), (s2, f2) = ((datetime.fromisoformat(j["started_at"]),
                               datetime.fromisoformat(j["finished_at"])) for j in jobs)
        assert s1 < f2 and s2 < f1, jobs
        wait_until("no send left queued", lambda: not queued_sends(node.data_dir), 60)
        assert node_json(node, "sends", "--state", "queued") == []
        for study_uid in studies:
            _exactly_once(orthanc, study_uid)
    finally:
        assert node.stop() == 0


@pytest.mark.orthanc
def test_worker_killed_mid_job_while_a_study_arrives(
        tmp_path: Path, orthanc: OrthancServer) -> None:
    mport = free_port()
    node = _node(tmp_path, orthanc, workers=1, metrics_port=mport).start()
    try:
        wait_until("the worker ready", lambda: _ready(node, 1), 240, poll=0.2)
        datasets = small_study("KILL-A")
        study_a = str(datasets[0].StudyInstanceUID)
        storescu(node.port, write_files(datasets, tmp_path / "a"), node.ae_title)
        # the worker has claimed the job of study A (it is in serve.json) ...
        [busy] = wait_until("the job to start",
                            lambda: [w for w in _workers(node) if w.get("job")], 120, poll=0.05)
        # ... while study B is being received, one instance at a time
        study_b = small_study("KILL-B", slices=60, seed=7)
        statuses: list[int] = []
        answered_at: list[float] = []

        def receive_b() -> None:
            for ds in study_b:
                statuses.extend(send(node.port, [ds]))
                answered_at.append(time.monotonic())

        receiver = threading.Thread(target=receive_b)
        receiver.start()
        wait_until("study B under way", lambda: len(statuses) >= 10, 60, poll=0.02)
        os.kill(busy["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        receiver.join(120)
        assert statuses == [0] * len(study_b)  # every C-STORE answered Success
        assert answered_at[0] < killed_at < answered_at[-1]  # ... before and after the kill
        wait_until("the restart in the journal",
                   lambda: f"worker-1 (pid {busy['pid']}) died: killed by SIGKILL during "
                           f"job {busy['job']}" in node.log(), 30, poll=0.1)
        assert f"job {busy['job']} is back in the queue (attempt 1 of 3 used)" in node.log()
        for study_uid in (study_a, str(study_b[0].StudyInstanceUID)):
            wait_until(f"results of {study_uid} in Orthanc",
                       lambda s=study_uid: _complete(orthanc, s), RESULT_TIMEOUT)
        [worker] = _workers(node)
        assert worker["pid"] != busy["pid"] and worker["restarts"] == 1
        assert worker["last_exit"].startswith(f"killed by SIGKILL during job {busy['job']}")
        status = node.cli("status").stdout
        assert "workers:   1 of 1 running" in status and "restarted 1 time(s)" in status
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as rsp:
            metrics = rsp.read().decode()
        assert "dicom_node_worker_restarts_total 1.0" in metrics
        assert 'dicom_node_workers{state="ready"} 1.0' in metrics
        job_a = next(j for j in node_json(node, "jobs") if j["study_uid"] == study_a)
        assert job_a["state"] == "done" and job_a["attempts"] == 2
        assert job_a["worker"] == f"worker-1 pid {worker['pid']}"
        wait_until("no send left queued", lambda: not queued_sends(node.data_dir), 60)
        assert node_json(node, "sends", "--state", "queued") == []
        _exactly_once(orthanc, study_a)
        assert len(node_json(node, "twin", "show", "KILL-A")["results"]) == 1
    finally:
        assert node.stop() == 0


@pytest.mark.orthanc
def test_destinations_reloaded_by_sighup_reach_the_workers(
        tmp_path: Path, orthanc: OrthancServer) -> None:
    data = tmp_path / "data"
    data.mkdir()
    install_model(data)
    node = NodeProcess(data, config="workers = 1\n", extra_args=["--stable-after", "1.5"]).start()
    try:
        wait_until("the worker ready", lambda: _ready(node, 1), 240, poll=0.2)
        (tmp_path / "data-config.toml").write_text(
            "workers = 1\nsend_backoff_initial_s = 0.5\n[[destinations]]\n"
            f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
        node.proc.send_signal(signal.SIGHUP)
        wait_until("the reload", lambda: "applied destinations" in node.log(), 30, poll=0.1)
        datasets = small_study("RELOAD-1")
        storescu(node.port, write_files(datasets, tmp_path / "s"), node.ae_title)
        # the worker queues the results for the destination it learnt from the reload
        wait_until("results in Orthanc",
                   lambda: _complete(orthanc, str(datasets[0].StudyInstanceUID)), RESULT_TIMEOUT)
    finally:
        assert node.stop() == 0
