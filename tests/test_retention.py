"""Retention by consent, legal holds, erasure (issue 23) on a real archive and queue.

Store level: the archive's own files and SQLite index, the queue database, the CLI in a
subprocess. The node-with-Orthanc tests are in ``test_retention_node.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.queue.jobs import JobQueue, JobState
from dicom_node.runtime import retention as shell_retention
from dicom_node.settings import load_settings
from node_harness import incoming, small_ct
from twin_archive import Archive, audit
from twin_archive.erasure import Erasure
from twin_archive.labels import LabelStore
from twin_archive.reconcile import recover, stray_files
from twin_archive.results import ResultStore, SegmentMeasure
from twin_archive.retention import (
    PatientHeldError,
    Retention,
    RetentionPolicy,
    SettledSeries,
)

ROOT = Path(__file__).resolve().parents[1]


def _series(archive: Archive, patient: str, n: int = 3, *, name: str = "Test^Patient",
            study_uid: str | None = None) -> tuple[str, str]:
    """Store ``n`` instances of one new series of ``patient``; (study, series) UIDs."""
    first = small_ct(patient_id=patient, study_uid=study_uid)
    first.PatientName = name
    uids = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    for i in range(n):
        ds = first if i == 0 else small_ct(patient_id=patient, study_uid=uids[0],
                                           series_uid=uids[1], instance=i + 1)
        ds.PatientName = name
        archive.ingest.store(incoming(ds))
    return uids


def _settled(archive: Archive, series_uid: str, *, ago_days: float = 0.0,
             tasks: tuple[str, ...] = ()) -> SettledSeries:
    last = archive.db.execute("SELECT last_received FROM series WHERE series_uid = ?",
                              (series_uid,)).fetchone()[0]
    return SettledSeries(series_uid=series_uid, last_received=last,
                         settled_at=iso(utc_now() - timedelta(days=ago_days)), tasks=tasks)


def _files(data_dir: Path, series_uid: str) -> list[Path]:
    return [p for p in (data_dir / "archive").rglob("*.dcm") if series_uid in str(p)]


def test_non_donor_pruned_donor_kept_held_kept(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s_non = _series(archive, "NON-1")
        _, s_don = _series(archive, "DON-1")
        _, s_held = _series(archive, "HELD-1")
        archive.twins.set_consent("DON-1", donate=True, by="dpo")
        held_key = archive.twins.find_twin_keys("HELD-1")[0]
        settled = [_settled(archive, s) for s in (s_non, s_don, s_held)]
    with Retention(tmp_path) as store:
        assert store.hold(held_key, by="legal", reason="case 17")
        policy = RetentionPolicy(retention_days=0)
        items = store.plan(policy, settled)
        assert [(i.kind, i.series_uid) for i in items] == [("source", s_non)]
        assert items[0].files == 3 and items[0].bytes > 0
        report = store.prune(items)
        assert report.files == 3 and report.series == 1
        assert store.plan(policy, settled) == []  # nothing left to prune
        assert set(store.pruned_by_series(items[0].patient_key)[s_non]) == {"instance"}
    assert _files(tmp_path, s_non) == []
    assert len(_files(tmp_path, s_don)) == 3 and len(_files(tmp_path, s_held)) == 3
    with Archive(tmp_path) as archive:
        assert stray_files(archive.ingest) == []
        detail = archive.twins.twin("NON-1")
        assert detail.studies[0].series[0].instances == 0  # the series row stays, empty


def test_retention_days_and_task_overrides_count_from_settling(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "NON-2")
        recent = _settled(archive, s1, ago_days=5, tasks=("spleen-ct",))
    policy = RetentionPolicy(retention_days=7)
    with Retention(tmp_path) as store:
        assert store.plan(policy, [recent]) == []  # 5 of 7 days
        assert len(store.plan(RetentionPolicy(retention_days=4), [recent])) == 1
        longer = RetentionPolicy(retention_days=4, task_retention_days={"spleen-ct": 10})
        assert store.plan(longer, [recent]) == []  # the task keeps its series longer
        assert len(store.plan(policy, [recent], pressure=True)) == 1  # days waived under pressure
    with pytest.raises(ValueError, match="retention_days"):
        RetentionPolicy(retention_days=-1)


def test_revoked_donor_pruned_only_after_the_grace(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "REV-1")
        archive.twins.set_consent("REV-1", donate=True, by="dpo")
        archive.twins.set_consent("REV-1", donate=False, by="dpo", reason="revoked")
        settled = [_settled(archive, s1, ago_days=100)]
    with Retention(tmp_path) as store:
        policy = RetentionPolicy(retention_days=0, revoke_grace_days=30)
        assert store.plan(policy, settled) == []
        assert store.plan(policy, settled, pressure=True) == []  # the grace stands under pressure
        later = store.plan(policy, settled, now=utc_now() + timedelta(days=31))
        assert len(later) == 1 and "revoked" in later[0].reason


def test_a_reopened_series_is_not_pruned_and_a_resent_instance_is_stored_again(
        tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        study, s1 = _series(archive, "NON-3")
        settled = [_settled(archive, s1)]
        late = small_ct(patient_id="NON-3", study_uid=study, series_uid=s1, instance=9)
        archive.ingest.store(incoming(late))  # the series is re-opened after it settled
    with Retention(tmp_path) as store:
        assert store.plan(RetentionPolicy(retention_days=0), settled) == []
    with Archive(tmp_path) as archive:
        settled = [_settled(archive, s1)]
    with Retention(tmp_path) as store:
        items = store.plan(RetentionPolicy(retention_days=0), settled)
        assert store.prune(items).files == 4
    with Archive(tmp_path) as archive:  # the scanner sends it again: stored, not "duplicate"
        result = archive.ingest.store(incoming(late))
        assert result.outcome.value != "duplicate"
        assert (tmp_path / result.path).is_file()


def test_results_follow_result_retention_and_labels_follow_their_source(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        study, s1 = _series(archive, "NON-4")
        key = archive.twins.find_twin_keys("NON-4")[0]
        settled = [_settled(archive, s1, tasks=("spleen-ct",))]
    with ResultStore(tmp_path) as results:
        seg = small_ct(patient_id="NON-4", study_uid=study)
        seg.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.1"
        result = results.record(
            job_key=f"{s1}@x/spleen-ct", patient_key=key, study_uid=study,
            source_series_uid=s1, source_last_received="x", source_instances=3,
            task="spleen-ct", model_name="m", model_version="1", backend="cpu",
            segments=[SegmentMeasure(name="Spleen", volume_ml=1.0)], timings={},
            objects=[("seg", seg)])
        rtstruct = small_ct(patient_id="NON-4", study_uid=study)  # added after, as the worker does
        rtstruct.SeriesInstanceUID = "1.2.826.0.1.3680043.10.999.2"
        result = results.add_objects(result.id, [("rtstruct", rtstruct)], timings={})
        assert sorted(o.kind for o in result.objects) == ["rtstruct", "seg"]
    with LabelStore(tmp_path) as labels:
        labels.add_file(series_uid=s1, data=b"\x00" * 64, segments=("Spleen",), by="rad",
                           suffix=".nii")
    kept = RetentionPolicy(retention_days=0)  # results kept (the default)
    with Retention(tmp_path) as store:
        items = store.plan(kept, settled)
        assert [i.kind for i in items] == ["source"]
        store.prune(items)
        assert store.usage().labels == 0
        assert store.usage().results > 0
        items = store.plan(RetentionPolicy(retention_days=0, result_retention_days=0), settled)
        assert [i.kind for i in items] == ["results"] and items[0].files == 2  # SEG, RTSTRUCT
        store.prune(items)
        assert store.usage().results == 0
    assert not list((tmp_path / "labels").rglob("*.nii"))
    assert not list((tmp_path / "results").rglob("*.dcm"))
    with ResultStore(tmp_path) as results:  # the measurement stays in the twin
        assert results.for_series(s1)[0].segments[0].volume_ml == 1.0


def _slow_prune_script(data_dir: Path) -> str:
    return f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
from pathlib import Path
import twin_archive.retention as r
from twin_archive import Archive
from dicom_node.foundation.clock import iso, utc_now
data = Path({str(data_dir)!r})
real = r.Retention._remove_files
def slow(self, moved):
    print("moved", len(moved), flush=True)
    time.sleep(30)  # killed here: rows moved, files still there
    real(self, moved)
r.Retention._remove_files = slow
with Archive(data) as a:
    rows = a.db.execute("SELECT series_uid, last_received FROM series").fetchall()
settled = [r.SettledSeries(series_uid=u, last_received=l, settled_at=iso(utc_now())) for u, l in rows]
with r.Retention(data) as store:
    store.prune(store.plan(r.RetentionPolicy(retention_days=0), settled))
"""


