"""The front door, fuzzed (issue 13 item 8): a bounded atheris run per target, and every
input a run ever crashed on replayed as a regression test.

The targets (``tests/fuzz_targets.py``) are the PDU and command-set reader, the
association request, and header parse + archive store. In the suite each runs for
:data:`FUZZ_SECONDS` (coverage-instrumented, 1 GiB memory limit, 10 s per input);
``benchmarks/fuzz.py`` runs them for longer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import fuzz_targets

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import fuzz  # noqa: E402

FUZZ_SECONDS = 20
REGRESSIONS = Path(__file__).parent / "fuzz_regressions"


@pytest.mark.slow
@pytest.mark.parametrize("target", fuzz_targets.TARGETS)
def test_bounded_fuzz_run_finds_no_crash(target: str) -> None:
    result = fuzz.run_target(target, FUZZ_SECONDS)
    assert result.crashes == 0 and result.exit_code == 0, result.tail
    assert result.executions > 100 and result.coverage > 50, result


def _regression_inputs() -> list[tuple[str, Path]]:
    return [(target, path) for target in fuzz_targets.TARGETS
            for path in sorted((REGRESSIONS / target).glob("*")) if path.is_file()]


@pytest.mark.parametrize(("target", "path"), _regression_inputs(),
                         ids=[f"{t}/{p.name}" for t, p in _regression_inputs()])
def test_input_a_fuzz_run_crashed_on_is_handled(target: str, path: Path) -> None:
    fuzz_targets.setup(target)(path.read_bytes())


@pytest.mark.parametrize("target", fuzz_targets.TARGETS)
def test_every_seed_is_handled(target: str) -> None:
    run = fuzz_targets.setup(target)
    for seed in fuzz_targets.seeds(target):
        run(seed)


def test_a_fuzz_run_from_a_process_that_once_held_much_memory_is_not_killed_as_oom() -> None:
    """Linux carries a parent's peak RSS into its child across vfork/exec, and libFuzzer
    compares that peak with ``-rss_limit_mb``: run from the test process after the
    big-model tests (peak 2.3 GB), every fuzz target was "out of memory" before its first
    input. The limit is now taken above what the fuzzing process starts with."""
    import subprocess

    code = ("import sys; sys.path[:0] = ['benchmarks', 'tests', '.']\n"
            "big = bytearray(1536 << 20); big[::4096] = b'x' * len(big[::4096]); del big\n"
            "import fuzz\n"
            "r = fuzz.run_target('pdu', 3)\n"
            "print(r.crashes, r.exit_code, r.executions)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    crashes, exit_code, executions = (int(v) for v in out.stdout.split()[-3:])
    assert (crashes, exit_code) == (0, 0), out.stdout[-2000:] + out.stderr[-2000:]
    assert executions > 100
