"""The per-patient archive: durable instance files and their SQLite index."""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
import sqlite3
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from twin_archive.dataset_walk import Walked, walk
from twin_archive.durable import clean_tmp, fsync_dir, write_durably
from twin_archive.errors import (
    InvalidInstanceError,
    OutOfResourcesError,
    SopClassMismatchError,
    TwinNotFoundError,
)
from twin_archive.layout import INDEX_NAME, instance_relpath, load_or_create_key, patient_key
from twin_archive.records import (
    ConsentEvent,
    IncomingInstance,
    SeriesRecord,
    StoreOutcome,
    StoreResult,
    StudyRecord,
    TwinDetail,
    TwinSummary,
)
from twin_archive.schema import connect, migrate, utc_now, write_transaction
from twin_archive.uids import uid_problem

LOG = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


# Every attribute the store path reads (identification, validation, index columns),
# read once per instance by :func:`_fields`.
_FIELD_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "SOPClassUID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "Modality",
    "BodyPartExamined", "SeriesDescription", "SeriesNumber", "Manufacturer",
    "ManufacturerModelName", "FrameOfReferenceUID", "InstanceNumber",
)
_FIELD_TAGS = tuple((kw, int(Tag(kw))) for kw in _FIELD_KEYWORDS)
_PIXEL_TAGS = frozenset(int(Tag(kw)) for kw in _PIXEL_KEYWORDS)
_ROWS, _COLUMNS = int(Tag("Rows")), int(Tag("Columns"))
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SEQ_DELIM = {True: b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", False: b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"}


def _ascii_text(raw: bytes) -> str | None:
    """The value of a raw single-valued text element, as ``_text`` would give it.

    Only for the plain case: 7-bit ASCII, no backslash (value multiplicity > 1), no
    escape (ISO 2022 code extensions), no NUL but one trailing pad byte. Anything else
    returns ``None`` and goes through pydicom, which applies the Specific Character
    Set and the VR's own rules.
    """
    if raw.endswith(b"\x00"):
        raw = raw[:-1]
    if not raw.isascii() or b"\\" in raw or b"\x1b" in raw or b"\x00" in raw:
        return None
    return raw.decode("ascii").strip()


def _fields(ds: Dataset) -> dict[str, str]:
    """Read every attribute the store path needs, in one pass over the data set.

    Equivalent to ``_text(ds, keyword)`` for each keyword (a test compares them), but
    plain ASCII values are taken from the raw bytes without building pydicom elements.
    """
    out: dict[str, str] = {}
    elements = ds._dict  # noqa: SLF001 - raw elements, before pydicom converts them
    for keyword, tag in _FIELD_TAGS:
        elem = elements.get(tag)  # type: ignore[call-overload]
        if elem is None:
            out[keyword] = ""
            continue
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED_LENGTH:
            if not elem.value:
                text: str | None = ""
            else:
                text = _ascii_text(bytes(elem.value))
            if text is not None:
                out[keyword] = text
                continue
        out[keyword] = _text(ds, keyword)
    return out


