"""The durable send queue: results go to each destination by C-STORE, once.

Each object of a result is one row per destination in table ``sends`` of
``queue.sqlite`` (DESIGN decision 5). The sender thread takes the rows that are due,
opens one association per destination proposing only the presentation contexts those
objects need (their SOP classes, each with the transfer syntax it is stored in) and
sends them. A destination that cannot be reached, or an association that breaks, keeps
the rows queued with exponential back-off (``send_backoff_initial_s`` doubling up to
``send_backoff_max_s``) for as long as it takes: nothing is dropped, and the rows with
their attempts and last error are listed by ``dicom-node sends``.

Per-destination profiles (:mod:`dicom_node.profiles`): each row carries the transfer
syntaxes its destination accepts; the association proposes one context per SOP class
and fitting syntax of the objects about to be sent, and each object goes in the most
preferred syntax the peer accepted, falling back to an uncompressed one when the
compressed context is refused or a compressed C-STORE fails. An object that failed
validation is queued ``held`` with the reason and is never sent. A PACS that answers a
C-STORE with a failure status gets :data:`MAX_REFUSALS` tries, then the row is left
``failed`` with that status as its reason.
"""

from __future__ import annotations

import builtins
import enum
import logging
import sqlite3
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, MutableSequence, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import sqlite_utils
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.queue import commitment, web_sender
from dicom_node.queue.commitment import ReportInbox
from dicom_node.queue.confirmations import ConfirmationLedger
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.faults import StateLog
from dicom_node.queue.durable_queue import DurableQueue
from dicom_node.queue.jobs import connect_queue, open_queue_readonly
from dicom_node.profiles import UNCOMPRESSED, ObjectShape, alias, choose, contexts_for, encode_as
from dicom_node.settings import Destination, seg_type_for
from dicom_node.wire.statuses import SUCCESS, is_warning
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome
from twin_archive.results import AIResult

LOG = logging.getLogger(__name__)

#: C-STORE failure statuses from the PACS tolerated per object before it is left failed.
MAX_REFUSALS = 5
#: Objects sent on one association at most.
BATCH = 1000
#: Seconds an association stays open after a Storage Commitment request for a report on it.
SAME_ASSOCIATION_WAIT_S = 0.5
#: At most this long for the answer to a Storage Commitment N-ACTION (the answer is
#: immediate, the report comes later): a peer that never answers held every delivery of
#: the node for the whole DIMSE timeout.
COMMITMENT_ANSWER_S = 10.0
#: A peer that refused Storage Commitment (aborted at the request, refused it, or does not
#: accept the SOP class) is not asked again for this long; its objects stay ``sent``.
COMMITMENT_ASK_AGAIN_S = 3600.0
#: Seconds between two read-backs of what DICOMweb destinations should hold.
READ_BACK_EVERY_S = 1.0


class SendState(str, enum.Enum):
    """Where an outbound object is."""

    QUEUED = "queued"
    SENT = "sent"  # acknowledged (C-STORE success, STOW-RS stored); awaiting a confirmation
    # while confirm_by is set (dicom_node.queue.confirmations)
    CONFIRMED = "confirmed"  # the archive took responsibility (Storage Commitment, read-back)
    FAILED = "failed"
    HELD = "held"  # not sent, or given up, with the reason in last_error (invalid, refused
    # by a DICOMweb server, never confirmed)


@dataclass(frozen=True, kw_only=True, slots=True)
class Send:
    """One object queued for one destination."""

    id: int
    result_id: int
    kind: str
    destination: str
    sop_class_uid: str
    sop_instance_uid: str
    state: SendState
    attempts: int
    enqueued_at: str
    next_attempt_at: str
    sent_at: str
    last_error: str
    confirm: str = "none"  # commitment, read-back or none
    confirm_by: str = ""  # while sent and awaiting its confirmation
    confirmed_at: str = ""
    resends: int = 0  # sent again for want of a confirmation


