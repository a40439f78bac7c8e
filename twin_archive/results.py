"""AI results kept in the twin: which result came from which series and which model.

A result is the set of DICOM objects (SEG, SR, overlay images) one model version made
from one series as it stood when it went quiet. The files are written durably under
``<data_dir>/results/<patient key>/<study uid>/`` and indexed in the archive index
(tables ``ai_results`` and ``ai_result_objects``, migration 2 in
:mod:`twin_archive.schema`) in one transaction.

A later result for the same series and task *supersedes* the earlier one: the earlier
row gets ``superseded_by``; nothing is overwritten (the new objects are new series).

Each result is recorded under its job's key, once: recording the same key again
returns the result already stored (a job re-run after a crash adds nothing).

A job whose destinations ask for a BINARY and a LABELMAP SEG records one result with a
SEG and an SR of each type (one measurement of the study: history, retention and
erasure see one result); :meth:`AIResult.seg_type_of_objects` pairs each SR with its
SEG, read from the objects themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils
from pydicom.dataset import Dataset

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.durable import fsync_dir, write_durably
from twin_archive.schema import IndexStore, fetch_dicts
from twin_archive.uids import path_component, uid_problem

LOG = logging.getLogger(__name__)

RESULT_KINDS = ("seg", "sr", "overlay", "rtstruct")
#: The SEG type of each Segmentation Storage SOP class a result may hold (PS3.4 B.5).
SEG_TYPE_OF_CLASS = {"1.2.840.10008.5.1.4.1.1.66.4": "binary",  # Segmentation Storage
                     "1.2.840.10008.5.1.4.1.1.66.7": "labelmap"}  # Label Map Segmentation
_INSERT_OBJECT = ("INSERT INTO ai_result_objects (result_id, kind, sop_class_uid, sop_instance_uid,"
                  " series_uid, transfer_syntax_uid, path, size) VALUES (?,?,?,?,?,?,?,?)")
RESULTS_DIR = "results"


@dataclass(frozen=True, kw_only=True, slots=True)
class SegmentMeasure:
    """One segment of a result and its volume (mL)."""

    name: str
    volume_ml: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ResultObject:
    """One stored DICOM object of a result."""

    kind: str  # seg, sr, overlay or rtstruct
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    transfer_syntax_uid: str
    path: Path  # absolute


@dataclass(frozen=True, kw_only=True, slots=True)
class AIResult:
    """An AI result as the twin keeps it."""

    id: int
    job_key: str
    patient_key: str
    study_uid: str
    source_series_uid: str
    source_last_received: str
    source_instances: int
    task: str
    model_name: str
    model_version: str
    backend: str
    created_at: str
    segments: tuple[SegmentMeasure, ...]
    timings: dict[str, float]
    superseded_by: int | None
    objects: tuple[ResultObject, ...]

    @property
    def seg_types(self) -> tuple[str, ...]:
        """The types of its SEGs (``binary``, ``labelmap``), in the order recorded: one
        for most results; one per type the job's destinations asked for otherwise."""
        return tuple(dict.fromkeys(SEG_TYPE_OF_CLASS.get(o.sop_class_uid, "binary")
                                   for o in self.objects if o.kind == "seg"))

    def seg_type_of_objects(self) -> dict[str, str]:
        """``{SOP Instance UID: SEG type}`` of each SEG and SR of the result: a SEG's
        type is its SOP class's, an SR's that of the SEG of this result its evidence
        references (the SR file's headers are read). The SR of a result with a SEG of
        each type goes with its own SEG, to the destinations that get that SEG.

        Raises
        ------
        OSError
            If an SR's file cannot be read.
        """
        segs = {o.sop_instance_uid: SEG_TYPE_OF_CLASS.get(o.sop_class_uid, "binary")
                for o in self.objects if o.kind == "seg"}
        out = dict(segs)
        for o in self.objects:
            if o.kind == "sr":
                found = {segs[uid] for uid in evidence_uids(o.path) if uid in segs}
                if len(found) == 1:
                    out[o.sop_instance_uid] = found.pop()
        return out

    def series_uids(self, kind: str) -> tuple[str, ...]:
        """Series Instance UIDs of the objects of ``kind``."""
        return tuple(dict.fromkeys(o.series_uid for o in self.objects if o.kind == kind))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``twin show`` lists)."""
        return {
            "id": self.id, "study_uid": self.study_uid,
            "source_series_uid": self.source_series_uid,
            "source_instances": self.source_instances, "task": self.task,
            "model": self.model_name, "model_version": self.model_version,
            "backend": self.backend, "created_at": self.created_at,
            "segments": [{"name": s.name, "volume_ml": s.volume_ml} for s in self.segments],
            "seg_series_uid": ",".join(self.series_uids("seg")),
            "sr_series_uid": ",".join(self.series_uids("sr")),
            "overlay_series_uid": ",".join(self.series_uids("overlay")),
            "objects": len(self.objects),
            "superseded_by": self.superseded_by,
        }


def evidence_uids(path: Path) -> set[str]:
    """SOP Instance UIDs an SR file lists as evidence (its Current Requested Procedure
    and Pertinent Other Evidence Sequences), read without the rest of its content.

    Raises
    ------
    OSError
        If the file cannot be read; ``ValueError`` if it is not DICOM.
    """
    ds = pydicom.dcmread(path, specific_tags=["CurrentRequestedProcedureEvidenceSequence",
                                              "PertinentOtherEvidenceSequence"])
    return {str(sop.ReferencedSOPInstanceUID)
            for keyword in ("CurrentRequestedProcedureEvidenceSequence",
                            "PertinentOtherEvidenceSequence")
            for study in ds.get(keyword, [])
            for series in study.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])}


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


class ResultStore(IndexStore):
    """Records and reads AI results; its own connection to the archive index.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (the index must exist and be migrated: open an
        :class:`~twin_archive.Archive` on it first).
    """

    REQUIRED_TABLE = "ai_results"

    def record(self, *, job_key: str, patient_key: str, study_uid: str, source_series_uid: str,
               source_last_received: str, source_instances: int, task: str, model_name: str,
               model_version: str, backend: str, segments: Sequence[SegmentMeasure],
               timings: dict[str, float], objects: Sequence[tuple[str, Dataset]]) -> AIResult:
        """Store the objects of one result durably and index them in one transaction.

        Earlier results of the same series and task are marked superseded by this one.
        Recording a ``job_key`` that is already recorded stores nothing and returns the
        existing result.

        Raises
        ------
        ValueError
            If a kind is not one of seg, sr, overlay, or an object's UID is invalid.
        OSError
            If a file cannot be written (the index is then left untouched).
        """
        existing = self.by_job_key(job_key)
        if existing is not None:
            LOG.info("result for job %s already recorded (result %d); not stored again",
                     job_key, existing.id)
            return existing
        if not study_uid:
            raise ValueError("study_uid: empty")
        rows, created = self._store_files(self.data_dir / RESULTS_DIR / patient_key
                                          / path_component(study_uid), objects)
        now = iso(utc_now())
        seg_json = json.dumps([{"name": s.name, "volume_ml": s.volume_ml} for s in segments])
        with self._all_or_nothing(created), self._lock, write(self.db) as conn:
            cur = conn.execute(
                "INSERT INTO ai_results (job_key, patient_key, study_uid, source_series_uid,"
                " source_last_received, source_instances, task, model_name, model_version,"
                " backend, created_at, segments, timings) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_key, patient_key, study_uid, source_series_uid, source_last_received,
                 source_instances, task, model_name, model_version, backend, now, seg_json,
                 json.dumps(timings)),
            )
            result_id = int(cur.lastrowid or 0)
            conn.executemany(_INSERT_OBJECT, [(result_id, *r) for r in rows])
            superseded = conn.execute(
                "UPDATE ai_results SET superseded_by = ? WHERE source_series_uid = ? AND task = ?"
                " AND id <> ? AND superseded_by IS NULL",
                (result_id, source_series_uid, task, result_id),
            ).rowcount
        if superseded:
            LOG.info("result %d supersedes %d earlier result(s) of the same series", result_id,
                     superseded)
        result = self.get(result_id)
        return result

    def _store_files(self, folder: Path, objects: Sequence[tuple[str, Dataset]]
                     ) -> tuple[list[tuple[str, str, str, str, str, str, int]], list[Path]]:
        """Write each object durably; its index row (without the result id), and the
        files this call created (for :meth:`_discard` when the set cannot be recorded).

        Each file is written to a temporary name, fdatasynced and renamed into place;
        the directory is fsynced once after all the renames (not once per file), before
        any row naming the files is committed. On a failure (a full disk) the files
        written so far are removed before the error goes on: all or nothing.
        """
        rows: list[tuple[str, str, str, str, str, str, int]] = []
        created: list[Path] = []
        for kind, ds in objects:
            if kind not in RESULT_KINDS:
                raise ValueError(f"objects: kind must be one of {RESULT_KINDS}, got {kind!r}")
            problem = uid_problem(str(ds.SOPInstanceUID))
            if problem:
                raise ValueError(f"objects: SOP Instance UID {problem}")
        try:
            for kind, ds in objects:
                sop_uid = str(ds.SOPInstanceUID)
                final = folder / f"{kind}-{sop_uid}.dcm"
                existed = final.exists()
                data = _encode(ds)
                write_durably(final, (data,), self.tmp_dir, sync_dir=False)
                if not existed:
                    created.append(final)
                rows.append((kind, str(ds.SOPClassUID), sop_uid, str(ds.SeriesInstanceUID),
                             str(ds.file_meta.TransferSyntaxUID),
                             str(final.relative_to(self.data_dir)), len(data)))
            if rows:
                fsync_dir(folder)
        except BaseException:
            self._discard(created)
            raise
        return rows, created

    @staticmethod
    def _discard(created: Sequence[Path]) -> None:
        """Remove the files written for a result set that could not be recorded whole
        (a result is recorded all or nothing: no file without its row)."""
        for path in created:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                LOG.warning("result file %s could not be removed after a failed recording; "
                            "start-up reconciliation will quarantine it", path.name)

    def add_objects(self, result_id: int, objects: Sequence[tuple[str, Dataset]], *,
                    timings: dict[str, float] | None = None) -> AIResult:
        """Store more objects of a recorded result (the overlay, written after the SEG
        and SR went out) durably, and index them in one transaction.

        Parameters
        ----------
        result_id : int
        objects : sequence of (kind, Dataset)
        timings : dict, optional
            Merged into the result's recorded timings (seconds).

        Raises
        ------
        KeyError
            If there is no such result.
        ValueError
            If a kind or an object's UID is invalid.
        OSError
            If a file cannot be written (the index is then left untouched).
        """
        result = self.get(result_id)
        rows, created = self._store_files(self.data_dir / RESULTS_DIR / result.patient_key
                                          / path_component(result.study_uid), objects)
        merged = {**result.timings, **(timings or {})}
        with self._all_or_nothing(created), self._lock, write(self.db) as conn:
            conn.executemany(_INSERT_OBJECT, [(result_id, *r) for r in rows])
            conn.execute("UPDATE ai_results SET timings = ? WHERE id = ?",
                         (json.dumps(merged), result_id))
        return self.get(result_id)

    @contextlib.contextmanager
    def _all_or_nothing(self, created: Sequence[Path]) -> Iterator[None]:
        """The index rows of a result set: if they cannot commit, its new files go too."""
        try:
            yield
        except BaseException:
            self._discard(created)
            raise

    # ------------------------------------------------------------------ reading
    def _result(self, row: sqlite3.Row | dict[str, Any]) -> AIResult:
        return _build(self.data_dir, self.db, dict(row))

    def get(self, result_id: int) -> AIResult:
        """One result by id.

        Raises
        ------
        KeyError
            If there is no such result.
        """
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM ai_results WHERE id = ?", (result_id,))
            if not rows:
                raise KeyError(f"no AI result {result_id}")
            return _build(self.data_dir, self.db, rows[0])

    def by_job_key(self, job_key: str) -> AIResult | None:
        """The result recorded under ``job_key``, if any."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM ai_results WHERE job_key = ?", (job_key,))
            return _build(self.data_dir, self.db, rows[0]) if rows else None

    def current_for_study(self, study_uid: str) -> list[AIResult]:
        """Results of one study not superseded by a later one, oldest first."""
        with self._lock:
            return [_build(self.data_dir, self.db, r) for r in fetch_dicts(
                self.db, "SELECT * FROM ai_results WHERE study_uid = ?"
                " AND superseded_by IS NULL ORDER BY id", (study_uid,))]

    def missing_files(self) -> list[str]:
        """Objects whose file is gone: their paths relative to the data directory, in
        the order they were recorded."""
        with self._lock:
            paths = [r[0] for r in self.db.execute(
                "SELECT path FROM ai_result_objects ORDER BY id")]
        return [p for p in paths if not (self.data_dir / p).is_file()]

    def for_series(self, series_uid: str) -> list[AIResult]:
        """Results made from one source series, oldest first."""
        with self._lock:
            return [_build(self.data_dir, self.db, r) for r in fetch_dicts(
                self.db, "SELECT * FROM ai_results WHERE source_series_uid = ? ORDER BY id",
                (series_uid,))]