def _scan(fp: BinaryIO, start: int, size: int, implicit: bool, little: bool,
          tail: Callable[[int], bytes], *, need_pixels: bool, walked: bool = False) -> _Parsed | None:
    """Read a data set from ``fp`` (at ``start``, ``size`` bytes) up to its pixel data.

    With ``need_pixels`` (``fp`` holds only the first part of the data set), a result
    is given only when the pixel data element was reached inside it. None whenever the
    result might differ from a full parse (see :meth:`Archive._parse_fast`). With
    ``walked`` the data set is known to parse to its end (:mod:`twin_archive.dataset_walk`):
    what follows the pixel data is not looked at, and values over 1 MiB before it are
    skipped, not read.
    """
    stop: list[tuple[int, int]] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            stop.append((fp.tell() - start, length))  # positioned at the value
            return True
        return False

    try:
        with fp:
            ds = read_dataset(fp, implicit, little, stop_when=at_pixels,
                              defer_size=(1 << 20) if walked else None)
            end = fp.tell() - start
        if not stop and need_pixels:
            return None
        if walked:
            pass
        elif stop:
            value_at, length = stop[0]
            if length == _UNDEFINED_LENGTH:
                delimiter = _SEQ_DELIM[little]
                if tail(len(delimiter)) != delimiter:
                    return None
            elif value_at + length != size:
                return None  # trailing elements or truncated pixel data
        elif end != size:
            return None
        fields = _fields(ds)
    except Exception:  # noqa: BLE001 - the full parse reports it properly
        return None
    elements = ds._dict  # noqa: SLF001
    return _Parsed(
        fields=fields,
        has_pixels=bool(stop),
        has_rows_columns=_ROWS in elements and _COLUMNS in elements,
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What the store path learns from a data set before writing it."""

    fields: dict[str, str]
    has_pixels: bool
    has_rows_columns: bool


@dataclass(slots=True, kw_only=True)
class _Pending:
    """One instance written and renamed into place, waiting for its group commit."""

    fields: dict[str, str]
    ident: dict[str, str]
    key: str
    sha: str
    rel: str
    incoming: IncomingInstance
    final: Path
    result: tuple[StoreOutcome, int] | None = None
    error: BaseException | None = None
    done: bool = False


class _GroupCommit:
    """Leader/follower group commit of the directory fsyncs and index rows.

    A storing thread hands in its instance; if no flush is running it becomes the
    leader and flushes everything handed in so far (its own instance included) with
    ``flush``, otherwise it waits for a leader to flush it. Alone (one association)
    a thread leads a batch of one at once, so nothing waits; with several
    associations the instances that arrive during a flush share the next one: one
    ``fsync`` per directory and one SQLite commit for all of them, instead of one
    each.
    """

    def __init__(self, flush: Callable[[list[_Pending]], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False

    def commit(self, item: _Pending) -> None:
        """Return when ``item`` is flushed (``item.result`` or ``item.error`` set)."""
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._flush(batch)
                except BaseException as exc:
                    for p in batch:
                        if p.result is None and p.error is None:
                            p.error = exc
                    raise
                finally:
                    self._cond.acquire()
                    for p in batch:
                        p.done = True
                    self._leading = False
                    self._cond.notify_all()


class Archive:
    """The twin archive under one data directory.

    Thread-safe: the DICOM server calls :meth:`store` from one thread per association.
    Several processes may open the same data directory (the server and the CLI);
    SQLite's WAL mode and ``BEGIN IMMEDIATE`` keep their writes apart.

    Parameters
    ----------
    data_dir : pathlib.Path
        Root of the archive; created if missing.
    min_free_bytes : int
        Refuse new instances (A700) while less than this many bytes are free on the
        data directory's file system, so the index can always commit and the
        operating system keeps working.
    """

    def __init__(self, data_dir: Path | str, *, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.data_dir = Path(data_dir).resolve()
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = self.data_dir / "tmp"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        self._secret = load_or_create_key(self.data_dir)
        self.db = connect(str(self.data_dir / INDEX_NAME))
        self._lock = threading.Lock()
        self._group = _GroupCommit(self._flush)
        migrate(self.db)

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recover(self) -> int:
        """Remove temporary files of writes interrupted by a crash; return how many."""
        removed = clean_tmp(self.tmp_dir)
        if removed:
            LOG.warning("archive: removed %d unfinished temporary file(s) after restart", removed)
        return removed

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
            if exc.errno in _NO_SPACE_ERRNOS:
                raise OutOfResourcesError(f"disk full receiving {incoming.sop_instance_uid}: "
                                          f"{exc.strerror}") from exc
            raise OutOfResourcesError(f"cannot spool {incoming.sop_instance_uid}: {exc}") from exc
        try:
            return self._store(incoming)
        finally:
            spool.discard(force=True)  # no-op once committed

    def _store(self, incoming: IncomingInstance) -> StoreResult:
        spool = incoming.spool
        parsed = self._parse(incoming)
        ident = self._identify(parsed, incoming)
        sha = spool.sha256 if spool is not None else hashlib.sha256(incoming.dataset).hexdigest()
        key = patient_key(self._secret, ident["patient_id"], ident["issuer"])
        rel = instance_relpath(
            key, ident["study_uid"], ident["series_uid"], ident["sop_uid"], sha
        )

        with self._lock:
            row = self.db.execute(
                "SELECT version FROM instances WHERE sop_instance_uid = ? AND sha256 = ?",
                (ident["sop_uid"], sha),
            ).fetchone()
        if row is not None:
            LOG.info("archive: instance %s already archived (identical), not written again",
                     ident["sop_uid"])
            return StoreResult(
                outcome=StoreOutcome.DUPLICATE, sop_instance_uid=ident["sop_uid"],
                series_uid=ident["series_uid"], study_uid=ident["study_uid"],
                patient_key=key, version=row[0], path=str(rel), sha256=sha,
            )

        final = self.data_dir / rel
        try:
            # The directory is fsynced by the group commit, before the index row.
            if spool is not None:
                self._check_free_space(0)  # already written, in the temporary folder
                spool.commit(final)
            else:
                self._check_free_space(incoming.size)
                write_durably(final, (incoming.file_meta, incoming.dataset), self.tmp_dir,
                              sync_dir=False)
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise OutOfResourcesError(f"disk full writing {rel.name}: {exc.strerror}") from exc
            raise OutOfResourcesError(f"cannot write {rel.name}: {exc}") from exc

        pending = _Pending(fields=parsed.fields, ident=ident, key=key, sha=sha, rel=str(rel),
                           incoming=incoming, final=final)
        self._group.commit(pending)
        if isinstance(pending.error, OSError):
            final.unlink(missing_ok=True)
            raise OutOfResourcesError(
                f"cannot make {rel.name} durable (directory fsync): {pending.error}"
            ) from pending.error
        if pending.error is not None:
            self._discard_unindexed(final, str(rel))
            raise OutOfResourcesError(
                f"archive index cannot commit: {pending.error}"
            ) from pending.error
        assert pending.result is not None
        outcome, version = pending.result
        if outcome is StoreOutcome.NEW_VERSION:
            LOG.warning(
                "archive: instance %s resent with different content from %s; kept as "
                "version %d beside the earlier one(s), the newer is current",
                ident["sop_uid"], incoming.calling_ae or "?", version,
            )
        return StoreResult(
            outcome=outcome, sop_instance_uid=ident["sop_uid"],
            series_uid=ident["series_uid"], study_uid=ident["study_uid"],
            patient_key=key, version=version, path=str(rel), sha256=sha,
        )

    def _parse(self, incoming: IncomingInstance) -> _Parsed:
        parsed = self._parse_fast(incoming)
        if parsed is not None:
            if UID(incoming.transfer_syntax_uid).is_compressed:
                self._walk(incoming)  # fragments of encapsulated pixel data, to the end
            return parsed
        # Anything else is first followed to its end (bounded memory, no recursion;
        # twin_archive/dataset_walk.py), then its header read up to the pixel data.
        walked = self._walk(incoming)
        ds = self._parse_full(incoming)
        try:
            fields = {kw: _text(ds, kw) for kw in _FIELD_KEYWORDS}
        except Exception as exc:  # a malformed value deep in the data set
            raise InvalidInstanceError("DataSet", f"cannot be decoded ({exc})") from exc
        return _Parsed(
            fields=fields,
            has_pixels=walked.has_pixels,
            has_rows_columns="Rows" in ds and "Columns" in ds,
        )

    @staticmethod
    def _walk(incoming: IncomingInstance) -> Walked:
        """Check that the data set parses to its end (raises InvalidInstanceError)."""
        try:
            ts = UID(incoming.transfer_syntax_uid)
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        except (ValueError, AttributeError) as exc:
            raise InvalidInstanceError("TransferSyntaxUID", f"unknown ({exc})") from exc
        spool = incoming.spool
        if ts.is_deflated:  # inflated in memory (rare; its header is read the same way)
            raw = spool.path.read_bytes()[spool.meta_length:] if spool is not None else incoming.dataset
            try:
                data = zlib.decompress(raw, -zlib.MAX_WBITS)
            except zlib.error as exc:
                raise InvalidInstanceError("DataSet", f"cannot be inflated ({exc})") from exc
            return walk(lambda at, n: data[at:at + n], len(data), implicit=False, little=True)
        if spool is not None:
            return walk(spool.read_at, spool.size, implicit=implicit, little=little)
        data = incoming.dataset
        return walk(lambda at, n: data[at:at + n], len(data), implicit=implicit, little=little)

    @staticmethod
    def _parse_full(incoming: IncomingInstance) -> Dataset:
        """The header up to the pixel data (values over 1 MiB left on disk)."""
        try:
            if incoming.spool is not None:
                return pydicom.dcmread(incoming.spool.path, stop_before_pixels=True,
                                       defer_size="1 MiB")
            return pydicom.dcmread(BytesIO(incoming.file_meta + incoming.dataset),
                                   stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError,
                RecursionError) as exc:
            raise InvalidInstanceError("DataSet", f"cannot be parsed ({exc})") from exc

    @staticmethod
    def _parse_fast(incoming: IncomingInstance) -> _Parsed | None:
        """Read the data set up to its pixel data, without copying or decoding pixels.

        Returns ``None`` whenever the result might differ from a full parse (deflated
        or unknown transfer syntax, anything unusual at or after the pixel data, any
        parse or decode error); the caller then takes the full, slow path, which gives
        the same answers and the same error messages as before.
        """
        try:
            ts = UID(incoming.transfer_syntax_uid)
            if ts.is_deflated or not ts.is_transfer_syntax:
                return None
            implicit, little = ts.is_implicit_VR, ts.is_little_endian
        except (ValueError, AttributeError):
            return None
        spool = incoming.spool
        if spool is None:
            return _scan(BytesIO(incoming.dataset), 0, len(incoming.dataset), implicit, little,
                         lambda n: incoming.dataset[-n:], need_pixels=False)
        # Most headers end well inside the first bytes the spool keeps in memory: read
        # them there (a file read through pydicom costs about 60 system calls).
        parsed = _scan(BytesIO(spool.head), 0, spool.size, implicit, little, spool.tail,
                       need_pixels=True)
        if parsed is not None:
            return parsed
        # A longer header, or elements after the pixel data: walked to its end (bounded
        # memory), then read from the file up to the pixel data.
        Archive._walk(incoming)
        return _scan(spool.open_dataset(), spool.meta_length, spool.size, implicit, little,
                     spool.tail, need_pixels=False, walked=True)

    def _identify(self, parsed: _Parsed, incoming: IncomingInstance) -> dict[str, str]:
        f = parsed.fields
        sop_class = f["SOPClassUID"]
        sop_uid = f["SOPInstanceUID"]
        ident = {
            "patient_id": f["PatientID"],
            "issuer": f["IssuerOfPatientID"],
            "study_uid": f["StudyInstanceUID"],
            "series_uid": f["SeriesInstanceUID"],
            "sop_uid": sop_uid,
            "sop_class": sop_class,
        }
        if not ident["patient_id"]:
            raise InvalidInstanceError("PatientID", "missing or empty: the instance cannot be filed into a twin")
        if len(ident["patient_id"]) > 64:
            raise InvalidInstanceError("PatientID", "longer than 64 characters (LO)")
        for keyword, name in (
            ("SOPInstanceUID", "sop_uid"),
            ("StudyInstanceUID", "study_uid"),
            ("SeriesInstanceUID", "series_uid"),
            ("SOPClassUID", "sop_class"),
        ):
            problem = uid_problem(ident[name] or None)
            if problem:
                raise InvalidInstanceError(keyword, problem)
        if sop_class != incoming.sop_class_uid:
            raise SopClassMismatchError(
                sop_uid, f"data set has SOP Class {sop_class} but was sent as {incoming.sop_class_uid}"
            )
        if sop_uid != incoming.sop_instance_uid:
            raise SopClassMismatchError(
                sop_uid, f"data set's SOP Instance UID differs from the request's ({incoming.sop_instance_uid})"
            )
        if UID(sop_class).name.endswith("Image Storage") and "Multi-frame" not in UID(sop_class).name:
            if not parsed.has_pixels:
                raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Pixel Data")
            if not parsed.has_rows_columns:
                raise SopClassMismatchError(sop_uid, f"{UID(sop_class).name} without Rows/Columns")
        return ident

    def _check_free_space(self, incoming_bytes: int) -> None:
        if not self.min_free_bytes:
            return
        free = shutil.disk_usage(self.data_dir).free
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfResourcesError(
                f"only {free // (1 << 20)} MiB free on the data directory, below the "
                f"reserve of {self.min_free_bytes // (1 << 20)} MiB (min_free_mb)"
            )

    def _flush(self, batch: list[_Pending]) -> None:
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
            with self._lock, write_transaction(self.db) as conn:
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

    def _index_rows(self, conn: sqlite3.Connection, p: _Pending) -> tuple[StoreOutcome, int]:
        """Write one instance's rows (twin, study, series, instance) in the open transaction."""
        fields, ident, key, sha, rel, incoming = (
            p.fields, p.ident, p.key, p.sha, p.rel, p.incoming)
        size = incoming.size
        now = utc_now()
        conn.execute(
            "INSERT INTO twins (patient_key, patient_id, issuer_of_patient_id, patient_name,"
            " birth_date, sex, donate, created_at, updated_at) VALUES (?,?,?,?,?,?,0,?,?)"
            " ON CONFLICT(patient_key) DO UPDATE SET patient_name=excluded.patient_name,"
            " birth_date=excluded.birth_date, sex=excluded.sex, updated_at=excluded.updated_at",
            (key, ident["patient_id"], ident["issuer"], fields["PatientName"],
             fields["PatientBirthDate"], fields["PatientSex"], now, now),
        )
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
        previous = conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM instances WHERE sop_instance_uid = ?",
            (ident["sop_uid"],),
        ).fetchone()[0]
        cur = conn.execute(
            "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, series_uid,"
            " study_uid, patient_key, instance_number, transfer_syntax_uid, size, sha256,"
            " path, calling_ae, received_at, version, current)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
            (ident["sop_uid"], ident["sop_class"], ident["series_uid"], ident["study_uid"],
             key, fields["InstanceNumber"], incoming.transfer_syntax_uid, size, sha, rel,
             incoming.calling_ae, now, previous + 1),
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

    def _discard_unindexed(self, final: Path, rel: str) -> None:
        """Remove a written file whose index row could not be committed."""
        try:
            with self._lock:
                referenced = self.db.execute(
                    "SELECT 1 FROM instances WHERE path = ?", (rel,)
                ).fetchone()
            if not referenced:
                final.unlink(missing_ok=True)
        except (sqlite3.Error, OSError):
            LOG.exception("archive: could not clean up %s after an index failure", rel)

    # ------------------------------------------------------------------ reading
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute(sql, params)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def list_twins(self) -> list[TwinSummary]:
        """All twins, most recently updated first."""
        rows = self._rows(
            "SELECT t.*, (SELECT COUNT(*) FROM studies s WHERE s.patient_key = t.patient_key) AS n_studies,"
            " (SELECT COUNT(*) FROM series se JOIN studies s ON se.study_uid = s.study_uid"
            "   WHERE s.patient_key = t.patient_key) AS n_series,"
            " (SELECT COUNT(*) FROM instances i WHERE i.patient_key = t.patient_key AND i.current = 1) AS n_instances,"
            " (SELECT MAX(received_at) FROM instances i WHERE i.patient_key = t.patient_key) AS last"
            " FROM twins t ORDER BY t.updated_at DESC"
        )
        return [self._summary(r) for r in rows]

    @staticmethod
    def _summary(r: dict[str, Any]) -> TwinSummary:
        return TwinSummary(
            patient_key=r["patient_key"], patient_id=r["patient_id"],
            issuer_of_patient_id=r["issuer_of_patient_id"] or "",
            patient_name=r["patient_name"] or "", donate=bool(r["donate"]),
            studies=r["n_studies"], series=r["n_series"], instances=r["n_instances"],
            last_received=r["last"] or "",
        )

    def find_twin_keys(self, patient_id: str, issuer: str | None = None) -> list[str]:
        """Patient keys of the twins with this Patient ID (one per issuer).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        sql = "SELECT patient_key FROM twins WHERE patient_id = ?"
        params: tuple[Any, ...] = (patient_id,)
        if issuer is not None:
            sql += " AND issuer_of_patient_id = ?"
            params += (issuer,)
        keys = [r["patient_key"] for r in self._rows(sql, params)]
        if not keys:
            raise TwinNotFoundError(patient_id)
        return keys

    def twin(self, patient_id: str, issuer: str | None = None) -> TwinDetail:
        """Everything known about one patient (the first issuer if several match).

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        """
        key = self.find_twin_keys(patient_id, issuer)[0]
        summary = next(t for t in self.list_twins() if t.patient_key == key)
        studies = []
        for st in self._rows(
            "SELECT * FROM studies WHERE patient_key = ? ORDER BY study_date, study_time", (key,)
        ):
            series = tuple(
                SeriesRecord(
                    series_uid=se["series_uid"], modality=se["modality"] or "",
                    body_part=se["body_part"] or "", description=se["description"] or "",
                    series_number=se["series_number"] or "", manufacturer=se["manufacturer"] or "",
                    model_name=se["model_name"] or "",
                    frame_of_reference_uid=se["frame_of_reference_uid"] or "",
                    instances=se["n"], first_received=se["first_received"],
                    last_received=se["last_received"],
                )
                for se in self._rows(
                    "SELECT se.*, (SELECT COUNT(*) FROM instances i WHERE i.series_uid = se.series_uid"
                    " AND i.current = 1) AS n FROM series se WHERE se.study_uid = ?"
                    " ORDER BY CAST(se.series_number AS INTEGER), se.first_received",
                    (st["study_uid"],),
                )
            )
            studies.append(StudyRecord(
                study_uid=st["study_uid"], study_date=st["study_date"] or "",
                study_time=st["study_time"] or "", description=st["description"] or "",
                accession_number=st["accession_number"] or "", series=series,
            ))
        history = tuple(
            ConsentEvent(at=r["at"], donate=bool(r["donate"]), previous=bool(r["previous"]),
                         by=r["by"] or "", reason=r["reason"] or "")
            for r in self._rows(
                "SELECT * FROM consent_events WHERE patient_key = ? ORDER BY id", (key,)
            )
        )
        from twin_archive.labels import twin_labels  # kept local: one hunk in this file
        from twin_archive.results import twin_results
        from twin_archive.training_use import twin_model_versions

        with self._lock:
            results = twin_results(self.db, self.data_dir, key)
            labels = twin_labels(self.db, self.data_dir, key)
            trained = twin_model_versions(self.db, key)
        return TwinDetail(twin=summary, studies=tuple(studies), consent_history=history,
                          results=results, labels=labels, trained_model_versions=trained)

    def set_consent(
        self, patient_id: str, *, donate: bool, by: str, reason: str = "",
        issuer: str | None = None,
    ) -> ConsentEvent:
        """Record a donation decision and its audit entry in one transaction.

        Raises
        ------
        TwinNotFoundError
            If no twin has that Patient ID.
        ValueError
            If ``by`` is empty.
        """
        if not by.strip():
            raise ValueError("by: the person recording the consent decision must be named")
        keys = self.find_twin_keys(patient_id, issuer)
        if len(keys) > 1:
            raise ValueError(
                f"patient_id: {len(keys)} twins share Patient ID {patient_id!r} under different "
                "issuers; name the issuer"
            )
        at = utc_now()
        with self._lock, write_transaction(self.db) as conn:
            previous = bool(conn.execute(
                "SELECT donate FROM twins WHERE patient_key = ?", (keys[0],)
            ).fetchone()[0])
            conn.execute(
                "UPDATE twins SET donate = ?, updated_at = ? WHERE patient_key = ?",
                (int(donate), at, keys[0]),
            )
            conn.execute(
                "INSERT INTO consent_events (patient_key, at, donate, previous, by, reason)"
                " VALUES (?,?,?,?,?,?)",
                (keys[0], at, int(donate), int(previous), by, reason),
            )
        LOG.info("consent: twin %s donation %s -> %s (by %s)", keys[0],
                 "on" if previous else "off", "on" if donate else "off", by)
        return ConsentEvent(at=at, donate=donate, previous=previous, by=by, reason=reason)

    def series_files(self, series_uid: str) -> list[Path]:
        """Absolute paths of the current instances of a series."""
        return [
            self.data_dir / r["path"]
            for r in self._rows(
                "SELECT path FROM instances WHERE series_uid = ? AND current = 1 ORDER BY id",
                (series_uid,),
            )
        ]

    def series_digest(self, series_uid: str) -> tuple[str, int]:
        """SHA-256 over the sorted SHA-256s of a series' current instances, and their number
        (the identity of the series' content, for dataset manifests)."""
        rows = self._rows("SELECT sha256 FROM instances WHERE series_uid = ? AND current = 1"
                          " ORDER BY sha256", (series_uid,))
        text = "\n".join(r["sha256"] for r in rows)
        return hashlib.sha256(text.encode()).hexdigest(), len(rows)

    def instance_count(self) -> int:
        """Number of instance rows (all versions)."""
        return int(self._rows("SELECT COUNT(*) AS n FROM instances")[0]["n"])


