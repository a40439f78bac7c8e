"""Rebuild the archive index from the files and the audit log (``archive rebuild-index``).

Every instance file carries its header, so twins, studies, series and instances come
back from the files (oldest first, so that versions of a resent instance keep their
order). Consent decisions and twin merges are not in the files: they are replayed, in
order, from the hash-chained audit log (``consent-changed`` and ``twin-merged``
events, which name twins by key), so losing ``index.sqlite`` loses no consent
decision. The chain is verified first; events after a break are not replayed (a
patient's donation then stays off, the safe side) and the report says so.

Not rebuilt: AI results, labels and the record of which model versions were trained
with which series; their rows hold what no file does (job, model, provenance). Their
files stay where they are.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.foundation.clock import utc_now
from dicom_node.foundation.durable import replace_durably
from twin_archive.archive import Archive
from twin_archive.audit import AuditEvent, AuditLog, AuditLogTamperedError
from twin_archive.errors import ArchiveError
from twin_archive.layout import ARCHIVE_DIR, INDEX_NAME
from twin_archive.reconcile import quarantine, walk_files
from twin_archive.records import StoreResult
from twin_archive.retention import Retention

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RebuildReport:
    """What :func:`rebuild_index` did."""

    instances: int
    twins: int
    studies: int
    consent_events: int  # consent decisions and legal holds placed or lifted
    merges: int
    skipped_events: int
    quarantined: int
    set_aside: str
    audit_problem: str
    seconds: float


def _set_aside(data_dir: Path) -> str:
    index = data_dir / INDEX_NAME
    if not index.exists():
        return ""
    stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
    target = data_dir / f"{INDEX_NAME}.old-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        src = data_dir / f"{INDEX_NAME}{suffix}"
        if src.exists():
            replace_durably(src, data_dir / f"{target.name}{suffix}")
    return str(target)


def _replay_hold(data_dir: Path, event: AuditEvent, key: str, by: str, reason: str) -> None:
    """A legal hold placed or lifted, replayed from the audit log (raises ValueError for
    a twin with no file left: its hold row cannot name it)."""
    with Retention(data_dir) as store:
        if event is AuditEvent.TWIN_HELD:
            try:
                store.hold(key, by=by, reason=reason)
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"twin {key} has no file left") from exc
        else:
            store.release(key, by=by, reason=reason)


def rebuild_index(data_dir: Path | str) -> RebuildReport:
    """Build a new ``index.sqlite`` from the archive's files and the audit log.

    The caller holds the data directory's lock (no node may serve meanwhile). An
    existing index is renamed ``index.sqlite.old-<time>`` first, never deleted.
    """
    t0 = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    set_aside = _set_aside(data_dir)
    quarantined = consent = merges = skipped = 0
    problem = ""
    with Archive(data_dir) as archive:
        files = sorted(walk_files(data_dir / ARCHIVE_DIR), key=lambda p: p.stat().st_mtime)
        for path, outcome in archive.ingest.index_files(files):
            if not isinstance(outcome, StoreResult):
                quarantine(data_dir, path, f"not intact ({outcome})")
                quarantined += 1
        with AuditLog(data_dir) as log:
            stop_at = None
            try:
                log.verify()
            except AuditLogTamperedError as exc:
                problem, stop_at = str(exc), exc.row_id
            for event in log.entries():
                if stop_at is not None and event.id >= stop_at:
                    break
                try:
                    if event.event_type is AuditEvent.CONSENT_CHANGED:
                        archive.twins.set_consent(event.what, donate=bool(event.detail["donate"]),
                                            by=event.who, reason=event.detail.get("reason", ""),
                                            at=event.detail.get("at") or event.at)
                        consent += 1
                    elif event.event_type in (AuditEvent.TWIN_HELD, AuditEvent.TWIN_RELEASED):
                        _replay_hold(data_dir, event.event_type, event.what, event.who,
                                     event.detail.get("reason", "") or "-")
                        consent += 1
                    elif event.event_type is AuditEvent.TWIN_MERGED:
                        archive.twins.merge_twins(event.what, event.detail["into"], by=event.who,
                                            reason=event.detail.get("reason", "") or "-",
                                            at=event.detail.get("at") or event.at)
                        merges += 1
                except (ArchiveError, ValueError, KeyError) as exc:
                    skipped += 1  # its twin has no file left, or the event is malformed
                    LOG.warning("rebuild: audit event %d (%s) not replayed: %s", event.id,
                                event.event_type.value, exc)
        twins = len(archive.twins.list_twins())
        studies = int(archive.db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])
        instances = archive.twins.instance_count()
    return RebuildReport(instances=instances, twins=twins, studies=studies,
                         consent_events=consent, merges=merges, skipped_events=skipped,
                         quarantined=quarantined, set_aside=set_aside, audit_problem=problem,
                         seconds=time.perf_counter() - t0)
