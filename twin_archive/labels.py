"""Radiologist labels of archived series: which mask, from whom, when; the newest is current.

A label is a reference segmentation of one archived *source series*, from one of two
places:

* ``dicom-seg``: a DICOM Segmentation that arrived over C-STORE, was not produced by
  this node, and references a series in the archive. The SEG instance itself stays
  where the store path put it (``archive/...``); the label row points at that file and
  its SHA-256. Provenance: the calling AE of the association that delivered it, the
  SEG's Content Creator's Name, its content date/time, its SOP Instance and Series
  Instance UIDs.
* ``nifti-import``: a mask file from an annotation tool (``dicom-node labels import``),
  checked against the series' geometry by the caller and written durably under
  ``<data_dir>/labels/<patient key>/<series uid>/<sha256>.nii.gz``.

Several labels of one series are all kept; the one recorded last is *current* (the
column ``current`` is moved in the same transaction that adds the new row).

A label may name the *tasks* it is for (the shell decides which: the tasks whose model
labels its segments name); per task, the current label of a series is the newest one
for that task (:meth:`LabelStore.donated_current` with ``task``), so a spleen SEG and a
later liver SEG of the same series are both kept in use. A label naming no task (from
before tasks were recorded, or an import without one) is for any task. Recording
the same content twice (a SEG re-sent identically, a file imported twice) adds nothing.

A SEG that names no configured task's structure is still kept, as an *unclaimed*
label with the reason (``unclaimed``) and its segments' codes: it is for no task, never
current and in no dataset until :meth:`LabelStore.claim` names the tasks it is for
(the shell claims it when a task or a model that names its segments appears). No label
is lost for want of a task.

This module decides nothing about DICOM content (whether an object is the node's own
output, what a SEG references): the application shell does, and calls
:meth:`LabelStore.add_seg` or :meth:`LabelStore.add_file`. Table ``labels``
(migrations 3, 4 and 8 in :mod:`twin_archive.schema`).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.durable import write_durably
from twin_archive.errors import ArchiveError
from twin_archive.schema import IndexStore, fetch_dicts
from twin_archive.uids import uid_problem

LOG = logging.getLogger(__name__)

LABELS_DIR = "labels"
SOURCE_SEG = "dicom-seg"
SOURCE_IMPORT = "nifti-import"
LABEL_SOURCES = (SOURCE_SEG, SOURCE_IMPORT)


class LabelRefusedError(ArchiveError, ValueError):
    """A label cannot be recorded for that series (the message says why).

    Parameters
    ----------
    series_uid : str
        The series the label was meant for.
    problem : str
        What is wrong, in words (no patient data).
    """

    def __init__(self, series_uid: str, problem: str) -> None:
        self.series_uid = series_uid
        self.problem = problem
        super().__init__(f"label for series {series_uid} refused: {problem}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Label:
    """One recorded label of a source series.

    Parameters
    ----------
    id : int
        Row id; a later label has a larger id.
    patient_key, study_uid, series_uid : str
        The labelled source series and its twin.
    source : str
        ``dicom-seg`` or ``nifti-import``.
    segments : tuple of str
        Names of the labelled structures (SEG Segment Labels, or ``--label``), in
        segment / label-value order (value 1 is the first).
    path : pathlib.Path
        Absolute path of the mask file (the SEG instance, or the NIfTI file).
    sha256 : str
        Hex SHA-256 of the mask file's content (for a SEG: of its data set as archived).
    seg_sop_instance_uid, seg_series_uid : str
        Identity of the SEG ('' for an import).
    calling_ae : str
        AE title that sent the SEG ('' for an import).
    content_creator : str
        Who made it: the SEG's Content Creator's Name, or the importing user.
    content_time : str
        When it was made, as the SEG says (``YYYYMMDDHHMMSS``), '' when unknown.
    recorded_at : str
        When the node recorded it (ISO 8601, UTC).
    current : bool
        Whether it is the series' current label (the newest recorded).
    tasks : tuple of str
        The tasks it is a label for; empty: any task (unless it is unclaimed).
    unclaimed : str
        Why it is for no task yet (its segments name no configured task's structure);
        '' once claimed. An unclaimed label is never current and in no dataset.
    segment_codes : tuple of str or None
        Code value of each segment's Segmented Property Type (``None`` for a segment
        without one); empty when unknown (imports, labels recorded before codes were).
    """

    id: int
    patient_key: str
    study_uid: str
    series_uid: str
    source: str
    segments: tuple[str, ...]
    path: Path
    sha256: str
    seg_sop_instance_uid: str
    seg_series_uid: str
    calling_ae: str
    content_creator: str
    content_time: str
    recorded_at: str
    current: bool
    tasks: tuple[str, ...] = ()
    unclaimed: str = ""
    segment_codes: tuple[str | None, ...] = ()

    def applies_to(self, task: str) -> bool:
        """Whether this label is a label of ``task`` (one naming no task is for any; an
        unclaimed one is for none)."""
        return not self.unclaimed and (not self.tasks or task in self.tasks)

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"source must be one of {LABEL_SOURCES}, got {self.source!r}")
        if not self.segments:
            raise ValueError("segments must name at least one structure")
        if self.unclaimed and (self.tasks or self.current):
            raise ValueError("an unclaimed label names no task and is not current")
        if self.segment_codes and len(self.segment_codes) != len(self.segments):
            raise ValueError("segment_codes needs one entry per segment")

    @property
    def version(self) -> str:
        """A short, stable identity of this label version (``label-<id>-<sha256[:12]>``)."""
        return f"label-{self.id}-{self.sha256[:12]}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``labels list --json``, ``twin show``)."""
        return {
            "id": self.id, "version": self.version, "study_uid": self.study_uid,
            "series_uid": self.series_uid, "source": self.source,
            "segments": list(self.segments), "sha256": self.sha256,
            "seg_sop_instance_uid": self.seg_sop_instance_uid,
            "seg_series_uid": self.seg_series_uid, "calling_ae": self.calling_ae,
            "content_creator": self.content_creator, "content_time": self.content_time,
            "recorded_at": self.recorded_at, "current": self.current,
            "tasks": list(self.tasks), "unclaimed": self.unclaimed or None,
            "segment_codes": list(self.segment_codes),
        }


