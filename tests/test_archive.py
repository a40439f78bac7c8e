"""The twin archive on its own: layout, validation, consent, migrations."""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage

from node_harness import incoming, small_ct
from twin_archive import audit
from twin_archive.arrivals import Arrivals
from twin_archive.counts import (
    ArchiveCounts,
    AuditCounts,
    ResultTimings,
    archive_counts,
    audit_counts,
    result_timings,
)
from twin_archive.labels import LabelStore
from twin_archive.results import ResultStore
from twin_archive import (
    Archive,
    IncomingInstance,
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
    StoreOutcome,
    TwinNotFoundError,
    uid_problem,
)
from twin_archive.reconcile import recover


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


def test_an_instance_whose_row_cannot_be_committed_leaves_no_file(tmp_path: Path) -> None:
    """The file written before a failed index commit is removed (looked up by its
    content's unique index: a scan by path took 0.26 s at 1,000,000 rows)."""
    with Archive(tmp_path) as archive:
        kept = archive.ingest.store(incoming(small_ct(instance=1)))
        archive.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON instances"
                           " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        with pytest.raises(OutOfResourcesError, match="cannot commit"):
            archive.ingest.store(incoming(small_ct(instance=2)))
        files = sorted(p.relative_to(tmp_path).as_posix()
                       for p in (tmp_path / "archive").rglob("*.dcm"))
        assert files == [kept.path]


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

    from dicom_node.foundation.database import begin_immediate, connect
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


def _series_of(ds, instance: int):
    return small_ct(patient_id=str(ds.PatientID), study_uid=str(ds.StudyInstanceUID),
                    series_uid=str(ds.SeriesInstanceUID), instance=instance)


def test_arrivals_name_the_series_gone_quiet_oldest_first(tmp_path: Path) -> None:
    first, second = small_ct(patient_id="P1"), small_ct(patient_id="P2")
    with Archive(tmp_path) as archive:
        archive.ingest.store(incoming(first))
        archive.ingest.store(incoming(second))
        archive.ingest.store(incoming(_series_of(second, 2)))
        keys = archive.twins.find_twin_keys("P1") + archive.twins.find_twin_keys("P2")
    with Arrivals(tmp_path) as arrivals:
        a, b = everything = arrivals.quiet("9999")
        assert [(s.series_uid, s.study_uid, s.patient_key, s.modality) for s in everything] == [
            (str(first.SeriesInstanceUID), str(first.StudyInstanceUID), keys[0], "CT"),
            (str(second.SeriesInstanceUID), str(second.StudyInstanceUID), keys[1], "CT")]
        assert a.last_received < b.last_received
        assert arrivals.quiet(a.last_received) == [a]  # until: inclusive
        assert arrivals.quiet("9999", since=b.last_received) == [b]  # since: inclusive
        assert arrivals.quiet(b.last_received, since=a.last_received) == [a, b]
        assert arrivals.quiet("2000") == []


def test_counts_for_status_are_read_only_and_zero_without_databases(tmp_path: Path) -> None:
    assert archive_counts(tmp_path) == ArchiveCounts()
    assert result_timings(tmp_path) == [] and audit_counts(tmp_path) == AuditCounts()
    assert list(tmp_path.iterdir()) == []  # nothing created
    with Archive(tmp_path) as archive:
        one = small_ct(patient_id="P1")
        for ds in (one, _series_of(one, 2), small_ct(patient_id="P2")):
            archive.ingest.store(incoming(ds))
        sizes = sum(p.stat().st_size for uid in {str(one.SeriesInstanceUID)}
                    for p in archive.twins.series_files(uid))
        key = archive.twins.find_twin_keys("P1")[0]
    counts = archive_counts(tmp_path)
    assert (counts.twins, counts.studies, counts.instances) == (2, 2, 3)
    assert counts.archived_bytes > sizes > 0
    with closing(ResultStore(tmp_path)) as results:
        made = [results.record(job_key=f"job-{i}", patient_key=key,
                               study_uid=str(one.StudyInstanceUID),
                               source_series_uid=str(one.SeriesInstanceUID),
                               source_last_received=f"t{i}", source_instances=2, task="spleen-ct",
                               model_name="m", model_version="1", backend="torch-cpu",
                               segments=(), timings=timings, objects=[])
                for i, timings in enumerate(({"inference_s": 1.5, "load_s": 2}, {"write_s": 1.0}))]
        results.db.execute("UPDATE ai_results SET timings = 'not json' WHERE id = ?", (made[1].id,))
        results.db.conn.commit()
    assert result_timings(tmp_path) == [
        ResultTimings(id=made[0].id, timings={"inference_s": 1.5, "load_s": 2.0}),
        ResultTimings(id=made[1].id, timings={})]  # counted, with no stage times
    assert [r.id for r in result_timings(tmp_path, after_id=made[0].id)] == [made[1].id]
    entry = audit.record(tmp_path, audit.AuditEvent.STUDY_RECEIVED, audit.AuditOutcome.SUCCESS,
                         "UNIT", "a study")
    assert audit_counts(tmp_path) == AuditCounts(events=1, last_at=entry.at)


def test_labels_whose_file_is_gone_are_named(tmp_path: Path) -> None:
    ds = small_ct()
    with Archive(tmp_path) as archive:
        archive.ingest.store(incoming(ds))
    with LabelStore(tmp_path) as labels:
        kept, _ = labels.add_file(series_uid=str(ds.SeriesInstanceUID), data=b"mask 1",
                                  segments=("spleen",), by="annotator")
        gone, _ = labels.add_file(series_uid=str(ds.SeriesInstanceUID), data=b"mask 2",
                                  segments=("spleen",), by="annotator")
        assert labels.missing_files() == []
        gone.path.unlink()
        assert labels.missing_files() == [str(gone.path.relative_to(tmp_path.resolve()))]
        assert kept.path.is_file()
