"""What the node learns from live traffic, kept in the archive index.

* :class:`ShadowStore` - results of a candidate model run in *shadow* on a live
  series (``dicom-node models shadow``): its DICOM objects are written durably under
  ``<data_dir>/results/<patient key>/<study uid>/shadow/<kind>-<uid>.dcm`` and indexed
  in ``shadow_results`` - never in ``ai_results``, so a shadow result is never queued
  for sending and never supersedes the served result - with its agreement with the
  active version's result on the same series (Dice per label, volumes).
* :class:`FigureStore` - a few figures of every served series (input and output),
  keyed by scanner (Manufacturer, Manufacturer's Model Name, Station Name), without
  patient data; and which scanners were already named as drifted (named once).

Tables: migration 4 of :mod:`twin_archive.schema`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from twin_archive.results import ResultStore
from twin_archive.schema import IndexStore, fetch_dicts

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True, order=True)
class Scanner:
    """A scanner as the series name it: Manufacturer, Model Name, Station Name."""

    manufacturer: str = ""
    model_name: str = ""
    station: str = ""

    def __str__(self) -> str:
        parts = [p for p in (self.manufacturer, self.model_name, self.station) if p]
        return " / ".join(parts) or "unnamed scanner"


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelAgreement:
    """How a shadow result agrees with the served one on one label.

    Parameters
    ----------
    name : str
    dice : float
        Dice between the two masks (1.0 when both are empty).
    active_ml, shadow_ml : float
        Segment volumes, mL.
    """

    name: str
    dice: float
    active_ml: float
    shadow_ml: float

    @property
    def volume_diff_ml(self) -> float:
        """Shadow minus active volume, mL."""
        return self.shadow_ml - self.active_ml


@dataclass(frozen=True, kw_only=True, slots=True)
class ShadowResult:
    """One stored shadow result."""

    id: int
    job_key: str
    source_series_uid: str
    task: str
    shadow_version: str
    active_version: str
    active_result_id: int | None
    scanner: Scanner
    created_at: str
    agreement: tuple[LabelAgreement, ...]
    min_dice: float
    objects: tuple[dict[str, str], ...]


class ShadowStore(ResultStore):
    """Records shadow results (files durably, then one index transaction)."""

    REQUIRED_TABLE = "shadow_results"

    def record_shadow(self, *, job_key: str, patient_key: str, study_uid: str,
                      source_series_uid: str, task: str, shadow_version: str,
                      active_version: str, active_result_id: int | None, scanner: Scanner,
                      agreement: Sequence[LabelAgreement],
                      objects: Sequence[tuple[str, Dataset]]) -> ShadowResult:
        """Store a shadow result's objects and index them with its agreement.

        Recording the same job and version again returns the stored one.

        Raises
        ------
        ValueError
            An object of an unknown kind or with an invalid UID; no agreement.
        OSError
            If a file cannot be written (the index is then left untouched).
        """
        if not agreement:
            raise ValueError("agreement must name at least one label")
        done = self._shadow_rows("job_key = ? AND shadow_version = ?", (job_key, shadow_version))
        if done:
            return done[0]
        # a folder of their own: never mistaken for served objects
        rows, created = self._store_files(
            self.data_dir / "results" / patient_key / study_uid / "shadow", objects)
        agree = [{"name": a.name, "dice": a.dice, "active_ml": a.active_ml,
                  "shadow_ml": a.shadow_ml} for a in agreement]
        objs = [{"kind": r[0], "sop_instance_uid": r[2], "series_uid": r[3], "path": r[5]}
                for r in rows]
        try:
            self._insert_shadow(job_key, patient_key, study_uid, source_series_uid, task,
                                shadow_version, active_version, active_result_id, scanner,
                                agree, min(a.dice for a in agreement), objs)
        except BaseException:
            self._discard(created)  # recorded whole or not at all: no file without its row
            raise
        return self._shadow_rows("job_key = ? AND shadow_version = ?", (job_key, shadow_version))[0]

    def _insert_shadow(self, job_key: str, patient_key: str, study_uid: str,
                       source_series_uid: str, task: str, shadow_version: str,
                       active_version: str, active_result_id: int | None, scanner: Scanner,
                       agree: list[dict[str, Any]], min_dice: float,
                       objs: list[dict[str, Any]]) -> None:
        with self._lock, write(self.db) as conn:
            conn.execute(
                "INSERT INTO shadow_results (job_key, patient_key, study_uid, source_series_uid,"
                " task, shadow_version, active_version, active_result_id, manufacturer,"
                " model_name, station, created_at, agreement, min_dice, objects)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_key, patient_key, study_uid, source_series_uid, task, shadow_version,
                 active_version, active_result_id, scanner.manufacturer, scanner.model_name,
                 scanner.station, iso(utc_now()), json.dumps(agree), min_dice, json.dumps(objs)))

    def _shadow_rows(self, where: str, params: tuple[Any, ...]) -> list[ShadowResult]:
        with self._lock:
            rows = fetch_dicts(self.db, f"SELECT * FROM shadow_results WHERE {where} ORDER BY id",
                               params)
        return [ShadowResult(
            id=r["id"], job_key=r["job_key"], source_series_uid=r["source_series_uid"],
            task=r["task"], shadow_version=r["shadow_version"],
            active_version=r["active_version"], active_result_id=r["active_result_id"],
            scanner=Scanner(manufacturer=r["manufacturer"], model_name=r["model_name"],
                            station=r["station"]),
            created_at=r["created_at"],
            agreement=tuple(LabelAgreement(**a) for a in json.loads(r["agreement"])),
            min_dice=float(r["min_dice"]), objects=tuple(json.loads(r["objects"])))
            for r in rows]

    def for_version(self, version: str) -> list[ShadowResult]:
        """The shadow results of one model version, oldest first."""
        return self._shadow_rows("shadow_version = ?", (version,))


@dataclass(frozen=True, kw_only=True, slots=True)
class FigureRow:
    """The figures of one served series (no patient data)."""

    id: int
    task: str
    scanner: Scanner
    model_version: str
    recorded_at: str
    figures: Mapping[str, float]
    histogram: tuple[float, ...]


class FigureStore(IndexStore):
    """Figures of served series by scanner, and the scanners named as drifted."""

    REQUIRED_TABLE = "series_figures"

    def record(self, *, job_key: str, task: str, scanner: Scanner, model_version: str,
               figures: Mapping[str, float], histogram: Sequence[float]) -> None:
        """Record one series' figures (once per job key)."""
        with self._lock, write(self.db) as conn:
            conn.execute(
                "INSERT OR IGNORE INTO series_figures (job_key, task, manufacturer, model_name,"
                " station, model_version, recorded_at, figures, histogram)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (job_key, task, scanner.manufacturer, scanner.model_name, scanner.station,
                 model_version, iso(utc_now()), json.dumps(dict(figures), sort_keys=True),
                 json.dumps([float(v) for v in histogram])))

    def scanners(self, task: str | None = None) -> list[tuple[str, Scanner]]:
        """(task, scanner) pairs with figures."""
        sql = "SELECT DISTINCT task, manufacturer, model_name, station FROM series_figures"
        params: tuple[Any, ...] = ()
        if task:
            sql += " WHERE task = ?"
            params = (task,)
        with self._lock:
            rows = fetch_dicts(self.db, sql + " ORDER BY 1, 2, 3, 4", params)
        return [(r["task"], Scanner(manufacturer=r["manufacturer"], model_name=r["model_name"],
                                    station=r["station"])) for r in rows]

    def rows(self, task: str, scanner: Scanner) -> list[FigureRow]:
        """The figures of one scanner and task, oldest first."""
        with self._lock:
            rows = fetch_dicts(
                self.db, "SELECT * FROM series_figures WHERE task = ? AND manufacturer = ?"
                " AND model_name = ? AND station = ? ORDER BY id",
                (task, scanner.manufacturer, scanner.model_name, scanner.station))
        return [FigureRow(id=r["id"], task=r["task"], scanner=scanner,
                          model_version=r["model_version"], recorded_at=r["recorded_at"],
                          figures=json.loads(r["figures"]),
                          histogram=tuple(json.loads(r["histogram"]))) for r in rows]

    def name_once(self, task: str, scanner: Scanner, detail: str) -> bool:
        """Remember that ``scanner`` was named as drifted; ``False`` if it already was."""
        with self._lock, write(self.db) as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO drift_named (task, manufacturer, model_name, station,"
                " named_at, detail) VALUES (?,?,?,?,?,?)",
                (task, scanner.manufacturer, scanner.model_name, scanner.station, iso(utc_now()),
                 detail))
            return cur.rowcount == 1

    def named(self, task: str, scanner: Scanner) -> str | None:
        """When ``scanner`` was named as drifted for ``task`` (ISO time), if it was."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT named_at FROM drift_named WHERE task = ? AND"
                               " manufacturer = ? AND model_name = ? AND station = ?",
                               (task, scanner.manufacturer, scanner.model_name, scanner.station))
        return rows[0]["named_at"] if rows else None
