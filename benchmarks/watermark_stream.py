"""A stream of studies into a small data disk at its high water mark (issue 23).

A real node (``serve``, the shipped demo model, one worker) on a tmpfs of ``--disk-mb``
with Orthanc as its destination receives one CT study after another from dcmtk
``storescu``, one every ``--every`` seconds, for ``--minutes`` (the issue asks for an
hour; the tests run minutes). Its
retention keeps images 30 days (so only the disk guard's prune under pressure frees
space) and results go once delivered. Printed: studies sent, C-STOREs refused (A700),
prunes under pressure, the disk's use over time (min / max), and whether anything was
refused while something was prunable (the journal's "nothing is prunable" line says
when nothing was).

Needs root (it mounts a tmpfs) and the packages ``scripts/setup.sh`` installs::

    .venv/bin/python benchmarks/watermark_stream.py --minutes 60
    .venv/bin/python benchmarks/watermark_stream.py --minutes 5 --disk-mb 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from loop_helpers import install_model, small_study, write_files  # noqa: E402
from node_harness import NodeProcess, free_port  # noqa: E402
from orthanc.server import OrthancServer  # noqa: E402


def _use(path: Path) -> float:
    u = shutil.disk_usage(path)
    return 100.0 * (u.total - u.free) / u.total


def _send(port: int, paths: list[Path], ae: str) -> bool:
    """True when every instance was acknowledged (storescu's exit status)."""
    done = subprocess.run([shutil.which("storescu") or "storescu", "-aet", "BENCH", "-aec", ae,
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True,
                          env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    return done.returncode == 0


def run(minutes: float, disk_mb: int, work: Path, every_s: float) -> dict[str, object]:
    data = work / "disk"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={disk_mb}m", "tmpfs", str(data)],
                   check=True)
    try:
        install_model(data)
        with OrthancServer(work / "orthanc") as orthanc:
            config = (f"metrics_port = {free_port()}\nretention_days = 30\n"
                      "result_retention_days = 0\nprune_every_min = 0.05\nmin_free_mb = 6\n"
                      "disk_high_water_pct = 60\ndisk_low_water_pct = 45\n"
                      "send_backoff_initial_s = 0.5\nsend_backoff_max_s = 2\n[[destinations]]\n"
                      f'ae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
            node = NodeProcess(data, config=config, extra_args=["--stable-after", "1"]).start()
            try:
                return _stream(node, data, work, minutes, every_s)
            finally:
                node.stop()
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _stream(node: NodeProcess, data: Path, work: Path, minutes: float,
            every_s: float) -> dict[str, object]:
    sent = refused = 0
    uses = []
    end = time.monotonic() + minutes * 60
    i = 0
    while time.monotonic() < end:
        started = time.monotonic()
        folder = work / f"s{i}"
        paths = write_files(small_study(f"WM-{i}", slices=40, size=128, seed=i), folder)
        ok = _send(node.port, paths, node.ae_title)
        sent += 1
        refused += 0 if ok else 1
        shutil.rmtree(folder)
        uses.append(_use(data))
        i += 1
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))
    log = node.log()
    return {"minutes": minutes, "every_s": every_s, "studies_sent": sent, "studies_with_a_refusal": refused,
            "refused_c_stores": log.count("refused, out of resources"),
            "prunes_under_pressure": sum(1 for line in log.splitlines()
                                         if "allowed by retention" in line
                                         and "under disk pressure" in line),
            "nothing_prunable_said": log.count("nothing is prunable"),
            "disk_use_pct_min": round(min(uses), 1) if uses else None,
            "disk_use_pct_max": round(max(uses), 1) if uses else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--disk-mb", type=int, default=40)
    parser.add_argument("--every", type=float, default=8.0,
                        help="seconds from one study's start to the next (a CT scanner makes "
                             "one every few minutes; the node needs a few seconds for one)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.minutes, args.disk_mb, Path(tmp), args.every)
    for key, value in result.items():
        print(f"{key:<28} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["refused_c_stores"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
