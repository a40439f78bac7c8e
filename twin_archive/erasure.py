"""Erasure of a patient (GDPR art. 17, DESIGN decision 12): the twin forgotten completely.

:meth:`Erasure.erase` removes a twin's images, results, labels and shadow results and
every row of the index that names the twin (twin, studies, series, instances, consent
events, results, labels, training-use records, figures, merges, holds, series retrieved
as priors, earlier prune records), then truncates the index's WAL. Connections run with ``secure_delete``
(:func:`dicom_node.foundation.database.connect`), so deleted rows are overwritten with zeros, not
left in free pages. Afterwards no file of the archive names the patient; the caller
scrubs the queues and the export mappings, and records the erasure in the audit log
under the twin's pseudonymous key.

Crash-safe like a prune (:mod:`twin_archive.retention`): one transaction replaces the
rows by ``pruned_files`` rows of kind ``erasure`` (a path and the twin's key, nothing
else), then the files go, then those rows. A stop in between leaves rows whose files
the next start removes (:meth:`~twin_archive.retention.Retention.finish_pending`);
reconciliation never re-indexes them.

The model versions trained with the twin's data are named in the report: whether to
retrain is the data protection officer's decision; the node does not retrain by itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import checkpoint_truncate, write
from twin_archive.layout import ARCHIVE_DIR, QUARANTINE_DIR
from twin_archive.retention import PatientHeldError, Retention

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ErasureReport:
    """What an erasure removed."""

    patient_key: str
    studies: int
    series: int
    files: int
    bytes: int
    quarantined_files: int
    model_versions: tuple[str, ...]  # trained with the twin's data
    series_uids: tuple[str, ...]  # for the caller's queue scrub; never printed
    study_uids: tuple[str, ...] = ()  # as series_uids
    result_ids: tuple[int, ...] = ()  # as series_uids (sends of its results)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``twin forget --json``); no UIDs."""
        return {"patient_key": self.patient_key, "studies": self.studies, "series": self.series,
                "files": self.files, "bytes": self.bytes,
                "quarantined_files": self.quarantined_files,
                "model_versions_trained_with_data": list(self.model_versions)}


#: Tables whose rows name a twin by ``patient_key``: those deleted before its results
#: (they may reference them), and those after.
_BEFORE_RESULTS = ("training_use", "shadow_results", "labels")
_AFTER_RESULTS = ("instances", "consent_events", "holds", "retrieved_series", "pruned_files")


class Erasure(Retention):
    """Forgets twins; opened like the other index stores."""

    def erase(self, patient_key: str, *, patient_id: str = "") -> ErasureReport:
        """Remove everything of one twin (and of unidentified twins merged into it).

        Parameters
        ----------
        patient_key : str
            The twin (resolved by the caller from the Patient ID).
        patient_id : str
            Its Patient ID, to find its files in quarantine (never stored or logged).

        Raises
        ------
        PatientHeldError
            If the twin is under a legal hold.
        """
        hold = self.held(patient_key)
        if hold is not None:
            raise PatientHeldError(patient_key, hold["reason"])
        with self._lock, write(self.db) as conn:
            facts = _facts(conn, patient_key)
            files = _files(conn, facts["keys"])
            conn.executemany(
                "INSERT INTO pruned_files (kind, patient_key, study_uid, series_uid,"
                " sop_instance_uid, size, received_at, path, pruned_at, reason)"
                " VALUES ('erasure', ?, '', '', '', 0, '', ?, ?, 'erasure')",
                [(patient_key, path, iso(utc_now())) for path, _ in files])
            _delete_rows(conn, facts)
        self.finish_pending()
        self._remove_folders(facts["keys"])
        quarantined = _scrub_quarantine(self.data_dir, patient_id) if patient_id else 0
        with self._lock:
            if not checkpoint_truncate(self.db):
                LOG.warning("archive: the index's WAL could not be truncated after the erasure "
                            "(a reader kept it busy); it is at the next checkpoint")
        return ErasureReport(patient_key=patient_key, studies=len(facts["studies"]),
                             series=len(facts["series"]), files=len(files),
                             bytes=sum(size for _, size in files),
                             quarantined_files=quarantined,
                             model_versions=tuple(facts["versions"]),
                             series_uids=tuple(facts["series"]),
                             study_uids=tuple(facts["studies"]),
                             result_ids=tuple(facts["results"]))

    def _remove_folders(self, keys: list[str]) -> None:
        """The twin's folders, once their files are gone (empty folders named by its key)."""
        for key in keys:
            for folder in (self.data_dir / ARCHIVE_DIR / key[:2] / key,
                           self.data_dir / "results" / key, self.data_dir / "labels" / key):
                shutil.rmtree(folder, ignore_errors=True)


