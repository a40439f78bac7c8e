"""The archive index schema, applied as numbered migrations.

Each migration runs in one transaction together with the row that records it in
``schema_migrations``; a migration is never edited once released: add a new one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from twin_archive.layout import INDEX_NAME

LOG = logging.getLogger(__name__)


def utc_now() -> str:
    """Current time as ISO 8601 in UTC with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def fetch_dicts(db: sqlite_utils.Database, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Rows of a query as dicts keyed by column name."""
    cur = db.execute(sql, params)
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _m1_initial(db: sqlite_utils.Database) -> None:
    db["twins"].create(
        {
            "patient_key": str,
            "patient_id": str,
            "issuer_of_patient_id": str,
            "patient_name": str,
            "birth_date": str,
            "sex": str,
            "donate": int,
            "created_at": str,
            "updated_at": str,
        },
        pk="patient_key",
        not_null={"patient_id", "donate"},
        defaults={"donate": 0, "issuer_of_patient_id": ""},
    )
    db["twins"].create_index(["patient_id"])
    db["consent_events"].create(
        {
            "id": int,
            "patient_key": str,
            "at": str,
            "donate": int,
            "previous": int,
            "by": str,
            "reason": str,
        },
        pk="id",
        foreign_keys=[("patient_key", "twins", "patient_key")],
    )
    db["consent_events"].create_index(["patient_key"])
    db["studies"].create(
        {
            "study_uid": str,
            "patient_key": str,
            "study_date": str,
            "study_time": str,
            "description": str,
            "accession_number": str,
            "first_received": str,
            "last_received": str,
        },
        pk="study_uid",
        foreign_keys=[("patient_key", "twins", "patient_key")],
    )
    db["studies"].create_index(["patient_key"])
    db["series"].create(
        {
            "series_uid": str,
            "study_uid": str,
            "modality": str,
            "body_part": str,
            "description": str,
            "series_number": str,
            "manufacturer": str,
            "model_name": str,
            "frame_of_reference_uid": str,
            "first_received": str,
            "last_received": str,
        },
        pk="series_uid",
        foreign_keys=[("study_uid", "studies", "study_uid")],
    )
    db["series"].create_index(["study_uid"])
    db["series"].create_index(["last_received"])
    db["instances"].create(
        {
            "id": int,
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "series_uid": str,
            "study_uid": str,
            "patient_key": str,
            "instance_number": str,
            "transfer_syntax_uid": str,
            "size": int,
            "sha256": str,
            "path": str,
            "calling_ae": str,
            "received_at": str,
            "version": int,
            "current": int,
        },
        pk="id",
        not_null={"sop_instance_uid", "sha256", "path", "version", "current"},
        foreign_keys=[("series_uid", "series", "series_uid")],
    )
    db["instances"].create_index(["sop_instance_uid", "sha256"], unique=True)
    db["instances"].create_index(["series_uid", "current"])


@contextlib.contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """One write transaction, ``BEGIN IMMEDIATE`` so that it takes the write lock first.

    A deferred ``BEGIN`` that reads and then writes fails at once with ``SQLITE_BUSY``
    in WAL mode when another process (the CLI, a second worker) wrote in between;
    ``IMMEDIATE`` waits on the busy timeout instead. Everything inside commits or
    nothing does (sqlite-utils #121).
    """
    conn = db.conn
    begin_immediate(conn)
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


#: Waits between attempts to take the write lock (then the last, repeated).
_LOCK_POLL_S = (0.00005, 0.0001, 0.0002, 0.0005, 0.001)


def begin_immediate(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's write lock in short steps.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between attempts. A write
    transaction of the archive holds the lock for well under a millisecond (the WAL
    write and its fsync), so with two processes storing, about a fifth of the
    transactions found it taken and then slept 1-4 ms: on average more than the
    transaction itself (measured: 575 commits of 4 associations, p90 wait 1.5 ms).
    Here the lock is tried again after 50 us, 100 us, 200 us, 0.5 ms, then every
    1 ms, for as long as the connection's ``busy_timeout``; the busy timeout is set
    back for everything else.

    Raises
    ------
    sqlite3.OperationalError
        The lock could not be had within the busy timeout ("database is locked"), or
        any other error of ``BEGIN``.
    """
    timeout_ms = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + timeout_ms / 1000
        for attempt in itertools.count():
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(_LOCK_POLL_S[min(attempt, len(_LOCK_POLL_S) - 1)])
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return "locked" in str(exc)
    return code & 0xFF == sqlite3.SQLITE_BUSY


def connect(path: str, *, timeout_s: float = 30.0) -> sqlite_utils.Database:
    """Open the index in WAL mode with full durability and a busy timeout.

    ``synchronous=FULL`` makes every commit durable before it returns, which the
    C-STORE acknowledgement relies on.
    """
    conn = sqlite3.connect(path, timeout=timeout_s, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    return sqlite_utils.Database(conn)


def _m2_ai_results(db: sqlite_utils.Database) -> None:
    """AI results (:mod:`twin_archive.results`): which objects came from which series and model."""
    db.execute(
        "CREATE TABLE ai_results (id INTEGER PRIMARY KEY, job_key TEXT NOT NULL UNIQUE,"
        " patient_key TEXT NOT NULL REFERENCES twins(patient_key),"
        " study_uid TEXT NOT NULL, source_series_uid TEXT NOT NULL,"
        " source_last_received TEXT NOT NULL, source_instances INTEGER NOT NULL,"
        " task TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,"
        " backend TEXT NOT NULL, created_at TEXT NOT NULL, segments TEXT NOT NULL,"
        " timings TEXT NOT NULL, superseded_by INTEGER REFERENCES ai_results(id))"
    )
    db.execute("CREATE INDEX ai_results_source ON ai_results (source_series_uid, task)")
    db.execute("CREATE INDEX ai_results_patient ON ai_results (patient_key)")
    db.execute(
        "CREATE TABLE ai_result_objects (id INTEGER PRIMARY KEY,"
        " result_id INTEGER NOT NULL REFERENCES ai_results(id), kind TEXT NOT NULL,"
        " sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL UNIQUE,"
        " series_uid TEXT NOT NULL, transfer_syntax_uid TEXT NOT NULL, path TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX ai_result_objects_result ON ai_result_objects (result_id)")


def _m3_labels_and_training_use(db: sqlite_utils.Database) -> None:
    """Radiologist labels (:mod:`twin_archive.labels`) and which model versions were
    trained with which series (:mod:`twin_archive.training_use`)."""
    db.execute(
        "CREATE TABLE labels (id INTEGER PRIMARY KEY,"
        " patient_key TEXT NOT NULL REFERENCES twins(patient_key),"
        " study_uid TEXT NOT NULL, series_uid TEXT NOT NULL REFERENCES series(series_uid),"
        " source TEXT NOT NULL, segments TEXT NOT NULL, path TEXT NOT NULL,"
        " sha256 TEXT NOT NULL, seg_sop_instance_uid TEXT NOT NULL DEFAULT '',"
        " seg_series_uid TEXT NOT NULL DEFAULT '', calling_ae TEXT NOT NULL DEFAULT '',"
        " content_creator TEXT NOT NULL DEFAULT '', content_time TEXT NOT NULL DEFAULT '',"
        " recorded_at TEXT NOT NULL, current INTEGER NOT NULL DEFAULT 0,"
        " UNIQUE (series_uid, sha256, seg_sop_instance_uid))"
    )
    db.execute("CREATE INDEX labels_series ON labels (series_uid, current)")
    db.execute("CREATE INDEX labels_patient ON labels (patient_key)")
    db.execute(
        "CREATE TABLE training_use (id INTEGER PRIMARY KEY, model_version TEXT NOT NULL,"
        " task TEXT NOT NULL, patient_key TEXT NOT NULL REFERENCES twins(patient_key),"
        " study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, label_id INTEGER,"
        " split TEXT NOT NULL, recorded_at TEXT NOT NULL,"
        " UNIQUE (model_version, series_uid))"
    )
    db.execute("CREATE INDEX training_use_patient ON training_use (patient_key)")


def _m4_label_tasks(db: sqlite_utils.Database) -> None:
    """The tasks a label is for (JSON list of task names); '' = any task (labels
    recorded before tasks were, and imports that name none)."""
    db.execute("ALTER TABLE labels ADD COLUMN tasks TEXT NOT NULL DEFAULT ''")


def _m5_liberal_acceptance_and_repair(db: sqlite_utils.Database) -> None:
    """Issue 13: unidentified twins and their merges, non-conformant UIDs flagged per
    instance, instances found missing by ``archive verify --repair``."""
    db.execute("ALTER TABLE twins ADD COLUMN unidentified INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE twins ADD COLUMN merged_into TEXT")
    # Comma-separated keywords of the instance's UIDs that are not conformant
    # (stored under hashed names): 'SOPInstanceUID,SeriesInstanceUID', or ''.
    db.execute("ALTER TABLE instances ADD COLUMN uid_flags TEXT NOT NULL DEFAULT ''")
    # When ``archive verify --repair`` found the file gone (NULL: present).
    db.execute("ALTER TABLE instances ADD COLUMN missing_at TEXT")
    db.execute(
        "CREATE TABLE twin_merges (id INTEGER PRIMARY KEY, source_key TEXT NOT NULL,"
        " target_key TEXT NOT NULL REFERENCES twins(patient_key), at TEXT NOT NULL,"
        " by TEXT NOT NULL, reason TEXT NOT NULL, studies INTEGER NOT NULL)")
    db.execute("CREATE INDEX twin_merges_target ON twin_merges (target_key)")


def _m6_live_learning(db: sqlite_utils.Database) -> None:
    """What the node learns from live traffic (:mod:`twin_archive.learning`): shadow
    results of candidate models, figures of every served series keyed by scanner, and
    the scanners already named as drifted."""
    db.execute(
        "CREATE TABLE shadow_results (id INTEGER PRIMARY KEY, job_key TEXT NOT NULL,"
        " patient_key TEXT NOT NULL REFERENCES twins(patient_key), study_uid TEXT NOT NULL,"
        " source_series_uid TEXT NOT NULL, task TEXT NOT NULL, shadow_version TEXT NOT NULL,"
        " active_version TEXT NOT NULL, active_result_id INTEGER REFERENCES ai_results(id),"
        " manufacturer TEXT NOT NULL DEFAULT '', model_name TEXT NOT NULL DEFAULT '',"
        " station TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL, agreement TEXT NOT NULL,"
        " min_dice REAL NOT NULL, objects TEXT NOT NULL, UNIQUE (job_key, shadow_version))"
    )
    db.execute("CREATE INDEX shadow_results_version ON shadow_results (shadow_version)")
    db.execute(
        "CREATE TABLE series_figures (id INTEGER PRIMARY KEY, job_key TEXT NOT NULL UNIQUE,"
        " task TEXT NOT NULL, manufacturer TEXT NOT NULL DEFAULT '',"
        " model_name TEXT NOT NULL DEFAULT '', station TEXT NOT NULL DEFAULT '',"
        " model_version TEXT NOT NULL DEFAULT '', recorded_at TEXT NOT NULL,"
        " figures TEXT NOT NULL, histogram TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX series_figures_scanner ON series_figures"
               " (task, manufacturer, model_name, station, id)")
    db.execute(
        "CREATE TABLE drift_named (task TEXT NOT NULL, manufacturer TEXT NOT NULL,"
        " model_name TEXT NOT NULL, station TEXT NOT NULL, named_at TEXT NOT NULL,"
        " detail TEXT NOT NULL, PRIMARY KEY (task, manufacturer, model_name, station))"
    )


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _m1_initial, _m2_ai_results, _m3_labels_and_training_use, _m4_label_tasks,
    _m5_liberal_acceptance_and_repair, _m6_live_learning)


def migrate(db: sqlite_utils.Database) -> int:
    """Apply every migration not yet recorded; return the schema version now in force."""
    conn = db.conn
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for number, migration in enumerate(MIGRATIONS, start=1):
        if number in done:
            continue
        with write_transaction(db):
            # Re-read under the write lock: another process may have just migrated.
            if conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (number,)
            ).fetchone():
                continue
            migration(db)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?)",
                (number, datetime.now(timezone.utc).isoformat()),
            )
        LOG.info("archive index: applied migration %d (%s)", number, migration.__name__)
    return len(MIGRATIONS)


class IndexStore:
    """Base of the stores that keep their rows in the archive's index (results, labels).

    Opens ``<data_dir>/index.sqlite`` with :func:`connect`, keeps a ``tmp/`` folder for
    durable writes, and serialises use of the connection with a lock.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (the index must exist and be migrated: open an
        :class:`~twin_archive.Archive` on it first).

    Raises
    ------
    RuntimeError
        If the index lacks :attr:`REQUIRED_TABLE` (not migrated).
    """

    #: A table this store needs; set by each subclass.
    REQUIRED_TABLE = ""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.tmp_dir = self.data_dir / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.db = connect(str(self.data_dir / INDEX_NAME))
        self._lock = threading.Lock()
        if self.REQUIRED_TABLE not in self.db.table_names():
            self.db.conn.close()
            raise RuntimeError(f"archive index in {self.data_dir} lacks the {self.REQUIRED_TABLE} "
                               "table; open the Archive first (it migrates the index)")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.db.conn.close()
