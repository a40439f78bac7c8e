"""Issue 13, the operator's side: one node per data directory, start-up reconciliation,
disk full during a job, ``archive verify`` and ``archive rebuild-index``.

Real nodes as subprocesses, real SQLite files, real files on disk (a real tmpfs for the
full disk when run as root).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_client import echo, send, stored_rows
from loop_helpers import install_model, jobs_now, small_study, storescu, write_files
from node_harness import DICOM_NODE, REPO, NodeProcess, incoming, small_ct
from test_scp_store import _mount_tmpfs
from twin_archive import Archive
from twin_archive.audit import AuditLog
from waiting import wait_until

SUCCESS = 0x0000


def test_second_node_on_a_data_directory_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "data", workers=0).start()
    try:
        assert send(first.port, [small_ct(patient_id="LOCK-1")]) == [SUCCESS]
        in_flight = first.data_dir / "tmp" / "in-flight.part"  # a write of the first node
        in_flight.write_bytes(b"x" * 100)
        state = json.loads((first.data_dir / "serve.json").read_text())
        for command in ("serve", "demo"):
            second = subprocess.run(
                [*DICOM_NODE, "--data-dir", str(first.data_dir), command, *(
                    ["--port", "0", "--bind", "127.0.0.1"] if command == "serve" else [])],
                capture_output=True, text=True, cwd=REPO, timeout=120)
            assert second.returncode == 2, (command, second.stderr)
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert f"pid {first.proc.pid}" in lines[0] and "in use by another node" in lines[0]
        # The first node is untouched: its temporary file, its state file, its service.
        assert in_flight.exists()
        assert json.loads((first.data_dir / "serve.json").read_text()) == state
        assert echo(first.port) == SUCCESS
        assert send(first.port, [small_ct(patient_id="LOCK-2")]) == [SUCCESS]
        # Read-only commands work beside it.
        status = first.cli("status")
        assert f"RUNNING (pid {first.proc.pid}" in status.stdout
        assert "LOCK-2" in first.cli("twin", "list").stdout
    finally:
        assert first.stop() == 0
    assert not (first.data_dir / "serve.json").exists()
    # Once the first is gone (even killed: the kernel drops the lock) a node starts again.
    again = NodeProcess(first.data_dir, workers=0).start()
    again.kill()
    third = NodeProcess(first.data_dir, workers=0).start()
    try:
        assert len(stored_rows(third.data_dir)) == 2
    finally:
        third.stop()


def _index(data_dir: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(data_dir / "index.sqlite")
    conn.row_factory = sqlite3.Row
    return conn


def _orphan(data_dir: Path, patient_id: str) -> Path:
    """An instance file renamed into place whose index commit never happened (a crash):
    stored through the archive, then its rows removed behind its back."""
    with Archive(data_dir) as archive:
        result = archive.ingest.store(incoming(small_ct(patient_id=patient_id)))
    with closing(_index(data_dir)) as conn, conn:
        conn.execute("DELETE FROM instances WHERE path = ?", (result.path,))
        conn.execute("DELETE FROM series WHERE series_uid = ?", (result.series_uid,))
        conn.execute("DELETE FROM studies WHERE study_uid = ?", (result.study_uid,))
        conn.execute("DELETE FROM twins WHERE patient_key = ?", (result.patient_key,))
    return data_dir / result.path


def _damaged_orphan(data_dir: Path) -> Path:
    """A file cut short: its content no longer has the hash in its name."""
    good = next((data_dir / "archive").rglob("*.dcm"))
    bad = good.with_name("9.9.9." + good.name.split(".")[-2] + ".dcm")
    bad.write_bytes(good.read_bytes()[:300])
    return bad


def test_start_up_indexes_intact_orphans_and_quarantines_the_rest(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    assert send(node.port, [small_ct(patient_id="KEEP-1")]) == [SUCCESS]
    node.stop()
    orphan = _orphan(node.data_dir, "ORPHAN-1")
    damaged = _damaged_orphan(node.data_dir)
    stray_result = node.data_dir / "results" / ("a" * 32) / "1.2.3" / "overlay-1.2.3.4.dcm"
    stray_result.parent.mkdir(parents=True)
    stray_result.write_bytes(b"half a result set")
    node.start()
    try:
        rows = {r["path"] for r in stored_rows(node.data_dir)}
        assert str(orphan.relative_to(node.data_dir)) in rows and len(rows) == 2
        assert "ORPHAN-1" in node.cli("twin", "list").stdout
        quarantine = node.data_dir / "quarantine"
        assert (quarantine / damaged.relative_to(node.data_dir)).is_file() and not damaged.exists()
        assert (quarantine / stray_result.relative_to(node.data_dir)).is_file()
        log = node.log()
        assert "had no index row (a crash before its commit); intact, indexed now" in log
        assert "moved to quarantine" in log and "not intact" in log
        verify = node.cli("archive", "verify", "--deep", check=False)
        assert verify.returncode == 0, verify.stdout
    finally:
        node.stop()


def test_archive_verify_finds_and_repair_fixes_orphans_missing_and_damaged(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    study, series = generate_uid(), generate_uid()
    cts = [small_ct(patient_id="VER-1", study_uid=study, series_uid=series, instance=i)
           for i in range(1, 5)]
    assert send(node.port, cts) == [SUCCESS] * 4
    assert node.cli("archive", "verify", "--deep").returncode == 0  # beside the node
    refused = node.cli("archive", "verify", "--repair", check=False)
    assert refused.returncode == 2 and "in use by another node" in refused.stderr
    node.stop()
    rows = stored_rows(node.data_dir)
    (node.data_dir / str(rows[0]["path"])).unlink()  # gone
    changed = node.data_dir / str(rows[1]["path"])  # bit rot
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    orphan = _orphan(node.data_dir, "VER-2")
    damaged = _damaged_orphan(node.data_dir)
    shallow = node.cli("archive", "verify", check=False)
    assert shallow.returncode == 1
    assert "2 file(s) without an index row" in shallow.stdout
    assert "1 instance row(s) whose file is gone" in shallow.stdout
    assert "SHA-256" not in shallow.stdout.split("repair with")[0]
    deep = node.cli("archive", "verify", "--deep", check=False)
    assert deep.returncode == 1 and "1 instance file(s) whose content no longer" in deep.stdout
    repair = node.cli("archive", "verify", "--deep", "--repair", check=False)
    assert repair.returncode == 0, repair.stdout
    assert "1 files indexed, 2 files quarantined, 2 instances marked missing" in repair.stdout
    assert "all well" in repair.stdout.split("checking again:")[1]
    assert (node.data_dir / "quarantine" / damaged.relative_to(node.data_dir)).exists()
    assert str(orphan.relative_to(node.data_dir)) in {r["path"] for r in stored_rows(node.data_dir)}
    shown = node.cli("twin", "show", "VER-1").stdout
    assert "2 MISSING (file gone; found by archive verify)" in shown
    with AuditLog(node.data_dir) as log:
        assert len(log.entries(event_type="archive-repaired")) == 1


def test_a_damaged_index_is_one_line_naming_it_and_the_command(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    assert send(node.port, [small_ct(patient_id="DMG-1")]) == [SUCCESS]
    node.stop()
    index = node.data_dir / "index.sqlite"
    data = bytearray(index.read_bytes())
    data[:100] = b"\x00garbage" * 12 + b"\x00" * 4
    index.write_bytes(bytes(data))
    for args in (["twin", "list"], ["status"], ["serve", "--port", "0", "--bind", "127.0.0.1"]):
        out = node.cli(*args, check=False)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, (args, out.stderr)
        assert len(lines) == 1 and str(index) in lines[0] and "archive verify" in lines[0], lines
    verify = node.cli("archive", "verify", check=False)
    assert verify.returncode == 1 and "rebuild-index" in verify.stdout


def _snapshot(data_dir: Path) -> dict[str, object]:
    with closing(_index(data_dir)) as conn:
        q = lambda sql: [tuple(r) for r in conn.execute(sql)]  # noqa: E731
        return {
            "twins": q("SELECT patient_key, patient_id, issuer_of_patient_id, patient_name, "
                       "birth_date, sex, donate, unidentified, merged_into FROM twins ORDER BY 1"),
            "studies": q("SELECT study_uid, patient_key, study_date, study_time, description,"
                         " accession_number FROM studies ORDER BY 1"),
            "series": q("SELECT series_uid, study_uid, modality, description, series_number"
                        " FROM series ORDER BY 1"),
            "instances": q("SELECT sop_instance_uid, series_uid, patient_key, sha256, path,"
                           " version, current, uid_flags, transfer_syntax_uid, size"
                           " FROM instances ORDER BY 1, version"),
            "consent": q("SELECT patient_key, at, donate, previous, by, reason"
                         " FROM consent_events ORDER BY id"),
            "merges": q("SELECT source_key, target_key, at, by, reason FROM twin_merges"),
        }


def test_index_deleted_then_rebuilt_with_twins_studies_and_consent_equal(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    try:
        a = [small_ct(patient_id="REB-A", instance=i) for i in (1, 2)]
        b = small_ct(patient_id="REB-B")
        anon = small_ct(patient_id="")
        resent = small_ct(patient_id="REB-B", seed=7)
        resent.SOPInstanceUID = resent.file_meta.MediaStorageSOPInstanceUID = b.SOPInstanceUID
        resent.StudyInstanceUID, resent.SeriesInstanceUID = b.StudyInstanceUID, b.SeriesInstanceUID
        odd = small_ct(patient_id="REB-A")
        odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = "abc.def"
        assert send(node.port, [*a, b, anon]) == [SUCCESS] * 4
        assert send(node.port, [resent, odd]) == [SUCCESS] * 2  # a second version; odd UID
        node.cli("twin", "consent", "REB-A", "--donate", "--by", "dr a", "--reason", "form 1")
        node.cli("twin", "consent", "REB-B", "--donate", "--by", "dr b")
        node.cli("twin", "consent", "REB-B", "--revoke", "--by", "dr b", "--reason", "withdrawn")
        key = [t["patient_key"] for t in json.loads(node.cli("twin", "list", "--json").stdout)
               if t["unidentified"]][0]
        node.cli("twin", "merge", key, "REB-A", "--by", "clerk", "--reason", "order 9")
    finally:
        node.stop()
    before = _snapshot(node.data_dir)
    assert len(before["consent"]) == 3 and len(before["merges"]) == 1
    for suffix in ("", "-wal", "-shm"):
        (node.data_dir / f"index.sqlite{suffix}").unlink(missing_ok=True)
    rebuilt = node.cli("archive", "rebuild-index", check=False)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "3 consent decision(s) and legal hold(s), and 1 twin merge(s) replayed" in rebuilt.stdout
    after = _snapshot(node.data_dir)
    for what in before:
        assert after[what] == before[what], what
    assert node.cli("archive", "verify", "--deep").returncode == 0
    shown = json.loads(node.cli("twin", "show", "REB-A", "--json").stdout)
    assert shown["twin"]["donate"] is True and len(shown["studies"]) == 4  # 3 own + 1 merged


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; return the bytes written."""
    written = 0
    chunk = b"\0" * (256 << 10)
    with path.open("wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
                written += len(chunk)
        except OSError:
            pass
    try:
        with path.open("ab") as fh:  # the last partial chunk
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass
    return written


@pytest.mark.slow
def test_disk_full_mid_job_waits_and_results_arrive_once_space_is_freed(tmp_path: Path) -> None:
    """A real full disk (tmpfs, as root) while a job runs: it waits (no failed attempt),
    its inference kept (run once, only the storing tried again), the loop logs one line
    per change of state, ``status`` answers "disk full", and once space is freed the
    results arrive with no intervention. Then the disk fills again and the worker is
    SIGKILLed: it is reaped and restarted all the same, no thread of the node dies, and
    ``serve.json`` tells the truth again once space is back (issue 23, part 6)."""
    mnt = tmp_path / "small"
    assert _mount_tmpfs(mnt, "64m"), "this test needs root to mount a tmpfs"
    node = None
    try:
        data = mnt / "data"
        data.mkdir()
        install_model(data)
        node = NodeProcess(data, config="min_free_mb = 0\n", extra_args=["--stable-after", "1"])
        node.log_path = tmp_path / "node.log"
        node.start()
        paths = write_files(small_study("FULL-1", slices=24, size=96), tmp_path / "study")
        storescu(node.port, paths)
        wait_until("the job to start", lambda: "spleen-ct on series" in node.log(), 120, 0.05)
        filler = mnt / "filler"
        _fill(filler)
        wait_until("the job to wait for space", lambda: "waits for disk space" in node.log(),
                   180, 0.2)
        status = node.cli("status", check=False)
        assert status.returncode == 0 and "RUNNING" in status.stdout, status.stderr
        assert "disk:      FULL" in status.stdout and "damaged" not in status.stdout
        # An observation window, not a wait for an event: several passes of the monitor,
        # worker and sender (each about once a second) on the full disk, after which the
        # log must not repeat itself and the job must not have failed.
        time.sleep(6)
        full_log = node.log()
        assert "Traceback" not in full_log
        assert full_log.count("disk full") <= 6, full_log[-3000:]
        jobs = json.loads(node.cli("jobs", "--json", check=False).stdout or "[]")
        assert jobs and all(j["state"] != "failed" for j in jobs), jobs
        filler.unlink()
        wait_until("the job done", lambda: [j for j in jobs_now(data) if j.state.value == "done"],
                   240, 0.2)
        [job] = json.loads(node.cli("jobs", "--json").stdout)
        assert job["attempts"] == 1, job  # waiting for space is no failed attempt
        [result] = json.loads(node.cli("twin", "show", "FULL-1", "--json").stdout)["results"]
        assert result["seg_series_uid"] and result["sr_series_uid"] and result["overlay_series_uid"]
        assert "working again" in node.log()
        assert node.log().count("pipelines.inference: spleen-ct-v1 on") == 1  # run once
        assert "storing the results of its inference, kept while the disk was full" in node.log()
        assert node.cli("archive", "verify", "--deep").returncode == 0  # nothing stray left
        _kill_the_worker_on_a_full_disk(node, filler, tmp_path)
    finally:
        if node is not None:
            node.stop()
        subprocess.run(["umount", str(mnt)], check=False)


def _serve_json_workers(node: NodeProcess) -> list[dict]:
    try:
        return json.loads((node.data_dir / "serve.json").read_text())["workers"]
    except (OSError, ValueError, KeyError):
        return []


def _kill_the_worker_on_a_full_disk(node: NodeProcess, filler: Path, tmp: Path) -> None:
    """The disk full again (serve.json cannot be written), the worker SIGKILLed: it is
    reaped and restarted, no thread dies, serve.json catches up once space is back, and
    the restarted worker serves the next study."""
    [before] = _serve_json_workers(node)
    assert before["state"] == "ready"
    _fill(filler)
    os.kill(before["pid"], signal.SIGKILL)
    wait_until("the killed worker restarted and ready", lambda: re.search(
        r"worker-1 pid (?!%d\b)\d+ ready for jobs" % before["pid"], node.log()), 120, 0.2)
    assert f"worker-1 (pid {before['pid']}) died: killed by SIGKILL" in node.log()
    status = node.cli("status", check=False)
    assert status.returncode == 0 and "disk:      FULL" in status.stdout, status.stderr
    filler.unlink()
    wait_until("serve.json telling the restarted worker", lambda: [
        (w["state"], w["restarts"]) for w in _serve_json_workers(node)] == [("ready", 1)], 30, 0.2)
    assert _serve_json_workers(node)[0]["pid"] != before["pid"]
    log = node.log()
    assert "Exception in thread" not in log and "Traceback" not in log
    storescu(node.port, write_files(small_study("FULL-3", slices=24, size=64), tmp / "again"))
    wait_until("the next job done", lambda: len(
        [j for j in jobs_now(node.data_dir) if j.state.value == "done"]) == 2, 240, 0.2)


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOM_NODE, "--data-dir", str(data), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def _open_under(where: Path) -> list[str]:
    """The files under ``where`` this process holds open."""
    out = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(str(where) + "/"):
            out.append(target)
    return out


def test_status_says_disk_full_not_damaged_and_metrics_answer(tmp_path: Path) -> None:
    """Issue 23 part 6: on a full disk SQLite cannot create a database's shared-memory
    file and answers "disk I/O error"; ``status`` names the full disk (and what it could
    not read) instead of sending the operator to ``rebuild-index``, other commands say
    "disk full" in their one line, ``/metrics`` answers with ``dicom_node_disk_full 1``;
    with space back, all is as before."""
    from prometheus_client import generate_latest

    from dicom_node.queue.jobs import JobQueue
    from dicom_node.wire.metrics import NodeMetrics
    from dicom_node.runtime.observability import NodeCollector, build_registry

    mnt = tmp_path / "small"
    assert _mount_tmpfs(mnt, "16m"), "this test needs root to mount a tmpfs"
    try:
        data = mnt / "data"
        install_model(data)
        with Archive(data) as archive:
            archive.ingest.store(incoming(small_ct(patient_id="FULL-2")))
        JobQueue(data).close()  # every store exists, none is open: no -shm file is left
        filler = mnt / "filler"
        _fill(filler)
        status = _cli(data, "status")
        assert status.returncode == 0, status.stderr[-2000:]
        assert "disk:      FULL" in status.stdout and "unreadable until then: " in status.stdout
        assert "damaged" not in status.stdout + status.stderr
        assert "rebuild-index" not in status.stdout + status.stderr
        state = json.loads(_cli(data, "status", "--json").stdout)["state"]
        assert state["disk_full"] is True and "index.sqlite" in state["unreadable"]
        other = _cli(data, "twin", "list")
        assert other.returncode == 1 and "dicom-node: disk full: " in other.stderr, other.stderr
        assert "damaged" not in other.stderr and "rebuild-index" not in other.stderr
        text = generate_latest(build_registry(NodeCollector(NodeMetrics(), data))).decode()
        assert "dicom_node_disk_full 1.0" in text
        assert _open_under(mnt) == []  # a scrape on a full disk leaves no connection open
        filler.unlink()
        status = _cli(data, "status")
        assert status.returncode == 0 and "FULL" not in status.stdout, status.stdout
        assert "1 instance(s)" in status.stdout and "spleen-ct: spleen-ct-v1" in status.stdout
        assert "FULL-2" in _cli(data, "twin", "list").stdout
        text = generate_latest(build_registry(NodeCollector(NodeMetrics(), data))).decode()
        assert "dicom_node_disk_full 0.0" in text
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