@dataclass(frozen=True, kw_only=True, slots=True)
class SendCounts:
    """How many objects are in each state, and the failed attempts to send them."""

    by_state: dict[str, int]
    failed_attempts: int


def read_send_counts(data_dir: Path | str) -> SendCounts:
    """The send queue of ``<data_dir>/queue.sqlite`` counted, read only (the node need
    not run; no queue counts as empty)."""
    conn = open_queue_readonly(data_dir)
    if conn is None:
        return SendCounts(by_state={}, failed_attempts=0)
    with closing(conn):
        by_state = dict(conn.execute("SELECT state, COUNT(*) FROM sends GROUP BY state"))
        # attempts count every try; the one that delivered a sent (or confirmed) row is no
        # failure, nor are the deliveries of rows sent again for want of a confirmation
        failed = conn.execute("SELECT COALESCE(SUM(attempts), 0) - COALESCE(SUM(state IN (?, ?)), 0)"
                              " - COALESCE(SUM(resends), 0) FROM sends",
                              (SendState.SENT.value, SendState.CONFIRMED.value)).fetchone()[0]
    return SendCounts(by_state=by_state, failed_attempts=int(failed))


def _send(r: sqlite3.Row) -> Send:
    return Send(id=r["id"], result_id=r["result_id"], kind=r["kind"],
                destination=r["destination"], sop_class_uid=r["sop_class_uid"],
                sop_instance_uid=r["sop_instance_uid"], state=SendState(r["state"]),
                attempts=r["attempts"], enqueued_at=r["enqueued_at"],
                next_attempt_at=r["next_attempt_at"], sent_at=r["sent_at"] or "",
                last_error=r["last_error"], confirm=r["confirm"], confirm_by=r["confirm_by"] or "",
                confirmed_at=r["confirmed_at"] or "", resends=r["resends"])


def sends_of_results(conn: sqlite_utils.Database, result_ids: Sequence[int]) -> list[Send]:
    """The objects queued for the results ``result_ids``, in the order they were queued.

    Parameters
    ----------
    conn : sqlite_utils.Database
        A connection to the queue (:func:`~dicom_node.queue.jobs.connect_queue`).
    result_ids : sequence of int
        Ids of AI results (:class:`~twin_archive.results.AIResult`).
    """
    ids = list(dict.fromkeys(int(i) for i in result_ids))
    if not ids:
        return []
    rows = conn.execute(f"SELECT * FROM sends WHERE result_id IN ({','.join('?' * len(ids))})"
                        " ORDER BY id", ids).fetchall()
    return [_send(r) for r in rows]


def _is_success(status: int) -> bool:
    # PS3.7 C.1.1 success, PS3.4 B.2.3 warnings (0001, Bxxx): the object is stored.
    return status == SUCCESS or is_warning(status)


#: Bits Allocated of each result kind's pixel data (0: none), to choose syntaxes
#: without reading the files before the association.
_KIND_BITS = {"seg": 1, "sr": 0, "overlay": 8, "rtstruct": 0}


def _preferred(row: Mapping[str, object]) -> list[str]:
    """The row's destination syntaxes, best first, then the syntax the file is stored in."""
    listed = [s for s in str(row.get("accept_syntaxes", "") or "").split(",") if s]
    stored = str(row["transfer_syntax_uid"])
    return listed + ([stored] if stored not in listed else [])


