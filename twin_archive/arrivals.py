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
                "SELECT se.series_uid, se.study_uid, st.patient_key, se.modality,"
                " se.last_received FROM series se JOIN studies st ON st.study_uid = se.study_uid"
                f" WHERE {where} ORDER BY se.last_received", args).fetchall()
        return [QuietSeries(series_uid=uid, study_uid=study, patient_key=key,
                            modality=modality or "", last_received=last)
                for uid, study, key, modality, last in rows]
