"""Modality Performed Procedure Step: what scanners say they did, kept in ``queue.sqlite``.

A scanner announces a procedure step with an N-CREATE (status ``IN PROGRESS``) and ends
it with an N-SET (``COMPLETED`` or ``DISCONTINUED``) whose Performed Series Sequence
lists every series and, in each, every instance it made (Referenced Image Sequence and
Referenced Non-Image Composite SOP Instance Sequence; PS3.4 Annex F.7). This module
reads those messages (:func:`read_create`, :func:`read_set`: anything malformed or out of
order is refused with the PS3.7 status that names it, :class:`MppsRefused`) and keeps the
steps (:class:`MppsSteps`, tables ``mpps_steps``, ``mpps_series``, ``mpps_instances``).
The stability monitor asks it for COMPLETED steps whose series it may decide at once
(DESIGN decision 3: the scanner's word first). With ``forward_mpps`` set, each accepted
message is queued for the PACS in the same transaction (``mpps_forwards``;
:mod:`dicom_node.queue.mpps_forward` sends them).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import sqlite_utils
from pydicom.dataset import Dataset

from dicom_node.wire import statuses
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.errors import DicomNodeError

LOG = logging.getLogger(__name__)

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
#: Performed Procedure Step Status (0040,0252) values (PS3.3 C.4.14).
STEP_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
#: Where a performed series lists its instances (PS3.3 Table C.4-15).
INSTANCE_SEQUENCES = ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence")


class MppsRefused(DicomNodeError, ValueError):
    """An N-CREATE or N-SET the node refuses, with the status to answer and why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True, kw_only=True, slots=True)
class PerformedSeries:
    """One item of a Performed Series Sequence: a series and the instances it lists."""

    series_uid: str
    instances: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StepMessage:
    """What an N-CREATE or N-SET says about a step.

    Attributes
    ----------
    status : str
        The Performed Procedure Step Status it sets ('' when an N-SET leaves it).
    series : tuple of PerformedSeries or None
        Its Performed Series Sequence (None when the message does not carry one).
    station : str
        Performed Station Name or AE Title ('' when absent).
    study_uid : str
        The Study Instance UID of its first Scheduled Step Attributes item ('' when absent).
    """

    status: str
    series: tuple[PerformedSeries, ...] | None
    station: str = ""
    study_uid: str = ""

    def listed(self) -> int:
        """Instances listed over all series."""
        return sum(len(s.instances) for s in self.series or ())


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletedStep:
    """A COMPLETED step not yet resolved (its instances: :meth:`MppsSteps.listing`)."""

    step_uid: str
    calling_ae: str
    completed_at: str  # ISO 8601 UTC: when the N-SET made it COMPLETED
    series_uids: tuple[str, ...]  # the series it lists instances of


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _status(ds: Dataset, *, required: bool) -> str:
    if "PerformedProcedureStepStatus" not in ds:
        if required:
            raise MppsRefused(statuses.MISSING_ATTRIBUTE,
                              "no Performed Procedure Step Status (0040,0252)")
        return ""
    status = _text(ds, "PerformedProcedureStepStatus").upper()
    if status not in STEP_STATUSES:
        raise MppsRefused(statuses.INVALID_ATTRIBUTE_VALUE,
                          f"Performed Procedure Step Status {status[:20]!r} is not one of "
                          + ", ".join(STEP_STATUSES))
    return status


def _series(ds: Dataset) -> tuple[PerformedSeries, ...] | None:
    if "PerformedSeriesSequence" not in ds:
        return None
    out = []
    for n, item in enumerate(ds.PerformedSeriesSequence or (), start=1):
        uid = _text(item, "SeriesInstanceUID")
        if not uid:
            raise MppsRefused(statuses.MISSING_ATTRIBUTE_VALUE,
                              f"Performed Series Sequence item {n} has no Series Instance UID")
        instances = []
        for keyword in INSTANCE_SEQUENCES:
            for ref in item.get(keyword) or ():
                sop = _text(ref, "ReferencedSOPInstanceUID")
                if not sop:
                    raise MppsRefused(statuses.MISSING_ATTRIBUTE_VALUE,
                                      f"series {uid[:64]}: an item of {keyword} has no "
                                      "Referenced SOP Instance UID")
                instances.append(sop)
        out.append(PerformedSeries(series_uid=uid, instances=tuple(dict.fromkeys(instances))))
    return tuple(out)