def _contexts(rows: Sequence[Mapping[str, object]]) -> list[PresentationContext]:
    """Presentation contexts for exactly the objects in ``rows`` (their SOP classes)."""
    by_syntaxes: dict[tuple[str, ...], list[ObjectShape]] = defaultdict(list)
    for r in rows:
        by_syntaxes[tuple(_preferred(r))].append(ObjectShape(
            sop_class_uid=str(r["sop_class_uid"]), bits_allocated=_KIND_BITS.get(str(r["kind"]), 0)))
    seen: set[tuple[str, str]] = set()
    contexts = []
    for syntaxes, shapes in by_syntaxes.items():
        for cx in contexts_for(shapes, syntaxes):
            key = (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            if key not in seen:
                seen.add(key)
                contexts.append(cx)
    return contexts


def _syntaxes_for(assoc: Association, row: Mapping[str, object], ds: Dataset) -> list[str]:
    """Accepted syntaxes to send ``ds`` in, best first (uncompressed ones last)."""
    sop = str(ds.SOPClassUID)
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if str(cx.abstract_syntax) == sop}
    return choose(ObjectShape.of(ds), _preferred(row), accepted)


def _store(assoc: Association, ds: Dataset, tries: Sequence[str], dest: str) -> Dataset:
    """C-STORE ``ds`` in the first of ``tries`` that works; fall back on refusal.

    A compressed attempt that cannot be encoded or that the peer answers with a
    failure status is followed by the next syntax (finally an uncompressed one).
    """
    status = Dataset()
    for i, ts in enumerate(tries):
        try:
            encoded = encode_as(ds, ts)
        except Exception as exc:  # a codec that cannot write this object: next syntax
            LOG.warning("send to %s: cannot encode %s as %s (%s); trying the next syntax",
                        dest, ds.SOPInstanceUID, alias(ts), exc)
            continue
        status = assoc.send_c_store(encoded)
        code = int(status.Status) if "Status" in status else None
        if code is None or _is_success(code) or ts in UNCOMPRESSED or i == len(tries) - 1:
            return status
        LOG.warning("send to %s: %s refused in %s with status 0x%04X; sending it uncompressed",
                    dest, ds.SOPInstanceUID, alias(ts), code)
    return status


