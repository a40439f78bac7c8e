"""What the archive holds, counted for ``dicom-node status`` and ``/metrics``.

Read only: the node need not run, and nothing is created (a data directory without an
index or audit log counts as empty). Each function opens its database read-only for
the one question and closes it.
"""

from __future__ import annotations

import json
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from dicom_node.foundation.database import open_existing
from twin_archive.audit import AUDIT_DB_NAME
from twin_archive.layout import INDEX_NAME


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchiveCounts:
    """Twins, studies and current instances (and their bytes) in the index."""

    twins: int = 0
    studies: int = 0
    instances: int = 0
    archived_bytes: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ResultTimings:
    """The stage times of one AI result, seconds by stage key (e.g. ``inference_s``);
    empty when the row's timings cannot be read."""

    id: int
    timings: dict[str, float]


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditCounts:
    """Events in the audit log and when the last one happened ('' if none)."""

    events: int = 0
    last_at: str = ""


def archive_counts(data_dir: Path | str) -> ArchiveCounts:
    """Twins, studies, current instances and their bytes in ``<data_dir>``'s index."""
    conn = open_existing(Path(data_dir) / INDEX_NAME, "instances")
    if conn is None:
        return ArchiveCounts()
    with closing(conn):
        twins = conn.execute("SELECT COUNT(*) FROM twins").fetchone()[0]
        studies = conn.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        n, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances"
                               " WHERE current = 1").fetchone()
    return ArchiveCounts(twins=int(twins), studies=int(studies), instances=int(n),
                         archived_bytes=int(size))


def result_timings(data_dir: Path | str, *, after_id: int = 0) -> list[ResultTimings]:
    """The stage times of the AI results recorded after result ``after_id``, in order.

    Only numeric times are kept; a row whose timings are not a JSON object gives none.
    """
    conn = open_existing(Path(data_dir) / INDEX_NAME, "ai_results")
    if conn is None:
        return []
    with closing(conn):
        rows = conn.execute("SELECT id, timings FROM ai_results WHERE id > ? ORDER BY id",
                            (after_id,)).fetchall()
    return [ResultTimings(id=row_id, timings=_numbers(text)) for row_id, text in rows]


def _numbers(text: str) -> dict[str, float]:
    try:
        items = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(items, dict):
        return {}
    return {k: float(v) for k, v in items.items() if isinstance(v, int | float)}


def audit_counts(data_dir: Path | str) -> AuditCounts:
    """Events in ``<data_dir>``'s audit log and the time of the last one."""
    conn = open_existing(Path(data_dir) / AUDIT_DB_NAME, "audit_events")
    if conn is None:
        return AuditCounts()
    with closing(conn):
        n, last = conn.execute("SELECT COUNT(*), MAX(at) FROM audit_events").fetchone()
    return AuditCounts(events=int(n), last_at=last or "")
