"""Group commit of the store path: instances written in the same moment share one flush.

An instance written and renamed into place (:class:`Pending`) waits here until its
directory is fsynced and its index row committed (the flush is the ingest's:
``Ingest._flush`` in :mod:`twin_archive.ingest`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twin_archive.records import IncomingInstance, StoreOutcome


@dataclass(slots=True, kw_only=True)
class Pending:
    """One instance written and renamed into place, waiting for its group commit."""

    fields: dict[str, str]
    ident: dict[str, str]
    key: str
    sha: str
    rel: str
    incoming: IncomingInstance
    final: Path
    received_at: str | None = None  # set when re-indexing a file (its mtime); else now
    result: tuple[StoreOutcome, int] | None = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit:
    """Leader/follower group commit of the directory fsyncs and index rows.

    A storing thread hands in its instance; if no flush is running it becomes the
    leader and flushes everything handed in so far (its own instance included) with
    ``flush``, otherwise it waits for a leader to flush it. Alone (one association)
    a thread leads a batch of one at once, so nothing waits; with several
    associations the instances that arrive during a flush share the next one: one
    ``fsync`` per directory and one SQLite commit for all of them, instead of one
    each.
    """

    def __init__(self, flush: Callable[[list[Pending]], None]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._queue: list[Pending] = []
        self._leading = False

    def commit(self, item: Pending) -> None:
        """Return when ``item`` is flushed (``item.result`` or ``item.error`` set)."""
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self._flush(batch)
                except BaseException as exc:
                    for p in batch:
                        if p.result is None and p.error is None:
                            p.error = exc
                    raise
                finally:
                    self._cond.acquire()
                    for p in batch:
                        p.done = True
                    self._leading = False
                    self._cond.notify_all()