def _station(ds: Dataset) -> str:
    return _text(ds, "PerformedStationName") or _text(ds, "PerformedStationAETitle")


def read_create(ds: Dataset) -> StepMessage:
    """The N-CREATE attribute list of a step (PS3.4 F.7.2.1).

    Raises
    ------
    MppsRefused
        Without a Performed Procedure Step Status (0120), with one other than
        ``IN PROGRESS`` (0106), or with a malformed Performed Series Sequence (0121).
    """
    status = _status(ds, required=True)
    if status != IN_PROGRESS:
        raise MppsRefused(statuses.INVALID_ATTRIBUTE_VALUE,
                          f"an N-CREATE must be IN PROGRESS, not {status}")
    scheduled = ds.get("ScheduledStepAttributesSequence") or ()
    study = _text(scheduled[0], "StudyInstanceUID") if scheduled else ""
    return StepMessage(status=status, series=_series(ds), station=_station(ds), study_uid=study)


def read_set(ds: Dataset) -> StepMessage:
    """The N-SET modification list of a step (PS3.4 F.7.2.2).

    Raises
    ------
    MppsRefused
        With a status value not of PS3.3 (0106), or a malformed Performed Series
        Sequence (0121).
    """
    return StepMessage(status=_status(ds, required=False), series=_series(ds),
                       station=_station(ds))


