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

FUZZ_SECONDS = 30
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
