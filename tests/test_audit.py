"""The audit log: append-only in SQLite, hash-chained, readable by ``dicom-node audit``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from twin_archive.audit import (
    AuditEvent,
    AuditLog,
    AuditLogTamperedError,
    AuditOutcome,
    record,
)

ROOT = Path(__file__).resolve().parents[1]


def test_record_and_read_back(tmp_path: Path) -> None:
    e = record(tmp_path, AuditEvent.DATASET_EXPORTED, AuditOutcome.SUCCESS, "nightly-trainer",
               "spleen_ct/2026-11-23", {"studies": 42, "format": "MSD"})
    record(tmp_path, "label-imported", "minor_failure", "dr.house", "a1b2c3", {"segments": 2})
    with AuditLog(tmp_path) as log:
        entries = log.entries()
        assert [x.event_type for x in entries] == [AuditEvent.DATASET_EXPORTED, AuditEvent.LABEL_IMPORTED]
        assert entries[0] == e and entries[0].event_id == "110106"
        assert entries[1].outcome is AuditOutcome.MINOR_FAILURE
        assert log.entries(event_type="label-imported")[0].who == "dr.house"
        assert log.entries(since=datetime.now(UTC) + timedelta(minutes=1)) == []
        assert log.verify() == 2


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        with pytest.raises(ValueError, match="event_type"):
            log.record("coffee-break", 0, "me", "")
        with pytest.raises(ValueError, match="outcome"):
            log.record(AuditEvent.LABEL_IMPORTED, 3, "me", "")
        with pytest.raises(ValueError, match="who"):
            log.record(AuditEvent.LABEL_IMPORTED, 0, " ", "")
        with pytest.raises(ValueError, match="JSON"):
            log.record(AuditEvent.LABEL_IMPORTED, 0, "me", "", {"x": object()})


def test_update_and_delete_are_refused(tmp_path: Path) -> None:
    record(tmp_path, AuditEvent.CONSENT_CHANGED, 0, "clerk", "key1", {"donate": True})
    conn = sqlite3.connect(tmp_path / "audit.sqlite")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit_events SET who = 'someone else'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit_events")
    finally:
        conn.close()


def test_rewriting_behind_sqlites_back_is_detected(tmp_path: Path) -> None:
    for i in range(3):
        record(tmp_path, AuditEvent.CONSENT_CHANGED, 0, "clerk", f"key{i}", {"donate": True})
    conn = sqlite3.connect(tmp_path / "audit.sqlite")
    conn.execute("DROP TRIGGER audit_events_no_update")
    conn.execute("UPDATE audit_events SET detail = '{\"donate\": false}' WHERE id = 2")
    conn.commit()
    conn.close()
    with AuditLog(tmp_path) as log, pytest.raises(AuditLogTamperedError, match="event 2"):
        log.verify()
    out = subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(tmp_path),
                          "audit", "--verify"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "tampered with at event 2" in out.stdout


def test_threads_and_processes_append_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    threads = [threading.Thread(target=lambda i=i: [log.record(
        AuditEvent.RESULTS_SENT, 0, "DICOM_NODE", f"PACS@h:{i}", {"n": j}) for j in range(10)])
        for i in range(4)]
    for t in threads:
        t.start()
    other = subprocess.Popen([sys.executable, "-c",
                              "import sys; from twin_archive.audit import record\n"
                              "for i in range(10): record(sys.argv[1], 'results-sent', 0, 'cli', 'x')",
                              str(tmp_path)], cwd=ROOT)
    for t in threads:
        t.join()
    assert other.wait(60) == 0
    assert log.verify() == 50
    log.close()


def test_cli_lists_since_and_as_json(tmp_path: Path) -> None:
    record(tmp_path, AuditEvent.MODEL_PROMOTED, 0, "admin", "spleen_ct-v3", {"task": "spleen_ct"})
    run = lambda *a: subprocess.run([sys.executable, "-m", "dicom_node", "--data-dir", str(tmp_path),
                                     "audit", *a], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = run("--json", "--since", "1h").stdout.splitlines()
    assert [json.loads(x)["event_type"] for x in lines] == ["model-promoted"]
    assert json.loads(lines[0])["event_id_meaning"] == "Security Alert"
    assert "no audit events since" in run("--since", "2999-01-01").stdout
    assert "model-promoted" in run().stdout
