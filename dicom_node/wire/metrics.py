"""Counters of what the node did, safe to update from the association threads."""

from __future__ import annotations

import threading
from collections import Counter


class NodeMetrics:
    """In-process counters; exported by the status command and the metrics endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.bytes_received = 0

    def stored(self, size: int, outcome: str) -> None:
        with self._lock:
            self.counts[f"instances_{outcome}"] += 1
            self.bytes_received += size

    def store_failed(self, reason: str) -> None:
        with self._lock:
            self.counts[f"store_failed_{reason}"] += 1

    def association(self, what: str) -> None:
        with self._lock:
            self.counts[f"associations_{what}"] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            out["bytes_received"] = self.bytes_received
            return out