def test_sigkill_mid_prune_then_restart_finishes_it(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "KILL-1", n=5)
    proc = subprocess.Popen([sys.executable, "-c", _slow_prune_script(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("moved 5")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert len(_files(tmp_path, s1)) == 5  # rows moved, files still there
    with Archive(tmp_path) as archive:
        assert stray_files(archive.ingest) == []  # never re-indexed
        recover(archive.ingest)  # start-up finishes the prune
        assert _files(tmp_path, s1) == []
        assert stray_files(archive.ingest) == []
        assert archive.twins.twin("KILL-1").studies[0].series[0].instances == 0
    with Retention(tmp_path) as store:
        assert store.db.execute("SELECT COUNT(*) FROM pruned_files WHERE file_removed = 0"
                                ).fetchone()[0] == 0
    verify = _cli(tmp_path, "archive", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_hold_and_release_through_the_cli_are_audited(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "HOLD-2")
        settled = [_settled(archive, s1)]
    out = _cli(tmp_path, "twin", "hold", "HOLD-2", "--by", "legal", "--reason", "case 4")
    assert out.returncode == 0 and "legal hold" in out.stdout, out.stderr
    show = _cli(tmp_path, "twin", "show", "HOLD-2")
    assert "LEGAL HOLD" in show.stdout and "case 4" in show.stdout
    with Retention(tmp_path) as store:
        assert store.plan(RetentionPolicy(retention_days=0), settled, pressure=True) == []
    with Archive(tmp_path) as archive:
        key = archive.twins.find_twin_keys("HOLD-2")[0]
    with Erasure(tmp_path) as erasure, pytest.raises(PatientHeldError, match="legal hold"):
        erasure.erase(key)
    refused = _cli(tmp_path, "twin", "forget", "HOLD-2", "--by", "dpo", "--reason", "art. 17")
    assert refused.returncode != 0 and "legal hold" in refused.stderr + refused.stdout
    assert len(_files(tmp_path, s1)) == 3
    out = _cli(tmp_path, "twin", "release", "HOLD-2", "--by", "legal", "--reason", "closed")
    assert out.returncode == 0 and "released" in out.stdout
    events = [e.event_type.value for e in audit.AuditLog(tmp_path).entries()]
    assert events.count("twin-held") == 1 and events.count("twin-released") == 1


def _settle_in_queue(data_dir: Path, archive: Archive, series_uid: str, key: str) -> None:
    """What the node leaves behind for a series whose job is done: the monitor's decision
    and a done job (no destinations: nothing to send)."""
    last = archive.db.execute("SELECT last_received FROM series WHERE series_uid = ?",
                              (series_uid,)).fetchone()[0]
    queue = JobQueue(data_dir)
    job = queue.enqueue(series_uid=series_uid, study_uid="1.2", patient_key=key, task="spleen-ct",
                        series_last_received=last, instances=3)
    assert job is not None
    with queue.conn:
        queue.conn.execute("UPDATE jobs SET state = ?, finished_at = ? WHERE id = ?",
                           (JobState.DONE.value, iso(utc_now()), job.id))
        queue.conn.execute("INSERT INTO monitored_series (series_uid, last_received, decision,"
                           " reason, decided_at) VALUES (?,?,?,?,?)",
                           (series_uid, last, "queued", "spleen-ct", iso(utc_now())))
    queue.close()


def test_archive_prune_cli_dry_run_then_prune_audited(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text("retention_days = 0\n")
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "CLI-1")
        _, s2 = _series(archive, "CLI-2")  # no job yet: not settled
        key = archive.twins.find_twin_keys("CLI-1")[0]
        _settle_in_queue(tmp_path, archive, s1, key)
    settings = load_settings(tmp_path / "node.toml", overrides={"data_dir": str(tmp_path)}, env={})
    assert [s.series_uid for s in shell_retention.settled_series(tmp_path)] == [s1]
    dry = _cli(tmp_path, "--config", str(tmp_path / "node.toml"), "archive", "prune", "--dry-run")
    assert dry.returncode == 0 and "would remove 3 file(s)" in dry.stdout, dry.stdout + dry.stderr
    assert len(_files(tmp_path, s1)) == 3
    run = shell_retention.prune(settings, by="test")
    assert run.report is not None and run.report.files == 3
    assert _files(tmp_path, s1) == [] and len(_files(tmp_path, s2)) == 3
    pruned = [e for e in audit.AuditLog(tmp_path).entries() if e.event_type.value == "archive-pruned"]
    assert len(pruned) == 1 and pruned[0].detail["files"] == 3
    assert pruned[0].detail["patient_keys"] == [key]
    show = _cli(tmp_path, "twin", "show", "CLI-1")
    assert "3 instance(s) PRUNED" in show.stdout, show.stdout


def _bytes_everywhere(data_dir: Path, needle: bytes) -> list[str]:
    """Files of the data directory (the audit log aside) that hold ``needle``."""
    found = []
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.name.startswith("audit.sqlite") and needle in path.read_bytes():
            found.append(str(path.relative_to(data_dir)))
    return found


def test_forget_leaves_no_byte_of_the_patient_id_or_name(tmp_path: Path) -> None:
    pid, name = "FORGET-ME-4711", "Forgetme^Zelda"
    with Archive(tmp_path) as archive:
        study, s1 = _series(archive, pid, name=name)
        _, s2 = _series(archive, pid, name=name, study_uid=study)
        _, other = _series(archive, "KEEP-ME-1")
        archive.twins.set_consent(pid, donate=True, by="dpo")
        key = archive.twins.find_twin_keys(pid)[0]
        _settle_in_queue(tmp_path, archive, s1, key)
        archive.db.execute("INSERT INTO training_use (model_version, task, patient_key, study_uid,"
                           " series_uid, split, recorded_at) VALUES ('spleen-ct/7','spleen-ct',?,?,?,"
                           "'train',?)", (key, study, s1, iso(utc_now())))
        archive.db.conn.commit()
    with ResultStore(tmp_path) as results:
        seg = small_ct(patient_id=pid, study_uid=study)
        seg.PatientName = name
        results.record(job_key=f"{s1}@x/spleen-ct", patient_key=key, study_uid=study,
                       source_series_uid=s1, source_last_received="x", source_instances=3,
                       task="spleen-ct", model_name="m", model_version="1", backend="cpu",
                       segments=[SegmentMeasure(name="Spleen", volume_ml=1.0)], timings={},
                       objects=[("seg", seg)])
    from registry.store import Registry
    with Registry(tmp_path) as registry:  # a version trained with the patient's data
        registry.db.execute(
            "INSERT INTO model_versions (version, task, number, architecture, labels, created_at,"
            " status, device_uid, path, dataset_manifest) VALUES ('spleen-ct/7','spleen-ct',7,"
            "'UNet','{}','x','candidate','1.2.3.4','p',?)", (json.dumps({"series": [{"patient_key": key, "study_uid": study,
                                                    "series_uid": s1, "split": "train"}]}),))
    (tmp_path / "quarantine").mkdir()
    stray = small_ct(patient_id=pid)
    stray.save_as(tmp_path / "quarantine" / "x.dcm", enforce_file_format=True)
    assert _bytes_everywhere(tmp_path, pid.encode())  # it is there before
    out = _cli(tmp_path, "twin", "forget", pid, "--by", "dpo", "--reason", "request 42")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "spleen-ct/7" in out.stdout and "data protection officer" in out.stdout
    assert "1 training manifest(s) redacted" in out.stdout
    assert _bytes_everywhere(tmp_path, pid.encode()) == []
    assert _bytes_everywhere(tmp_path, b"Forgetme") == []
    assert _bytes_everywhere(tmp_path, key.encode()) == []  # not even its pseudonymous key
    assert len(_files(tmp_path, other)) == 3  # the other patient is untouched
    gone = _cli(tmp_path, "twin", "show", pid)
    assert gone.returncode != 0
    entries = audit.AuditLog(tmp_path).entries()
    assert entries[-1].event_type.value == "twin-erased" and entries[-1].what == key
    assert pid not in str([e.to_dict() for e in entries])
    assert _cli(tmp_path, "archive", "verify").returncode == 0
    with Archive(tmp_path) as archive:
        assert archive.twins.twin("KEEP-ME-1").studies[0].series[0].instances == 3


def test_forget_refuses_while_a_job_of_the_patient_runs(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "RUN-1")
        key = archive.twins.find_twin_keys("RUN-1")[0]
    queue = JobQueue(tmp_path, worker="worker-1 pid 1")
    queue.enqueue(series_uid=s1, study_uid="1.2", patient_key=key, task="spleen-ct",
                  series_last_received="x", instances=3)
    assert queue.claim() is not None
    queue.close()
    out = _cli(tmp_path, "twin", "forget", "RUN-1", "--by", "dpo", "--reason", "r")
    assert out.returncode != 0
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "is running" in lines[0]
    assert len(_files(tmp_path, s1)) == 3


def test_usage_by_kind(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _series(archive, "U-NON")
        _series(archive, "U-DON", n=2)
        _series(archive, "U-HELD", n=4)
        archive.twins.set_consent("U-DON", donate=True, by="dpo")
        held = archive.twins.find_twin_keys("U-HELD")[0]
        size = {pid: sum(f.stat().st_size for st in archive.twins.twin(pid).studies
                         for se in st.series for f in archive.twins.series_files(se.series_uid))
                for pid in ("U-NON", "U-DON", "U-HELD")}
    with Retention(tmp_path) as store:
        store.hold(held, by="legal", reason="case 1")
        usage = store.usage()
    assert (usage.non_donors, usage.donors, usage.held) == (
        size["U-NON"], size["U-DON"], size["U-HELD"])
    assert usage.received_last_7d == usage.donors + usage.non_donors + usage.held


def test_rebuild_index_replays_holds_from_the_audit_log(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        _series(archive, "HOLD-3")
    assert _cli(tmp_path, "twin", "hold", "HOLD-3", "--by", "legal", "--reason", "case 9"
                ).returncode == 0
    rebuilt = _cli(tmp_path, "archive", "rebuild-index")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    show = _cli(tmp_path, "twin", "show", "HOLD-3")
    assert "LEGAL HOLD" in show.stdout and "case 9" in show.stdout


def test_disk_guard_on_a_disk_full_to_the_last_byte_says_so_once_and_prunes_when_it_can(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the full-disk test of the whole suite: recording a prune needs a little
    space; on a disk full to the last byte the guard logged a traceback every second."""
    data = tmp_path / "disk"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(data)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        with Archive(data) as archive:
            _, s1 = _series(archive, "FULL-1", n=20)
            _settle_in_queue(data, archive, s1, archive.twins.find_twin_keys("FULL-1")[0])
        filler = data / "filler"
        with open(filler, "wb", buffering=0) as fh:  # unbuffered: ENOSPC at a write, not at close
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        settings = load_settings(None, overrides={"data_dir": str(data)}, env={})
        guard = shell_retention.DiskGuard(settings)
        caplog.set_level("INFO", logger="dicom_node.runtime.retention")
        for _ in range(3):
            guard._retry_at = 0.0
            assert guard.check() is False  # nothing can be recorded: no exception
        assert guard.full and caplog.text.count("completely full") == 1
        assert "Traceback" not in caplog.text
        assert len(_files(data, s1)) == 20
        filler.unlink()
        with open(filler, "wb") as fh:  # above high water, with 256 KiB the index can use
            fh.write(b"\0" * (shutil.disk_usage(data).free - (256 << 10)))
        guard._retry_at = 0.0
        assert guard.check() is True and _files(data, s1) == []
        assert "a prune can be recorded again" in caplog.text
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_an_association_that_waited_for_another_prune_does_not_prune_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """C-STOREs below the reserve on several associations each ask the guard for room; one
    that finds the room made (by the prune it waited for) returns at once, no new plan."""
    with Archive(tmp_path) as archive:
        _series(archive, "ROOM-1")
    settings = load_settings(None, overrides={"data_dir": str(tmp_path)}, env={})
    guard = shell_retention.DiskGuard(settings.replace(min_free_mb=0))
    caplog.set_level("INFO", logger="dicom_node.runtime.retention")
    assert guard.make_room(1) is True
    assert "archive prune" not in caplog.text and not (tmp_path / "retention-outlook.json").exists()


def test_forget_leaves_no_retrieved_prior_and_no_send_of_a_prior_result(tmp_path: Path) -> None:
    """A prior retrieved from the PACS is recorded in ``retrieved_series`` (with the twin
    key), also before any of it arrived; its result may be queued for a destination
    (``send_prior_results``) before the series' own job exists. Forgetting the twin
    removes both: no row of the index or the queue names it afterwards."""
    from dicom_node.queue.sender import Sender
    from dicom_node.settings import Destination
    from twin_archive.history import HistoryStore

    pid = "PRIOR-FORGET-5"
    with Archive(tmp_path) as archive:
        study, s1 = _series(archive, pid)
        prior_study, prior = _series(archive, pid)
        _series(archive, "PRIOR-KEEP-1")
        key = archive.twins.find_twin_keys(pid)[0]
    with HistoryStore(tmp_path) as history:
        assert history.mark_retrieved([prior], source="PACS", for_study_uid=study) == 1
        history.expect_retrieved(series_uid="1.2.826.0.1.3680043.8.498.4711",
                                 study_uid=prior_study, patient_key=key, source="PACS",
                                 for_study_uid=study)  # asked for, never came
    with ResultStore(tmp_path) as results:
        result = results.record(
            job_key=f"{prior}@x/spleen-ct", patient_key=key, study_uid=prior_study,
            source_series_uid=prior, source_last_received="x", source_instances=3,
            task="spleen-ct", model_name="m", model_version="1", backend="cpu",
            segments=[SegmentMeasure(name="Spleen", volume_ml=1.0)], timings={},
            objects=[("seg", small_ct(patient_id=pid, study_uid=prior_study))])
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=1, send=("seg",))
    sender = Sender(tmp_path, ae_title="NODE", destinations=[dest])
    assert sender.enqueue(result, [dest]) == 1  # no job row names this result
    sender.close()
    out = _cli(tmp_path, "twin", "forget", pid, "--by", "dpo", "--reason", "request 44")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _bytes_everywhere(tmp_path, key.encode()) == []
    assert _bytes_everywhere(tmp_path, prior.encode()) == []
    assert _bytes_everywhere(tmp_path, b"1.2.826.0.1.3680043.8.498.4711") == []


def test_a_reopened_series_is_not_settled_while_its_earlier_results_sends_are_open(
        tmp_path: Path) -> None:
    """A series completed early and re-opened by a late instance has two jobs: the first
    one's result may still be queued for the PACS when the second is done. The series is
    settled only once those sends are settled too (result retention would remove the
    files they send)."""
    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "REOPEN-1")
        key = archive.twins.find_twin_keys("REOPEN-1")[0]
        _settle_in_queue(tmp_path, archive, s1, key)  # the second job, done, nothing to send
    queue = JobQueue(tmp_path)
    first = queue.enqueue(series_uid=s1, study_uid="1.2", patient_key=key, task="spleen-ct",
                          series_last_received="2000-01-01T00:00:00+00:00", instances=2)
    assert first is not None
    now = iso(utc_now())
    with queue.conn:
        queue.conn.execute("UPDATE jobs SET state = ?, finished_at = ?, result_id = 7 WHERE id = ?",
                           (JobState.DONE.value, now, first.id))
        queue.conn.execute(
            "INSERT INTO sends (result_id, kind, destination, ae_title, host, port, path,"
            " sop_class_uid, sop_instance_uid, transfer_syntax_uid, state, enqueued_at,"
            " next_attempt_at) VALUES (7, 'seg', 'P@h:1', 'P', 'h', 1, 'r/x.dcm', '1.2', '1.2.9',"
            " '1.2.840.10008.1.2.1', 'queued', ?, ?)", (now, now))
    assert shell_retention.settled_series(tmp_path) == []  # the PACS was down
    with queue.conn:
        queue.conn.execute("UPDATE sends SET state = 'sent', sent_at = ?", (now,))
    assert [s.series_uid for s in shell_retention.settled_series(tmp_path)] == [s1]
    queue.close()


def test_a_job_queued_for_the_patient_is_not_claimed_while_it_is_erased(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node runs on while ``twin forget`` removes the files: a job of the patient
    still queued (a retry, one waiting for disk space) must not be claimed by a worker
    in the meantime (it would run on an erased series, and its row, left running, would
    keep the twin key in the queue)."""
    import argparse

    from dicom_node.cli.retention import cmd_forget

    with Archive(tmp_path) as archive:
        _, s1 = _series(archive, "CLAIM-1")
        key = archive.twins.find_twin_keys("CLAIM-1")[0]
    queue = JobQueue(tmp_path)
    assert queue.enqueue(series_uid=s1, study_uid="1.2", patient_key=key, task="spleen-ct",
                         series_last_received="x", instances=3) is not None
    queue.close()
    claimed = []
    real = Erasure.erase

    def erase_while_a_worker_claims(self: Erasure, *a: object, **kw: object) -> object:
        worker = JobQueue(tmp_path, worker="worker-1 pid 1")
        claimed.append(worker.claim())
        worker.close()
        return real(self, *a, **kw)

    monkeypatch.setattr(Erasure, "erase", erase_while_a_worker_claims)
    settings = load_settings(None, overrides={"data_dir": str(tmp_path)}, env={})
    args = argparse.Namespace(patient_id="CLAIM-1", issuer=None, by="dpo", reason="r", json=True)
    assert cmd_forget(args, settings) == 0
    assert claimed == [None]
    assert _bytes_everywhere(tmp_path, key.encode()) == []
