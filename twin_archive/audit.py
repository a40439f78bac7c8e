"""The node's append-only audit log of security-relevant events.

Modelled on DICOM PS3.15 Annex A.5 (the audit message format of IHE ATNA): each event
has a type (with its DICOM Event ID code), an outcome (``EventOutcomeIndicator``: 0
success, 4 minor failure, 8 serious failure, 12 major failure), who did it (the active
participant: a person, or a peer as ``AE@address``), what it was about (the participant
object: a Study Instance UID, a twin's patient key, a model version, a destination) and
a small JSON detail.

Where it lives: ``<data_dir>/audit.sqlite``, table ``audit_events``. It cannot be
silently rewritten:

* SQL triggers refuse every ``UPDATE`` and ``DELETE`` (rows can only be appended);
* every row carries ``hash = sha256(prev_hash + the row's fields)``, a chain from the
  first event, so a row changed or removed behind SQLite's back (triggers dropped, the
  file edited) is found by :meth:`AuditLog.verify` (``dicom-node audit --verify``);
* writes are ``synchronous=FULL``: a recorded event survives a power cut.

How other rooms call it (the archive, the trainer, the shell; stores know nothing of
the network, so this module does not either)::

    from twin_archive.audit import AuditEvent, AuditOutcome, record

    record(data_dir, AuditEvent.DATASET_EXPORTED, AuditOutcome.SUCCESS,
           who="nightly-trainer", what="spleen_ct/2026-11-23",
           detail={"studies": 42, "format": "MSD", "path": "/var/lib/..."})

or, for many events from one process, keep an :class:`AuditLog` open and call
:meth:`AuditLog.record` with the same arguments (it is thread-safe). Never put patient
names or Patient IDs in ``who``, ``what`` or ``detail``: use the twin's patient key.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import Migration, connect, migrate, write

LOG = logging.getLogger(__name__)

AUDIT_DB_NAME = "audit.sqlite"
GENESIS = "0" * 64


class AuditEvent(str, enum.Enum):
    """Event types, each mapped to its DICOM PS3.15 A.5.3 Event ID in :data:`EVENT_IDS`."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REFUSED = "association-refused"
    STUDY_RECEIVED = "study-received"
    RESULTS_SENT = "results-sent"
    CONSENT_CHANGED = "consent-changed"
    LABEL_IMPORTED = "label-imported"
    DATASET_EXPORTED = "dataset-exported"
    MODEL_PROMOTED = "model-promoted"
    TWIN_MERGED = "twin-merged"
    ARCHIVE_REPAIRED = "archive-repaired"
    ARCHIVE_PRUNED = "archive-pruned"
    TWIN_ERASED = "twin-erased"
    TWIN_HELD = "twin-held"
    TWIN_RELEASED = "twin-released"
    PRIORS_RETRIEVED = "priors-retrieved"


#: DICOM Event ID (code, meaning) of each event type; DCM coding scheme (PS3.16 CID 400).
EVENT_IDS: dict[AuditEvent, tuple[str, str]] = {
    AuditEvent.APPLICATION_START: ("110100", "Application Activity"),
    AuditEvent.APPLICATION_STOP: ("110100", "Application Activity"),
    AuditEvent.ASSOCIATION_ACCEPTED: ("110114", "User Authentication"),
    AuditEvent.ASSOCIATION_REFUSED: ("110113", "Security Alert"),
    AuditEvent.STUDY_RECEIVED: ("110104", "DICOM Instances Transferred"),
    AuditEvent.RESULTS_SENT: ("110104", "DICOM Instances Transferred"),
    AuditEvent.CONSENT_CHANGED: ("110110", "Patient Record"),
    AuditEvent.LABEL_IMPORTED: ("110107", "Import"),
    AuditEvent.DATASET_EXPORTED: ("110106", "Export"),
    AuditEvent.MODEL_PROMOTED: ("110113", "Security Alert"),  # type 110131 Software Configuration
    AuditEvent.TWIN_MERGED: ("110110", "Patient Record"),
    AuditEvent.ARCHIVE_REPAIRED: ("110113", "Security Alert"),  # the archive was changed by hand
    AuditEvent.ARCHIVE_PRUNED: ("110105", "DICOM Study Deleted"),
    AuditEvent.TWIN_ERASED: ("110105", "DICOM Study Deleted"),
    AuditEvent.TWIN_HELD: ("110110", "Patient Record"),
    AuditEvent.TWIN_RELEASED: ("110110", "Patient Record"),
    AuditEvent.PRIORS_RETRIEVED: ("110104", "DICOM Instances Transferred"),
}


