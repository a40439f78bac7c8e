"""The twin read model and consent: what the archive knows about each patient.

A twin is a patient's archive: studies, series and instances (filed by the ingest
path, :mod:`twin_archive.ingest`), AI results, labels, the model versions trained
with its data, its donation decisions (consent, DESIGN decision 6) and its merges (an
unidentified twin attached to a patient's, issue 13). Consent and merges are written
here, each in one transaction; the caller records the audit event.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from twin_archive.errors import TwinNotFoundError
from twin_archive.labels import twin_labels
from twin_archive.records import (
    ConsentEvent,
    SeriesRecord,
    StudyRecord,
    TwinDetail,
    TwinMerge,
    TwinSummary,
)
from twin_archive.results import twin_results
from twin_archive.schema import fetch_dicts
from twin_archive.text import printable
from twin_archive.training_use import twin_model_versions

LOG = logging.getLogger(__name__)

# A twin with its counts; a WHERE clause follows.
_SUMMARY_SQL = (
    "SELECT t.*, (SELECT COUNT(*) FROM studies s WHERE s.patient_key = t.patient_key) AS n_studies,"
    " (SELECT COUNT(*) FROM series se JOIN studies s ON se.study_uid = s.study_uid"
    "   WHERE s.patient_key = t.patient_key) AS n_series,"
    " (SELECT COUNT(*) FROM instances i WHERE i.patient_key = t.patient_key AND i.current = 1) AS n_instances,"
    " (SELECT MAX(received_at) FROM instances i WHERE i.patient_key = t.patient_key) AS last"
    " FROM twins t"
)


class Twins:
    """Reads twins, their studies and series; records consent and twin merges.

    Opened by :class:`twin_archive.Archive`, whose index connection and lock it shares
    with the ingest path (:class:`twin_archive.ingest.Ingest`).

    Parameters
    ----------
    db : sqlite_utils.Database
        The archive index (migrated).
    lock : threading.Lock
        Serialises use of ``db`` (shared with the other users of the connection).
    data_dir : pathlib.Path
        Root of the archive (the files of instances, results and labels).
    """

    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock, *,
                 data_dir: Path) -> None:
        self.db = db
        self.data_dir = data_dir
        self._lock = lock

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return fetch_dicts(self.db, sql, params)

    def list_twins(self) -> list[TwinSummary]:
        """All twins, most recently updated first."""
        rows = self._rows(_SUMMARY_SQL + " WHERE t.merged_into IS NULL ORDER BY t.updated_at DESC")
        return [_summary(r) for r in rows]

    def find_twin_keys(self, patient_id: str, issuer: str | None = None) -> list[str]:
        """Patient keys of the twins with this Patient ID (one per issuer).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        sql = "SELECT patient_key FROM twins WHERE patient_id = ? AND patient_id <> ''"
        params: tuple[Any, ...] = (patient_id,)
        if issuer is not None:
            sql += " AND issuer_of_patient_id = ?"
            params += (issuer,)
        keys = [r["patient_key"] for r in self._rows(sql, params)]
        if not keys and issuer is None:  # a twin key (how unidentified twins are named)
            keys = [r["patient_key"] for r in self._rows(
                "SELECT patient_key FROM twins WHERE patient_key = ?", (patient_id.lower(),))]
        if not keys:
            raise TwinNotFoundError(patient_id)
        return keys

    def twin(self, patient_id: str, issuer: str | None = None) -> TwinDetail:
        """Everything known about one patient (the first issuer if several match).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        key = self.find_twin_keys(patient_id, issuer)[0]
        summary = _summary(self._rows(_SUMMARY_SQL + " WHERE t.patient_key = ?", (key,))[0])
        studies = self._studies(key)
        history = self._consent_history(key)
        with self._lock:
            results = twin_results(self.db, self.data_dir, key)
            labels = twin_labels(self.db, self.data_dir, key)
            trained = twin_model_versions(self.db, key)
        return TwinDetail(twin=summary, studies=studies, consent_history=history,
                          results=results, labels=labels, trained_model_versions=trained,
                          merges=self._merges(key))

    def _studies(self, key: str) -> tuple[StudyRecord, ...]:
        """A twin's studies, oldest first, each with its series."""
        return tuple(
            StudyRecord(
                study_uid=st["study_uid"], study_date=st["study_date"] or "",
                study_time=st["study_time"] or "", description=st["description"] or "",
                accession_number=st["accession_number"] or "", series=self._series(st["study_uid"]),
            )
            for st in self._rows(
                "SELECT * FROM studies WHERE patient_key = ? ORDER BY study_date, study_time", (key,)
            )
        )

    def _series(self, study_uid: str) -> tuple[SeriesRecord, ...]:
        """A study's series in series-number order, with their instance counts."""
        return tuple(
            SeriesRecord(
                series_uid=se["series_uid"], modality=se["modality"] or "",
                body_part=se["body_part"] or "", description=se["description"] or "",
                series_number=se["series_number"] or "", manufacturer=se["manufacturer"] or "",
                model_name=se["model_name"] or "",
                frame_of_reference_uid=se["frame_of_reference_uid"] or "",
                instances=se["n"], first_received=se["first_received"],
                last_received=se["last_received"], nonconformant_uids=se["n_flagged"],
                missing=se["n_missing"],
            )
            for se in self._rows(
                "SELECT se.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
                " AND i.current = 1) AS n, (SELECT COUNT(*) FROM instances i WHERE"
                " i.series_uid = se.series_uid AND i.current = 1 AND i.uid_flags <> '') AS n_flagged,"
                " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
                " AND i.current = 1 AND i.missing_at IS NOT NULL) AS n_missing"
                " FROM series se WHERE se.study_uid = ?"
                " ORDER BY CAST(se.series_number AS INTEGER), se.first_received",
                (study_uid,),
            )
        )

    def _consent_history(self, key: str) -> tuple[ConsentEvent, ...]:
        """A twin's donation decisions, oldest first."""
        return tuple(
            ConsentEvent(at=r["at"], donate=bool(r["donate"]), previous=bool(r["previous"]),
                         by=r["by"] or "", reason=r["reason"] or "")
            for r in self._rows(
                "SELECT * FROM consent_events WHERE patient_key = ? ORDER BY id", (key,)
            )
        )

    def _merges(self, key: str) -> tuple[TwinMerge, ...]:
        """The merges a twin took part in (as source or target), oldest first."""
        return tuple(
            TwinMerge(source_key=r["source_key"], target_key=r["target_key"], at=r["at"],
                      by=r["by"], reason=r["reason"], studies=r["studies"])
            for r in self._rows("SELECT * FROM twin_merges WHERE target_key = ? OR source_key = ?"
                                " ORDER BY id", (key, key)))

    def merge_twins(self, source: str, target: str, *, by: str, reason: str,
                    at: str | None = None) -> TwinMerge:
        """Attach an unidentified twin to a patient's twin, in one transaction.

        Its studies, series, instances, AI results, labels and training records move to
        ``target``; the files stay where they are (paths are not identity). The source
        twin is kept, marked ``merged_into``, so that instances of the same study that
        arrive later without a Patient ID go to ``target`` too. The caller records the
        audit event (:meth:`twin_archive.audit.AuditLog.record`, ``twin-merged``).

        Parameters
        ----------
        source : str
            The unidentified twin, by its key (``twin list`` shows it).
        target : str
            The patient's twin, by Patient ID or key.
        by : str
            Who decides (required).
        reason : str
            Why (required): e.g. the order or the PACS reconciliation it follows.
        at : str, optional
            Time of the decision (ISO 8601, UTC); now by default (``rebuild-index``
            gives the recorded one).

        Raises
        ------
        TwinNotFoundError
            If either twin is unknown.
        ValueError
            Naming ``by``/``reason`` when empty, ``source`` when it is not an
            unidentified twin or already merged, ``target`` when it is unidentified or
            ambiguous, or the same twin.
        """
        src, dst = self._merge_keys(source, target, by=by, reason=reason)
        at = at or iso(utc_now())
        with self._lock, write(self.db) as conn:
            _check_mergeable(conn, src, dst)
            studies = _move_twin(conn, src, dst, at=at, by=by, reason=reason)
        LOG.info("twin %s (unidentified, %d study(ies)) attached to twin %s by %s", src, studies,
                 dst, printable(by))
        return TwinMerge(source_key=src, target_key=dst, at=at, by=by, reason=reason,
                         studies=studies)

    def _merge_keys(self, source: str, target: str, *, by: str, reason: str) -> tuple[str, str]:
        """The keys of the two twins of a merge, once its arguments are checked.

        Raises
        ------
        TwinNotFoundError
            If either twin is unknown.
        ValueError
            Naming ``by``/``reason`` when empty, ``target`` when ambiguous, or the
            same twin.
        """
        if not by.strip():
            raise ValueError("by: the person attaching the twin must be named")
        if not reason.strip():
            raise ValueError("reason: say why the twin is attached to that patient")
        [src] = self.find_twin_keys(source)[:1]
        dst_keys = self.find_twin_keys(target)
        if len(dst_keys) > 1:
            raise ValueError(f"target: {len(dst_keys)} twins share Patient ID {printable(target)!r}"
                             " under different issuers; give the twin key")
        dst = dst_keys[0]
        if src == dst:
            raise ValueError("target: the source and the target are the same twin")
        return src, dst

    def set_consent(
        self, patient_id: str, *, donate: bool, by: str, reason: str = "",
        issuer: str | None = None, at: str | None = None,
    ) -> ConsentEvent:
        """Record a donation decision and its audit entry in one transaction.

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        ValueError
            If ``by`` is empty.
        """
        if not by.strip():
            raise ValueError("by: the person recording the consent decision must be named")
        keys = self.find_twin_keys(patient_id, issuer)
        if len(keys) > 1:
            raise ValueError(
                f"patient_id: {len(keys)} twins share Patient ID {patient_id!r} under different "
                "issuers; name the issuer"
            )
        at = at or iso(utc_now())  # given when replayed from the audit log (rebuild-index)
        with self._lock, write(self.db) as conn:
            previous = bool(conn.execute(
                "SELECT donate FROM twins WHERE patient_key = ?", (keys[0],)
            ).fetchone()[0])
            conn.execute(
                "UPDATE twins SET donate = ?, updated_at = ? WHERE patient_key = ?",
                (int(donate), at, keys[0]),
            )
            conn.execute(
                "INSERT INTO consent_events (patient_key, at, donate, previous, by, reason)"
                " VALUES (?,?,?,?,?,?)",
                (keys[0], at, int(donate), int(previous), by, reason),
            )
        LOG.info("consent: twin %s donation %s -> %s (by %s)", keys[0],
                 "on" if previous else "off", "on" if donate else "off", by)
        return ConsentEvent(at=at, donate=donate, previous=previous, by=by, reason=reason)

    def series_files(self, series_uid: str) -> list[Path]:
        """Absolute paths of the current instances of a series."""
        return [
            self.data_dir / r["path"]
            for r in self._rows(
                "SELECT path FROM instances WHERE series_uid = ? AND current = 1 ORDER BY id",
                (series_uid,),
            )
        ]

    def series_digest(self, series_uid: str) -> tuple[str, int]:
        """SHA-256 over the sorted SHA-256s of a series' current instances, and their number
        (the identity of the series' content, for dataset manifests)."""
        rows = self._rows("SELECT sha256 FROM instances WHERE series_uid = ? AND current = 1"
                          " ORDER BY sha256", (series_uid,))
        text = "\n".join(r["sha256"] for r in rows)
        return hashlib.sha256(text.encode()).hexdigest(), len(rows)

    def instance_count(self) -> int:
        """Number of instance rows (all versions)."""
        return int(self._rows("SELECT COUNT(*) AS n FROM instances")[0]["n"])


