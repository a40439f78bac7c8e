"""The systemd notify protocol against a real AF_UNIX datagram socket set as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.runtime.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    yield path, sock
    sock.close()


def _messages(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until!r} within {timeout} s; got {got}")


def test_ready_and_status_in_one_datagram(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.notify(READY=1, STATUS="serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    n.close()


def test_abstract_socket_name(tmp_path: Path) -> None:
    name = f"dicom-node-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify(STOPPING=1)
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert n.notify(READY=1) is False


def test_watchdog_pings_at_half_the_interval_while_healthy(
        notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    healthy = [True]
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == pytest.approx(0.2)
    t0 = time.monotonic()
    n.start_watchdog(lambda: healthy[0])
    assert sock.recv(64) == b"WATCHDOG=1"
    assert sock.recv(64) == b"WATCHDOG=1"
    assert 0.3 <= time.monotonic() - t0 < 2.0
    healthy[0] = False  # stuck: no more pings, so systemd would restart the node
    time.sleep(0.3)
    while True:  # drain what was sent before the switch
        sock.settimeout(0.05)
        try:
            sock.recv(64)
        except TimeoutError:
            break
    sock.settimeout(0.6)
    with pytest.raises(TimeoutError):
        sock.recv(64)
    n.close()


def test_watchdog_for_another_pid_is_ignored(notify_socket: tuple[str, socket.socket]) -> None:
    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None


def test_serve_notifies_ready_watchdog_and_stopping(
        tmp_path: Path, notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    """The real node under a fake service manager: READY=1 with STATUS, pings, STOPPING=1."""
    from node_harness import NodeProcess

    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # ping every 0.5 s
    node = NodeProcess(tmp_path / "data", workers=0).start()
    try:
        got = _messages(sock, "READY=1")
        ready = got[-1].split("\n")
        assert f"MAINPID={node.proc.pid}" in ready
        assert any(f.startswith("STATUS=serving DICOM_NODE on port") for f in ready)
        _messages(sock, "WATCHDOG=1", timeout=5.0)
        # keep reading while the node stops, as systemd does (pings go on until then)
        stopping: list[list[str]] = []
        reader = threading.Thread(target=lambda: stopping.append(
            _messages(sock, "STOPPING=1", timeout=40.0)), daemon=True)
        reader.start()
        assert node.stop() == 0
        reader.join(45.0)
        assert stopping and any("STOPPING=1" in m for m in stopping[0])
    finally:
        node.kill()


def test_log_lines_carry_journald_priorities_under_systemd(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from dicom_node.logconfig import configure_logging

    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        log = logging.getLogger("dicom_node.test")
        log.warning("association REJECTED from X")
        log.info("ready")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        out = capsys.readouterr().out.splitlines()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert out[0] == "<4>WARNING dicom_node.test: association REJECTED from X"
    assert out[1] == "<6>INFO dicom_node.test: ready"
    assert out[2] == "<3>ERROR dicom_node.test: failed" and all(x.startswith("<3>") for x in out[2:])


def test_a_manager_that_stops_reading_never_blocks_the_node(
        notify_socket: tuple[str, socket.socket]) -> None:
    """A full datagram queue makes notify() give up after its timeout, not hang."""
    from dicom_node.runtime.sdnotify import SEND_TIMEOUT_S

    path, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    t0 = time.monotonic()
    results = [n.notify(STATUS=f"message {i}") for i in range(qlen + 2)]
    elapsed = time.monotonic() - t0
    n.close()
    assert results[0] is True and results[-1] is False
    assert elapsed < (2 + 1) * SEND_TIMEOUT_S + 2.0