class AuditOutcome(enum.IntEnum):
    """PS3.15 A.5.3 ``EventOutcomeIndicator``."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditEntry:
    """One recorded event."""

    id: int
    at: str  # ISO 8601, UTC, microseconds
    event_type: AuditEvent
    event_id: str  # DICOM Event ID code (DCM)
    outcome: AuditOutcome
    who: str
    what: str
    detail: dict[str, Any]
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``dicom-node audit --json``)."""
        return {"id": self.id, "at": self.at, "event_type": self.event_type.value,
                "event_id": self.event_id, "event_id_meaning": EVENT_IDS[self.event_type][1],
                "outcome": int(self.outcome), "outcome_name": self.outcome.name.lower(),
                "who": self.who, "what": self.what, "detail": self.detail, "hash": self.hash}


class AuditLogTamperedError(RuntimeError):
    """The hash chain of the audit log is broken at a row."""

    def __init__(self, row_id: int, why: str) -> None:
        self.row_id = row_id
        super().__init__(f"audit log tampered with at event {row_id}: {why}")


def _m1(db: sqlite_utils.Database) -> None:
    conn = db.conn
    conn.execute(
        "CREATE TABLE audit_events (id INTEGER PRIMARY KEY, at TEXT NOT NULL,"
        " event_type TEXT NOT NULL, event_id TEXT NOT NULL, outcome INTEGER NOT NULL,"
        " who TEXT NOT NULL, what TEXT NOT NULL, detail TEXT NOT NULL,"
        " prev_hash TEXT NOT NULL, hash TEXT NOT NULL)")
    conn.execute("CREATE INDEX audit_events_at ON audit_events (at)")
    conn.execute("CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events"
                 " BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END")
    conn.execute("CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events"
                 " BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END")


MIGRATIONS: tuple[Migration, ...] = (_m1,)


