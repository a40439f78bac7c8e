"""Confirmed delivery: the send queue's rows between ``sent`` and ``confirmed``.

A destination with ``confirm = "commitment"`` (DIMSE, PS3.4 Annex J) or ``"read-back"``
(DICOMweb) does not stop at the acknowledgement: the row is ``sent`` with a deadline
(``confirm_by``, ``confirm_timeout_s`` after the acknowledgement) and becomes
``confirmed`` when the archive says it keeps the object (a Storage Commitment
N-EVENT-REPORT naming it, or the instance found by a QIDO-RS read-back). A row still
unconfirmed at its deadline, or one the archive reports as failed, is sent again (a
re-send of the same instance is idempotent: same SOP Instance UID) up to
``confirm_resends`` times, then ``held`` with the reason.

Invariant: ``confirm_by`` is set exactly while a row is ``sent`` and waits for its
confirmation. Every transition here is one transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write

LOG = logging.getLogger(__name__)

# The states (dicom_node.queue.sender.SendState's values; no import: the sender imports us).
_QUEUED, _SENT, _CONFIRMED, _HELD = "queued", "sent", "confirmed", "held"


@dataclass(frozen=True, kw_only=True, slots=True)
class Awaiting:
    """A sent row that waits for its confirmation."""

    id: int
    destination: str
    url: str
    path: str
    sop_instance_uid: str
    confirm: str
    confirm_by: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Expired:
    """What :meth:`ConfirmationLedger.expire` did: rows queued again, rows held."""

    resent: int
    held: int


class ConfirmationLedger:
    """The confirmation transitions of ``sends``, on one queue connection.

    Parameters
    ----------
    db : sqlite_utils.Database
        The queue database (:func:`dicom_node.queue.jobs.connect_queue`).
    lock : threading.Lock, optional
        The lock that guards ``db`` (the sender's), if it is shared.
    """

    def __init__(self, db: sqlite_utils.Database, lock: threading.Lock | None = None) -> None:
        self.db = db
        self._lock = lock or threading.Lock()

    def acknowledged(self, ids: Sequence[int], *, timeout_s: float) -> None:
        """Rows acknowledged by the archive: ``sent``; those whose ``confirm`` is not
        ``none`` wait until now + ``timeout_s`` for their confirmation."""
        now = utc_now()
        with self._lock, write(self.db) as conn:
            conn.executemany(
                "UPDATE sends SET state = ?, sent_at = ?, attempts = attempts + 1, last_error = '',"
                " confirm_by = CASE WHEN confirm = 'none' THEN NULL ELSE ? END WHERE id = ?",
                [(_SENT, iso(now), iso(now + timedelta(seconds=timeout_s)), i) for i in ids])

    def requested(self, ids: Sequence[int], transaction_uid: str) -> None:
        """A Storage Commitment request for ``ids`` went out under ``transaction_uid``."""
        with self._lock, write(self.db) as conn:
            conn.executemany("UPDATE sends SET commitment_uid = ? WHERE id = ?",
                             [(transaction_uid, i) for i in ids])

    def unconfirmable(self, ids: Sequence[int], note: str) -> None:
        """The archive cannot confirm: the rows stay ``sent`` (acknowledged), with ``note``."""
        with self._lock, write(self.db) as conn:
            conn.executemany("UPDATE sends SET confirm_by = NULL, last_error = ? WHERE id = ?"
                             " AND state = ?", [(note, i, _SENT) for i in ids])

    def confirm(self, ids: Sequence[int]) -> int:
        """Rows the archive has taken responsibility for: ``confirmed``."""
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            before = conn.total_changes
            conn.executemany(
                "UPDATE sends SET state = ?, confirmed_at = ?, confirm_by = NULL, last_error = ''"
                " WHERE id = ? AND state IN (?, ?)", [(_CONFIRMED, now, i, _SENT, _QUEUED) for i in ids])
            return conn.total_changes - before

    def report(self, transaction_uid: str, committed: Sequence[str],
               failed: Mapping[str, str], *, max_resends: int) -> tuple[int, int]:
        """A Storage Commitment report: ``committed`` SOP Instance UIDs are confirmed,
        ``failed`` ones (``{uid: reason}``) sent again or held. Returns (confirmed, failed)."""
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            rows = conn.execute("SELECT id, sop_instance_uid, resends FROM sends WHERE"
                                " commitment_uid = ? AND state IN (?, ?)",
                                (transaction_uid, _SENT, _QUEUED)).fetchall()
            by_uid = {r[1]: (r[0], r[2]) for r in rows}
            ok = [by_uid[u][0] for u in committed if u in by_uid]
            conn.executemany("UPDATE sends SET state = ?, confirmed_at = ?, confirm_by = NULL,"
                             " last_error = '' WHERE id = ?", [(_CONFIRMED, now, i) for i in ok])
            bad = [(by_uid[u][0], by_uid[u][1], f"storage commitment failed: {why}")
                   for u, why in failed.items() if u in by_uid]
            _resend_or_hold(conn, bad, max_resends)
        return len(ok), len(bad)

    def awaiting(self, confirm: str, limit: int = 1000) -> list[Awaiting]:
        """Rows waiting for a confirmation of kind ``confirm``, oldest first."""
        with self._lock:
            rows = self.db.conn.execute(
                "SELECT id, destination, url, path, sop_instance_uid, confirm, confirm_by FROM sends"
                " WHERE confirm_by IS NOT NULL AND confirm = ? ORDER BY id LIMIT ?",
                (confirm, limit)).fetchall()
        return [Awaiting(id=r[0], destination=r[1], url=r[2], path=r[3], sop_instance_uid=r[4],
                         confirm=r[5], confirm_by=r[6]) for r in rows]

    def waiting(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` still wait for their confirmation."""
        if not ids:
            return 0
        with self._lock:
            return int(self.db.conn.execute(
                f"SELECT COUNT(*) FROM sends WHERE confirm_by IS NOT NULL AND id IN"
                f" ({','.join('?' * len(ids))})", list(ids)).fetchone()[0])

    def next_deadline(self) -> str | None:
        """The earliest ``confirm_by`` (ISO 8601 UTC), or None when nothing waits."""
        with self._lock:
            return self.db.conn.execute(
                "SELECT MIN(confirm_by) FROM sends WHERE confirm_by IS NOT NULL").fetchone()[0]

    def expire(self, *, max_resends: int, timeout_s: float) -> Expired:
        """Rows past their deadline: queued again (up to ``max_resends`` times), then held."""
        now = iso(utc_now())
        first = self.next_deadline()
        if first is None or first > now:  # nothing due: no write transaction at every pass
            return Expired(resent=0, held=0)
        with self._lock, write(self.db) as conn:
            rows = conn.execute("SELECT id, resends, confirm FROM sends WHERE confirm_by IS NOT NULL"
                                " AND confirm_by <= ?", (now,)).fetchall()
            what = {"commitment": "no Storage Commitment report", "read-back": "not found by read-back"}
            bad = [(r[0], r[1], f"not confirmed: {what.get(r[2], r[2])} within {timeout_s:g} s")
                   for r in rows]
            resent = _resend_or_hold(conn, bad, max_resends)
        return Expired(resent=resent, held=len(bad) - resent)


def _resend_or_hold(conn: object, rows: Sequence[tuple[int, int, str]], max_resends: int) -> int:
    """Queue ``(id, resends, reason)`` rows again, or hold those sent again
    ``max_resends`` times already; returns how many were queued again."""
    now = iso(utc_now())
    again = [(r[2], now, r[0]) for r in rows if r[1] < max_resends]
    held = [(f"{r[2]}; held after {r[1]} re-send(s)", r[0]) for r in rows if r[1] >= max_resends]
    conn.executemany(  # type: ignore[attr-defined]
        f"UPDATE sends SET state = '{_QUEUED}', resends = resends + 1, confirm_by = NULL,"
        " commitment_uid = '', last_error = ?, next_attempt_at = ? WHERE id = ?", again)
    conn.executemany(  # type: ignore[attr-defined]
        f"UPDATE sends SET state = '{_HELD}', confirm_by = NULL, last_error = ? WHERE id = ?", held)
    for reason, _ in held:
        LOG.error("send held: %s", reason)
    return len(again)
