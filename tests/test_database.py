"""The SQLite leaf (dicom_node.foundation.database): connect, write, migrate, the clock; and that
data directories written before it upgrade (the registry's, the queue's and the audit
log's older records of their migrations)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import connect, migrate, write


def _db(tmp_path: Path, name: str = "x.sqlite") -> sqlite_utils.Database:
    db = connect(tmp_path / name, timeout_s=5)
    db.execute("CREATE TABLE t (v INTEGER PRIMARY KEY)")
    return db


# --------------------------------------------------------------------------- clock
def test_one_clock_utc_aware_and_text_that_sorts_as_time() -> None:
    now = utc_now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    text = iso(now)
    assert text.endswith("+00:00") and len(text.split("T")[1]) == len("08:41:47.123456+00:00")
    assert datetime.fromisoformat(text) == now
    later = now + timedelta(microseconds=1)
    assert iso(later) > text
    cet = now.astimezone(timezone(timedelta(hours=1)))
    assert iso(cet) == text  # written in UTC whatever zone it was given in


# ---------------------------------------------------------------------- connection
def test_connect_sets_durability_and_autocommit(tmp_path: Path) -> None:
    db = _db(tmp_path)
    conn = db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    conn.execute("INSERT INTO t VALUES (1)")
    assert not conn.in_transaction  # autocommit: no implicit transaction left open
    row = conn.execute("SELECT v FROM t").fetchone()
    assert row["v"] == 1 and row[0] == 1
    other = connect(tmp_path / "x.sqlite", timeout_s=5)
    assert [r["v"] for r in other.query("SELECT v FROM t")] == [1]
    with pytest.raises(ValueError, match="timeout_s"):
        connect(tmp_path / "y.sqlite", timeout_s=0)


def test_readonly_never_writes_nor_creates(tmp_path: Path) -> None:
    folder = tmp_path / "odd #?% name"
    folder.mkdir()
    db = _db(folder)
    db.execute("INSERT INTO t VALUES (7)")
    ro = connect(folder / "x.sqlite", timeout_s=5, readonly=True)
    assert [r[0] for r in ro.conn.execute("SELECT v FROM t")] == [7]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.conn.execute("INSERT INTO t VALUES (8)")
    with pytest.raises(sqlite3.OperationalError):
        connect(folder / "missing.sqlite", timeout_s=5, readonly=True)
    assert not (folder / "missing.sqlite").exists()


# --------------------------------------------------------------------- transaction
def test_write_commits_or_rolls_back_everything(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with write(db) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("INSERT INTO t VALUES (2)")
    assert not db.conn.in_transaction
    with pytest.raises(sqlite3.IntegrityError):
        with write(db) as conn:
            conn.execute("INSERT INTO t VALUES (3)")
            conn.execute("INSERT INTO t VALUES (1)")  # duplicate key: the whole block goes
    with pytest.raises(KeyboardInterrupt):
        with write(db) as conn:
            conn.execute("INSERT INTO t VALUES (4)")
            raise KeyboardInterrupt
    assert not db.conn.in_transaction
    assert [r[0] for r in db.conn.execute("SELECT v FROM t ORDER BY v")] == [1, 2]


def test_nested_write_joins_the_outer_transaction(tmp_path: Path) -> None:
    db = _db(tmp_path)
    reader = connect(tmp_path / "x.sqlite", timeout_s=5)
    with write(db) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        with write(db) as inner:
            inner.execute("INSERT INTO t VALUES (2)")
        assert db.conn.in_transaction  # the inner block did not commit
        assert reader.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
        db["t"].insert({"v": 3})  # sqlite-utils' writers nest too (as a savepoint)
        assert db.conn.in_transaction
    assert reader.conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 3
    with pytest.raises(RuntimeError):
        with write(db) as conn:
            conn.execute("INSERT INTO t VALUES (4)")
            with write(db) as inner:
                inner.execute("INSERT INTO t VALUES (5)")
                raise RuntimeError("inner")
    assert [r[0] for r in db.conn.execute("SELECT v FROM t ORDER BY v")] == [1, 2, 3]


def test_a_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    """A COMMIT that fails (here a deferred foreign key) leaves no transaction open
    that the next write would silently join."""
    db = connect(tmp_path / "x.sqlite", timeout_s=5)
    db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER"
               " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        with write(db) as conn:
            conn.execute("INSERT INTO child VALUES (1, 99)")
    assert not db.conn.in_transaction
    with write(db) as conn:
        conn.execute("INSERT INTO parent VALUES (1)")
    assert db.conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    assert db.conn.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 1


# ---------------------------------------------------------------------- migrations
def _m1(db: sqlite_utils.Database) -> None:
    db.execute("CREATE TABLE a (x INTEGER)")


def _m2(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT ''")


def _records(db: sqlite_utils.Database) -> list[tuple[int, bool]]:
    return [(r[0], r[1] is not None) for r in
            db.conn.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")]


def test_migrate_applies_each_migration_once_and_records_it(tmp_path: Path) -> None:
    db = connect(tmp_path / "x.sqlite", timeout_s=5)
    assert migrate(db, (_m1,), name="test") == 1
    assert migrate(db, (_m1, _m2), name="test") == 2
    assert migrate(db, (_m1, _m2), name="test") == 2  # nothing to do: no error
    assert _records(db) == [(1, True), (2, True)]
    assert [c.name for c in db["a"].columns] == ["x", "y"]
    assert not db.conn.in_transaction


def test_two_openers_at_once_apply_each_migration_once(tmp_path: Path) -> None:
    """Two processes (here two connections in threads) opening a new file together:
    the record is re-read under the write lock, so no migration runs twice."""
    import threading
    import time

    applied: list[str] = []

    def slow_m1(db: sqlite_utils.Database) -> None:
        applied.append(threading.current_thread().name)
        time.sleep(0.05)  # hold the write lock while the other opener waits for it
        _m1(db)

    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def opener() -> None:
        db = connect(tmp_path / "x.sqlite", timeout_s=10)
        try:
            barrier.wait(5)
            migrate(db, (slow_m1, _m2), name="test")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=opener, name=f"opener-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == [] and len(applied) == 1
    assert _records(connect(tmp_path / "x.sqlite", timeout_s=5)) == [(1, True), (2, True)]


def test_a_failing_migration_leaves_no_trace(tmp_path: Path) -> None:
    def broken(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE b (x INTEGER)")
        db.execute("ALTER TABLE nowhere ADD COLUMN z")

    db = connect(tmp_path / "x.sqlite", timeout_s=5)
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        migrate(db, (_m1, broken), name="test")
    assert _records(db) == [(1, True)]
    assert "b" not in db.table_names()
    assert not db.conn.in_transaction


def test_migrate_adopts_a_count_in_user_version(tmp_path: Path) -> None:
    """The queue and the audit log counted their migrations in PRAGMA user_version."""
    db = connect(tmp_path / "x.sqlite", timeout_s=5)
    _m1(db)
    db.execute("PRAGMA user_version=1")
    assert migrate(db, (_m1, _m2), name="test") == 2  # _m1 would fail if run again
    assert _records(db) == [(1, False), (2, True)]  # applied_at of 1 is not known


def test_migrate_adopts_the_registry_record(tmp_path: Path) -> None:
    """The registry recorded its migrations in schema_migrations (number, applied_at)."""
    db = connect(tmp_path / "x.sqlite", timeout_s=5)
    db.execute("CREATE TABLE schema_migrations (number INTEGER PRIMARY KEY,"
               " applied_at TEXT NOT NULL)")
    _m1(db)
    db.execute("INSERT INTO schema_migrations VALUES (1, '2026-01-01T00:00:00+00:00')")
    assert migrate(db, (_m1, _m2), name="test") == 2
    assert _records(db) == [(1, True), (2, True)]
    other = connect(tmp_path / "y.sqlite", timeout_s=5)
    other.execute("CREATE TABLE schema_migrations (n INTEGER)")
    with pytest.raises(sqlite3.DatabaseError, match="unknown columns"):
        migrate(other, (_m1,), name="test")
    assert "a" not in other.table_names() and not other.conn.in_transaction


# -------------------------------------------------- data directories written before
def test_older_data_directories_upgrade(tmp_path: Path) -> None:
    """Each store opened on its file as the code before the leaf left it: the record of
    its migrations is put back in the older form, and reopening must adopt it (a
    migration applied twice would fail: its tables exist)."""
    from dicom_node.queue.jobs import JobQueue
    from registry.store import Registry
    from twin_archive import Archive
    from twin_archive.audit import AuditLog

    Archive(tmp_path).close()
    JobQueue(tmp_path).close()
    Registry(tmp_path).close()
    AuditLog(tmp_path).close()

    def as_before(name: str, how: str) -> int:
        db = connect(tmp_path / name, timeout_s=5)
        n = db.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]
        if how == "user_version":
            db.execute("DROP TABLE schema_migrations")
            db.execute(f"PRAGMA user_version={n}")
        elif how == "number":
            db.execute("ALTER TABLE schema_migrations RENAME COLUMN version TO number")
        db.close()
        return n

    counts = {"queue.sqlite": as_before("queue.sqlite", "user_version"),
              "audit.sqlite": as_before("audit.sqlite", "user_version"),
              "registry.sqlite": as_before("registry.sqlite", "number"),
              "index.sqlite": as_before("index.sqlite", "as it was")}
    Archive(tmp_path).close()
    queue = JobQueue(tmp_path)
    assert queue.counts() == {}
    queue.close()
    with Registry(tmp_path) as registry:
        assert registry.list() == []
    with AuditLog(tmp_path) as log:
        log.record("application-start", 0, who="test", what="upgrade")
    for name, n in counts.items():
        db = connect(tmp_path / name, timeout_s=5)
        assert [r[0] for r in db.conn.execute("SELECT version FROM schema_migrations")] == \
            list(range(1, n + 1)), name
