"""The register of model versions: SQLite (via :mod:`dicom_node.foundation.database`) and files on disk.

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
from pathlib import Path

import sqlite_utils

from dicom_node.foundation.database import Migration, connect, migrate, write
from registry.artifacts import ArtifactRecords
from registry.intake import VersionIntake

LOG = logging.getLogger(__name__)

DB_NAME = "registry.sqlite"

# The register's schema, migration 1 (dicom_node.foundation.database.migrate records it).
_M1 = """
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
"""


def _m1_initial(db: sqlite_utils.Database) -> None:
    for statement in _M1.split(";"):
        if statement.strip():
            db.conn.execute(statement)


_MIGRATIONS: tuple[Migration, ...] = (_m1_initial,)


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
        self.db = connect(self.db_path, timeout_s=30.0)
        migrate(self.db, _MIGRATIONS, name=f"registry {self.db_path}")

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions and schema ------------------------------------------------------

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction on the register (:func:`dicom_node.foundation.database.write`):
        write lock taken up front, nested calls join it."""
        return write(self.db)


__all__ = ["DB_NAME", "Registry"]
