"""``benchmarks/gpu.py`` where no CUDA GPU is usable (none here; on a GPU host the test
hides it with ``CUDA_VISIBLE_DEVICES=""``): it measures nothing, says why on one line,
exits 0 and writes no figure. On a GPU machine the script itself is the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_without_a_gpu_nothing_is_measured_and_the_reason_is_said(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--json",
                          str(tmp_path / "gpu.json")], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stderr
    (line,) = res.stdout.splitlines()
    assert line.startswith("gpu: no CUDA GPU here: torch ") and "nothing measured" in line
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert out["skipped"] in line and "backends" not in out and "end_to_end" not in out
    assert out["environment"]["cuda_available"] is False
