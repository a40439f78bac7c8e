#!/usr/bin/env python3
"""Ingest benchmark: how fast does the node accept a CT series, next to Orthanc and storescp?

One 512x512 phantom CT series (``pipelines.phantom``) is written to a temporary
folder once, then sent with dcmtk ``storescu`` (``TCP_NODELAY=1``) to

* ``node``     -- ``dicom-node serve`` (durable write: temp file, fsync, rename, SQLite index),
* ``orthanc``  -- a real Orthanc (``orthanc/server.py``; ``SyncStorageArea`` on, SQLite index),
* ``storescp`` -- dcmtk ``storescp --fork`` writing plain files (no fsync, no index): the
  floor set by the network stack and the disk.

in turns (node, orthanc, storescp; then the next round), ``--rounds`` rounds each,
once over one association and once over four associations in parallel (the files
split in four, four ``storescu`` at once). Every round starts with an empty
destination (a fresh data directory and a freshly started receiver, whose start-up
is not timed). The wall time runs from launching the first ``storescu`` to the exit
of the last one. After each round the destination is checked to hold exactly the
number of files sent (a broken receiver must not look fast); a round that fails the
check is reported as failed, not timed.

Usage::

    .venv/bin/python benchmarks/ingest.py [--slices 200] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from orthanc.server import OrthancServer, free_ports, orthanc_version, set_pdeathsig  # noqa: E402
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402

NODE_BIN = REPO / ".venv" / "bin" / "dicom-node"
NODE_AET = "DICOM_NODE"
CALLING_AET = "BENCHSCU"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # dcmtk waits on Nagle's algorithm otherwise
TARGETS = ("node", "node-plain", "orthanc", "storescp")
MODES = (1, 4)  # associations in parallel

_CHILDREN: list[subprocess.Popen[bytes]] = []


# --------------------------------------------------------------------- child hygiene
def _spawn(args: list[str], **kw: object) -> subprocess.Popen[bytes]:
    kw.setdefault("preexec_fn", set_pdeathsig)  # SIGTERM the child should this script die
    proc = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
    _CHILDREN.append(proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    """SIGTERM, wait, SIGKILL (only processes this script started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)
    return proc.returncode


