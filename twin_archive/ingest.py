"""The ingest path: an instance validated, written durably and indexed.

:meth:`Ingest.store` is what a C-STORE waits for (DESIGN decision 1): the header is
read and the identifiers checked (:mod:`twin_archive.header`), the bytes are written
to a temporary file (or the spool the front door wrote) and renamed into place, then
the directory fsync and the index row are committed together with the other
instances of that moment (:mod:`twin_archive.group_commit`). Files already in the
archive are indexed the same way (:meth:`Ingest.index_files`: start-up
reconciliation in :mod:`twin_archive.reconcile`, ``archive verify --repair``,
``archive rebuild-index``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path
from typing import Any

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from twin_archive import reconcile
from dicom_node.foundation.durable import fsync_dir, write_durably
from twin_archive.errors import ArchiveError, InvalidInstanceError, OutOfResourcesError
from twin_archive.group_commit import GroupCommit, Pending
from twin_archive.header import Header, identify, parse
from twin_archive.layout import (
    instance_relpath,
    patient_key,
    unidentified_key,
)
from twin_archive.records import IncomingInstance, StoreOutcome, StoreResult
from twin_archive.schema import fetch_dicts
from twin_archive.spool import Spool, alone, helper_pool
from twin_archive.text import printable

LOG = logging.getLogger(__name__)

_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _disk_error(exc: OSError, doing: str, what: str) -> OutOfResourcesError:
    """An ``OSError`` while ``doing`` (``writing``, ...) ``what``, as the archive reports it:
    "disk full ..." for a full disk or quota, "cannot ..." for anything else."""
    if exc.errno in _NO_SPACE_ERRNOS:
        return OutOfResourcesError(f"disk full {doing} {what}: {exc.strerror}")
    verb = {"receiving": "spool", "writing": "write", "flushing": "flush"}[doing]
    return OutOfResourcesError(f"cannot {verb} {what}: {exc}")


def _parser() -> Any:
    """Helper threads that read headers while the storing threads flush (one per
    association storing at once, up to eight)."""
    return helper_pool("parse", 8)


class Ingest:
    """Stores instances into the archive and keeps its files and index in agreement.

    Thread-safe: the DICOM server calls :meth:`store` from one thread per association.
    Opened by :class:`twin_archive.Archive`, whose index connection and lock it shares
    with the twin read model (:class:`twin_archive.twins.Twins`).

    Parameters
    ----------
    db : sqlite_utils.Database
        The archive index (migrated).
    lock : threading.Lock
        Serialises use of ``db`` (shared with the other users of the connection).
    data_dir : pathlib.Path
        Root of the archive.
    secret : bytes
        The installation secret that names patient folders
        (:func:`twin_archive.layout.load_or_create_key`).
    min_free_bytes : int
        Refuse new instances (A700) while less than this many bytes are free on the
        data directory's file system, so the index can always commit and the
        operating system keeps working.
    """

    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock, *, data_dir: Path,
                 secret: bytes, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.db = db
        self.data_dir = data_dir
        #: Called with the bytes needed before an instance is refused for lack of space;
        #: returns whether it freed any (the node's disk guard prunes what retention allows).
        self.make_room: Callable[[int], bool] | None = None
        self.tmp_dir = data_dir / "tmp"
        self.min_free_bytes = min_free_bytes
        self._lock = lock
        self._secret = secret
        self._group = GroupCommit(self._flush)

    # ------------------------------------------------------------------ storing
    def store(self, incoming: IncomingInstance) -> StoreResult:
        """Validate, write durably and index one instance.

        Returns only after the file is fsynced, renamed into place and its index row
        committed.

        Raises
        ------
        InvalidInstanceError
            A required identifier (Patient ID, Study/Series/SOP Instance UID) is missing
            or invalid, or the data set cannot be parsed.
        SopClassMismatchError
            The data set does not match the SOP class it was sent as.
        OutOfResourcesError
            Disk full, below the free-space reserve, or the index cannot commit.
        """
        spool = incoming.spool
        if spool is None:
            return self._store(incoming)
        try:
            spool.claim()
        except OSError as exc:
            raise _disk_error(exc, "receiving", incoming.sop_instance_uid) from exc
        try:
            # Flushed beside the header read only when alone (see twin_archive.spool.alone)
            # and new: a resent instance may be archived already, and is then not flushed.
            if alone() and not self._known(incoming.sop_instance_uid):
                return self._store(incoming, self._parse_while_flushing(incoming, spool))
            return self._store(incoming)
        finally:
            spool.discard(force=True)  # no-op once committed

    def _parse_while_flushing(self, incoming: IncomingInstance, spool: Spool) -> Header:
        """Flush the spool (``fdatasync``, this thread) while a helper thread reads and
        checks the header: the one waits on the disk, the other needs the CPU, and one
        instance's wait to be answered is the longer of the two, not their sum.

        Raises
        ------
        InvalidInstanceError
            From :func:`parse`, once the flush is done.
        OutOfResourcesError
            The flush failed.
        """
        parsing = _parser().submit(parse, incoming)
        try:
            spool.flush()
        except OSError as exc:
            parsing.exception()  # let the helper finish with the file before it is removed
            raise _disk_error(exc, "flushing", incoming.sop_instance_uid) from exc
        return parsing.result()

    def _known(self, sop_uid: str) -> bool:
        """Whether an instance of this SOP Instance UID is archived (any content)."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ? LIMIT 1",
                                   (sop_uid,)).fetchone() is not None

    def _store(self, incoming: IncomingInstance, parsed: Header | None = None) -> StoreResult:
        """Read, check, write and commit one instance (:meth:`store` claimed its spool and
        may have read its header already: ``parsed``)."""
        spool = incoming.spool
        if parsed is None:
            parsed = parse(incoming)
        ident = identify(parsed, incoming)
        sha = spool.sha256 if spool is not None else hashlib.sha256(incoming.dataset).hexdigest()
        key = self._twin_key(ident)
        rel = instance_relpath(
            key, ident["study_uid"], ident["series_uid"], ident["sop_uid"], sha
        )
        version = self._archived_version(ident["sop_uid"], sha)
        if version is not None:
            LOG.info("archive: instance %s already archived (identical), not written again",
                     printable(ident["sop_uid"]))
            return _result(StoreOutcome.DUPLICATE, ident, key, version, rel, sha,
                           parsed.pixel_problem)
        final = self.data_dir / rel
        self._write(incoming, final, rel)
        pending = Pending(fields=parsed.fields, ident=ident, key=key, sha=sha, rel=str(rel),
                          incoming=incoming, final=final)
        outcome, version = self._commit(pending)
        if outcome is StoreOutcome.NEW_VERSION:
            LOG.warning(
                "archive: instance %s resent with different content from %s; kept as "
                "version %d beside the earlier one(s), the newer is current",
                printable(ident["sop_uid"]), printable(incoming.calling_ae or "?"), version,
            )
        return _result(outcome, ident, key, version, rel, sha, parsed.pixel_problem)

    def _archived_version(self, sop_uid: str, sha: str) -> int | None:
        """The version under which this very content is archived already, if it is."""
        with self._lock:
            row = self.db.execute(
                "SELECT version FROM instances WHERE sop_instance_uid = ? AND sha256 = ?",
                (sop_uid, sha),
            ).fetchone()
        return None if row is None else int(row[0])

    def _write(self, incoming: IncomingInstance, final: Path, rel: Path) -> None:
        """Put the instance's file in place: the spool renamed, or the bytes written durably.

        The directory is fsynced by the group commit, before the index row.

        Raises
        ------
        OutOfResourcesError
            Below the free-space reserve, disk full, or any other write error.
        """
        spool = incoming.spool
        try:
            if spool is not None:
                self._check_free_space(0)  # already written, in the temporary folder
                spool.commit(final)
            else:
                self._check_free_space(incoming.size)
                write_durably(final, (incoming.file_meta, incoming.dataset), self.tmp_dir,
                              sync_dir=False)
        except OSError as exc:
            raise _disk_error(exc, "writing", rel.name) from exc

    def _commit(self, pending: Pending) -> tuple[StoreOutcome, int]:
        """Hand a written file to the group commit; its outcome and version once indexed.

        Raises
        ------
        OutOfResourcesError
            The directory fsync failed (the file is removed) or the index row could not
            be committed (the file is removed unless a row names it).
        """
        self._group.commit(pending)
        final, name = pending.final, pending.final.name
        if isinstance(pending.error, OSError):
            final.unlink(missing_ok=True)
            raise OutOfResourcesError(
                f"cannot make {name} durable (directory fsync): {pending.error}"
            ) from pending.error
        if pending.error is not None:
            self._discard_unindexed(pending)
            raise OutOfResourcesError(
                f"archive index cannot commit: {pending.error}"
            ) from pending.error
        assert pending.result is not None
        return pending.result

    def _twin_key(self, ident: dict[str, str]) -> str:
        if ident["unidentified"]:
            return unidentified_key(self._secret, ident["study_uid"], ident["issuer"])
        return patient_key(self._secret, ident["patient_id"], ident["issuer"])

    def _check_free_space(self, incoming_bytes: int) -> None:
        if not self.min_free_bytes:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming_bytes < self.min_free_bytes and self.make_room is not None \
                and self.make_room(incoming_bytes):  # pruned what retention allows: look again
            free = shutil.disk_usage(self.data_dir).free
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResourcesError(
                f"only {free // (1 << 20)} MiB free on the data directory, below the "
                f"reserve of {self.min_free_bytes // (1 << 20)} MiB (min_free_mb)"
            )

    def _flush(self, batch: list[Pending]) -> None:
        """Make a batch durable: each directory fsynced once, then one index transaction.

        Runs in whichever storing thread leads the group commit. Order matters: a
        directory is fsynced (the renames into it survive a power cut) before the
        transaction that indexes its files commits, so the index never names a file
        that might not be there. Each row has its own savepoint: one row that fails
        fails alone.
        """
        for directory in dict.fromkeys(p.final.parent for p in batch):
            try:
                fsync_dir(directory)
            except OSError as exc:
                for p in batch:
                    if p.final.parent == directory:
                        p.error = exc
        todo = [p for p in batch if p.error is None]
        if not todo:
            return
        try:
            with self._lock, write(self.db) as conn:
                for p in todo:
                    conn.execute("SAVEPOINT instance")
                    try:
                        p.result = self._index_rows(conn, p)
                    except sqlite3.Error as exc:
                        conn.execute("ROLLBACK TO instance")
                        p.error = exc
                    conn.execute("RELEASE instance")
        except sqlite3.Error as exc:  # BEGIN or COMMIT failed: nothing of the batch is in
            for p in todo:
                p.result = None
                p.error = exc

    def _index_rows(self, conn: sqlite3.Connection, p: Pending) -> tuple[StoreOutcome, int]:
        """Write one instance's rows (twin, study, series, instance) in the open transaction."""
        now = iso(utc_now()) if p.received_at is None else p.received_at
        key = _upsert_twin(conn, p, now)
        _upsert_study_and_series(conn, p, key, now)
        return _insert_instance(conn, p, key, now)

    def _discard_unindexed(self, p: Pending) -> None:
        """Remove a written file whose index row could not be committed (unless a row of
        the same content names it: looked up by the unique ``(sop_instance_uid, sha256)``
        index, not by path, which no index covers: 0.26 s a failed instance at 1,000,000
        rows, under the archive's lock, when the disk is full)."""
        try:
            with self._lock:
                referenced = self.db.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid = ? AND sha256 = ?"
                    " AND path = ?", (p.ident["sop_uid"], p.sha, p.rel)
                ).fetchone()
            if not referenced:
                p.final.unlink(missing_ok=True)
        except (sqlite3.Error, OSError):
            LOG.exception("archive: could not clean up %s after an index failure", p.rel)

    # ------------------------------------------------------- reconciliation
    def indexed_paths(self) -> set[str]:
        """Every file path (relative to the data directory) a row of the index names."""
        with self._lock:
            cur = self.db.conn.cursor()
            cur.row_factory = None  # plain tuples: a million sqlite3.Row objects cost seconds
            paths = {r[0] for r in cur.execute("SELECT path FROM instances")}
            paths.update(r[0] for r in cur.execute("SELECT path FROM ai_result_objects"))
            paths.update(r[0] for r in cur.execute("SELECT path FROM labels"))
            # removals in progress (twin_archive.retention): finished at start, never re-indexed
            paths.update(r[0] for r in cur.execute(
                "SELECT path FROM pruned_files WHERE file_removed = 0"))
            # shadow results (twin_archive.learning): stored, indexed, never sent
            paths.update(obj["path"] for r in self.db.execute("SELECT objects FROM shadow_results")
                         for obj in json.loads(r[0]))
        return paths

    def index_files(self, paths: Sequence[Path], *, batch: int = 256
                    ) -> list[tuple[Path, StoreResult | Exception]]:
        """Index instance files already in the archive (reconciliation, rebuild).

        Each file is checked first: a Part 10 file whose data set has the SHA-256 its
        name carries and parses to its end, with Study, Series and SOP Instance UIDs.
        Rows are committed ``batch`` at a time (one transaction each). Returns, per
        file, its :class:`StoreResult` or the exception that says why it is not intact.
        """
        out: list[tuple[Path, StoreResult | Exception]] = []
        pending: list[tuple[Path, Pending]] = []
        for path in paths:
            try:
                pending.append((path, self._pending_for_file(path)))
            except (ArchiveError, OSError, ValueError) as exc:
                out.append((path, exc))
            if len(pending) >= batch:
                out.extend(self._index_batch(pending))
                pending = []
        out.extend(self._index_batch(pending))
        return out

    def _index_batch(self, pending: list[tuple[Path, Pending]]
                     ) -> list[tuple[Path, StoreResult | Exception]]:
        """Commit the rows of files checked by :meth:`_pending_for_file` (one transaction)."""
        if not pending:
            return []
        self._flush([p for _, p in pending])
        out: list[tuple[Path, StoreResult | Exception]] = []
        for path, p in pending:
            if p.error is not None or p.result is None:
                out.append((path, OutOfResourcesError(f"index cannot commit: {p.error}")))
                continue
            outcome, version = p.result
            out.append((path, StoreResult(
                outcome=outcome, sop_instance_uid=p.ident["sop_uid"],
                series_uid=p.ident["series_uid"], study_uid=p.ident["study_uid"],
                patient_key=p.key, version=version, path=p.rel, sha256=p.sha)))
        return out

    def _pending_for_file(self, path: Path) -> Pending:
        """Check an archived file (Part 10, its name's hash, parses, identifiable).

        Raises
        ------
        InvalidInstanceError
            The file is not intact or its instance cannot be grouped.
        SopClassMismatchError
            Its data set does not fit its SOP class.
        """
        data = path.read_bytes()
        fh = BytesIO(data)
        try:
            meta = reconcile.read_part10_meta(fh)
        except ValueError as exc:
            raise InvalidInstanceError("file", str(exc)) from exc
        offset = fh.tell()
        sha = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
        expected = reconcile.name_hash(path)
        if expected is not None and expected != sha[:12]:
            raise InvalidInstanceError("file", "content does not match the hash in its name "
                                       "(damaged or cut short)")
        ts = str(meta.get("TransferSyntaxUID", "") or "")
        probe = IncomingInstance(file_meta=data[:offset], dataset=data[offset:],
                                 transfer_syntax_uid=ts, sop_class_uid="", sop_instance_uid="")
        parsed = parse(probe)
        incoming = IncomingInstance(
            file_meta=data[:offset], dataset=data[offset:], transfer_syntax_uid=ts,
            sop_class_uid=parsed.fields["SOPClassUID"],
            sop_instance_uid=parsed.fields["SOPInstanceUID"],
            calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip())
        ident = identify(parsed, incoming)
        received = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        return Pending(fields=parsed.fields, ident=ident, key=self._twin_key(ident), sha=sha,
                       rel=str(path.relative_to(self.data_dir)), incoming=incoming,
                       final=path, received_at=received.isoformat(timespec="microseconds"))

    def instance_files(self) -> list[dict[str, Any]]:
        """``id``, ``path``, ``sha256``, ``missing_at`` of every instance row."""
        with self._lock:
            return fetch_dicts(self.db, "SELECT id, path, sha256, missing_at FROM instances"
                               " ORDER BY id", ())

    def mark_missing(self, row_ids: Sequence[int]) -> int:
        """Mark instance rows whose file is gone (one transaction); return how many."""
        at = iso(utc_now())
        with self._lock, write(self.db) as conn:
            n = 0
            for row_id in row_ids:
                n += conn.execute("UPDATE instances SET missing_at = ? WHERE id = ?"
                                  " AND missing_at IS NULL", (at, row_id)).rowcount
        return n


