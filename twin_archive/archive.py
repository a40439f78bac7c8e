"""The per-patient archive under one data directory: it opens the index and wires its two jobs.

:class:`Archive` opens the data directory (its folders, the installation secret, the
SQLite index, migrated) and gives the two jobs done on it, which share its index
connection and lock:

* :attr:`Archive.ingest` (:class:`twin_archive.ingest.Ingest`): instances stored
  durably and indexed (the C-STORE path), files already in the archive indexed
  (start-up reconciliation, :func:`twin_archive.reconcile.recover`, uses it);
* :attr:`Archive.twins` (:class:`twin_archive.twins.Twins`): the twin read model
  (twins, studies, series, their files) and consent and twin merges.

One object opens both because the node, the CLI and the tests open a data directory
once and use both jobs on it (the listener stores, the monitor and the workers read
series, ``archive rebuild-index`` indexes files then replays consent): one index
connection, one migration at opening, one ``close``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_node.foundation.database import connect, migrate
from twin_archive.ingest import Ingest
from twin_archive.layout import INDEX_NAME, load_or_create_key
from twin_archive.schema import MIGRATIONS
from twin_archive.twins import Twins


class Archive:
    """The twin archive under one data directory.

    Thread-safe: the DICOM server stores from one thread per association. Several
    processes may open the same data directory (the server and the CLI); SQLite's
    WAL mode and ``BEGIN IMMEDIATE`` keep their writes apart.

    Parameters
    ----------
    data_dir : pathlib.Path
        Root of the archive; created if missing.
    min_free_bytes : int
        Refuse new instances (A700) while less than this many bytes are free on the
        data directory's file system, so the index can always commit and the
        operating system keeps working.

    Raises
    ------
    ValueError
        If ``min_free_bytes`` is negative.
    OSError
        If the data directory cannot be created or used.
    """

    def __init__(self, data_dir: Path | str, *, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.data_dir = Path(data_dir).resolve()
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = self.data_dir / "tmp"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        secret = load_or_create_key(self.data_dir)
        self.db = connect(self.data_dir / INDEX_NAME, timeout_s=30.0)
        self._lock = threading.Lock()
        migrate(self.db, MIGRATIONS, name="archive index")
        self.ingest = Ingest(self.db, self._lock, data_dir=self.data_dir, secret=secret,
                             min_free_bytes=min_free_bytes)
        self.twins = Twins(self.db, self._lock, data_dir=self.data_dir)

    def close(self) -> None:
        """Close the index connection."""
        with self._lock:
            self.db.conn.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
