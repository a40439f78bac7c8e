"""Learned completeness: a series complete when it reaches the size its scanner makes.

Scanners without MPPS still make series of a size that can be known (DESIGN decision 3):
a protocol makes the same number of images each time, and some headers say the size
(Images in Acquisition, 0020,1002). Per scanner (the calling AE title and the Station
Name) and protocol (Series Description, frames per instance, Number of Temporal
Positions), the size of each decided series is kept (table ``series_sizes``); once the
last ``learn_from_series`` of them had the same size, the next series that reaches it is
complete after ``early_guard_s`` without an instance, not ``stable_after``. Without a
learned size, Images in Acquisition (in instances: divided by the frames per instance)
serves as the size.

A series completed early that then receives an instance is re-opened (the monitor
decides it again and the new result supersedes the old); re-opens are counted per
scanner (``scanner_completeness``), and a scanner re-opened ``early_reopen_limit``
times completes by the quiet period from then on.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
from pydicom.dataset import Dataset

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.faults import is_disk_full
from dicom_node.queue.jobs import open_queue_readonly

LOG = logging.getLogger(__name__)

#: How a series' completion was decided (``monitored_series.completed_by``).
BY_QUIET, BY_MPPS, BY_LEARNED, BY_DECLARED = "quiet", "mpps", "learned", "declared"
COMPLETED_BY = (BY_QUIET, BY_MPPS, BY_LEARNED, BY_DECLARED)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = int(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesShape:
    """What one instance's header says about its series' size.

    Attributes
    ----------
    scanner : str
        ``AE/station``: the calling AE title (from the stored file's meta) and Station Name.
    protocol : str
        Series Description, with ``frames=N`` and ``temporal=T`` when the header has them.
    declared : int or None
        Instances the header declares (Images in Acquisition / frames per instance).
    """

    scanner: str
    protocol: str
    declared: int | None = None


def shape_of(header: Dataset) -> SeriesShape:
    """The :class:`SeriesShape` of the series of a stored instance's header."""
    meta = getattr(header, "file_meta", None)
    ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip() if meta else ""
    station = str(header.get("StationName", "") or "").strip()
    frames = _int(header, "NumberOfFrames") or 1
    temporal = _int(header, "NumberOfTemporalPositions")
    protocol = str(header.get("SeriesDescription", "") or "").strip()
    if frames > 1:
        protocol += f" frames={frames}"
    if temporal:
        protocol += f" temporal={temporal}"
    images = _int(header, "ImagesInAcquisition")
    declared = -(-images // frames) if images else None
    return SeriesShape(scanner=f"{ae}/{station}", protocol=protocol, declared=declared)


@dataclass(frozen=True, kw_only=True, slots=True)
class Expected:
    """The size a series is expected to reach, and where that came from."""

    instances: int
    by: str  # BY_LEARNED or BY_DECLARED
    why: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannerCompleteness:
    """One scanner's early completions and how many were re-opened."""

    scanner: str
    early: int
    reopened: int
    early_start: bool  # False once it re-opened early_reopen_limit times


class Completeness:
    """The learned sizes and re-open counts of ``queue.sqlite``.

    Parameters
    ----------
    db : sqlite_utils.Database
        The queue database (migrated); the caller serialises its use.
    learn_from : int
        Series of one scanner and protocol that must agree before their size is used (0: never).
    reopen_limit : int
        Re-opens after which a scanner completes by the quiet period only.
    """

    def __init__(self, db: sqlite_utils.Database, *, learn_from: int, reopen_limit: int) -> None:
        if learn_from < 0:
            raise ValueError(f"learn_from must be >= 0, got {learn_from}")
        if reopen_limit < 1:
            raise ValueError(f"reopen_limit must be >= 1, got {reopen_limit}")
        self.db = db
        self.learn_from = learn_from
        self.reopen_limit = reopen_limit

    def early_start(self, scanner: str) -> bool:
        """Whether ``scanner`` may still complete series early (by size)."""
        row = self.db.conn.execute("SELECT reopened FROM scanner_completeness WHERE scanner = ?",
                                   (scanner,)).fetchone()
        return row is None or row[0] < self.reopen_limit

    def expected(self, shape: SeriesShape, series_uid: str) -> Expected | None:
        """The size ``series_uid`` of ``shape`` is expected to reach, or None (quiet period)."""
        if not self.early_start(shape.scanner):
            return None
        if self.learn_from:
            sizes = [r[0] for r in self.db.conn.execute(
                "SELECT instances FROM series_sizes WHERE scanner = ? AND protocol = ? AND"
                " series_uid != ? ORDER BY decided_at DESC LIMIT ?",
                (shape.scanner, shape.protocol, series_uid, self.learn_from))]
            if len(sizes) == self.learn_from and len(set(sizes)) == 1:
                return Expected(instances=sizes[0], by=BY_LEARNED,
                                why=f"its last {self.learn_from} series of {shape.protocol or '?'} "
                                    f"from {shape.scanner} had {sizes[0]} instance(s)")
        if shape.declared:
            return Expected(instances=shape.declared, by=BY_DECLARED,
                            why=f"Images in Acquisition says {shape.declared} instance(s)")
        return None

    def record(self, conn: sqlite3.Connection, series_uid: str, shape: SeriesShape,
               instances: int, at: str) -> None:
        """Keep a decided series' size (inside the monitor's transaction)."""
        conn.execute(
            "INSERT INTO series_sizes (series_uid, scanner, protocol, instances, decided_at)"
            " VALUES (?,?,?,?,?) ON CONFLICT(series_uid) DO UPDATE SET scanner=excluded.scanner,"
            " protocol=excluded.protocol, instances=excluded.instances,"
            " decided_at=excluded.decided_at", (series_uid, shape.scanner, shape.protocol,
                                                instances, at))

    def counted(self, conn: sqlite3.Connection, scanner: str, *, early: bool,
                reopened: bool) -> None:
        """Count an early completion and/or a re-open for ``scanner`` (inside a transaction);
        the re-open that reaches the limit is logged."""
        if not early and not reopened:
            return
        conn.execute(
            "INSERT INTO scanner_completeness (scanner, early, reopened, last_reopened_at)"
            " VALUES (?,?,?,?) ON CONFLICT(scanner) DO UPDATE SET early = early + excluded.early,"
            " reopened = reopened + excluded.reopened,"
            " last_reopened_at = COALESCE(excluded.last_reopened_at, last_reopened_at)",
            (scanner, int(early), int(reopened), iso(utc_now()) if reopened else None))
        if reopened:
            n = conn.execute("SELECT reopened FROM scanner_completeness WHERE scanner = ?",
                             (scanner,)).fetchone()[0]
            conn.execute("UPDATE scanner_completeness SET early_start = ? WHERE scanner = ?",
                         (int(n < self.reopen_limit), scanner))
            if n == self.reopen_limit:
                LOG.warning("scanner %s: %d series completed early were re-opened by later "
                            "instances (early_reopen_limit = %d): its series complete by the "
                            "quiet period from now on (MPPS COMPLETED still counts)", scanner, n,
                            self.reopen_limit)


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletenessCounts:
    """How series were completed, and per scanner the early completions and re-opens."""

    by: dict[str, int]
    scanners: tuple[ScannerCompleteness, ...]


def read_completeness(data_dir: Path | str) -> CompletenessCounts:
    """The completeness figures of ``<data_dir>/queue.sqlite``, read only (``status``,
    ``/metrics``); empty before the queue has them, and on a full disk (SQLite cannot
    make its shared-memory file; ``status`` says the disk is full). A scanner's early
    start is as the running node's ``early_reopen_limit`` last judged it."""
    try:
        return _read_completeness(data_dir)
    except (OSError, sqlite3.Error) as exc:
        if not is_disk_full(exc, data_dir):
            raise
        LOG.debug("completeness figures unreadable on a full disk: %s", exc)
        return CompletenessCounts(by={}, scanners=())


def _read_completeness(data_dir: Path | str) -> CompletenessCounts:
    conn = open_queue_readonly(data_dir)
    if conn is None:
        return CompletenessCounts(by={}, scanners=())
    with contextlib.closing(conn):
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "scanner_completeness" not in tables:
            return CompletenessCounts(by={}, scanners=())
        by = dict(conn.execute("SELECT completed_by, COUNT(*) FROM monitored_series"
                               " WHERE decision = 'queued' GROUP BY completed_by"))
        scanners = tuple(
            ScannerCompleteness(scanner=s, early=e, reopened=r, early_start=bool(on))
            for s, e, r, on in conn.execute("SELECT scanner, early, reopened, early_start FROM"
                                            " scanner_completeness ORDER BY scanner"))
    return CompletenessCounts(by=by, scanners=scanners)