def _result(outcome: StoreOutcome, ident: dict[str, str], key: str, version: int, rel: Path,
            sha: str, warning: str = "") -> StoreResult:
    return StoreResult(
        outcome=outcome, sop_instance_uid=ident["sop_uid"],
        series_uid=ident["series_uid"], study_uid=ident["study_uid"],
        patient_key=key, version=version, path=str(rel), sha256=sha, warning=warning,
    )


def _upsert_twin(conn: sqlite3.Connection, p: Pending, now: str) -> str:
    """Insert or update the instance's twin; the key its rows go under (the patient's
    twin when an unidentified twin was attached to one)."""
    fields, ident, key = p.fields, p.ident, p.key
    conn.execute(
        "INSERT INTO twins (patient_key, patient_id, issuer_of_patient_id, patient_name,"
        " birth_date, sex, donate, created_at, updated_at, unidentified)"
        " VALUES (?,?,?,?,?,?,0,?,?,?)"
        " ON CONFLICT(patient_key) DO UPDATE SET patient_name=excluded.patient_name,"
        " birth_date=excluded.birth_date, sex=excluded.sex, updated_at=excluded.updated_at",
        (key, ident["patient_id"], ident["issuer"], fields["PatientName"],
         fields["PatientBirthDate"], fields["PatientSex"], now, now,
         int(bool(ident["unidentified"]))),
    )
    merged = conn.execute("SELECT merged_into FROM twins WHERE patient_key = ?",
                          (key,)).fetchone()
    if merged is not None and merged[0]:  # an unidentified twin attached to a patient
        return str(merged[0])
    return key


