"""A twin's measurements over time, the prior of a result, and the series retrieved as priors.

The history of a twin is, per task and segment, the volume each current (not
superseded) AI result measured, in the order of the studies' dates: study date,
volume (mL), model version, result. The *prior* of a new result is the patient's most
recent current result of the same task from an earlier study (by Study Date, then
Study Time; a study without a date is never a prior of a dated one).

Series that the node retrieved from a PACS as priors are recorded here
(``retrieved_series``, migration 10): their results serve the comparison and are
not sent unless the site asks for it. This store knows nothing of the network; the
shell does the retrieving and tells it what arrived.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from twin_archive.results import AIResult, _build
from twin_archive.schema import IndexStore, fetch_dicts

LOG = logging.getLogger(__name__)


def study_day(study_date: str) -> dt.date | None:
    """A DICOM DA (``YYYYMMDD``, or ``YYYY-MM-DD``) as a date; None when empty or invalid."""
    text = (study_date or "").strip().replace("-", "").replace(".", "")
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class HistoryPoint:
    """One measurement of one segment at one time point of a twin.

    ``study_date`` is ISO (``2025-12-03``) or '' when the study has none;
    ``retrieved`` is true when the source series came from a PACS as a prior.
    """

    task: str
    segment: str
    volume_ml: float
    study_uid: str
    study_date: str
    result_id: int
    model_version: str
    source_series_uid: str
    retrieved: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``twin history --json``)."""
        return {"task": self.task, "segment": self.segment, "volume_ml": self.volume_ml,
                "study_uid": self.study_uid, "study_date": self.study_date,
                "result_id": self.result_id, "model_version": self.model_version,
                "source_series_uid": self.source_series_uid, "retrieved": self.retrieved}


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorRecord:
    """The result a new one is compared with, and its study's date (None: undated)."""

    result: AIResult
    study_date: dt.date | None


_CURRENT = ("SELECT r.*, s.study_date AS s_date, s.study_time AS s_time,"
            " (SELECT 1 FROM retrieved_series x WHERE x.series_uid = r.source_series_uid)"
            " AS retrieved FROM ai_results r LEFT JOIN studies s ON s.study_uid = r.study_uid"
            " WHERE r.patient_key = ? AND r.superseded_by IS NULL")


