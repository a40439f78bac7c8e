"""The nightly job in a child process: lower CPU priority, dies with the node.

:func:`run_in_subprocess` runs :func:`trainer.nightly.run_training` in a child process
(``python -m trainer.child REQUEST.json``) at a lower CPU priority (``os.nice``), so
that the node keeps serving studies while it trains (STYLE rule 15); the outcome comes
back as JSON. The child dies with the process that started it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.selection import SelectionRules
from trainer.errors import TrainingError
from trainer.nightly import TRAINING_DIR, NightlyConfig, TrainingOutcome, run_training

LOG = logging.getLogger(__name__)

#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def run_in_subprocess(data_dir: Path | str, task: str, rules: SelectionRules,
                      config: NightlyConfig, *, nice: int = 10, by: str = "trainer",
                      timeout_s: float | None = None,
                      cancel: threading.Event | None = None) -> TrainingOutcome:
    """Run :func:`run_training` in a child process at lower priority; return its outcome.

    The child inherits stdout/stderr (its log lines go where the node's go). It dies
    with its parent (``PR_SET_PDEATHSIG``, SIGKILL, as the node's other children do), so
    a killed node leaves no training behind that writes to the data directory after its
    lock is gone; the calling thread waits for the child, so the signal (tied by Linux
    to the thread that started the child) comes only when the process dies.

    Parameters
    ----------
    nice : int
        Niceness added to the child (0..19).
    timeout_s : float, optional
        Kill the child after this many seconds (default: the time budget plus 10 min
        for caching, evaluation and registration).
    cancel : threading.Event, optional
        When set (the node stops), the child is terminated; a later run on the same
        dataset resumes from its checkpoint.

    Raises
    ------
    TrainingError
        If the child fails or times out (its exit status and last error in the message).
    ValueError
        If ``nice`` is out of range.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be in 0..19, got {nice}")
    data_dir = Path(data_dir)
    req_dir = data_dir / TRAINING_DIR / task
    req_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    request = req_dir / f"request-{stamp}.json"
    result = req_dir / f"result-{stamp}.json"
    request.write_text(json.dumps({
        "data_dir": str(data_dir), "task": task, "rules": dataclasses.asdict(rules),
        "config": dataclasses.asdict(config), "by": by, "result": str(result)}))
    cmd = [sys.executable, "-m", "trainer.child", str(request)]
    timeout = timeout_s if timeout_s is not None else config.time_budget_s + 600
    LOG.info("training %s in a subprocess (nice +%d, timeout %.0f s)", task, nice, timeout)

    proc = subprocess.Popen(cmd, preexec_fn=_child_setup(nice),
                            cwd=str(Path(__file__).resolve().parents[1]))
    try:
        _wait_for_child(proc, task, timeout, cancel)
    finally:
        request.unlink(missing_ok=True)
    return _read_outcome(proc.returncode, result, task)


def _child_setup(nice: int) -> Callable[[], None]:
    """What the training child runs before exec: lower its priority by ``nice`` and ask
    the kernel for SIGKILL when its parent dies (exit at once if it already has). libc
    is loaded here, in the parent: a child forked from a threaded process does no
    ``dlopen``. The node's own children do the same (``dicom_node.wire.childproc``, which
    this room may not import)."""
    parent = os.getpid()
    prctl: Any
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        prctl = None

    def setup() -> None:
        os.nice(nice)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def _wait_for_child(proc: subprocess.Popen[bytes], task: str, timeout: float,
                    cancel: threading.Event | None) -> None:
    """Wait for the training child; stop it (TERM, then KILL after 30 s) on the way out.

    Raises
    ------
    TrainingError
        If ``cancel`` is set or the child runs past ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                raise TrainingError(f"training {task} cancelled (the node is stopping); the next "
                                    "run on the same dataset resumes from the checkpoint")
            if time.monotonic() > deadline:
                raise TrainingError(f"training {task} did not finish within {timeout:.0f} s")
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read_outcome(returncode: int | None, result: Path, task: str) -> TrainingOutcome:
    """The outcome the child wrote to ``result`` (removed after reading).

    Raises
    ------
    TrainingError
        If the child failed or wrote an error.
    """
    if returncode != 0 or not result.is_file():
        detail = result.read_text() if result.is_file() else "no result written"
        result.unlink(missing_ok=True)
        raise TrainingError(f"training {task} failed (exit status {returncode}): {detail}")
    data = json.loads(result.read_text())
    result.unlink(missing_ok=True)
    if "error" in data:
        raise TrainingError(f"training {task} failed: {data['error']}")
    return TrainingOutcome.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m trainer.child REQUEST.json``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.child")
    parser.add_argument("request", type=Path)
    args = parser.parse_args(argv)
    req = json.loads(args.request.read_text())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [trainer %(process)d] %(name)s: %(message)s")
    result = Path(req["result"])
    try:
        rules = SelectionRules.from_dict(req["rules"])
        config = NightlyConfig(**req["config"])
        outcome = run_training(req["data_dir"], req["task"], rules, config, by=req["by"])
    except Exception as exc:  # reported to the parent, which raises TrainingError
        LOG.exception("training %s failed", req.get("task"))
        result.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    result.write_text(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