def _facts(conn: sqlite3.Connection, key: str) -> dict[str, Any]:
    """The twin's keys (with merged unidentified twins), studies, series and the model
    versions trained with its data."""
    keys = [key] + [r[0] for r in conn.execute(
        "SELECT patient_key FROM twins WHERE merged_into = ?", (key,))]
    marks = ",".join("?" * len(keys))
    studies = [r[0] for r in conn.execute(
        f"SELECT study_uid FROM studies WHERE patient_key IN ({marks})", keys)]  # noqa: S608
    series: list[str] = []
    for study in studies:
        series.extend(r[0] for r in conn.execute(
            "SELECT series_uid FROM series WHERE study_uid = ?", (study,)))
    versions = [r[0] for r in conn.execute(
        f"SELECT DISTINCT model_version FROM training_use WHERE patient_key IN ({marks})"  # noqa: S608
        " ORDER BY model_version", keys)]
    results = [r[0] for r in conn.execute(
        f"SELECT id FROM ai_results WHERE patient_key IN ({marks})", keys)]  # noqa: S608
    return {"keys": keys, "studies": studies, "series": series, "versions": versions,
            "results": results}


def _files(conn: sqlite3.Connection, keys: list[str]) -> list[tuple[str, int]]:
    """``(path, size)`` of every file of the twins: instances (all versions), result
    objects, labels, shadow result objects."""
    marks = ",".join("?" * len(keys))
    out = [(r[0], int(r[1] or 0)) for r in conn.execute(
        f"SELECT path, size FROM instances WHERE patient_key IN ({marks})", keys)]  # noqa: S608
    out += [(r[0], int(r[1] or 0)) for r in conn.execute(
        "SELECT o.path, o.size FROM ai_result_objects o JOIN ai_results r ON r.id = o.result_id"
        f" WHERE r.patient_key IN ({marks})", keys)]  # noqa: S608
    out += [(r[0], int(r[1] or 0)) for r in conn.execute(
        f"SELECT path, size FROM labels WHERE patient_key IN ({marks})", keys)]  # noqa: S608
    for (objects,) in conn.execute(
            f"SELECT objects FROM shadow_results WHERE patient_key IN ({marks})", keys):  # noqa: S608
        out += [(o["path"], 0) for o in json.loads(objects)]
    out += [(r[0], int(r[1] or 0)) for r in conn.execute(
        f"SELECT path, size FROM pruned_files WHERE patient_key IN ({marks})"  # noqa: S608
        " AND file_removed = 0", keys)]
    return out


def _delete_rows(conn: sqlite3.Connection, facts: dict[str, Any]) -> None:
    """Every index row naming the twins, in the open transaction (children first)."""
    keys = facts["keys"]
    marks = ",".join("?" * len(keys))
    for uid in facts["series"]:
        conn.execute("DELETE FROM series_figures WHERE job_key LIKE ? ESCAPE '\\'",
                     (uid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "@%",))
    for table in _BEFORE_RESULTS:
        conn.execute(f"DELETE FROM {table} WHERE patient_key IN ({marks})", keys)  # noqa: S608
    conn.execute("DELETE FROM ai_result_objects WHERE result_id IN (SELECT id FROM ai_results"
                 f" WHERE patient_key IN ({marks}))", keys)  # noqa: S608
    conn.execute(f"UPDATE ai_results SET superseded_by = NULL WHERE patient_key IN ({marks})", keys)  # noqa: S608
    conn.execute(f"DELETE FROM ai_results WHERE patient_key IN ({marks})", keys)  # noqa: S608
    for table in _AFTER_RESULTS:
        conn.execute(f"DELETE FROM {table} WHERE patient_key IN ({marks})"  # noqa: S608
                     + (" AND kind <> 'erasure'" if table == "pruned_files" else ""), keys)
    for study in facts["studies"]:
        conn.execute("DELETE FROM series WHERE study_uid = ?", (study,))
    conn.execute(f"DELETE FROM studies WHERE patient_key IN ({marks})", keys)  # noqa: S608
    conn.execute(f"DELETE FROM twin_merges WHERE target_key IN ({marks})"  # noqa: S608
                 f" OR source_key IN ({marks})", keys + keys)
    conn.execute(f"DELETE FROM twins WHERE patient_key IN ({marks})", keys)  # noqa: S608


def _scrub_quarantine(data_dir: Path, patient_id: str) -> int:
    """Remove the quarantined files of the patient (by their Patient ID); how many.

    A file that does not parse as DICOM is removed when its bytes hold the Patient ID.
    """
    root = data_dir / QUARANTINE_DIR
    if not root.is_dir():
        return 0
    needle = patient_id.encode("utf-8", "surrogateescape")
    removed = 0
    for path in [p for p in root.rglob("*") if p.is_file()]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            match = str(ds.get("PatientID", "")).strip() == patient_id
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
            match = needle in path.read_bytes()
        if match:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