class HistoryStore(IndexStore):
    """Reads a twin's measurements over time and records retrieved priors.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (migrated: open an :class:`~twin_archive.Archive` first).
    """

    REQUIRED_TABLE = "retrieved_series"

    def _current(self, patient_key: str, task: str | None) -> list[dict[str, Any]]:
        sql, params = _CURRENT, [patient_key]
        if task:
            sql += " AND r.task = ?"
            params.append(task)
        sql += " ORDER BY COALESCE(s.study_date, ''), COALESCE(s.study_time, ''), r.id"
        with self._lock:
            return fetch_dicts(self.db, sql, tuple(params))

    def history(self, patient_key: str, task: str | None = None) -> tuple[HistoryPoint, ...]:
        """Every segment volume of the twin's current results, oldest study first."""
        out = []
        for r in self._current(patient_key, task):
            day = study_day(r["s_date"] or "")
            for seg in json.loads(r["segments"]):
                out.append(HistoryPoint(
                    task=r["task"], segment=seg["name"], volume_ml=float(seg["volume_ml"]),
                    study_uid=r["study_uid"], study_date=day.isoformat() if day else "",
                    result_id=int(r["id"]), model_version=r["model_version"],
                    source_series_uid=r["source_series_uid"], retrieved=bool(r["retrieved"])))
        return tuple(out)

    def prior_result(self, patient_key: str, task: str, study_uid: str) -> PriorRecord | None:
        """The most recent current result of ``task`` from a study of the twin dated
        before ``study_uid`` (by Study Date, then Study Time); None when there is none
        or the study itself has no date."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT study_date, study_time FROM studies WHERE"
                               " study_uid = ?", (study_uid,))
        if not rows or study_day(rows[0]["study_date"] or "") is None:
            return None
        today = (study_day(rows[0]["study_date"]), rows[0]["study_time"] or "")
        best: dict[str, Any] | None = None
        for r in self._current(patient_key, task):
            day = study_day(r["s_date"] or "")
            if r["study_uid"] == study_uid or day is None or (day, r["s_time"] or "") >= today:
                continue
            best = r  # ordered oldest first: the last one before today wins
        if best is None:
            return None
        with self._lock:
            return PriorRecord(result=_build(self.data_dir, self.db, best),
                               study_date=study_day(best["s_date"] or ""))

    def studies_within(self, patient_key: str, study_uid: str, since: dt.date) -> list[str]:
        """The twin's other studies dated from ``since`` up to ``study_uid``'s date
        (the priors it already has in that window)."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT study_uid, study_date FROM studies WHERE"
                               " patient_key = ?", (patient_key,))
        dates = {r["study_uid"]: study_day(r["study_date"] or "") for r in rows}
        today = dates.get(study_uid)
        return [uid for uid, day in dates.items() if uid != study_uid and day is not None
                and day >= since and (today is None or day <= today)]

    def study_uids(self, patient_key: str) -> set[str]:
        """Every Study Instance UID the twin holds."""
        with self._lock:
            return {r[0] for r in self.db.execute(
                "SELECT study_uid FROM studies WHERE patient_key = ?", (patient_key,))}

    def mark_retrieved(self, series_uids: Sequence[str], *, source: str,
                       for_study_uid: str) -> int:
        """Record series as retrieved from ``source`` (a PACS's AE title) as priors of
        ``for_study_uid``, in one transaction; series the index does not hold are
        skipped. Returns how many were recorded."""
        now = iso(utc_now())
        n = 0
        with self._lock, write(self.db) as conn:
            for uid in series_uids:
                row = conn.execute("SELECT se.study_uid, st.patient_key FROM series se JOIN"
                                   " studies st ON st.study_uid = se.study_uid WHERE"
                                   " se.series_uid = ?", (uid,)).fetchone()
                if row is None:
                    continue
                n += conn.execute(
                    "INSERT OR IGNORE INTO retrieved_series (series_uid, study_uid, patient_key,"
                    " source, retrieved_at, for_study_uid) VALUES (?,?,?,?,?,?)",
                    (uid, row[0], row[1], source, now, for_study_uid)).rowcount
        return n

    def expect_retrieved(self, *, series_uid: str, study_uid: str, patient_key: str, source: str,
                         for_study_uid: str) -> None:
        """Record a series as retrieved *before* it is asked for, so that whatever of it
        arrives (all, or part of it when the PACS stops halfway) counts as a prior and
        its result is never sent unless asked."""
        with self._lock, write(self.db) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO retrieved_series (series_uid, study_uid, patient_key,"
                " source, retrieved_at, for_study_uid) VALUES (?,?,?,?,?,?)",
                (series_uid, study_uid, patient_key, source, iso(utc_now()), for_study_uid))

    def retrieved_for(self, study_uid: str) -> list[str]:
        """The series retrieved (or asked for) as priors of ``study_uid``, oldest study
        first."""
        with self._lock:
            return [r[0] for r in self.db.execute(
                "SELECT x.series_uid FROM retrieved_series x LEFT JOIN studies s ON"
                " s.study_uid = x.study_uid WHERE x.for_study_uid = ?"
                " ORDER BY COALESCE(s.study_date, ''), COALESCE(s.study_time, ''), x.series_uid",
                (study_uid,))]

    def is_retrieved(self, series_uid: str) -> bool:
        """Whether ``series_uid`` came from a PACS as a prior."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM retrieved_series WHERE series_uid = ?",
                                   (series_uid,)).fetchone() is not None

    def series_arrival(self, series_uid: str) -> tuple[str, str, int, int] | None:
        """(study UID, last received, current instances, their bytes) of a series the
        index holds; None when it holds none of it."""
        with self._lock:
            row = self.db.execute(
                "SELECT se.study_uid, se.last_received, COUNT(i.id), COALESCE(SUM(i.size), 0)"
                " FROM series se LEFT JOIN instances i ON i.series_uid = se.series_uid"
                " AND i.current = 1 WHERE se.series_uid = ? GROUP BY se.series_uid",
                (series_uid,)).fetchone()
        return None if row is None else (row[0], row[1] or "", int(row[2]), int(row[3]))