def _build(data_dir: Path, db: sqlite_utils.Database, r: dict[str, Any]) -> AIResult:
    objects = tuple(
        ResultObject(kind=o["kind"], sop_class_uid=o["sop_class_uid"],
                     sop_instance_uid=o["sop_instance_uid"], series_uid=o["series_uid"],
                     transfer_syntax_uid=o["transfer_syntax_uid"], path=data_dir / o["path"])
        for o in fetch_dicts(db, "SELECT * FROM ai_result_objects WHERE result_id = ? ORDER BY id",
                       (r["id"],))
    )
    return AIResult(
        id=r["id"], job_key=r["job_key"], patient_key=r["patient_key"], study_uid=r["study_uid"],
        source_series_uid=r["source_series_uid"], source_last_received=r["source_last_received"],
        source_instances=r["source_instances"], task=r["task"], model_name=r["model_name"],
        model_version=r["model_version"], backend=r["backend"], created_at=r["created_at"],
        segments=tuple(SegmentMeasure(name=s["name"], volume_ml=float(s["volume_ml"]))
                       for s in json.loads(r["segments"])),
        timings={k: float(v) for k, v in json.loads(r["timings"]).items()},
        superseded_by=r["superseded_by"], objects=objects,
    )


def twin_results(db: sqlite_utils.Database, data_dir: Path, patient_key: str
                 ) -> tuple[dict[str, Any], ...]:
    """The results of one twin as dictionaries, oldest first (for ``TwinDetail.results``).

    The caller serialises access to ``db`` (the archive holds its lock).
    """
    return tuple(_build(data_dir, db, r).to_dict() for r in fetch_dicts(
        db, "SELECT * FROM ai_results WHERE patient_key = ? ORDER BY id", (patient_key,)))
