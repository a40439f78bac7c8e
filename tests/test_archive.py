"""The twin archive on its own: layout, validation, consent, migrations."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import MRImageStorage

from node_harness import small_ct
from twin_archive import (
    Archive,
    IncomingInstance,
    InvalidInstanceError,
    SopClassMismatchError,
    StoreOutcome,
    TwinNotFoundError,
    uid_problem,
)
from twin_archive.reconcile import recover


def incoming(ds, *, sop_class: str | None = None) -> IncomingInstance:
    buf = DicomBytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, ds.file_meta)
    whole = io.BytesIO()
    ds.save_as(whole, enforce_file_format=True)
    meta = buf.getvalue()
    return IncomingInstance(file_meta=meta, dataset=whole.getvalue()[len(meta):],
                            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                            sop_class_uid=sop_class or str(ds.SOPClassUID),
                            sop_instance_uid=str(ds.SOPInstanceUID), calling_ae="UNIT")


@pytest.mark.parametrize("value, problem", [
    ("1.2.840.10008.5.1.4.1.1.2", None),
    ("", "empty"),
    ("1.2..3", "not a UID"),
    ("../../etc/passwd", "not a UID"),
    ("1.2.3/4", "not a UID"),
    ("1." + "1" * 63, "longer than 64"),
    (None, "missing"),
])
def test_uid_validation(value: str | None, problem: str | None) -> None:
    found = uid_problem(value)
    assert (found is None) if problem is None else (problem in found)


def test_paths_hold_no_phi_and_stay_inside(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        ds = small_ct(patient_id="MRN-123456")
        ds.PatientName = "Doe^Jane"
        result = archive.ingest.store(incoming(ds))
        assert result.outcome is StoreOutcome.STORED
        path = (tmp_path / result.path).resolve()
        assert tmp_path.resolve() in path.parents
        assert "MRN-123456" not in str(path) and "Doe" not in str(path)
        assert (tmp_path / "archive.key").stat().st_mode & 0o777 == 0o600
    # The folder name is keyed by the installation secret: another install differs.
    with Archive(tmp_path / "other") as other:
        assert other.ingest.store(incoming(ds)).patient_key != result.patient_key


def test_sop_class_mismatch_is_refused(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        with pytest.raises(SopClassMismatchError, match="but was sent as"):
            archive.ingest.store(incoming(small_ct(), sop_class=MRImageStorage))
        with pytest.raises(InvalidInstanceError):  # garbage: C000 with a reason
            good = incoming(small_ct())
            archive.ingest.store(IncomingInstance(
                file_meta=good.file_meta, dataset=good.dataset[:40] + b"\xff" * 9,
                transfer_syntax_uid=good.transfer_syntax_uid, sop_class_uid=good.sop_class_uid,
                sop_instance_uid=good.sop_instance_uid))
        assert archive.twins.instance_count() == 0


def test_concurrent_stores_of_the_same_instance_index_it_once(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        item = incoming(small_ct())
        outcomes = []
        threads = [threading.Thread(target=lambda: outcomes.append(archive.ingest.store(item).outcome))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes.count(StoreOutcome.STORED) == 1
        assert outcomes.count(StoreOutcome.DUPLICATE) == 7
        assert archive.twins.instance_count() == 1


def test_storing_and_reading_twins_at_once_share_the_index_safely(tmp_path: Path) -> None:
    """The ingest path and the twin read model use one index connection (Archive wires
    them with one lock): a store in one thread and reads and consent decisions in
    another never meet inside each other's transaction."""
    with Archive(tmp_path) as archive:
        first = small_ct(patient_id="CONC-1")
        archive.ingest.store(incoming(first))
        errors: list[BaseException] = []
        stored = threading.Event()

        def store() -> None:
            try:
                for n in range(2, 32):
                    archive.ingest.store(incoming(small_ct(
                        patient_id="CONC-1", study_uid=str(first.StudyInstanceUID),
                        series_uid=str(first.SeriesInstanceUID), instance=n)))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)
            finally:
                stored.set()

        def read_and_decide() -> None:
            try:
                donate = False
                while not stored.is_set():
                    archive.twins.twin("CONC-1")
                    archive.twins.series_files(str(first.SeriesInstanceUID))
                    donate = not donate
                    archive.twins.set_consent("CONC-1", donate=donate, by="test")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=store), threading.Thread(target=read_and_decide)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        [study] = archive.twins.twin("CONC-1").studies
        assert study.series[0].instances == 31


