"""Retention by consent: which files have served their purpose, and their removal.

DESIGN decision 12: the archive keeps what has a purpose. A series' source images have
served theirs once the series is *settled*: every job of the series as it now stands is
done and every send of its results is settled (delivered, refused and given up, or
held). Settling is the job queue's knowledge, so the shell works it out and passes it
in (:class:`SettledSeries`); this module knows the twins, their consent and holds.

The rules (:class:`RetentionPolicy`), per settled series of a patient:

* held patient (``twin hold``): nothing is removed;
* donor: the source images stay while the patient donates;
* non-donor: the source images go ``retention_days`` after the series settled (the
  longest of its tasks' overrides); after a revoke, not before ``revoke_grace_days``
  have passed since the revoke. The radiologist's labels of the series (the label file
  and the SEG it came in) go with them;
* results (SEG, SR, RTSTRUCT, overlay files) go ``result_retention_days`` after the series
  settled; ``None`` keeps them (the default). The result's row (volumes, model) stays.

Under disk pressure (:meth:`Retention.plan` with ``pressure=True``) the days of
``retention_days`` are waived: the settled source images of non-donors may go at once,
oldest first; donors, held patients, the revoke grace and unsettled series still
stand.

Removal is crash-safe (:meth:`Retention.prune`): in one transaction each file's row
moves to ``pruned_files`` (UIDs, size, dates, why) with ``file_removed = 0``, then the
files are unlinked and their folders fsynced, then the rows are marked removed. A crash
in between leaves rows whose files may still be there; :func:`finish_pending` (run at
start-up) removes them, and reconciliation never re-indexes them
(:meth:`twin_archive.ingest.Ingest.indexed_paths` names them).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.durable import fsync_dir
from twin_archive.errors import ArchiveError
from twin_archive.schema import IndexStore, fetch_dicts

LOG = logging.getLogger(__name__)

#: Series removed per transaction (each with its files), so that a large prune commits
#: progress as it goes and holds the index's write lock briefly.
BATCH_FILES = 2000


class PatientHeldError(ArchiveError, PermissionError):
    """The patient is under a legal hold: nothing of theirs may be removed."""

    def __init__(self, patient_key: str, reason: str) -> None:
        self.patient_key = patient_key
        super().__init__(f"twin {patient_key} is under a legal hold ({reason}); "
                         "release it first: dicom-node twin release PATIENT --by NAME --reason TEXT")


def _days(name: str, value: float | None, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number of days >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionPolicy:
    """How long what has served its purpose is kept, in days.

    Parameters
    ----------
    retention_days : float
        Source images of non-donors, counted from the moment their series settled.
    result_retention_days : float or None
        Results (SEG, SR, RTSTRUCT, overlay files); ``None`` keeps them.
    revoke_grace_days : float
        After a donor revokes, the images stay at least this long from the revoke.
    task_retention_days, task_result_retention_days : mapping of str to float
        Per-task overrides; a series served by several tasks keeps the longest.

    Raises
    ------
    ValueError
        If a number of days is negative or not a number.
    """

    retention_days: float
    result_retention_days: float | None = None
    revoke_grace_days: float = 30.0
    task_retention_days: Mapping[str, float] = field(default_factory=dict)
    task_result_retention_days: Mapping[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _days("retention_days", self.retention_days)
        _days("result_retention_days", self.result_retention_days, optional=True)
        _days("revoke_grace_days", self.revoke_grace_days)
        for task, days in self.task_retention_days.items():
            _days(f"tasks.{task}.retention_days", days)
        for task, result_days in self.task_result_retention_days.items():
            _days(f"tasks.{task}.result_retention_days", result_days, optional=True)

    def source_days(self, tasks: Iterable[str]) -> float:
        """Days the source images of a series served by ``tasks`` are kept."""
        overrides = [self.task_retention_days[t] for t in tasks if t in self.task_retention_days]
        return max(overrides) if overrides else self.retention_days

    def result_days(self, task: str) -> float | None:
        """Days the results of ``task`` are kept (``None``: kept)."""
        if task in self.task_result_retention_days:
            return self.task_result_retention_days[task]
        return self.result_retention_days


@dataclass(frozen=True, kw_only=True, slots=True)
class SettledSeries:
    """A series whose purpose is served, as the job and send queues tell it.

    ``last_received`` is the state of the series that settled: a later instance
    re-opens it (its ``last_received`` moves on) and it is no longer settled.
    """

    series_uid: str
    last_received: str
    settled_at: str  # ISO 8601 UTC
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneItem:
    """The files of one series (or of its results) that retention allows to remove."""

    kind: str  # "source" (images and their labels) or "results"
    patient_key: str
    study_uid: str
    series_uid: str
    last_received: str
    eligible_at: str
    files: int
    bytes: int
    reason: str
    donor: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``archive prune --json``)."""
        return {"kind": self.kind, "patient_key": self.patient_key, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "eligible_at": self.eligible_at,
                "files": self.files, "bytes": self.bytes, "reason": self.reason}


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneReport:
    """What a prune removed."""

    series: int
    files: int
    bytes: int
    patients: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # series re-opened since the plan (not removed)

    def to_dict(self) -> dict[str, Any]:
        return {"series": self.series, "files": self.files, "bytes": self.bytes,
                "patients": len(self.patients), "skipped_reopened": len(self.skipped)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """Bytes of the archive by kind (``status``, ``/metrics``)."""

    donors: int
    non_donors: int
    held: int
    results: int
    labels: int
    pruned_files: int
    pruned_bytes: int
    received_last_7d: int

    def to_dict(self) -> dict[str, int]:
        return {"source_donors": self.donors, "source_non_donors": self.non_donors,
                "source_held": self.held, "results": self.results, "labels": self.labels,
                "pruned_files": self.pruned_files, "pruned_bytes": self.pruned_bytes,
                "received_last_7d": self.received_last_7d}


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _after(start: str, days: float) -> str:
    return iso(_parse(start) + timedelta(days=days))


# Settled series joined with their twin; the temporary table ``settled`` is filled first.
_SETTLED_SQL = (
    "SELECT s.series_uid, s.settled_at, s.tasks, se.study_uid, se.last_received,"
    " st.patient_key, t.donate,"
    " (SELECT MAX(c.at) FROM consent_events c WHERE c.patient_key = st.patient_key"
    "   AND c.donate = 0 AND c.previous = 1) AS revoked_at,"
    " (SELECT COUNT(*) FROM instances i WHERE i.series_uid = s.series_uid) AS n,"
    " (SELECT COALESCE(SUM(i.size), 0) FROM instances i WHERE i.series_uid = s.series_uid) AS b,"
    " (SELECT COUNT(*) FROM labels l WHERE l.series_uid = s.series_uid) AS n_labels"
    " FROM temp.settled s JOIN series se ON se.series_uid = s.series_uid"
    "   AND se.last_received = s.last_received"
    " JOIN studies st ON st.study_uid = se.study_uid"
    " JOIN twins t ON t.patient_key = st.patient_key"
    " WHERE NOT EXISTS (SELECT 1 FROM holds h WHERE h.patient_key = st.patient_key)"
)
_RESULTS_SQL = (
    "SELECT r.task, COUNT(o.id) AS n, COALESCE(SUM(o.size), 0) AS b FROM ai_results r"
    " JOIN ai_result_objects o ON o.result_id = r.id WHERE r.source_series_uid = ?"
    " GROUP BY r.task"
)


class Retention(IndexStore):
    """Plans and carries out the removals retention allows; legal holds.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (open an :class:`~twin_archive.Archive` on it
        first: it migrates the index).
    """

    REQUIRED_TABLE = "pruned_files"

    # ------------------------------------------------------------------ plan
    def plan(self, policy: RetentionPolicy, settled: Sequence[SettledSeries], *,
             now: datetime | None = None, pressure: bool = False) -> list[PruneItem]:
        """What retention allows to remove now, oldest first.

        Parameters
        ----------
        policy : RetentionPolicy
        settled : sequence of SettledSeries
            The series whose jobs and sends are settled (from the queues).
        now : datetime, optional
            The time to judge by (default: now, UTC).
        pressure : bool
            Disk above its high water mark: ``retention_days`` is waived for settled
            non-donor source images (see the module docstring).
        """
        stamp = iso(now or utc_now())
        with self._lock:
            rows = self._settled_rows(settled)
            items: list[PruneItem] = []
            for r in rows:
                items.extend(self._items_of(r, policy, stamp, pressure))
        items.sort(key=lambda i: (i.eligible_at, i.series_uid, i.kind))
        return items

    def _settled_rows(self, settled: Sequence[SettledSeries]) -> list[dict[str, Any]]:
        conn = self.db.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS settled (series_uid TEXT PRIMARY KEY,"
                     " last_received TEXT, settled_at TEXT, tasks TEXT)")
        conn.execute("DELETE FROM temp.settled")
        conn.executemany("INSERT OR REPLACE INTO temp.settled VALUES (?,?,?,?)",
                         [(s.series_uid, s.last_received, s.settled_at, "\n".join(s.tasks))
                          for s in settled])
        try:
            return fetch_dicts(self.db, _SETTLED_SQL, ())
        finally:
            conn.execute("DELETE FROM temp.settled")

    def _items_of(self, r: dict[str, Any], policy: RetentionPolicy, now: str,
                  pressure: bool) -> list[PruneItem]:
        tasks = tuple(t for t in (r["tasks"] or "").split("\n") if t)
        base = {"patient_key": r["patient_key"], "study_uid": r["study_uid"],
                "series_uid": r["series_uid"], "last_received": r["last_received"],
                "donor": bool(r["donate"])}
        out: list[PruneItem] = []
        if r["n"] and not r["donate"]:
            days = 0.0 if pressure else policy.source_days(tasks)
            eligible = _after(r["settled_at"], days)
            why = (f"retention: non-donor, settled {r['settled_at'][:19]}Z, "
                   + ("disk above high water" if pressure else f"kept {days:g} day(s)"))
            if r["revoked_at"]:
                grace_end = _after(r["revoked_at"], policy.revoke_grace_days)
                eligible = max(eligible, grace_end)
                why += f", donation revoked {r['revoked_at'][:10]} (+{policy.revoke_grace_days:g} d grace)"
            if eligible <= now:
                out.append(PruneItem(kind="source", eligible_at=eligible, files=r["n"],
                                     bytes=r["b"], reason=why, **base))
        for task, n, size in self.db.conn.execute(_RESULTS_SQL, (r["series_uid"],)):
            days_r = policy.result_days(task)
            if days_r is None or not n:
                continue
            eligible = _after(r["settled_at"], days_r)
            if eligible <= now:
                out.append(PruneItem(kind="results", eligible_at=eligible, files=n, bytes=size,
                                     reason=f"result retention: {task} results kept {days_r:g} day(s)",
                                     **base))
        return out

    # ------------------------------------------------------------------ prune
    def prune(self, items: Sequence[PruneItem], *, stop_when: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None) -> PruneReport:
        """Remove the files of ``items``, crash-safely, a batch of series at a time.

        A series that received an instance since the plan (its ``last_received``
        moved on) is skipped: it is no longer settled. ``stop_when`` is asked between
        batches (disk back below its low water mark); ``progress(done, total)`` is
        called after each batch with the files removed so far.
        """
        done_files = done_bytes = series = 0
        patients: set[str] = set()
        skipped: list[str] = []
        total = sum(i.files for i in items)
        for batch in _batches(items, BATCH_FILES):
            if stop_when is not None and stop_when():
                break
            moved, reopened = self._move_rows(batch)
            skipped.extend(reopened)
            self._remove_files(moved)
            done_files += len(moved)
            done_bytes += sum(m["size"] for m in moved)
            series += len({(i.series_uid, i.kind) for i in batch} - {(u, "source") for u in reopened})
            patients.update(i.patient_key for i in batch if i.series_uid not in reopened)
            if progress is not None:
                progress(done_files, total)
        return PruneReport(series=series, files=done_files, bytes=done_bytes,
                           patients=tuple(sorted(patients)), skipped=tuple(skipped))

    def _move_rows(self, batch: Sequence[PruneItem]) -> tuple[list[dict[str, Any]], list[str]]:
        """Move the rows of a batch to ``pruned_files`` in one transaction; return the
        moved rows and the series skipped because they were re-opened."""
        now = iso(utc_now())
        moved: list[dict[str, Any]] = []
        reopened: list[str] = []
        with self._lock, write(self.db) as conn:
            for item in batch:
                row = conn.execute("SELECT last_received FROM series WHERE series_uid = ?",
                                   (item.series_uid,)).fetchone()
                if row is None or row[0] != item.last_received:
                    reopened.append(item.series_uid)
                    continue
                if item.kind == "source":
                    moved.extend(_move_source(conn, item, now))
                else:
                    moved.extend(_move_results(conn, item, now))
        return moved, reopened

    def _remove_files(self, moved: Sequence[dict[str, Any]]) -> None:
        """Unlink the files of moved rows, fsync their folders, mark the rows removed."""
        folders: set[Path] = set()
        for m in moved:
            path = self.data_dir / m["path"]
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            folders.add(path.parent)
        for folder in folders:
            _fsync_and_tidy(folder, stop=self.data_dir)
        with self._lock, write(self.db) as conn:
            conn.executemany("UPDATE pruned_files SET file_removed = 1 WHERE id = ?",
                             [(m["id"],) for m in moved])
            # an erasure keeps no record of what it removed (twin_archive.erasure)
            conn.execute("DELETE FROM pruned_files WHERE kind = 'erasure' AND file_removed = 1")

    def finish_pending(self) -> int:
        """Finish removals a crash interrupted (start-up); return how many files."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT id, path, size FROM pruned_files"
                                        " WHERE file_removed = 0", ())
        if rows:
            self._remove_files(rows)
            LOG.warning("archive: finished the removal of %d file(s) that a stop interrupted",
                        len(rows))
        return len(rows)

    # ------------------------------------------------------------------ holds
    def hold(self, patient_key: str, *, by: str, reason: str) -> bool:
        """Put a twin under a legal hold; False when it already was."""
        _need("by", by, "the person placing the hold must be named")
        _need("reason", reason, "say why the hold is placed (e.g. the case or order)")
        with self._lock, write(self.db) as conn:
            cur = conn.execute("INSERT OR IGNORE INTO holds (patient_key, at, by, reason)"
                               " VALUES (?,?,?,?)", (patient_key, iso(utc_now()), by, reason))
        return cur.rowcount == 1

    def release(self, patient_key: str, *, by: str, reason: str) -> bool:
        """Lift a twin's legal hold; False when there was none."""
        _need("by", by, "the person releasing the hold must be named")
        _need("reason", reason, "say why the hold is released")
        with self._lock, write(self.db) as conn:
            cur = conn.execute("DELETE FROM holds WHERE patient_key = ?", (patient_key,))
        return cur.rowcount == 1

    def held(self, patient_key: str) -> dict[str, str] | None:
        """The hold on a twin (``at``, ``by``, ``reason``), or None."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT at, by, reason FROM holds WHERE patient_key = ?",
                               (patient_key,))
        return rows[0] if rows else None

    # ------------------------------------------------------------------ usage
    def usage(self, *, now: datetime | None = None) -> Usage:
        """Bytes by kind: source images of donors, non-donors and held twins, results,
        labels, what was pruned, and what arrived in the last 7 days."""
        since = iso((now or utc_now()) - timedelta(days=7))
        with self._lock:
            conn = self.db.conn
            # Non-donors' bytes are the rest: the total is a scan of a narrow covering
            # index, donors' and held twins' a range of instances_patient each (0.7 s at
            # 1,000,000 instances when every row was grouped by twin; 0.1 s so).
            by = {"donor": 0, "non": 0, "held": 0}
            total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM instances").fetchone()[0]
            for held, size in conn.execute(
                    "SELECT h.patient_key IS NOT NULL, (SELECT COALESCE(SUM(i.size), 0)"
                    " FROM instances i WHERE i.patient_key = t.patient_key) FROM twins t"
                    " LEFT JOIN holds h ON h.patient_key = t.patient_key"
                    " WHERE t.donate = 1 OR h.patient_key IS NOT NULL"):
                by["held" if held else "donor"] += int(size)
            by["non"] = int(total) - by["donor"] - by["held"]
            results = conn.execute("SELECT COALESCE(SUM(size), 0) FROM ai_result_objects").fetchone()[0]
            labels = conn.execute("SELECT COALESCE(SUM(size), 0) FROM labels").fetchone()[0]
            pf, pb = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM pruned_files"
                                  " WHERE kind <> 'erasure'").fetchone()
            recent = conn.execute("SELECT COALESCE(SUM(size), 0) FROM instances"
                                  " WHERE received_at >= ?", (since,)).fetchone()[0]
        return Usage(donors=by["donor"], non_donors=by["non"], held=by["held"],
                     results=int(results), labels=int(labels), pruned_files=int(pf),
                     pruned_bytes=int(pb), received_last_7d=int(recent))

    def pruned_by_series(self, patient_key: str) -> dict[str, dict[str, Any]]:
        """Per series of a twin: files and bytes pruned, and when last (``twin show``)."""
        with self._lock:
            rows = fetch_dicts(
                self.db, "SELECT series_uid, kind, COUNT(*) AS files, SUM(size) AS bytes,"
                " MAX(pruned_at) AS at, MAX(reason) AS reason FROM pruned_files"
                " WHERE patient_key = ? GROUP BY series_uid, kind", (patient_key,))
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            out.setdefault(r["series_uid"], {})[r["kind"]] = {
                "files": r["files"], "bytes": r["bytes"], "at": r["at"], "reason": r["reason"]}
        return out


def _need(name: str, value: str, why: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: {why}")


def _batches(items: Sequence[PruneItem], max_files: int) -> Iterable[list[PruneItem]]:
    batch: list[PruneItem] = []
    files = 0
    for item in items:
        batch.append(item)
        files += item.files
        if files >= max_files:
            yield batch
            batch, files = [], 0
    if batch:
        yield batch


_MOVE_INSTANCES = (
    "INSERT INTO pruned_files (kind, patient_key, study_uid, series_uid, sop_instance_uid,"
    " size, received_at, path, pruned_at, reason) SELECT 'instance', patient_key, study_uid,"
    " series_uid, sop_instance_uid, COALESCE(size, 0), COALESCE(received_at, ''), path, ?, ?"
    " FROM instances WHERE series_uid = ? RETURNING id, path, size"
)


def _move_source(conn: sqlite3.Connection, item: PruneItem, now: str) -> list[dict[str, Any]]:
    """The series' instances, its labels and the label SEGs' instances, moved to
    ``pruned_files`` (in the open transaction)."""
    moved = [dict(r) for r in conn.execute(_MOVE_INSTANCES, (now, item.reason, item.series_uid))]
    conn.execute("DELETE FROM instances WHERE series_uid = ?", (item.series_uid,))
    label_series = [r[0] for r in conn.execute(
        "SELECT DISTINCT seg_series_uid FROM labels WHERE series_uid = ? AND seg_series_uid <> ''",
        (item.series_uid,))]
    why = f"label of a pruned series ({item.reason})"
    for uid in label_series:
        moved.extend(dict(r) for r in conn.execute(_MOVE_INSTANCES, (now, why, uid)))
        conn.execute("DELETE FROM instances WHERE series_uid = ?", (uid,))
    moved.extend(dict(r) for r in conn.execute(
        "INSERT INTO pruned_files (kind, patient_key, study_uid, series_uid, sop_instance_uid,"
        " size, received_at, path, pruned_at, reason) SELECT 'label', patient_key, study_uid,"
        " series_uid, seg_sop_instance_uid, size, recorded_at, path, ?, ? FROM labels"
        " WHERE series_uid = ? RETURNING id, path, size", (now, why, item.series_uid)))
    conn.execute("DELETE FROM labels WHERE series_uid = ?", (item.series_uid,))
    return moved


def _move_results(conn: sqlite3.Connection, item: PruneItem, now: str) -> list[dict[str, Any]]:
    """The series' result objects moved to ``pruned_files`` (the result rows stay)."""
    ids = [r[0] for r in conn.execute("SELECT id FROM ai_results WHERE source_series_uid = ?",
                                      (item.series_uid,))]
    moved: list[dict[str, Any]] = []
    for rid in ids:
        moved.extend(dict(r) for r in conn.execute(
            "INSERT INTO pruned_files (kind, patient_key, study_uid, series_uid, sop_instance_uid,"
            " size, received_at, path, pruned_at, reason) SELECT 'result', r.patient_key,"
            " r.study_uid, o.series_uid, o.sop_instance_uid, o.size, r.created_at, o.path, ?, ?"
            " FROM ai_result_objects o JOIN ai_results r ON r.id = o.result_id"
            " WHERE o.result_id = ? RETURNING id, path, size", (now, item.reason, rid)))
        conn.execute("DELETE FROM ai_result_objects WHERE result_id = ?", (rid,))
    return moved


def _fsync_and_tidy(folder: Path, *, stop: Path) -> None:
    """Fsync a folder whose files were removed, and remove it when it is empty (only
    this folder: a parent may be about to receive a new series' folder)."""
    try:
        fsync_dir(folder)
    except FileNotFoundError:
        return
    if folder == stop or stop not in folder.parents:
        return
    try:
        os.rmdir(folder)
    except OSError:  # not empty, or gone
        return
    try:
        fsync_dir(folder.parent)
    except OSError:
        pass
