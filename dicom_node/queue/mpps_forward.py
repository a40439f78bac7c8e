"""MPPS passed on to the PACS (``forward_mpps``): durable, in order, with retries.

The node may sit between the scanner and the PACS; the PACS (or RIS) then still wants
the scanner's MPPS. Every N-CREATE and N-SET the node accepts is queued with its data
set in ``mpps_forwards`` in the transaction that keeps the step (:mod:`dicom_node.queue.mpps`).
One thread sends them oldest first, each with the step's SOP Instance UID: a
destination that cannot be reached is tried again with the sender's back-off, and no
later message passes an earlier one (an N-SET never reaches the PACS before its
N-CREATE). A message the PACS refuses with a failure status is left ``failed`` with the
status in ``last_error`` and logged; the ones after it go on. A message's data set (it
names the patient) is kept only until it is sent or refused; erasing a twin deletes its
steps and their messages (:meth:`dicom_node.queue.jobs.JobQueue.erase_patient`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.queue.jobs import connect_queue
from dicom_node.settings import parse_destination
from dicom_node.wire.statuses import SUCCESS, is_warning

LOG = logging.getLogger(__name__)

#: How long stop waits for the thread after aborting a forward in flight, seconds.
ABORT_JOIN_S = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Forward:
    """One queued MPPS message."""

    id: int
    step_uid: str
    kind: str  # create or set
    dataset: bytes
    destination: str  # AET@HOST:PORT
    attempts: int


class MppsForwarder:
    """Sends the queued MPPS messages of ``<data_dir>/queue.sqlite`` in a thread.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The node's data directory.
    ae_title : str
        The node's AE title (the calling AE).
    backoff_initial_s, backoff_max_s : float
        First delay after a failed attempt, and the cap of its doubling, seconds.
    network_timeout_s : float
        Timeout of each association and message, seconds.
    """

    def __init__(self, data_dir: object, *, ae_title: str, backoff_initial_s: float = 2.0,
                 backoff_max_s: float = 300.0, network_timeout_s: float = 30.0) -> None:
        self.db = connect_queue(data_dir)  # type: ignore[arg-type]
        self.ae_title = ae_title
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.network_timeout_s = network_timeout_s
        self.wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._assoc: Any = None  # the association in use, aborted at stop (a stalled PACS)

    def due(self) -> list[Forward]:
        """The queued messages, oldest first."""
        return [Forward(id=r[0], step_uid=r[1], kind=r[2], dataset=bytes(r[3]), destination=r[4],
                        attempts=r[5]) for r in self.db.conn.execute(
            "SELECT id, step_uid, kind, dataset, destination, attempts FROM mpps_forwards"
            " WHERE state = 'queued' ORDER BY id")]

    def send_due(self) -> int:
        """Send what is due, per destination in order; return how many went."""
        now = iso(utc_now())
        pending = self.due()
        blocked = {d for d, in self.db.conn.execute(
            "SELECT destination FROM mpps_forwards WHERE state = 'queued' AND next_attempt_at > ?",
            (now,))}
        sent = 0
        for destination in dict.fromkeys(f.destination for f in pending):
            if destination in blocked:
                continue
            sent += self._send_to(destination, [f for f in pending if f.destination == destination])
        return sent

    def _send_to(self, destination: str, forwards: list[Forward]) -> int:
        dest = parse_destination(destination, "forward_mpps")
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.network_timeout_s
        ae.connection_timeout = min(10.0, self.network_timeout_s)  # as the sender's
        assoc = self._assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            self._retry(forwards[0], "association not established")
            return 0
        sent = 0
        try:
            for f in forwards:
                if not self._send_one(assoc, f):
                    break
                sent += 1
        finally:
            self._assoc = None
            if assoc.is_established:
                assoc.release()
        return sent

    def _send_one(self, assoc: Any, f: Forward) -> bool:
        """One message; False when the association failed (it is retried later)."""
        ds = decode(BytesIO(f.dataset), False, True)
        if f.kind == "create":
            status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, f.step_uid)
        else:
            status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, f.step_uid)
        code = getattr(status, "Status", None) if isinstance(status, Dataset) else None
        if code is None:
            self._retry(f, "no response (association aborted or timed out)")
            return False
        with write(self.db) as conn:
            if code == SUCCESS or is_warning(code):
                conn.execute("UPDATE mpps_forwards SET state = 'sent', sent_at = ?,"
                             " attempts = attempts + 1, dataset = x'' WHERE id = ?",
                             (iso(utc_now()), f.id))
            else:
                conn.execute("UPDATE mpps_forwards SET state = 'failed', attempts = attempts + 1,"
                             " last_error = ?, dataset = x'' WHERE id = ?",
                             (f"status 0x{code:04X}", f.id))
        if code == SUCCESS or is_warning(code):
            LOG.info("MPPS N-%s of step %s passed on to %s", f.kind.upper(), f.step_uid,
                     f.destination)
        else:
            LOG.warning("MPPS N-%s of step %s refused by %s (status 0x%04X); not sent again",
                        f.kind.upper(), f.step_uid, f.destination, code)
        return True

    def _retry(self, f: Forward, why: str) -> None:
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** f.attempts)
        with write(self.db) as conn:
            conn.execute("UPDATE mpps_forwards SET attempts = attempts + 1, last_error = ?,"
                         " next_attempt_at = ? WHERE destination = ? AND state = 'queued'",
                         (why, iso(utc_now() + timedelta(seconds=delay)), f.destination))
        LOG.warning("MPPS for %s not passed on (%s); tried again in %.0f s", f.destination, why,
                    delay)

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mpps-forwarder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.send_due()
            except Exception:  # keep going; the next round retries
                LOG.exception("passing MPPS on failed")
            self.wakeup.wait(0.5)
            self.wakeup.clear()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; a message in flight to a PACS that does not answer is aborted (it stays
        queued and is sent again at the next start).

        pynetdicom's wait for the N-CREATE/N-SET response is not woken by a local abort
        (it waits out its DIMSE timeout), so after an abort the thread (a daemon; the
        abort ended its association's threads) is given :data:`ABORT_JOIN_S` only, and
        its connection is left to the process's exit.
        """
        self._stop.set()
        self.wakeup.set()
        assoc = self._assoc
        if assoc is not None:
            assoc.abort()
            LOG.info("MPPS forward to a PACS that had not answered aborted at stop; it stays "
                     "queued for the next start")
        if self._thread is not None:
            self._thread.join(ABORT_JOIN_S if assoc is not None else timeout)
            if self._thread.is_alive():
                return
        self.db.conn.close()
