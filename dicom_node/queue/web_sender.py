"""The sender's DICOMweb side: STOW-RS of queued rows, read-back of what was stored.

Rows of a DICOMweb destination (``sends.url`` set) ride the same queue, back-off and
``sends`` listing as DIMSE ones (:mod:`dicom_node.queue.sender`). They are posted as the
Part 10 files the archive keeps (no decoding), several instances per request
(:data:`dicom_node.wire.stow.MAX_INSTANCES`, :data:`dicom_node.wire.stow.MAX_BYTES`), and each
instance's outcome (:func:`dicom_node.wire.stow.outcome`) moves its row: ``sent``, queued
again with back-off, or ``held`` with the reason. A destination whose rows want
``read-back`` is asked at once with QIDO-RS which of them it holds, and again at most
once a second (:meth:`dicom_node.queue.sender.Sender.settle_confirmations`) until each is
``confirmed`` or its deadline passes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import TYPE_CHECKING

import requests
from pydicom import dcmread

from dicom_node.wire import stow
from dicom_node.queue.confirmations import Awaiting
from dicom_node.settings import Destination

if TYPE_CHECKING:
    from dicom_node.queue.sender import Sender

LOG = logging.getLogger(__name__)


def _ids(rows: Sequence[dict[str, object]]) -> list[int]:
    return [int(str(r["id"])) for r in rows]


def _batches(sender: Sender, rows: Sequence[dict[str, object]]
             ) -> Iterator[tuple[list[dict[str, object]], list[tuple[str, bytes]]]]:
    """Rows with their files' bytes, in requests of bounded count and size."""
    batch: list[dict[str, object]] = []
    blobs: list[tuple[str, bytes]] = []
    size = 0
    for r in rows:
        blob = (sender.data_dir / str(r["path"])).read_bytes()
        if batch and (len(batch) >= stow.MAX_INSTANCES or size + len(blob) > stow.MAX_BYTES):
            yield batch, blobs
            batch, blobs, size = [], [], 0
        batch.append(r)
        blobs.append((str(r["sop_instance_uid"]), blob))
        size += len(blob)
    if batch:
        yield batch, blobs


def send(sender: Sender, dest_key: str, rows: list[dict[str, object]]) -> int:
    """STOW-RS ``rows`` to the DICOMweb destination ``dest_key``; returns objects stored."""
    dest = sender.web_destinations.get(dest_key)
    why = "" if dest is not None else "not a configured DICOMweb destination (its " \
                                      "authentication is in the configuration)"
    session = None
    if dest is not None:
        try:
            session = stow.session_for(dest)
        except stow.WebAuthError as exc:
            why = str(exc)
    if session is None or dest is None:
        delay = sender.mark_retry(_ids(rows), why)
        LOG.warning("send to %s: %s; %d object(s) kept in the queue, next try in %.0f s",
                    dest_key, why, len(rows), delay)
        return 0
    stored = tried = 0
    with closing(session):
        for batch, blobs in _batches(sender, rows):
            if sender.stopping():
                break
            out = stow.stow(session, dest.url, blobs, timeout_s=sender.network_timeout_s)
            stored += _apply(sender, dest_key, batch, out)
            tried += len(batch)
            if out.http_status == 0 or out.http_status in stow.RETRY_STATUSES \
                    or out.http_status >= 500:  # the server is not taking any: wait for it
                if rows[tried:]:
                    sender.mark_retry(_ids(rows[tried:]), next(iter(out.retry.values()), "not sent"))
                break
        if stored:
            LOG.info("send to %s: %d object(s) stored (STOW-RS)", dest_key, stored)
            sender.audit_sent(dest_key, rows, stored, dest.url.startswith("https:"))
            read_back(sender, [a for a in sender.ledger.awaiting("read-back")
                               if a.destination == dest_key], session=session)
    return stored


def _apply(sender: Sender, dest_key: str, batch: list[dict[str, object]],
           out: stow.StowOutcome) -> int:
    """Move each row of ``batch`` as the STOW-RS outcome says; returns rows stored."""
    by_uid = {str(r["sop_instance_uid"]): int(str(r["id"])) for r in batch}
    stored = [by_uid[u] for u in out.stored if u in by_uid]
    if stored:
        sender.mark_sent(stored)
    for uid, warning in out.stored.items():
        if warning:
            LOG.warning("send to %s: %s stored with %s", dest_key, uid, warning)
    retry: dict[str, list[int]] = defaultdict(list)
    for uid, why in out.retry.items():
        retry[why].append(by_uid[uid])
    for why, ids in retry.items():
        delay = sender.mark_retry(ids, why)
        LOG.warning("send to %s: %s; %d object(s) kept in the queue, next try in %.0f s",
                    dest_key, why, len(ids), delay)
    held: dict[str, list[int]] = defaultdict(list)
    for uid, why in out.held.items():
        held[why].append(by_uid[uid])
    for why, ids in held.items():
        sender.mark_held(ids, why)
        LOG.error("send to %s: %d object(s) held (not sent again): %s", dest_key, len(ids), why)
    return len(stored)


def _present(dest: Destination, session: requests.Session | None, study: str, series: str,
             timeout_s: float) -> set[str]:
    if session is not None:
        return stow.present(session, dest.url, study, series, timeout_s=timeout_s)
    with stow.session_for(dest) as own:
        return stow.present(own, dest.url, study, series, timeout_s=timeout_s)


def read_back(sender: Sender, waiting: Sequence[Awaiting],
              session: requests.Session | None = None) -> int:
    """Ask each DICOMweb destination (QIDO-RS, per series) which ``waiting`` rows it
    holds; confirm those. Returns rows confirmed; an archive that does not answer
    leaves its rows waiting until their deadline."""
    groups: dict[tuple[str, str, str], list[Awaiting]] = defaultdict(list)
    for a in waiting:
        try:
            ds = dcmread(sender.data_dir / a.path, stop_before_pixels=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
        except OSError:
            continue  # gone (pruned): its deadline settles it
        groups[(a.destination, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(a)
    confirmed = 0
    for (dest_key, study, series), rows in groups.items():
        dest = sender.web_destinations.get(dest_key)
        if dest is None:
            continue
        try:
            found = _present(dest, session, study, series, sender.network_timeout_s)
        except (requests.RequestException, OSError, ValueError) as exc:
            if dest_key not in sender.said_read_back_failed:  # once, not every second
                sender.said_read_back_failed.add(dest_key)
                LOG.warning("read-back from %s failed (%s); its objects are sent again when "
                            "unconfirmed after %.0f s (confirm = \"none\" if it has no QIDO-RS)",
                            dest_key, stow.short(exc), sender.confirm_timeout_s)
            continue
        sender.said_read_back_failed.discard(dest_key)
        confirmed += sender.ledger.confirm([a.id for a in rows if a.sop_instance_uid in found])
    if confirmed:
        LOG.info("read-back: %d object(s) confirmed", confirmed)
    return confirmed
