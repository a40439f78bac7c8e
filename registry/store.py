"""The register of model versions: SQLite (via sqlite-utils) plus artifacts on disk.

Layout under the data directory::

    <data-dir>/registry.sqlite               the register (WAL mode)
    <data-dir>/models/<task>/<version>/      a copy of the bundle (configs/, models/)
        onnx/model.onnx                      optimised artifacts, when built
        tensorrt/<key>.plan

Every change that writes more than one row (a version and its audit entry, a promote
that demotes the previous version) is one transaction. Exactly one version is active
per task and scanner scope; a partial unique index in the database enforces it.

:class:`Registry` holds the connection, the transactions and the schema; what it does
is in one module per job: reading versions and the audit trail
(:mod:`registry.versions`), adding versions (:mod:`registry.intake`), their standing
(:mod:`registry.lifecycle`), artifact files and backend checks (:mod:`registry.artifacts`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from registry.artifacts import ArtifactRecords
from registry.intake import VersionIntake
from registry.records import utc_now
from registry.rows import ts

LOG = logging.getLogger(__name__)

DB_NAME = "registry.sqlite"

# Recorded migrations: (number, SQL). Applied in order, each in one transaction.
_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
    CREATE TABLE model_versions (
        version TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        number INTEGER NOT NULL,
        architecture TEXT NOT NULL,
        labels TEXT NOT NULL,
        modality TEXT NOT NULL DEFAULT '',
        input_spacing TEXT,
        intensity TEXT,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('candidate', 'active', 'retired')),
        manufacturer TEXT NOT NULL DEFAULT '',
        scanner_model TEXT NOT NULL DEFAULT '',
        device_uid TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL,
        bundle_name TEXT NOT NULL DEFAULT '',
        bundle_version TEXT NOT NULL DEFAULT '',
        parent_version TEXT REFERENCES model_versions(version),
        dataset_manifest TEXT,
        metrics TEXT,
        UNIQUE (task, number)
    );
    CREATE UNIQUE INDEX one_active_per_scope ON model_versions
        (task, manufacturer COLLATE NOCASE, scanner_model COLLATE NOCASE)
        WHERE status = 'active';
    CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        version TEXT NOT NULL REFERENCES model_versions(version),
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        key TEXT NOT NULL DEFAULT '',
        UNIQUE (version, kind, key)
    );
    CREATE TABLE verifications (
        id INTEGER PRIMARY KEY,
        version TEXT NOT NULL REFERENCES model_versions(version),
        backend TEXT NOT NULL,
        device_name TEXT NOT NULL,
        max_abs_diff REAL NOT NULL,
        argmax_agreement REAL NOT NULL,
        median_ms REAL NOT NULL,
        shape TEXT NOT NULL,
        verified INTEGER NOT NULL,
        measured_at TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        UNIQUE (version, backend, device_name)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        action TEXT NOT NULL,
        task TEXT NOT NULL,
        version TEXT NOT NULL,
        manufacturer TEXT NOT NULL DEFAULT '',
        scanner_model TEXT NOT NULL DEFAULT '',
        by TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        previous_version TEXT
    );
    CREATE INDEX audit_task ON audit (task, id);
    """),
)


class Registry(VersionIntake, ArtifactRecords):
    """The model registry of one node.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The node's data directory; created if missing. The register is
        ``<data_dir>/registry.sqlite`` and artifacts live under ``<data_dir>/models``.

    Notes
    -----
    One instance per thread (it holds one SQLite connection). Several processes may
    share a data directory: writes take SQLite's write lock up front
    (``BEGIN IMMEDIATE``) and wait up to 30 s for it.

    Its methods come from one class per job, each in its own module:
    :class:`~registry.versions.VersionQueries` (reading),
    :class:`~registry.intake.VersionIntake` (adding versions),
    :class:`~registry.lifecycle.VersionLifecycle` (status changes) and
    :class:`~registry.artifacts.ArtifactRecords` (artifact files, backend checks). They
    share this object's connection (``db``), paths and write transaction (``_tx``); one
    object stays what callers hold, so none of them changed.
    """

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir = self.data_dir / "models"
        self.db_path = self.data_dir / DB_NAME
        conn = sqlite3.connect(str(self.db_path), timeout=30.0)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = FULL")
        self._migrate()

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and schema ------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, write lock taken up front; nested calls join it."""
        conn = self.db.conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def _migrate(self) -> None:
        with self._tx() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(number INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = {r[0] for r in conn.execute("SELECT number FROM schema_migrations")}
            for number, sql in _MIGRATIONS:
                if number in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (number, ts(utc_now())))
                LOG.info("registry %s: applied migration %d", self.db_path, number)


__all__ = ["DB_NAME", "Registry"]
