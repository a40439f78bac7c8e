"""The shape every durable queue of ``queue.sqlite`` shares: one table, one connection.

:class:`~dicom_node.queue.jobs.JobQueue` (inference jobs) and
:class:`~dicom_node.queue.sender.Sender` (sends of results) are each one table of the
queue database whose rows move through states. What they share is here: the
connection and the lock that serialises its use across threads, the event that wakes
the thread working the queue, the rows newest first (optionally of one state), the
count per state, and closing.
"""

from __future__ import annotations

import sqlite3
import threading

import sqlite_utils


class DurableQueue:
    """One table of the queue database (``table``: a class attribute of the subclass).

    Parameters
    ----------
    db : sqlite_utils.Database
        The queue database, migrated (:func:`dicom_node.queue.jobs.connect_queue`).
    """

    #: The queue's table (a constant of the subclass, never user input).
    table: str = ""

    def __init__(self, db: sqlite_utils.Database) -> None:
        if not self.table.isidentifier():
            raise TypeError(f"{type(self).__name__} names no table")
        self.db = db
        self.conn = db.conn
        self._lock = threading.Lock()
        self.wakeup = threading.Event()

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.conn.close()

    def _rows(self, state: str | None, limit: int) -> list[sqlite3.Row]:
        """The table's rows newest first, only those in ``state`` when given."""
        sql, params = f"SELECT * FROM {self.table}", ()  # type: tuple[str, tuple[object, ...]]
        if state is not None:
            sql, params = sql + " WHERE state = ?", (state,)
        with self._lock:
            return self.conn.execute(sql + " ORDER BY id DESC LIMIT ?",
                                     (*params, limit)).fetchall()

    def counts(self) -> dict[str, int]:
        """Number of rows in each state."""
        with self._lock:
            rows = self.conn.execute(
                f"SELECT state, COUNT(*) FROM {self.table} GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}
