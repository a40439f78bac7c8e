"""Issue 13, the operator's side: one node per data directory, start-up reconciliation,
disk full during a job, ``archive verify`` and ``archive rebuild-index``.

Real nodes as subprocesses, real SQLite files, real files on disk (a real tmpfs for the
full disk when run as root).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dicom_client import echo, send, stored_rows
from node_harness import DICOM_NODE, REPO, NodeProcess, small_ct

SUCCESS = 0x0000


def test_second_node_on_a_data_directory_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "data").start()
    try:
        assert send(first.port, [small_ct(patient_id="LOCK-1")]) == [SUCCESS]
        in_flight = first.data_dir / "tmp" / "in-flight.part"  # a write of the first node
        in_flight.write_bytes(b"x" * 100)
        state = json.loads((first.data_dir / "serve.json").read_text())
        for command in ("serve", "demo"):
            second = subprocess.run(
                [*DICOM_NODE, "--data-dir", str(first.data_dir), command, *(
                    ["--port", "0", "--bind", "127.0.0.1"] if command == "serve" else [])],
                capture_output=True, text=True, cwd=REPO, timeout=120)
            assert second.returncode == 2, (command, second.stderr)
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1, second.stderr
            assert f"pid {first.proc.pid}" in lines[0] and "in use by another node" in lines[0]
        # The first node is untouched: its temporary file, its state file, its service.
        assert in_flight.exists()
        assert json.loads((first.data_dir / "serve.json").read_text()) == state
        assert echo(first.port) == SUCCESS
        assert send(first.port, [small_ct(patient_id="LOCK-2")]) == [SUCCESS]
        # Read-only commands work beside it.
        status = first.cli("status")
        assert f"RUNNING (pid {first.proc.pid}" in status.stdout
        assert "LOCK-2" in first.cli("twin", "list").stdout
    finally:
        assert first.stop() == 0
    assert not (first.data_dir / "serve.json").exists()
    # Once the first is gone (even killed: the kernel drops the lock) a node starts again.
    again = NodeProcess(first.data_dir).start()
    again.kill()
    third = NodeProcess(first.data_dir).start()
    try:
        assert len(stored_rows(third.data_dir)) == 2
    finally:
        third.stop()