def _kill_children() -> None:
    for proc in list(_CHILDREN):
        try:
            _stop(proc, timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------- helpers
def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM, KiB) of a live process, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads (and reaped children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def flush_ms(folder: Path, n: int = 20) -> float:
    """Median milliseconds of one device flush on ``folder``'s file system.

    Measured as ``fsync`` of a new 4 KiB file's directory after ``fdatasync`` of the
    file: the node pays about three of these per instance (file, directory, index),
    Orthanc one, storescp none. Shared disks vary a lot; this puts a figure on it.
    """
    times = []
    for i in range(n):
        path = folder / f".flush-probe-{i}"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        times.append((time.perf_counter() - t0) / 2)
        path.unlink()
    return round(statistics.median(times) * 1000, 3)


def count_files(root: Path, pattern: str = "*") -> int:
    return sum(1 for p in root.rglob(pattern) if p.is_file())


def write_series(folder: Path, slices: int) -> list[Path]:
    """Render the benchmark series (512x512 CT, ``slices`` slices) into ``folder``."""
    series = ct_series(Anatomy.random(7), SliceGeometry(rows=512, columns=512, slices=slices),
                       StudyInfo(patient_id="BENCH-0001", patient_name="Bench^Ingest"))
    paths = []
    for k, ds in enumerate(series):
        path = folder / f"ct{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(files: list[Path], n: int) -> list[list[Path]]:
    """``n`` contiguous chunks of nearly equal size."""
    k, r = divmod(len(files), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(files[start:end])
        start = end
    return [c for c in out if c]


def send(port: int, called_aet: str, files: list[Path], parallel: int, timeout: float
         ) -> tuple[float, list[int], str]:
    """Run ``parallel`` storescu at once; wall seconds from first launch to last exit."""
    chunks = split(files, parallel)
    procs = []
    t0 = time.perf_counter()
    for chunk in chunks:
        procs.append(_spawn(["storescu", "-aet", CALLING_AET, "-aec", called_aet,
                             "127.0.0.1", str(port), *map(str, chunk)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    codes, errors = [], []
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            errors.append(f"storescu timed out after {timeout} s")
        codes.append(proc.returncode)
        if err and err.strip():
            errors.append(err.decode(errors="replace").strip()[-500:])
        if proc in _CHILDREN:
            _CHILDREN.remove(proc)
    wall = time.perf_counter() - t0
    return wall, codes, "\n".join(errors)


# --------------------------------------------------------------------- receivers
@dataclass
class Receiver:
    """A started receiver: where to send, how to count, whose memory to read."""

    port: int
    aet: str
    count: Callable[[], int]
    pid: int
    log: Path
    helpers: Callable[[], list[int]] = lambda: []  # more receiving processes (node acceptors)


def child_pids(pid: int, marker: bytes) -> list[int]:
    """Live children of ``pid`` whose command line contains ``marker``."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                if marker in Path(f"/proc/{kid}/cmdline").read_bytes():
                    out.append(int(kid))
            except OSError:
                continue
    return out


#: ``listener_processes`` of the node under test (``--node-processes``).
NODE_PROCESSES = [min(os.cpu_count() or 1, 4)]


@contextmanager
def node_receiver(workdir: Path, *, fast_receive: bool = True) -> Iterator[Receiver]:
    data = workdir / "node-data"
    (port,) = free_ports(1)
    log = workdir / "node.log"
    config = workdir / "node.toml"
    config.write_text(f"listener_processes = {NODE_PROCESSES[0]}\n"
                      f"fast_receive = {'true' if fast_receive else 'false'}\n")
    with open(log, "ab") as out:
        # This checkout's code (``python -m dicom_node``), whichever environment runs it.
        proc = _spawn([sys.executable, "-m", "dicom_node", "--config", str(config), "serve",
                       "--data-dir", str(data),
                       "--port", str(port), "--ae-title", NODE_AET, "--bind", "127.0.0.1"],
                      cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                      env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)),
                      start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        # Untimed start-up means all of it: the listener and the inference worker, whose
        # start (importing torch, about 2 s of a core) would otherwise run in the first round.
        while "ready for jobs" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise RuntimeError(f"node exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node not ready after 60 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        _wait_port(port, proc)
        deadline = time.monotonic() + 60
        while len(child_pids(proc.pid, b"dicom_node.runtime.acceptor_process")) < NODE_PROCESSES[0] - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node acceptors not started:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Receiver(port=port, aet=NODE_AET, pid=proc.pid, log=log,
                       count=lambda: count_files(data / "archive", "*.dcm"),
                       helpers=lambda: child_pids(proc.pid, b"dicom_node.runtime.acceptor_process"))
    finally:
        _stop(proc)


@contextmanager
def orthanc_receiver(workdir: Path) -> Iterator[Receiver]:
    server = OrthancServer(workdir / "orthanc", aet="ORTHANC")
    with server:
        assert server.pid is not None
        yield Receiver(port=server.dicom_port, aet=server.aet, pid=server.pid, log=server.log_path,
                       count=server.count_instances)


@contextmanager
def storescp_receiver(workdir: Path) -> Iterator[Receiver]:
    out_dir = workdir / "storescp-out"
    out_dir.mkdir()
    (port,) = free_ports(1)
    log = workdir / "storescp.log"
    with open(log, "ab") as out:
        proc = _spawn(["storescp", "--fork", "-aet", "STORESCP", "-od", str(out_dir), str(port)],
                      env=DCMTK_ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(port, proc)
        yield Receiver(port=port, aet="STORESCP", pid=proc.pid, log=log,
                       count=lambda: count_files(out_dir))
    finally:
        _stop(proc)
        # --fork children exit with their association; give stragglers a moment.
        time.sleep(0.1)


@contextmanager
def node_plain_receiver(workdir: Path) -> Iterator[Receiver]:
    """The node with ``fast_receive = false`` (plain pynetdicom receive path)."""
    with node_receiver(workdir, fast_receive=False) as receiver:
        yield receiver


RECEIVERS = {"node": node_receiver, "node-plain": node_plain_receiver,
             "orthanc": orthanc_receiver, "storescp": storescp_receiver}


# --------------------------------------------------------------------- the benchmark
@dataclass
class RoundResult:
    target: str
    parallel: int
    round: int
    seconds: float | None
    instances_per_s: float | None
    received: int
    expected: int
    ok: bool
    peak_rss_mib: float | None
    cpu_s: float | None = None
    error: str = ""
    peak_rss_main_mib: float | None = None
    processes: int = 1


@dataclass
class Summary:
    target: str
    parallel: int
    rounds_ok: int
    median_s: float | None
    median_instances_per_s: float | None
    best_instances_per_s: float | None
    mib_per_s: float | None
    peak_rss_mib: float | None
    median_cpu_s: float | None = None
    times_s: list[float] = field(default_factory=list)


def run_round(target: str, parallel: int, rnd: int, files: list[Path], scratch: Path,
              timeout: float) -> RoundResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-p{parallel}-r{rnd}-", dir=scratch))
    try:
        with RECEIVERS[target](workdir) as rx:
            pids = [rx.pid, *rx.helpers()]
            cpu0 = [cpu_seconds(p) for p in pids]
            wall, codes, err = send(rx.port, rx.aet, files, parallel, timeout)
            cpu1 = [cpu_seconds(p) for p in pids]
            # The last C-STORE response precedes storescu's exit; count what landed.
            received = rx.count()
            hwm = [vm_hwm_kib(p) for p in pids]
            rss = sum(h for h in hwm if h) if hwm[0] else None
            rss_main = hwm[0]
        ok = received == len(files) and all(c == 0 for c in codes)
        error = "" if ok else (f"received {received}/{len(files)}, storescu exit codes {codes}; "
                               f"{err[-800:]}")
        return RoundResult(target=target, parallel=parallel, round=rnd,
                           seconds=round(wall, 4) if ok else None,
                           instances_per_s=round(len(files) / wall, 2) if ok else None,
                           received=received, expected=len(files), ok=ok,
                           peak_rss_mib=round(rss / 1024, 1) if rss else None,
                           peak_rss_main_mib=round(rss_main / 1024, 1) if rss_main else None,
                           processes=len(pids),
                           cpu_s=round(sum(b - a for a, b in zip(cpu0, cpu1)
                                           if a is not None and b is not None), 2)
                           if cpu0[0] is not None and cpu1[0] is not None else None,
                           error=error)
    except Exception as exc:  # noqa: BLE001 - reported as a failed round, the rest goes on
        return RoundResult(target=target, parallel=parallel, round=rnd, seconds=None,
                           instances_per_s=None, received=0, expected=len(files), ok=False,
                           peak_rss_mib=None, error=f"{type(exc).__name__}: {exc}"[-1500:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(results: list[RoundResult], bytes_total: int, n: int) -> list[Summary]:
    out = []
    for parallel in MODES:
        for target in TARGETS:
            rs = [r for r in results if r.target == target and r.parallel == parallel]
            if not rs:
                continue
            times = [r.seconds for r in rs if r.ok and r.seconds]
            rss = [r.peak_rss_mib for r in rs if r.peak_rss_mib]
            cpu = [r.cpu_s for r in rs if r.ok and r.cpu_s is not None]
            med = statistics.median(times) if times else None
            out.append(Summary(
                target=target, parallel=parallel, rounds_ok=len(times), median_s=med,
                median_instances_per_s=round(n / med, 1) if med else None,
                best_instances_per_s=round(n / min(times), 1) if times else None,
                mib_per_s=round(bytes_total / med / 2**20, 1) if med else None,
                peak_rss_mib=max(rss) if rss else None,
                median_cpu_s=statistics.median(cpu) if cpu else None, times_s=times))
    return out


def conditions(files: list[Path], scratch: Path, args: argparse.Namespace) -> dict[str, object]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    df = subprocess.run(["df", "-T", str(scratch)], capture_output=True, text=True).stdout.split()
    fs = f"{df[-6]} on {df[-7]}" if len(df) >= 7 else "?"
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    return {
        "slices": len(files), "rows": 512, "columns": 512,
        "file_bytes_each": files[0].stat().st_size,
        "bytes_total": sum(f.stat().st_size for f in files),
        "rounds": args.rounds, "modes_parallel_associations": list(MODES),
        "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "orthanc": ".".join(map(str, orthanc_version())),
        "storescu": version(["storescu", "--version"]).strip("$ ").replace("dcmtk: ", "dcmtk "),
        "scratch": str(scratch), "scratch_fs": fs, "git": git,
        "tcp_nodelay": True, "transfer_syntax": "Explicit VR Little Endian (as written)",
        "node_listener_processes": NODE_PROCESSES[0],
        "load_average_at_start": os.getloadavg(),
        "flush_ms_at_start": flush_ms(scratch),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200, help="slices in the series (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target and mode (default 3)")
    parser.add_argument("--json", metavar="OUT", help="write all results and conditions as JSON")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of node,node-plain,orthanc,storescp")
    parser.add_argument("--scratch", default=None,
                        help="folder for series and destinations (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per send (default 600)")
    parser.add_argument("--node-processes", type=int, default=NODE_PROCESSES[0],
                        help="the node's listener_processes (default: CPUs, at most 4)")
    args = parser.parse_args(argv)
    if args.slices < 4 or args.rounds < 1:
        parser.error("--slices must be >= 4 and --rounds >= 1")
    if not 1 <= args.node_processes <= 16:
        parser.error("--node-processes must be from 1 to 16")
    NODE_PROCESSES[0] = args.node_processes
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {sorted(unknown)}")
    for tool in ("storescu", "storescp"):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (apt-get install dcmtk)")

    atexit.register(_kill_children)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dicom-node-bench-")).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        series_dir = scratch / "series"
        series_dir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        files = write_series(series_dir, args.slices)
        print(f"series: {len(files)} x 512x512 CT, {files[0].stat().st_size} bytes each, "
              f"written in {time.perf_counter() - t0:.1f} s to {series_dir}", flush=True)
        cond = conditions(files, scratch, args)
        results: list[RoundResult] = []
        for parallel in MODES:
            for rnd in range(1, args.rounds + 1):
                for target in targets:
                    r = run_round(target, parallel, rnd, files, scratch, args.timeout)
                    results.append(r)
                    shown = (f"{r.seconds:7.2f} s {r.instances_per_s:8.1f} inst/s" if r.ok
                             else f"FAILED: {r.error}")
                    procs = f" in {r.processes} processes" if r.processes > 1 else ""
                    extra = (f"  (receiver CPU {r.cpu_s} s, peak RSS {r.peak_rss_mib} MiB{procs})"
                             if r.ok else "")
                    print(f"  {target:8s} x{parallel} round {rnd}: {shown}{extra}", flush=True)
        cond["flush_ms_at_end"] = flush_ms(scratch)
        cond["load_average_at_end"] = os.getloadavg()
        summary = summarise(results, int(cond["bytes_total"]), len(files))  # type: ignore[call-overload]
        print_table(summary, cond)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"conditions": cond, "summary": [asdict(s) for s in summary],
                 "rounds": [asdict(r) for r in results], "ratios": ratios(summary)}, indent=2))
            print(f"wrote {args.json}")
        return 0 if all(r.ok for r in results) else 1
    finally:
        _kill_children()
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def ratios(summary: list[Summary]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    by = {(s.target, s.parallel): s.median_instances_per_s for s in summary}
    for parallel in MODES:
        for name in ("node", "node-plain"):
            node = by.get((name, parallel))
            for other in ("orthanc", "storescp") + (("node",) if name == "node-plain" else ()):
                ref = by.get((other, parallel))
                out[f"{name}/{other} x{parallel}"] = round(node / ref, 3) if node and ref else None
    return out


def print_table(summary: list[Summary], cond: dict[str, object]) -> None:
    print()
    print(f"{cond['slices']} slices 512x512 ({cond['bytes_total']} bytes), {cond['rounds']} rounds, "
          f"{cond['cpus']} CPUs, Orthanc {cond['orthanc']}, {cond['storescu']}, "
          f"scratch {cond['scratch_fs']}, node listener_processes "
          f"{cond['node_listener_processes']}, load average at start "
          f"{'/'.join(f'{x:.2f}' for x in cond['load_average_at_start'])}, at end "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}; one device flush "
          f"{cond['flush_ms_at_start']} ms at start, {cond['flush_ms_at_end']} ms at end")
    print(f"{'target':9s} {'assocs':>6s} {'ok':>3s} {'median s':>9s} {'inst/s':>8s} {'best':>8s} "
          f"{'MiB/s':>7s} {'CPU s':>6s} {'peak RSS MiB':>13s}")
    for s in summary:
        def f(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"
        print(f"{s.target:9s} {s.parallel:6d} {s.rounds_ok:3d} {f(s.median_s, '9.2f')} "
              f"{f(s.median_instances_per_s, '8.1f')} {f(s.best_instances_per_s, '8.1f')} "
              f"{f(s.mib_per_s, '7.1f')} {f(s.median_cpu_s, '6.2f')} {f(s.peak_rss_mib, '13.1f')}")
    for k, v in ratios(summary).items():
        print(f"{k}: {v if v is not None else '-'}")


if __name__ == "__main__":
    sys.exit(main())