def test_consent_defaults_off_and_every_change_is_audited(tmp_path: Path) -> None:
    with Archive(tmp_path) as archive:
        archive.ingest.store(incoming(small_ct(patient_id="P1")))
        assert archive.twins.twin("P1").twin.donate is False
        archive.twins.set_consent("P1", donate=True, by="dr.who", reason="form 42")
        archive.twins.set_consent("P1", donate=False, by="clerk", reason="patient called")
        detail = archive.twins.twin("P1")
        assert detail.twin.donate is False
        assert [(e.previous, e.donate, e.by, e.reason) for e in detail.consent_history] == [
            (False, True, "dr.who", "form 42"), (True, False, "clerk", "patient called")]
        with pytest.raises(TwinNotFoundError, match="no twin with Patient ID 'NOPE'"):
            archive.twins.set_consent("NOPE", donate=True, by="x")
        with pytest.raises(ValueError, match="by:"):
            archive.twins.set_consent("P1", donate=True, by=" ")


def test_reopening_applies_no_migration_twice_and_cleans_tmp(tmp_path: Path) -> None:
    Archive(tmp_path).close()
    (tmp_path / "tmp" / "leftover.part").write_bytes(b"half a file")
    with Archive(tmp_path) as archive:
        assert recover(archive.ingest) == 1
        versions = [r[0] for r in archive.db.execute("SELECT version FROM schema_migrations")]
        assert versions == sorted(set(versions))


def test_write_lock_taken_after_another_process_releases_it(tmp_path: Path) -> None:
    """begin_immediate waits for a held write lock in short steps, then gives up cleanly."""
    import sqlite3

    from twin_archive.schema import begin_immediate, connect
    from waiting import wait_until

    path = str(tmp_path / "x.sqlite")
    holder = connect(path, timeout_s=5).conn
    holder.execute("CREATE TABLE t (v INTEGER)")
    waiter = connect(path, timeout_s=5).conn
    holder.execute("BEGIN IMMEDIATE")
    attempts: list[str] = []  # the waiter's BEGIN IMMEDIATE statements, as SQLite runs them
    waiter.set_trace_callback(lambda sql: attempts.append(sql) if "BEGIN IMMEDIATE" in sql else None)
    releasing = threading.Event()

    def release_once_the_waiter_retries() -> None:
        wait_until("the waiter to find the lock taken and try again", lambda: len(attempts) >= 2,
                   10.0, poll=0.001)
        holder.execute("INSERT INTO t VALUES (1)")
        releasing.set()  # before COMMIT: the waiter may have the lock the instant COMMIT ends
        holder.execute("COMMIT")

    releaser = threading.Thread(target=release_once_the_waiter_retries)
    releaser.start()
    begin_immediate(waiter)  # waits for the holder, then has the lock
    waiter.set_trace_callback(None)
    releaser.join(10)
    assert releasing.is_set() and len(attempts) >= 2
    waiter.execute("INSERT INTO t VALUES (2)")
    waiter.execute("COMMIT")
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 5000  # set back

    holder.execute("BEGIN IMMEDIATE")
    waiter.execute("PRAGMA busy_timeout=100")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(waiter)
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 100
    assert not waiter.in_transaction
    holder.execute("ROLLBACK")
    assert [r[0] for r in waiter.execute("SELECT v FROM t ORDER BY v")] == [1, 2]
