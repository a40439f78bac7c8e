"""Which model versions were trained with which series: the twin's side of a manifest.

The registry keeps each model version's dataset manifest; the twin keeps, per
patient, the rows that say "series S of this patient (label L, split train/val) was
used by model version V", so that ``twin show`` can list the model versions trained
with a patient's data without the archive knowing anything of the registry. Written
by the trainer in one transaction when a version is registered (table
``training_use``, migration 3 in :mod:`twin_archive.schema`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import connect, write
from twin_archive.layout import INDEX_NAME

SPLITS = ("train", "validation")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingUse:
    """One series used to train (or validate) one model version.

    Parameters
    ----------
    patient_key, study_uid, series_uid : str
    label_id : int or None
        The label version used (``None`` when the series was used without a label).
    split : str
        ``train`` or ``validation``.
    """

    patient_key: str
    study_uid: str
    series_uid: str
    label_id: int | None
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


def record_training_use(data_dir: Path | str, *, model_version: str, task: str,
                        uses: Sequence[TrainingUse]) -> int:
    """Record the series a model version was trained and validated with (one transaction).

    Recording the same version and series again changes nothing.

    Returns
    -------
    int
        Rows added.

    Raises
    ------
    ValueError
        If ``model_version`` or ``task`` is empty.
    """
    if not model_version.strip():
        raise ValueError("model_version must be non-empty")
    if not task.strip():
        raise ValueError("task must be non-empty")
    db = connect(Path(data_dir) / INDEX_NAME, timeout_s=30.0)
    now = iso(utc_now())
    try:
        with write(db) as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO training_use (model_version, task, patient_key, study_uid,"
                " series_uid, label_id, split, recorded_at) VALUES (?,?,?,?,?,?,?,?)",
                [(model_version, task, u.patient_key, u.study_uid, u.series_uid, u.label_id,
                  u.split, now) for u in uses])
            added = conn.total_changes - before
    finally:
        db.conn.close()
    return added


def twin_model_versions(db: sqlite_utils.Database, patient_key: str) -> tuple[str, ...]:
    """Model versions trained or validated with this patient's data, oldest first.

    The caller serialises access to ``db`` (the archive holds its lock).
    """
    rows = db.execute(
        "SELECT model_version, MIN(id) AS first FROM training_use WHERE patient_key = ?"
        " GROUP BY model_version ORDER BY first", (patient_key,)).fetchall()
    return tuple(str(r[0]) for r in rows)
