"""Which model versions serve, read for ``dicom-node status`` and ``/metrics``.

Read only: the node need not run, and nothing is created (a data directory without a
registry has no version in service). :class:`registry.store.Registry` is the way to
change what serves.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from dicom_node.foundation.database import open_existing
from registry.records import ModelStatus
from registry.store import DB_NAME


@dataclass(frozen=True, kw_only=True, slots=True)
class ActiveVersion:
    """A model version in service, and the scanners it serves ('' = any)."""

    task: str
    version: str
    manufacturer: str
    model_name: str


def active_versions(data_dir: Path | str) -> tuple[ActiveVersion, ...]:
    """The active versions of ``<data_dir>``'s registry, by task and version."""
    conn = open_existing(Path(data_dir) / DB_NAME, "model_versions")
    if conn is None:
        return ()
    with closing(conn):
        rows = conn.execute("SELECT task, version, manufacturer, scanner_model FROM model_versions"
                            " WHERE status = ? ORDER BY task, version",
                            (ModelStatus.ACTIVE.value,)).fetchall()
    return tuple(ActiveVersion(task=t, version=v, manufacturer=m, model_name=s)
                 for t, v, m, s in rows)