def _row_hash(prev_hash: str, at: str, event_type: str, event_id: str, outcome: int,
              who: str, what: str, detail: str) -> str:
    payload = json.dumps([prev_hash, at, event_type, event_id, outcome, who, what, detail],
                         ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _coerce(event_type: AuditEvent | str, outcome: AuditOutcome | int | str
            ) -> tuple[AuditEvent, AuditOutcome]:
    try:
        ev = AuditEvent(event_type)
    except ValueError:
        raise ValueError(f"event_type must be one of {[e.value for e in AuditEvent]}, "
                         f"got {event_type!r}") from None
    try:
        oc = AuditOutcome[outcome.upper()] if isinstance(outcome, str) else AuditOutcome(outcome)
    except (KeyError, ValueError):
        raise ValueError(f"outcome must be an AuditOutcome (0, 4, 8, 12), got {outcome!r}") from None
    return ev, oc


class AuditLog:
    """The audit log of one data directory; thread-safe, several processes may append.

    Parameters
    ----------
    data_dir : path
        The node's data directory (``audit.sqlite`` is created there).
    timeout_s : float
        How long a writer waits for another process's write, seconds.
    """

    def __init__(self, data_dir: Path | str, *, timeout_s: float = 30.0) -> None:
        self.path = Path(data_dir) / AUDIT_DB_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = connect(self.path, timeout_s=timeout_s)
        self.conn = self.db.conn
        migrate(self.db, MIGRATIONS, name="audit log")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, event_type: AuditEvent | str, outcome: AuditOutcome | int | str,
               who: str, what: str, detail: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append one event, durably, and return it.

        Parameters
        ----------
        event_type : AuditEvent or str
            What happened, e.g. ``AuditEvent.LABEL_IMPORTED`` or ``"label-imported"``.
        outcome : AuditOutcome, int or str
            ``AuditOutcome.SUCCESS`` (0), ``MINOR_FAILURE`` (4), ``SERIOUS_FAILURE`` (8) or
            ``MAJOR_FAILURE`` (12); the name (``"success"``) is accepted too.
        who : str
            The active participant: a person's user name, a process (``"nightly-trainer"``)
            or a DICOM peer as ``AE@address``.
        what : str
            The participant object: a Study Instance UID, a twin's patient key, a model
            version, a destination key. No patient names or Patient IDs.
        detail : mapping, optional
            Small JSON-serialisable extras (counts, reasons, paths).

        Raises
        ------
        ValueError
            If ``event_type`` or ``outcome`` is unknown, ``who`` is empty, or ``detail``
            is not JSON-serialisable.
        """
        ev, oc = _coerce(event_type, outcome)
        if not isinstance(who, str) or not who.strip():
            raise ValueError("who: the person, process or peer responsible must be named")
        if not isinstance(what, str):
            raise TypeError(f"what must be a str, got {type(what).__name__}")
        try:
            detail_text = json.dumps(dict(detail or {}), sort_keys=True, ensure_ascii=True)
        except TypeError as exc:
            raise ValueError(f"detail must be JSON-serialisable: {exc}") from None
        at = iso(utc_now())
        event_id = EVENT_IDS[ev][0]
        with self._lock, write(self.db) as conn:
            row = conn.execute("SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1").fetchone()
            prev = row[0] if row else GENESIS
            digest = _row_hash(prev, at, ev.value, event_id, int(oc), who, what, detail_text)
            cur = conn.execute(
                "INSERT INTO audit_events (at, event_type, event_id, outcome, who, what, detail,"
                " prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?)",
                (at, ev.value, event_id, int(oc), who, what, detail_text, prev, digest))
            row_id = int(cur.lastrowid or 0)
        return AuditEntry(id=row_id, at=at, event_type=ev, event_id=event_id, outcome=oc,
                          who=who, what=what, detail=json.loads(detail_text), hash=digest)

    def entries(self, *, since: datetime | None = None,
                event_type: AuditEvent | str | None = None, limit: int | None = None
                ) -> list[AuditEntry]:
        """Events in the order they were recorded (oldest first).

        Parameters
        ----------
        since : datetime, optional
            Only events at or after this time (naive times are taken as UTC).
        event_type : AuditEvent or str, optional
            Only events of this type.
        limit : int, optional
            Only the last ``limit`` events.
        """
        sql, args = "SELECT * FROM audit_events WHERE 1=1", []  # type: str, list[Any]
        if since is not None:
            if since.tzinfo is None:
                since = since.replace(tzinfo=UTC)
            sql += " AND at >= ?"
            args.append(iso(since))
        if event_type is not None:
            sql += " AND event_type = ?"
            args.append(AuditEvent(event_type).value)
        if limit is not None:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT ?)"
            args.append(int(limit))
        with self._lock:
            rows = self.conn.execute(sql + " ORDER BY id", args).fetchall()
        return [AuditEntry(id=r["id"], at=r["at"], event_type=AuditEvent(r["event_type"]),
                           event_id=r["event_id"], outcome=AuditOutcome(r["outcome"]),
                           who=r["who"], what=r["what"], detail=json.loads(r["detail"]),
                           hash=r["hash"]) for r in rows]

    def verify(self) -> int:
        """Check the hash chain from the first event; return the number of events.

        Raises
        ------
        AuditLogTamperedError
            Naming the first row whose hash or link does not match.
        """
        prev = GENESIS
        n = 0
        with self._lock:
            rows = self.conn.execute("SELECT * FROM audit_events ORDER BY id").fetchall()
        for r in rows:
            if r["prev_hash"] != prev:
                raise AuditLogTamperedError(r["id"], "link to the previous event broken "
                                                     "(an event was removed or inserted)")
            digest = _row_hash(prev, r["at"], r["event_type"], r["event_id"], r["outcome"],
                               r["who"], r["what"], r["detail"])
            if digest != r["hash"]:
                raise AuditLogTamperedError(r["id"], "content does not match its hash")
            prev = digest
            n += 1
        return n


def record(data_dir: Path | str, event_type: AuditEvent | str, outcome: AuditOutcome | int | str,
           who: str, what: str, detail: Mapping[str, Any] | None = None) -> AuditEntry:
    """Append one event to ``<data_dir>/audit.sqlite`` (opens and closes the log).

    The one-call form for commands and jobs that record an event now and then (label
    imports, dataset exports, model promotions, consent changes). Arguments as
    :meth:`AuditLog.record`.

    Raises
    ------
    ValueError
        If an argument is invalid (see :meth:`AuditLog.record`).
    """
    with AuditLog(data_dir) as log:
        return log.record(event_type, outcome, who, what, detail)
