"""When the instances of each series arrived: the series gone quiet.

DICOM has no end-of-study message (DESIGN decision 3): a series is complete when no
instance of it has arrived for a quiet period. The index keeps, per series, when its
last instance arrived (``series.last_received``, ISO 8601 UTC text that sorts as time
does); this store answers which series have been quiet since a given moment, for the
node's stability monitor to decide on (the monitor keeps its own decisions).
"""

from __future__ import annotations

from dataclasses import dataclass

from twin_archive.schema import IndexStore


@dataclass(frozen=True, kw_only=True, slots=True)
class QuietSeries:
    """A series and when its last instance arrived.

    Attributes
    ----------
    series_uid, study_uid : str
        The series and its study.
    patient_key : str
        The twin the study belongs to.
    modality : str
        The series' Modality ('' when the instances had none).
    last_received : str
        When its last instance arrived (ISO 8601, UTC).
    """

    series_uid: str
    study_uid: str
    patient_key: str
    modality: str
    last_received: str


@dataclass(frozen=True, kw_only=True, slots=True)
class GrowingSeries:
    """A series still receiving (not yet quiet), with what it has so far.

    Attributes
    ----------
    series : QuietSeries
        The series and when its last instance arrived.
    instances : int
        Its current instances.
    calling_ae : str
        The calling AE title its last instance came from ('' when not known).
    description : str
        Its Series Description ('' when none).
    """

    series: QuietSeries
    instances: int
    calling_ae: str
    description: str


_SERIES_COLUMNS = ("se.series_uid, se.study_uid, st.patient_key, se.modality, se.last_received"
                   " FROM series se JOIN studies st ON st.study_uid = se.study_uid")


_GROWING_SQL = (
    "SELECT se.series_uid, se.study_uid, st.patient_key, se.modality, se.last_received,"
    " se.description, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
    " AND i.current = 1), (SELECT i.calling_ae FROM instances i WHERE"
    " i.series_uid = se.series_uid ORDER BY i.id DESC LIMIT 1)"
    " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
    " WHERE se.last_received > ? ORDER BY se.last_received")


def _quiet_row(row: tuple[str, str, str, str | None, str]) -> QuietSeries:
    uid, study, key, modality, last = row
    return QuietSeries(series_uid=uid, study_uid=study, patient_key=key,
                       modality=modality or "", last_received=last)


class Arrivals(IndexStore):
    """Reads when series arrived; its own connection to the archive index.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (the index must exist and be migrated: open an
        :class:`~twin_archive.Archive` on it first).

    Raises
    ------
    RuntimeError
        If the index lacks the ``series`` table (not migrated).
    """

    REQUIRED_TABLE = "series"

    def quiet(self, until: str, *, since: str | None = None) -> list[QuietSeries]:
        """The series whose last instance arrived at or before ``until`` (and at or after
        ``since``, if given).

        Parameters
        ----------
        until, since : str
            ISO 8601 UTC times in the index's form (microseconds, ``+00:00``).

        Returns
        -------
        list of QuietSeries
            Oldest arrival first.
        """
        where, args = ("se.last_received <= ?", (until,)) if since is None else (
            "se.last_received BETWEEN ? AND ?", (since, until))
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_SERIES_COLUMNS} WHERE {where} ORDER BY se.last_received",
                args).fetchall()
        return [_quiet_row(r) for r in rows]

    def of(self, series_uids: list[str]) -> list[QuietSeries]:
        """The series of ``series_uids`` that are in the archive (any order)."""
        out: list[QuietSeries] = []
        for i in range(0, len(series_uids), 500):
            part = series_uids[i:i + 500]
            with self._lock:
                rows = self.db.execute(
                    f"SELECT {_SERIES_COLUMNS} WHERE se.series_uid IN"
                    f" ({','.join('?' * len(part))})", part).fetchall()
            out.extend(_quiet_row(r) for r in rows)
        return out

    def growing(self, since: str) -> list[GrowingSeries]:
        """The series whose last instance arrived after ``since`` (ISO 8601 UTC), with their
        current instances counted; oldest arrival first."""
        with self._lock:
            rows = self.db.execute(_GROWING_SQL, (since,)).fetchall()
        return [GrowingSeries(series=_quiet_row(r[:5]), description=r[5] or "",
                              instances=int(r[6]), calling_ae=(r[7] or "").strip())
                for r in rows]

    def archived(self, sop_instance_uids: list[str]) -> set[str]:
        """Those of ``sop_instance_uids`` that are current instances of the archive."""
        found: set[str] = set()
        for i in range(0, len(sop_instance_uids), 500):
            part = sop_instance_uids[i:i + 500]
            with self._lock:
                found.update(r[0] for r in self.db.execute(
                    "SELECT sop_instance_uid FROM instances WHERE current = 1 AND"
                    f" sop_instance_uid IN ({','.join('?' * len(part))})", part))
        return found
