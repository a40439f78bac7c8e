"""``listener_processes`` > 1: extra acceptor processes share the node's port.

A real ``dicom-node serve`` with three listener processes receives parallel
associations (every instance indexed exactly once, whichever process took it), counts
what the acceptors stored, and its acceptors end with it: on SIGTERM (drained, exit 0)
and when the node is killed (SIGKILL: the kernel kills them too).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pydicom

from dicom_client import send
from node_harness import NodeProcess, small_ct
from waiting import wait_until


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out.update(int(c) for c in text)
    return out


def _acceptors(pid: int) -> set[int]:
    return {c for c in _children(pid)
            if b"dicom_node.runtime.acceptor_process" in Path(f"/proc/{c}/cmdline").read_bytes()}


def _written(pid: int) -> int:
    """Bytes the process has written (``wchar``: files, sockets and pipes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def _gone(pids: set[int], timeout: float = 15.0) -> bool:
    return wait_until(f"acceptor processes {sorted(pids)} gone",
                      lambda: not any(Path(f"/proc/{p}").exists() for p in pids), timeout, poll=0.05)


def test_acceptor_processes_share_the_port_and_stop_with_the_node(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", config="listener_processes = 3\n", workers=0).start()
    try:
        assert node.proc is not None
        acceptors = _acceptors(node.proc.pid)
        assert len(acceptors) == 2
        study = pydicom.uid.generate_uid()
        batches = [[small_ct(patient_id=f"P{a}", study_uid=study, instance=i, seed=a)
                    for i in range(1, 26)] for a in range(6)]
        results: list[list[int]] = [[] for _ in batches]
        written_before = {pid: _written(pid) for pid in acceptors}

        def run(k: int) -> None:
            results[k] = send(node.port, batches[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [[0] * 25] * 6
        with sqlite3.connect(tmp_path / "data" / "index.sqlite") as db:
            rows = db.execute("SELECT sop_instance_uid FROM instances").fetchall()
        sent = {ds.SOPInstanceUID for batch in batches for ds in batch}
        assert sorted(r[0] for r in rows) == sorted(sent)
        assert len(list((tmp_path / "data" / "archive").rglob("*.dcm"))) == 150
        # The acceptors took part: they wrote at least one association's instances.
        one_batch = sum(len(ds.PixelData) for ds in batches[0])
        assert sum(_written(pid) - written_before[pid] for pid in acceptors) >= one_batch
        assert node.stop() == 0
        assert _gone(acceptors)
    finally:
        node.kill()


def test_acceptors_die_with_a_killed_node(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", config="listener_processes = 2\n", workers=0).start()
    assert node.proc is not None
    acceptors = _acceptors(node.proc.pid)
    assert len(acceptors) == 1
    node.kill()
    assert _gone(acceptors)