def _check_segments(series_uid: str, segments: Sequence[str]) -> tuple[str, ...]:
    names = tuple(" ".join(str(s).split()) for s in segments)
    if not names or not all(names):
        raise LabelRefusedError(series_uid, "the label names no structure (segments are empty)")
    return names


class LabelStore(IndexStore):
    """Records and reads labels; its own connection to the archive index.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The archive's data directory (the index must exist and be migrated: open an
        :class:`~twin_archive.Archive` on it first).

    Raises
    ------
    RuntimeError
        If the index lacks the ``labels`` table (not migrated).
    """

    REQUIRED_TABLE = "labels"

    # ------------------------------------------------------------------ writing
    def _series_row(self, series_uid: str) -> dict[str, Any]:
        problem = uid_problem(series_uid)
        if problem:
            raise ValueError(f"series_uid: {problem}")
        rows = fetch_dicts(self.db, "SELECT se.series_uid, se.study_uid, st.patient_key, se.modality"
                     " FROM series se JOIN studies st ON st.study_uid = se.study_uid"
                     " WHERE se.series_uid = ?", (series_uid,))
        if not rows:
            raise LabelRefusedError(series_uid, "no such series in the archive")
        return rows[0]

    def add_seg(self, *, seg_sop_instance_uid: str, source_series_uid: str,
                segments: Sequence[str], content_creator: str = "",
                content_time: str = "", tasks: Sequence[str] = (), unclaimed: str = "",
                segment_codes: Sequence[str | None] = ()) -> tuple[Label, bool]:
        """Record an archived DICOM SEG instance as a label of ``source_series_uid``.

        The SEG must already be archived (its current instance row gives the file, the
        SHA-256 and the calling AE). The caller has checked that it is not the node's
        own output and that it references ``source_series_uid``. ``tasks`` names the
        tasks it is a label for (empty: any task); re-recording the same SEG with other
        tasks updates them. With ``unclaimed`` (why), it is kept for no task until
        :meth:`claim`; re-recording a claimed label as unclaimed changes nothing.
        ``segment_codes``: each segment's Segmented Property Type code value.

        Returns
        -------
        (Label, bool)
            The label, and whether it was new (``False``: this exact SEG content was
            already recorded, nothing changed).

        Raises
        ------
        LabelRefusedError
            If the source series is not archived, the SEG instance is not archived,
            or the SEG belongs to another patient than the series.
        ValueError
            If a UID is invalid, ``unclaimed`` comes with ``tasks``, or
            ``segment_codes`` does not have one entry per segment.
        """
        problem = uid_problem(seg_sop_instance_uid)
        if problem:
            raise ValueError(f"seg_sop_instance_uid: {problem}")
        segs = _check_segments(source_series_uid, segments)
        if unclaimed and tasks:
            raise ValueError("unclaimed: an unclaimed label names no task")
        if segment_codes and len(segment_codes) != len(segs):
            raise ValueError("segment_codes: one code (or None) per segment")
        with self._lock:
            src = self._series_row(source_series_uid)
            inst = fetch_dicts(self.db, "SELECT * FROM instances WHERE sop_instance_uid = ? AND current = 1",
                         (seg_sop_instance_uid,))
            if not inst:
                raise LabelRefusedError(source_series_uid,
                                        f"SEG instance {seg_sop_instance_uid} is not archived")
            seg = inst[0]
            if seg["patient_key"] != src["patient_key"]:
                raise LabelRefusedError(source_series_uid, "the SEG belongs to another patient "
                                        "than the series it references")
            return self._insert(
                patient_key=src["patient_key"], study_uid=src["study_uid"],
                series_uid=source_series_uid, source=SOURCE_SEG, segments=segs,
                path=seg["path"], sha256=seg["sha256"], seg_sop=seg_sop_instance_uid,
                seg_series=seg["series_uid"], calling_ae=seg["calling_ae"] or "",
                creator=content_creator, content_time=content_time, tasks=tuple(tasks),
                unclaimed=unclaimed, codes=tuple(segment_codes))

    def add_file(self, *, series_uid: str, data: bytes, segments: Sequence[str], by: str,
                 suffix: str = ".nii.gz") -> tuple[Label, bool]:
        """Record a mask file (already checked against the series' geometry) as a label.

        The bytes are written durably under ``labels/<patient key>/<series uid>/`` and
        indexed in one transaction.

        Returns
        -------
        (Label, bool)
            The label, and whether it was new.

        Raises
        ------
        LabelRefusedError
            If the series is not archived.
        ValueError
            If ``by`` is empty or ``suffix`` is not a plain file suffix.
        """
        if not by.strip():
            raise ValueError("by: the person importing the label must be named")
        if suffix not in (".nii", ".nii.gz"):
            raise ValueError(f"suffix must be '.nii' or '.nii.gz', got {suffix!r}")
        segs = _check_segments(series_uid, segments)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            src = self._series_row(series_uid)
        rel = Path(LABELS_DIR) / src["patient_key"] / series_uid / f"{sha}{suffix}"
        final = self.data_dir / rel
        if not final.exists():
            write_durably(final, (data,), self.tmp_dir)
        with self._lock:
            return self._insert(
                patient_key=src["patient_key"], study_uid=src["study_uid"], series_uid=series_uid,
                source=SOURCE_IMPORT, segments=segs, path=str(rel), sha256=sha, seg_sop="",
                seg_series="", calling_ae="", creator=by,
                content_time=utc_now().strftime("%Y%m%d%H%M%S"))

    def _insert(self, *, patient_key: str, study_uid: str, series_uid: str, source: str,
                segments: tuple[str, ...], path: str, sha256: str, seg_sop: str,
                seg_series: str, calling_ae: str, creator: str, content_time: str,
                tasks: tuple[str, ...] = (), unclaimed: str = "",
                codes: tuple[str | None, ...] = ()) -> tuple[Label, bool]:
        """Insert a label row and make it current (unless unclaimed), in one transaction
        (lock held); the same content again updates its tasks or claims it."""
        tasks_text = json.dumps(sorted(set(tasks))) if tasks else ""
        with write(self.db) as conn:
            same = conn.execute(
                "SELECT id, tasks, unclaimed FROM labels WHERE series_uid = ? AND sha256 = ?"
                " AND seg_sop_instance_uid = ?", (series_uid, sha256, seg_sop)).fetchone()
            if same is not None:
                label_id, new = int(same[0]), False
                if unclaimed:  # a claimed label stays claimed; an unclaimed one says why now
                    conn.execute("UPDATE labels SET unclaimed = ? WHERE id = ? AND unclaimed <> ''",
                                 (unclaimed, label_id))
                elif same[2]:
                    _claim_row(conn, label_id, series_uid, tasks_text)
                elif same[1] != tasks_text:
                    conn.execute("UPDATE labels SET tasks = ? WHERE id = ?", (tasks_text, label_id))
            else:
                cur = conn.execute(
                    "INSERT INTO labels (patient_key, study_uid, series_uid, source, segments,"
                    " path, sha256, seg_sop_instance_uid, seg_series_uid, calling_ae,"
                    " content_creator, content_time, recorded_at, current, tasks, size,"
                    " unclaimed, segment_codes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?,?)",
                    (patient_key, study_uid, series_uid, source, json.dumps(list(segments)),
                     path, sha256, seg_sop, seg_series, calling_ae, creator, content_time,
                     iso(utc_now()), tasks_text, _file_size(self.data_dir / path), unclaimed,
                     json.dumps(list(codes)) if codes else ""))
                label_id, new = int(cur.lastrowid or 0), True
                if not unclaimed:
                    _move_current(conn, series_uid)
        label = _build(self.data_dir, fetch_dicts(self.db, "SELECT * FROM labels WHERE id = ?",
                                            (label_id,))[0])
        if new and unclaimed:
            LOG.info("label %d kept unclaimed for series %s (%s, %s; from %s): %s", label.id,
                     series_uid, source, ", ".join(segments), calling_ae or "import", unclaimed)
        elif new:
            LOG.info("label %d recorded for series %s (%s, %s; from %s; for %s)", label.id,
                     series_uid, source, ", ".join(segments), calling_ae or "import",
                     ", ".join(tasks) or "any task")
        return label, new

    def claim(self, label_id: int, tasks: Sequence[str]) -> tuple[Label, bool]:
        """Make an unclaimed label a label of ``tasks`` (one transaction: tasks named,
        reason cleared, the series' current label moved to the newest claimed one).

        Returns
        -------
        (Label, bool)
            The label, and whether this call claimed it (``False``: it was claimed
            already, e.g. by another process; nothing changed).

        Raises
        ------
        KeyError
            If there is no such label.
        ValueError
            If ``tasks`` is empty.
        """
        if not tasks:
            raise ValueError("tasks: name at least one task to claim a label for")
        tasks_text = json.dumps(sorted(set(tasks)))
        with self._lock:
            with write(self.db) as conn:
                row = conn.execute("SELECT series_uid, unclaimed FROM labels WHERE id = ?",
                                   (label_id,)).fetchone()
                if row is None:
                    raise KeyError(f"no label {label_id}")
                if row[1]:
                    _claim_row(conn, label_id, str(row[0]), tasks_text)
            label = _build(self.data_dir, fetch_dicts(self.db, "SELECT * FROM labels WHERE id = ?",
                                                      (label_id,))[0])
        if row[1]:
            LOG.info("label %d of series %s claimed for %s (was unclaimed: %s)", label_id,
                     label.series_uid, ", ".join(label.tasks), row[1])
        return label, bool(row[1])

    def set_unclaimed_reason(self, label_id: int, reason: str) -> None:
        """Say why a label is still unclaimed (nothing happens to a claimed one).

        Raises
        ------
        ValueError
            If ``reason`` is empty.
        """
        if not reason.strip():
            raise ValueError("reason: say why the label is unclaimed")
        with self._lock, write(self.db) as conn:
            conn.execute("UPDATE labels SET unclaimed = ? WHERE id = ? AND unclaimed <> ''",
                         (reason, label_id))

    # ------------------------------------------------------------------ reading
    def frame_of_reference(self, series_uid: str) -> str | None:
        """Frame of Reference UID of an archived series ('' if it has none), ``None``
        when the series is not archived."""
        with self._lock:
            row = self.db.execute("SELECT frame_of_reference_uid FROM series WHERE series_uid = ?",
                                  (series_uid,)).fetchone()
        return None if row is None else str(row[0] or "")

    def series_owner(self, series_uid: str) -> str | None:
        """Patient key of an archived series, ``None`` when the series is not archived."""
        with self._lock:
            row = self.db.execute("SELECT st.patient_key FROM series se JOIN studies st"
                                  " ON st.study_uid = se.study_uid WHERE se.series_uid = ?",
                                  (series_uid,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, label_id: int) -> Label:
        """One label by id.

        Raises
        ------
        KeyError
            If there is no such label.
        """
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM labels WHERE id = ?", (label_id,))
        if not rows:
            raise KeyError(f"no label {label_id}")
        return _build(self.data_dir, rows[0])

    def current(self, series_uid: str) -> Label | None:
        """The current label of a series, if it has one."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM labels WHERE series_uid = ? AND current = 1",
                         (series_uid,))
        return _build(self.data_dir, rows[0]) if rows else None

    def for_series(self, series_uid: str) -> list[Label]:
        """Every label of a series, oldest first."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM labels WHERE series_uid = ? ORDER BY id",
                         (series_uid,))
        return [_build(self.data_dir, r) for r in rows]

    def donated_current(self, task: str | None = None) -> list[Label]:
        """Current labels of series whose patient donates *now* (consent read at call time).

        With ``task``: per series, the newest label for that task (or for any task).
        """
        args: tuple[str, ...]
        if task is None:
            sql, args = ("SELECT l.* FROM labels l JOIN twins t ON t.patient_key = l.patient_key"
                         " WHERE l.current = 1 AND t.donate = 1 ORDER BY l.id", ())
        else:
            sql, args = ("SELECT l.* FROM labels l JOIN twins t ON t.patient_key = l.patient_key"
                         " WHERE t.donate = 1 AND l.id = (SELECT MAX(l2.id) FROM labels l2"
                         f" WHERE l2.series_uid = l.series_uid AND {_FOR_TASK.format('l2')})"
                         " ORDER BY l.id", (_task_token(task),))
        with self._lock:
            rows = fetch_dicts(self.db, sql, args)
        return [_build(self.data_dir, r) for r in rows]

    def donated_unlabelled_series(self, task: str | None = None) -> list[dict[str, str]]:
        """Series of donating patients without any claimed label (with ``task``: without a label
        for that task): ``patient_key``, ``study_uid``, ``series_uid``, ``modality``,
        ``description``, ``last_received``; oldest first. Result and document modalities
        (SEG, SR, ...) are for the caller to filter."""
        which, args = (" AND l.unclaimed = ''", ()) if task is None else (
            f" AND {_FOR_TASK.format('l')}", (_task_token(task),))
        with self._lock:
            return fetch_dicts(self.db, "SELECT st.patient_key, se.study_uid, se.series_uid,"
                         " se.modality, se.description, se.last_received FROM series se"
                         " JOIN studies st ON st.study_uid = se.study_uid"
                         " JOIN twins t ON t.patient_key = st.patient_key"
                         " WHERE t.donate = 1 AND NOT EXISTS (SELECT 1 FROM labels l"
                         f" WHERE l.series_uid = se.series_uid{which})"
                         " ORDER BY se.first_received", args)

    def missing_files(self) -> list[str]:
        """Labels whose file is gone: their paths relative to the data directory, in
        the order they were recorded."""
        with self._lock:
            paths = [r[0] for r in self.db.execute("SELECT path FROM labels ORDER BY id")]
        return [p for p in paths if not (self.data_dir / p).is_file()]

    def list(self, *, current_only: bool = False) -> list[Label]:
        """All labels, oldest first (with ``current_only``: the current and the unclaimed
        ones)."""
        sql = "SELECT * FROM labels" + (" WHERE current = 1 OR unclaimed <> ''"
                                        if current_only else "") + " ORDER BY id"
        with self._lock:
            rows = fetch_dicts(self.db, sql, ())
        return [_build(self.data_dir, r) for r in rows]

    def unclaimed(self) -> builtins.list[Label]:
        """The unclaimed labels, oldest first."""
        with self._lock:
            rows = fetch_dicts(self.db, "SELECT * FROM labels WHERE unclaimed <> '' ORDER BY id", ())
        return [_build(self.data_dir, r) for r in rows]