class Sender(DurableQueue):
    """Sends queued result objects; one background thread.

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory (``queue.sqlite``; result files live under it).
    ae_title : str
        Calling AE title of the node.
    backoff_initial_s, backoff_max_s : float
        First retry delay and its cap, seconds.
    network_timeout_s : float
        Connection, ACSE and DIMSE timeout, seconds.
    tls_context : ssl.SSLContext, optional
        Client TLS context for the destinations in ``tls_destinations``.
    tls_destinations : iterable of str
        Keys (``AET@HOST:PORT``) of the destinations sent to over TLS.
    audit : twin_archive.audit.AuditLog, optional
        Where one ``results-sent`` event per association with objects delivered goes.
    destinations : sequence of Destination
        The configured destinations: a DICOMweb row is sent with the authentication and
        CA of the destination of its key (:meth:`set_destinations` on reload).
    confirm_timeout_s : float
        Seconds an acknowledged object waits for its confirmation before it is sent again.
    confirm_resends : int
        Times an unconfirmed object is sent again before it is held.
    """

    table = "sends"

    def __init__(self, data_dir: Path | str, *, ae_title: str, backoff_initial_s: float = 2.0,
                 backoff_max_s: float = 300.0, network_timeout_s: float = 30.0,
                 tls_context: ssl.SSLContext | None = None,
                 tls_destinations: Sequence[str] | frozenset[str] = frozenset(),
                 audit: AuditLog | None = None, destinations: Sequence[Destination] = (),
                 confirm_timeout_s: float = 60.0, confirm_resends: int = 3) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("backoff_initial_s must be > 0 and <= backoff_max_s, got "
                             f"{backoff_initial_s} and {backoff_max_s}")
        self.data_dir = Path(data_dir)
        self.ae_title = ae_title
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.network_timeout_s = network_timeout_s
        self.tls_context = tls_context
        self.tls_destinations = frozenset(tls_destinations)
        if self.tls_destinations and tls_context is None:
            raise ValueError("tls_destinations need a tls_context")
        self.audit = audit
        self.confirm_timeout_s = confirm_timeout_s
        self.confirm_resends = confirm_resends
        self.web_destinations: dict[str, Destination] = {}
        self.set_destinations(destinations)
        super().__init__(connect_queue(self.data_dir))
        self.ledger = ConfirmationLedger(self.db, self._lock)
        # Reports on the sender's own associations (the listener has its own inbox).
        self.inbox = ReportInbox(self.data_dir, max_resends=confirm_resends, ledger=self.ledger)
        self._said_no_commitment: set[str] = set()
        #: destination -> (monotonic time until which it is not asked, why)
        self._refused_commitment: dict[str, tuple[float, str]] = {}
        self.said_read_back_failed: set[str] = set()
        self._read_back_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_destinations(self, destinations: Sequence[Destination]) -> None:
        """The configured destinations (DICOMweb ones are looked up by key when sending)."""
        self.web_destinations = {d.key: d for d in destinations if d.web}

    # ----------------------------------------------------------------- queueing
    def enqueue(self, result: AIResult, destinations: Sequence[Destination],
                held: Mapping[str, str] | None = None) -> int:
        """Queue every object of ``result`` each destination wants, in one transaction.

        Parameters
        ----------
        held : mapping, optional
            ``{SOP Instance UID: reason}`` of objects that failed validation: their
            rows are ``held`` with the reason as last error and are never sent.

        Returns the number of new rows (rows already queued for the same object and
        destination are kept as they are, so a re-run job queues nothing twice).

        A result with a SEG of each type (destinations that ask for different
        ``seg_type``) gives each destination the SEG of its type and the SR that
        references it (:func:`~dicom_node.settings.seg_type_for`); every other object
        goes to every destination that takes its kind.
        """
        now = iso(utc_now())
        held = dict(held or {})
        written = result.seg_types
        paired = result.seg_type_of_objects() if len(written) > 1 else {}
        rows = []
        for dest in destinations:
            own = seg_type_for(dest, written) if paired else ""
            for obj in result.objects:
                if obj.kind in dest.send and paired.get(obj.sop_instance_uid, own) == own:
                    reason = held.get(obj.sop_instance_uid)
                    state = SendState.HELD if reason is not None else SendState.QUEUED
                    rows.append((result.id, obj.kind, dest.key, dest.ae_title, dest.host,
                                 dest.port, str(obj.path.relative_to(self.data_dir.resolve())),
                                 obj.sop_class_uid, obj.sop_instance_uid, obj.transfer_syntax_uid,
                                 state.value, now, now, ",".join(dest.transfer_syntaxes),
                                 f"not sent, invalid: {reason}" if reason is not None else "",
                                 dest.url.rstrip("/"), dest.confirm))
        with self._lock, write(self.db) as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO sends (result_id, kind, destination, ae_title, host, port,"
                " path, sop_class_uid, sop_instance_uid, transfer_syntax_uid, state, enqueued_at,"
                " next_attempt_at, accept_syntaxes, last_error, url, confirm)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            added = conn.total_changes - before
        if added:
            LOG.info("result %d: %d object(s) queued for %s", result.id, added,
                     ", ".join(d.key for d in destinations))
            self.wakeup.set()
        return added

    def list(self, state: SendState | str | None = None, limit: int = 200) -> list[Send]:
        """Queued, sent or failed objects, newest first."""
        return [_send(r) for r in self._rows(
            SendState(state).value if state is not None else None, limit)]

    def pending(self) -> int:
        """Number of objects still queued."""
        with self._lock:
            return int(self.conn.execute("SELECT COUNT(*) FROM sends WHERE state = ?",
                                         (SendState.QUEUED.value,)).fetchone()[0])

    # ----------------------------------------------------------------- sending
    def _due(self) -> dict[str, builtins.list[dict[str, object]]]:
        with self._lock:
            rows = self.conn.execute(
                "SELECT * FROM sends WHERE state = ? AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (SendState.QUEUED.value, iso(utc_now()), BATCH)).fetchall()
        by_dest: dict[str, list[dict[str, object]]] = defaultdict(list)
        for r in rows:
            by_dest[r["destination"]].append(dict(r))
        return by_dest

    def _backoff(self, attempts: int) -> float:
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempts - 1)))

    def _mark_sent(self, send_id: int) -> None:
        self.mark_sent([send_id])

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Acknowledged: ``sent``, waiting for a confirmation where the row wants one."""
        self.ledger.acknowledged(ids, timeout_s=self.confirm_timeout_s)

    def mark_held(self, ids: Sequence[int], reason: str) -> None:
        """Given up for a reason that a re-send would not change: ``held`` with it."""
        with self._lock, write(self.db) as conn:
            conn.executemany("UPDATE sends SET state = ?, attempts = attempts + 1, last_error = ?,"
                             " confirm_by = NULL WHERE id = ?",
                             [(SendState.HELD.value, reason, i) for i in ids])

    def mark_retry(self, ids: Sequence[int], error: str) -> float:
        """A failed attempt that a later one may fix; returns the back-off delay."""
        return self._mark_retry(ids, error)

    def _mark_retry(self, ids: Sequence[int], error: str, *, refused: bool = False) -> float:
        """Count a failed attempt for ``ids``; returns the delay before the next one."""
        delay = 0.0
        with self._lock, write(self.db) as conn:
            for send_id in ids:
                attempts = conn.execute("SELECT attempts FROM sends WHERE id = ?",
                                        (send_id,)).fetchone()[0] + 1
                delay = self._backoff(attempts)
                if refused and attempts >= MAX_REFUSALS:
                    conn.execute("UPDATE sends SET state = ?, attempts = ?, last_error = ?"
                                 " WHERE id = ?", (SendState.FAILED.value, attempts, error, send_id))
                else:
                    conn.execute(
                        "UPDATE sends SET attempts = ?, last_error = ?, next_attempt_at = ?"
                        " WHERE id = ?",
                        (attempts, error, iso(utc_now() + timedelta(seconds=delay)), send_id))
        return delay

    def send_due(self) -> int:
        """Settle the confirmations that are due, then send what is due now, one
        association (or STOW-RS session) per destination; return objects delivered."""
        self.settle_confirmations()
        delivered = 0
        for dest, rows in self._due().items():
            if self._stop.is_set():
                break
            if rows[0]["url"]:
                delivered += web_sender.send(self, dest, rows)
            else:
                delivered += self._send_to(dest, rows)
        return delivered

    def settle_confirmations(self) -> None:
        """Read back what DICOMweb destinations should now hold (at most once a second),
        then send again, or hold, what stayed unconfirmed past its deadline."""
        if time.monotonic() - self._read_back_at >= READ_BACK_EVERY_S:
            self._read_back_at = time.monotonic()
            web_sender.read_back(self, self.ledger.awaiting("read-back"))
        expired = self.ledger.expire(max_resends=self.confirm_resends,
                                     timeout_s=self.confirm_timeout_s)
        if expired.resent or expired.held:
            LOG.warning("sender: %d unconfirmed object(s) queued to be sent again, %d held "
                        "(not confirmed after %d re-sends)", expired.resent, expired.held,
                        self.confirm_resends)

    def _associate(self, dest: str, rows: Sequence[Mapping[str, object]]
                   ) -> tuple[Association, bool]:
        """An association to the destination of ``rows`` proposing what they need (and
        Storage Commitment when one of them wants it); whether it uses TLS."""
        first = rows[0]
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = min(10.0, self.network_timeout_s)
        ae.acse_timeout = self.network_timeout_s
        ae.dimse_timeout = self.network_timeout_s
        ae.network_timeout = self.network_timeout_s
        contexts = _contexts(rows)
        if any(r["confirm"] == "commitment" for r in rows) and len(contexts) < 128 \
                and self._commitment_refusal(dest) is None:
            contexts.append(build_context(commitment.STORAGE_COMMITMENT))
        tls_args = ((self.tls_context, str(first["host"]))
                    if self.tls_context is not None and dest in self.tls_destinations else None)
        assoc = ae.associate(str(first["host"]), int(str(first["port"])),
                             ae_title=str(first["ae_title"]), contexts=contexts, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, commitment.handle_report,
                                            [self.inbox])])
        return assoc, tls_args is not None

    def _send_to(self, dest: str, rows: builtins.list[dict[str, object]]) -> int:
        assoc, tls = self._associate(dest, rows)
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected else
                   "association aborted" if assoc.is_aborted else "cannot connect")
            delay = self._mark_retry([int(str(r["id"])) for r in rows], why)
            LOG.warning("send to %s: %s; %d object(s) kept in the queue, next try in %.0f s",
                        dest, why, len(rows), delay)
            return 0
        done: MutableSequence[Mapping[str, object]] = []
        try:
            for i, r in enumerate(rows):
                if self._stop.is_set():
                    break
                send_id = int(str(r["id"]))
                ds = dcmread(self.data_dir / str(r["path"]))
                tries = _syntaxes_for(assoc, r, ds)
                if not tries:
                    why = (f"the peer accepted no presentation context for SOP class "
                           f"{r['sop_class_uid']} in {', '.join(map(alias, _preferred(r)))}")
                    self._mark_retry([send_id], why, refused=True)
                    LOG.error("send to %s: %s object %s: %s", dest, r["kind"], r["sop_instance_uid"], why)
                    continue
                status = _store(assoc, ds, tries, dest)
                code = int(status.Status) if "Status" in status else None
                if code is not None and _is_success(code):
                    self._mark_sent(send_id)
                    done.append(r)
                elif code is None:
                    rest = [int(str(x["id"])) for x in rows[i:]]
                    delay = self._mark_retry(rest, "no answer (association lost)")
                    LOG.warning("send to %s: association lost; %d object(s) kept in the queue, "
                                "next try in %.0f s", dest, len(rest), delay)
                    break
                else:
                    self._mark_retry([send_id], f"C-STORE refused with status 0x{code:04X}",
                                     refused=True)
                    LOG.error("send to %s: %s object %s refused with status 0x%04X",
                              dest, r["kind"], r["sop_instance_uid"], code)
            if assoc.is_established:
                self._request_commitment(assoc, dest, done)
        finally:
            if assoc.is_established:
                assoc.release()
        if done:
            LOG.info("send to %s: %d object(s) delivered", dest, len(done))
            self.audit_sent(dest, rows, len(done), tls)
        return len(done)

    def _unconfirmable(self, dest: str, ids: Sequence[int], why: str) -> None:
        """The peer will not confirm: the rows stay ``sent``, and the peer is not asked
        again for :data:`COMMITMENT_ASK_AGAIN_S`; said once per destination."""
        if dest not in self._said_no_commitment:  # once per destination, not per batch
            self._said_no_commitment.add(dest)
            LOG.warning("send to %s: %s; its objects stay 'sent' (acknowledged, not confirmed); "
                        "asked again in %.0f min", dest, why, COMMITMENT_ASK_AGAIN_S / 60)
        self._refused_commitment[dest] = (time.monotonic() + COMMITMENT_ASK_AGAIN_S, why)
        self.ledger.unconfirmable(ids, f"not confirmed: {why}")

    def _commitment_refusal(self, dest: str) -> str | None:
        """Why ``dest`` is not asked for Storage Commitment now, or None."""
        until, why = self._refused_commitment.get(dest, (0.0, ""))
        return why if time.monotonic() < until else None

    def _request_commitment(self, assoc: Association, dest: str,
                            rows: Sequence[Mapping[str, object]]) -> None:
        """Ask the peer to commit to the acknowledged ``rows`` that want it (one
        N-ACTION); wait briefly for a report on this association."""
        wanted = [r for r in rows if r["confirm"] == "commitment"]
        ids = [int(str(r["id"])) for r in wanted]
        if not wanted:
            return
        refused = self._commitment_refusal(dest)
        if refused is not None:
            self.ledger.unconfirmable(ids, f"not confirmed: {refused}")
            return
        if not commitment.accepts_commitment(assoc):
            self._unconfirmable(dest, ids, "the peer does not accept Storage Commitment")
            return
        uid = commitment.new_transaction_uid()
        self.ledger.requested(ids, uid)  # before the request: the report may come at once
        self.inbox.received.clear()
        t0 = time.monotonic()
        answer_s = min(self.network_timeout_s, COMMITMENT_ANSWER_S)
        assoc.dimse_timeout, dimse_timeout = answer_s, assoc.dimse_timeout
        try:
            status = commitment.request(assoc, uid, [(str(r["sop_class_uid"]),
                                                      str(r["sop_instance_uid"])) for r in wanted])
        finally:
            assoc.dimse_timeout = dimse_timeout
        quick = time.monotonic() - t0 < answer_s / 2
        while status is None and quick and assoc.is_established and time.monotonic() - t0 < 1.0:
            time.sleep(0.02)  # the A-ABORT that ended the wait is still being taken in
        if status is None and quick and assoc.is_aborted:
            # Orthanc aborts the association at a request from a calling AE it does not know
            self._unconfirmable(dest, ids, "the peer refused the Storage Commitment request "
                                           "(it aborted the association)")
            return
        if status is None:
            LOG.warning("send to %s: no answer to the Storage Commitment request; %d object(s) are "
                        "sent again if no report comes within %.0f s", dest, len(ids),
                        self.confirm_timeout_s)
            return
        if not _is_success(status):  # e.g. Orthanc, for a calling AE it does not know
            self._unconfirmable(dest, ids, f"the peer refused the Storage Commitment request "
                                           f"(status 0x{status:04X})")
            return
        deadline = time.monotonic() + SAME_ASSOCIATION_WAIT_S
        while time.monotonic() < deadline and not self.inbox.received.wait(0.05):
            if not self.ledger.waiting(ids):  # reported on another association already
                break

    def audit_sent(self, dest: str, rows: builtins.list[dict[str, object]], delivered: int,
                   tls: bool) -> None:
        """One ``results-sent`` audit event per association (or STOW-RS session) that
        delivered objects."""
        if self.audit is None:
            return
        try:
            self.audit.record(AuditEvent.RESULTS_SENT, AuditOutcome.SUCCESS, self.ae_title, dest,
                              {"objects": delivered, "tls": tls,
                               "results": sorted({int(str(r["result_id"])) for r in rows})})
        except Exception:
            LOG.exception("send to %s: could not write the audit event", dest)

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Send in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()
        n = self.pending()
        if n:
            LOG.info("sender: %d object(s) waiting from before the restart", n)

    def _next_due_in(self) -> float:
        with self._lock:
            row = self.conn.execute("SELECT MIN(next_attempt_at) FROM sends WHERE state = ?",
                                    (SendState.QUEUED.value,)).fetchone()
        due = [t for t in (row[0], self.ledger.next_deadline()) if t is not None]
        wait = 5.0
        if due:
            wait = (datetime.fromisoformat(min(due)) - utc_now()).total_seconds()
        if self.ledger.awaiting("read-back", limit=1):
            wait = min(wait, READ_BACK_EVERY_S)
        return max(0.05, min(5.0, wait))

    def _run(self) -> None:
        state = StateLog(LOG, "sender")  # one line per change (a full disk), not per pass
        while not self._stop.is_set():
            try:
                self.send_due()
                wait = self._next_due_in()
                state.ok()
            except Exception as exc:
                state.failed(exc, "pass failed")
                wait = 5.0
            self.wakeup.wait(wait)
            self.wakeup.clear()

    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the object being sent; what is not sent stays queued."""
        self._stop.set()
        self.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