class MppsSteps:
    """The MPPS steps of ``queue.sqlite``, read and written through one connection.

    Parameters
    ----------
    db : sqlite_utils.Database
        The queue database (:func:`dicom_node.queue.jobs.connect_queue`), migrated. The
        caller serialises use of it.
    forward_to : str, optional
        ``AET@HOST:PORT`` of the destination every accepted message is queued for
        (``forward_mpps``); '' forwards nothing.
    """

    def __init__(self, db: sqlite_utils.Database, *, forward_to: str = "") -> None:
        self.db = db
        self.forward_to = forward_to

    def create(self, step_uid: str, message: StepMessage, *, calling_ae: str,
               raw: bytes = b"") -> None:
        """Keep a new step (IN PROGRESS), and queue its N-CREATE for the PACS.

        Raises
        ------
        MppsRefused
            If the step exists (0111).
        """
        now = iso(utc_now())
        with write(self.db) as conn:
            if conn.execute("SELECT 1 FROM mpps_steps WHERE step_uid = ?", (step_uid,)).fetchone():
                raise MppsRefused(statuses.DUPLICATE_SOP_INSTANCE,
                                  f"step {step_uid} exists already")
            conn.execute(
                "INSERT INTO mpps_steps (step_uid, status, calling_ae, station, study_uid,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                (step_uid, message.status, calling_ae, message.station, message.study_uid, now, now))
            self._keep_series(conn, step_uid, message.series)
            self._queue_forward(conn, step_uid, "create", raw, now)

    def update(self, step_uid: str, message: StepMessage, *, raw: bytes = b"") -> str:
        """Apply an N-SET; return the step's status after it.

        Raises
        ------
        MppsRefused
            If no such step was created here (0112), the step is already COMPLETED or
            DISCONTINUED (0110: it may no longer be updated), or it would become
            COMPLETED without any Performed Series Sequence (0121).
        """
        now = iso(utc_now())
        with write(self.db) as conn:
            row = conn.execute("SELECT status FROM mpps_steps WHERE step_uid = ?",
                               (step_uid,)).fetchone()
            if row is None:
                raise MppsRefused(statuses.NO_SUCH_SOP_INSTANCE,
                                  f"no step {step_uid} was created here (N-CREATE first)")
            if row[0] != IN_PROGRESS:
                raise MppsRefused(statuses.PROCESSING_FAILURE,
                                  f"step {step_uid} is {row[0]}: it may no longer be updated")
            status = message.status or row[0]
            if message.series is not None:
                self._keep_series(conn, step_uid, message.series)
            if status == COMPLETED and not conn.execute(
                    "SELECT 1 FROM mpps_series WHERE step_uid = ?", (step_uid,)).fetchone():
                raise MppsRefused(statuses.MISSING_ATTRIBUTE_VALUE,
                                  "COMPLETED without a Performed Series Sequence item")
            conn.execute("UPDATE mpps_steps SET status = ?, updated_at = ?,"
                         " resolved = CASE WHEN ? = ? THEN 'discontinued' ELSE resolved END"
                         " WHERE step_uid = ?", (status, now, status, DISCONTINUED, step_uid))
            if message.station:
                conn.execute("UPDATE mpps_steps SET station = ? WHERE step_uid = ?",
                             (message.station, step_uid))
            self._queue_forward(conn, step_uid, "set", raw, now)
        return status

    @staticmethod
    def _keep_series(conn: sqlite3.Connection, step_uid: str,
                     series: Sequence[PerformedSeries] | None) -> None:
        """Replace what the step lists (an N-SET's sequence replaces the whole value)."""
        if series is None:
            return
        conn.execute("DELETE FROM mpps_instances WHERE step_uid = ?", (step_uid,))
        conn.execute("DELETE FROM mpps_series WHERE step_uid = ?", (step_uid,))
        for s in series:
            conn.execute("INSERT OR REPLACE INTO mpps_series (step_uid, series_uid, listed)"
                         " VALUES (?,?,?)", (step_uid, s.series_uid, len(s.instances)))
            conn.executemany("INSERT OR IGNORE INTO mpps_instances (step_uid, series_uid,"
                             " sop_instance_uid) VALUES (?,?,?)",
                             [(step_uid, s.series_uid, sop) for sop in s.instances])

    def _queue_forward(self, conn: sqlite3.Connection, step_uid: str, kind: str, raw: bytes,
                       now: str) -> None:
        if not self.forward_to or not raw:
            return
        conn.execute("INSERT INTO mpps_forwards (step_uid, kind, dataset, destination, state,"
                     " next_attempt_at) VALUES (?,?,?,?,'queued',?)",
                     (step_uid, kind, raw, self.forward_to, now))

    # ------------------------------------------------------------ the monitor's questions
    def completed_open(self, series_uid: str = "") -> list[CompletedStep]:
        """COMPLETED steps not yet resolved (those listing ``series_uid``, if given),
        oldest first. Cheap: their instances are read by :meth:`listing`."""
        rows = self.db.conn.execute(
            "SELECT p.step_uid, p.calling_ae, p.updated_at, group_concat(s.series_uid, ' ')"
            " FROM mpps_steps p LEFT JOIN mpps_series s ON s.step_uid = p.step_uid"
            " AND s.listed > 0 WHERE p.status = ? AND p.resolved = '' AND (? = '' OR"
            " p.step_uid IN (SELECT step_uid FROM mpps_series WHERE series_uid = ?))"
            " GROUP BY p.step_uid ORDER BY p.updated_at",
            (COMPLETED, series_uid, series_uid)).fetchall()
        return [CompletedStep(step_uid=uid, calling_ae=ae, completed_at=at,
                              series_uids=tuple((uids or "").split()))
                for uid, ae, at, uids in rows]

    def listing(self, step_uid: str) -> tuple[PerformedSeries, ...]:
        """The series a step lists instances of, with those instances."""
        rows = self.db.conn.execute(
            "SELECT series_uid, sop_instance_uid FROM mpps_instances WHERE step_uid = ?"
            " ORDER BY series_uid, rowid", (step_uid,)).fetchall()
        by_series: dict[str, list[str]] = {}
        for series_uid, sop in rows:
            by_series.setdefault(series_uid, []).append(sop)
        return tuple(PerformedSeries(series_uid=k, instances=tuple(v)) for k, v in by_series.items())

    def resolve(self, step_uid: str, how: str) -> None:
        """Mark a step resolved: ``complete`` (its series decided at once) or ``fallback``."""
        with write(self.db) as conn:
            conn.execute("UPDATE mpps_steps SET resolved = ? WHERE step_uid = ?", (how, step_uid))

    def counts(self) -> dict[str, int]:
        """Steps by status and resolution (``COMPLETED/complete``, ``IN PROGRESS/``...)."""
        return {f"{status}/{resolved}": n for status, resolved, n in self.db.conn.execute(
            "SELECT status, resolved, COUNT(*) FROM mpps_steps GROUP BY status, resolved")}
