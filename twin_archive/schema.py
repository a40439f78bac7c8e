"""The archive index schema, applied as numbered migrations.

Each migration runs in one transaction together with the row that records it in
``schema_migrations`` (:func:`dicom_node.foundation.database.migrate`); a migration is never
edited once released: add a new one.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from dicom_node.foundation.database import Migration, connect
from twin_archive.layout import INDEX_NAME

LOG = logging.getLogger(__name__)


def fetch_dicts(db: sqlite_utils.Database, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Rows of a query as dicts keyed by column name."""
    cur = db.execute(sql, params)
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def _m1_initial(db: sqlite_utils.Database) -> None:
    """Twins, their consent events, studies, series, instances.

    Written first with sqlite-utils' ``Table.create``; this is the SQL it ran
    (``sqlite_master`` of an index it made), so that the migration can never change
    with the library's version.
    """
    for sql in (
        'CREATE TABLE "twins" (\n   "patient_key" TEXT PRIMARY KEY,\n   "patient_id" TEXT NOT NULL,\n'
        '   "issuer_of_patient_id" TEXT DEFAULT \'\',\n   "patient_name" TEXT,\n   "birth_date" TEXT,\n'
        '   "sex" TEXT,\n   "donate" INTEGER NOT NULL DEFAULT 0,\n   "created_at" TEXT,\n'
        '   "updated_at" TEXT\n)',
        'CREATE INDEX "idx_twins_patient_id"\n    ON "twins" ("patient_id")',
        'CREATE TABLE "consent_events" (\n   "id" INTEGER PRIMARY KEY,\n'
        '   "patient_key" TEXT REFERENCES "twins"("patient_key"),\n   "at" TEXT,\n'
        '   "donate" INTEGER,\n   "previous" INTEGER,\n   "by" TEXT,\n   "reason" TEXT\n)',
        'CREATE INDEX "idx_consent_events_patient_key"\n    ON "consent_events" ("patient_key")',
        'CREATE TABLE "studies" (\n   "study_uid" TEXT PRIMARY KEY,\n'
        '   "patient_key" TEXT REFERENCES "twins"("patient_key"),\n   "study_date" TEXT,\n'
        '   "study_time" TEXT,\n   "description" TEXT,\n   "accession_number" TEXT,\n'
        '   "first_received" TEXT,\n   "last_received" TEXT\n)',
        'CREATE INDEX "idx_studies_patient_key"\n    ON "studies" ("patient_key")',
        'CREATE TABLE "series" (\n   "series_uid" TEXT PRIMARY KEY,\n'
        '   "study_uid" TEXT REFERENCES "studies"("study_uid"),\n   "modality" TEXT,\n'
        '   "body_part" TEXT,\n   "description" TEXT,\n   "series_number" TEXT,\n'
        '   "manufacturer" TEXT,\n   "model_name" TEXT,\n   "frame_of_reference_uid" TEXT,\n'
        '   "first_received" TEXT,\n   "last_received" TEXT\n)',
        'CREATE INDEX "idx_series_study_uid"\n    ON "series" ("study_uid")',
        'CREATE INDEX "idx_series_last_received"\n    ON "series" ("last_received")',
        'CREATE TABLE "instances" (\n   "id" INTEGER PRIMARY KEY,\n'
        '   "sop_instance_uid" TEXT NOT NULL,\n   "sop_class_uid" TEXT,\n'
        '   "series_uid" TEXT REFERENCES "series"("series_uid"),\n   "study_uid" TEXT,\n'
        '   "patient_key" TEXT,\n   "instance_number" TEXT,\n   "transfer_syntax_uid" TEXT,\n'
        '   "size" INTEGER,\n   "sha256" TEXT NOT NULL,\n   "path" TEXT NOT NULL,\n'
        '   "calling_ae" TEXT,\n   "received_at" TEXT,\n   "version" INTEGER NOT NULL,\n'
        '   "current" INTEGER NOT NULL\n)',
        'CREATE UNIQUE INDEX "idx_instances_sop_instance_uid_sha256"\n'
        '    ON "instances" ("sop_instance_uid", "sha256")',
        'CREATE INDEX "idx_instances_series_uid_current"\n    ON "instances" ("series_uid", "current")',
    ):
        db.execute(sql)


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