def _summary(r: dict[str, Any]) -> TwinSummary:
    """A twin's summary from a row of :data:`_SUMMARY_SQL`."""
    return TwinSummary(
        patient_key=r["patient_key"], patient_id=r["patient_id"],
        issuer_of_patient_id=r["issuer_of_patient_id"] or "",
        patient_name=r["patient_name"] or "", donate=bool(r["donate"]),
        studies=r["n_studies"], series=r["n_series"], instances=r["n_instances"],
        last_received=r["last"] or "", unidentified=bool(r["unidentified"]),
        merged_into=r["merged_into"] or "",
    )


def _check_mergeable(conn: sqlite3.Connection, src: str, dst: str) -> None:
    """Check, in the merge's transaction, that ``src`` is an unmerged unidentified twin
    and ``dst`` an identified patient's (raises ValueError naming the one that is not)."""
    s_row = conn.execute("SELECT unidentified, merged_into FROM twins WHERE patient_key = ?",
                         (src,)).fetchone()
    d_row = conn.execute("SELECT unidentified, merged_into FROM twins WHERE patient_key = ?",
                         (dst,)).fetchone()
    if not s_row[0]:
        raise ValueError("source: only an unidentified twin (no Patient ID) can be "
                         "attached to a patient; correct identified patients in the PACS")
    if s_row[1]:
        raise ValueError(f"source: already merged into twin {s_row[1]}")
    if d_row[0] or d_row[1]:
        raise ValueError("target: must be an identified patient's twin")


def _move_twin(conn: sqlite3.Connection, src: str, dst: str, *, at: str, by: str,
               reason: str) -> int:
    """Move a twin's rows to another and record the merge, in the open transaction;
    return how many studies moved."""
    studies = int(conn.execute("SELECT COUNT(*) FROM studies WHERE patient_key = ?",
                               (src,)).fetchone()[0])
    for table in ("studies", "instances", "ai_results", "labels", "training_use"):
        conn.execute(f"UPDATE {table} SET patient_key = ? WHERE patient_key = ?",  # noqa: S608
                     (dst, src))
    conn.execute("UPDATE twins SET merged_into = ?, updated_at = ? WHERE patient_key = ?",
                 (dst, at, src))
    conn.execute("UPDATE twins SET updated_at = ? WHERE patient_key = ?", (at, dst))
    conn.execute("INSERT INTO twin_merges (source_key, target_key, at, by, reason, studies)"
                 " VALUES (?,?,?,?,?,?)", (src, dst, at, by, reason, studies))
    return studies