def _upsert_study_and_series(conn: sqlite3.Connection, p: Pending, key: str, now: str) -> None:
    """Insert the instance's study and series, or move their ``last_received`` on."""
    fields, ident = p.fields, p.ident
    conn.execute(
        "INSERT INTO studies (study_uid, patient_key, study_date, study_time, description,"
        " accession_number, first_received, last_received) VALUES (?,?,?,?,?,?,?,?)"
        " ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received",
        (ident["study_uid"], key, fields["StudyDate"], fields["StudyTime"],
         fields["StudyDescription"], fields["AccessionNumber"], now, now),
    )
    conn.execute(
        "INSERT INTO series (series_uid, study_uid, modality, body_part, description,"
        " series_number, manufacturer, model_name, frame_of_reference_uid,"
        " first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(series_uid) DO UPDATE SET last_received=excluded.last_received",
        (ident["series_uid"], ident["study_uid"], fields["Modality"],
         fields["BodyPartExamined"], fields["SeriesDescription"],
         fields["SeriesNumber"], fields["Manufacturer"],
         fields["ManufacturerModelName"], fields["FrameOfReferenceUID"], now, now),
    )


def _insert_instance(conn: sqlite3.Connection, p: Pending, key: str,
                     now: str) -> tuple[StoreOutcome, int]:
    """Insert the instance's row as its next version (the earlier ones no longer
    current); its outcome and version (a duplicate when a concurrent association
    committed the same content first)."""
    fields, ident, incoming = p.fields, p.ident, p.incoming
    previous = conn.execute(
        "SELECT COALESCE(MAX(version), 0) FROM instances WHERE sop_instance_uid = ?",
        (ident["sop_uid"],),
    ).fetchone()[0]
    cur = conn.execute(
        "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, series_uid,"
        " study_uid, patient_key, instance_number, transfer_syntax_uid, size, sha256,"
        " path, calling_ae, received_at, version, current, uid_flags)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1,?)",
        (ident["sop_uid"], ident["sop_class"], ident["series_uid"], ident["study_uid"],
         key, fields["InstanceNumber"], incoming.transfer_syntax_uid, incoming.size, p.sha,
         p.rel, incoming.calling_ae, now, previous + 1, ident["uid_flags"]),
    )
    if cur.rowcount == 0:  # the same content committed by a concurrent association
        return StoreOutcome.DUPLICATE, previous
    if previous:
        conn.execute(
            "UPDATE instances SET current = 0 WHERE sop_instance_uid = ? AND version <= ?",
            (ident["sop_uid"], previous),
        )
        return StoreOutcome.NEW_VERSION, previous + 1
    return StoreOutcome.STORED, 1