#: SQL condition "label {0} is for the task given as parameter" (``tasks`` is a JSON list
#: of task names, which hold no quote; '' means any task; an unclaimed label is for none).
_FOR_TASK = "({0}.unclaimed = '' AND ({0}.tasks = '' OR instr({0}.tasks, ?) > 0))"


def _move_current(conn: Any, series_uid: str) -> None:
    """Make the newest claimed label of a series its current one (open transaction)."""
    conn.execute("UPDATE labels SET current = COALESCE(id = (SELECT MAX(id) FROM labels"
                 " WHERE series_uid = ? AND unclaimed = ''), 0) WHERE series_uid = ?",
                 (series_uid, series_uid))


def _claim_row(conn: Any, label_id: int, series_uid: str, tasks_text: str) -> None:
    """Claim label ``label_id`` for the tasks of ``tasks_text`` (open transaction)."""
    conn.execute("UPDATE labels SET tasks = ?, unclaimed = '' WHERE id = ?", (tasks_text, label_id))
    _move_current(conn, series_uid)


def _task_token(task: str) -> str:
    return json.dumps(task)  # "spleen-ct", quotes included: no prefix matches


def _build(data_dir: Path, r: dict[str, Any]) -> Label:
    return Label(
        id=int(r["id"]), patient_key=r["patient_key"], study_uid=r["study_uid"],
        series_uid=r["series_uid"], source=r["source"], segments=tuple(json.loads(r["segments"])),
        path=data_dir / r["path"], sha256=r["sha256"],
        seg_sop_instance_uid=r["seg_sop_instance_uid"] or "",
        seg_series_uid=r["seg_series_uid"] or "", calling_ae=r["calling_ae"] or "",
        content_creator=r["content_creator"] or "", content_time=r["content_time"] or "",
        recorded_at=r["recorded_at"], current=bool(r["current"]),
        tasks=tuple(json.loads(r["tasks"])) if r.get("tasks") else (),
        unclaimed=r.get("unclaimed") or "",
        segment_codes=tuple(json.loads(r["segment_codes"])) if r.get("segment_codes") else (),
    )


def twin_labels(db: sqlite_utils.Database, data_dir: Path, patient_key: str
                ) -> tuple[dict[str, Any], ...]:
    """The labels of one twin as dictionaries, oldest first (for ``TwinDetail.labels``).

    The caller serialises access to ``db`` (the archive holds its lock).
    """
    rows = fetch_dicts(db, "SELECT * FROM labels WHERE patient_key = ? ORDER BY id", (patient_key,))
    return tuple(_build(data_dir, r).to_dict() for r in rows)


def _file_size(path: Path) -> int:
    """Size of a label file in bytes (0 when it cannot be read)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