def _m7_retention(db: sqlite_utils.Database) -> None:
    """Issue 23: what retention pruned (:mod:`twin_archive.retention`), legal holds, and
    the sizes of result and label files (bytes by kind in ``status``).

    ``pruned_files`` keeps one row per removed file (instance, result object or label)
    with its UIDs, size, dates and why: ``twin show`` tells what existed. A row with
    ``file_removed = 0`` is a removal in progress: its file, if still there, is removed
    at the next start (:func:`twin_archive.retention.finish_pending`), never re-indexed.
    """
    db.execute(
        "CREATE TABLE pruned_files (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,"
        " patient_key TEXT NOT NULL, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,"
        " sop_instance_uid TEXT NOT NULL, size INTEGER NOT NULL, received_at TEXT NOT NULL,"
        " path TEXT NOT NULL, pruned_at TEXT NOT NULL, reason TEXT NOT NULL,"
        " file_removed INTEGER NOT NULL DEFAULT 0)")
    db.execute("CREATE INDEX pruned_files_series ON pruned_files (series_uid)")
    db.execute("CREATE INDEX pruned_files_patient ON pruned_files (patient_key)")
    db.execute("CREATE INDEX pruned_files_pending ON pruned_files (file_removed)"
               " WHERE file_removed = 0")
    db.execute(
        "CREATE TABLE holds (patient_key TEXT PRIMARY KEY REFERENCES twins(patient_key),"
        " at TEXT NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL)")
    db.execute("ALTER TABLE ai_result_objects ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE labels ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX ai_results_series ON ai_results (source_series_uid)")
    db.execute("CREATE INDEX instances_received_at ON instances (received_at)")
    data_dir = Path(db.conn.execute("PRAGMA database_list").fetchone()[2]).parent
    for table in ("ai_result_objects", "labels"):  # sizes of the files already there
        rows = db.conn.execute(f"SELECT id, path FROM {table}").fetchall()  # noqa: S608
        for row_id, rel in rows:
            try:
                size = (data_dir / rel).stat().st_size
            except OSError:
                continue
            db.conn.execute(f"UPDATE {table} SET size = ? WHERE id = ?", (size, row_id))  # noqa: S608


def _m8_instance_indexes_by_patient_and_current(db: sqlite_utils.Database) -> None:
    """Issue 23 (an archive of millions): instances by patient, and current instances
    with their sizes, so that neither ``twin show`` nor ``status``/``/metrics`` reads
    the whole table (``benchmarks/archive_scale.py``; README, "How the index scales").

    ``instances_patient`` serves a twin's counts, last arrival and bytes (it was a scan
    of every instance row per twin shown; retention's bytes by kind looked each row
    up) and the moves of a twin merge; ``instances_current_size`` is a covering index
    for the archive's count and bytes (a scan of a narrow index instead of the table).
    """
    db.execute("CREATE INDEX instances_patient ON instances"
               " (patient_key, current, received_at, size)")
    db.execute("CREATE INDEX instances_current_size ON instances (current, size)")


def _m9_unclaimed_labels(db: sqlite_utils.Database) -> None:
    """Issue 27: a SEG whose segments name no configured task's structure is kept as an
    *unclaimed* label (``unclaimed``: why, in words; '' once claimed, and for every
    label before this migration), with the code values of its segments' Segmented
    Property Types (``segment_codes``: JSON list, ``null`` for a segment without one;
    '' when unknown), so that a task or model added later can claim it without
    reading the SEG again."""
    db.execute("ALTER TABLE labels ADD COLUMN unclaimed TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE labels ADD COLUMN segment_codes TEXT NOT NULL DEFAULT ''")
    db.execute("CREATE INDEX labels_unclaimed ON labels (id) WHERE unclaimed <> ''")


def _m10_retrieved_priors(db: sqlite_utils.Database) -> None:
    """Issue 26: series the node retrieved from a PACS as priors of a patient
    (:mod:`twin_archive.history`), so that their results are not sent unless asked
    and ``twin history`` can say which points came from the PACS."""
    db.execute(
        "CREATE TABLE retrieved_series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,"
        " patient_key TEXT NOT NULL, source TEXT NOT NULL, retrieved_at TEXT NOT NULL,"
        " for_study_uid TEXT NOT NULL DEFAULT '')")
    db.execute("CREATE INDEX retrieved_series_patient ON retrieved_series (patient_key)")


MIGRATIONS: tuple[Migration, ...] = (
    _m1_initial, _m2_ai_results, _m3_labels_and_training_use, _m4_label_tasks,
    _m5_liberal_acceptance_and_repair, _m6_live_learning, _m7_retention,
    _m8_instance_indexes_by_patient_and_current, _m9_unclaimed_labels,
    _m10_retrieved_priors)


class IndexStore:
    """Base of the stores that keep their rows in the archive's index (results, labels).

    Opens ``<data_dir>/index.sqlite`` with :func:`~dicom_node.foundation.database.connect`, keeps a ``tmp/`` folder for
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
        self.db = connect(self.data_dir / INDEX_NAME, timeout_s=30.0)
        self._lock = threading.Lock()
        if self.REQUIRED_TABLE not in self.db.table_names():
            self.db.conn.close()
            raise RuntimeError(f"archive index in {self.data_dir} lacks the {self.REQUIRED_TABLE} "
                               "table; open the Archive first (it migrates the index)")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
