"""The admission rules of the front door (issue 28 item 4), without a network.

Connections are stand-ins with a ``fileno`` (closed: -1); the clock is the test's.
The same rules are exercised against the real node, with 20 hostile peers, in
``tests/test_hostile_peers.py``.
"""

from __future__ import annotations

import logging

import pytest

from dicom_node.wire.handlers.admission import LOCKOUT_QUIET_S, Admission
from dicom_node.wire.metrics import NodeMetrics


class _Conn:
    def __init__(self) -> None:
        self.fd = 3

    def fileno(self) -> int:
        return self.fd


def test_pending_connections_hold_only_their_own_peers_slots(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    metrics = NodeMetrics()
    admission = Admission(2, 2, metrics, clock=lambda: now[0])
    hostile = [_Conn() for _ in range(2)]
    assert all(admission.connection(c, "10.0.0.66") for c in hostile)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="dicom_node.wire.handlers.admission")
    for _ in range(20):  # the hostile peer again and again: closed at accept
        assert not admission.connection(_Conn(), "10.0.0.66")  # type: ignore[arg-type]
    scanner = [_Conn(), _Conn()]
    for conn in scanner:  # another peer is served: both its associations admitted
        assert admission.connection(conn, "10.0.0.7")  # type: ignore[arg-type]
        assert admission.request(conn, "10.0.0.7") is None  # type: ignore[arg-type]
    third = _Conn()
    assert admission.connection(third, "10.0.0.8")  # type: ignore[arg-type]
    assert "max_associations = 2" in (admission.request(third, "10.0.0.8") or "")  # type: ignore[arg-type]
    started = [r.getMessage() for r in caplog.records if "started" in r.getMessage()]
    assert len(started) == 2 and "lock-out of 10.0.0.66 started" in started[0]
    assert "lock-out of every peer started" in started[1]
    assert metrics.snapshot()["associations_refused"] == 20
    assert metrics.snapshot()["associations_lockouts"] == 2
    now[0] += LOCKOUT_QUIET_S
    for conn in [*hostile, *scanner]:
        conn.fd = -1  # their connections closed
    assert admission.tick() == 0
    ended = [r.getMessage() for r in caplog.records if "ended" in r.getMessage()]
    assert any("lock-out of 10.0.0.66 ended" in e and "20 connection(s)" in e for e in ended)
    assert admission.connection(_Conn(), "10.0.0.66")  # type: ignore[arg-type]


def test_per_host_limit_on_associations() -> None:
    admission = Admission(10, 1, NodeMetrics())
    first, second = _Conn(), _Conn()
    assert admission.connection(first, "10.0.0.7")  # type: ignore[arg-type]
    assert not admission.connection(_Conn(), "10.0.0.7")  # type: ignore[arg-type]  # 1 pending
    assert admission.request(first, "10.0.0.7") is None  # type: ignore[arg-type]
    assert admission.connection(second, "10.0.0.7")  # type: ignore[arg-type]  # none pending
    assert "max_associations_per_host = 1" in (admission.request(second, "10.0.0.7") or "")  # type: ignore[arg-type]


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="per_host"):
        Admission(4, 0, NodeMetrics())
