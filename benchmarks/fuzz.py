"""Fuzz the node's front door with atheris (libFuzzer for Python), issue 13 item 8.

    .venv/bin/python benchmarks/fuzz.py                      # every target, 300 s each
    .venv/bin/python benchmarks/fuzz.py --target store --seconds 3600 --corpus fuzz-corpus
    .venv/bin/python benchmarks/fuzz.py --json               # one JSON object per target

Targets (``tests/fuzz_targets.py``): ``pdu`` (PDU stream watch, command-set decoder,
P-DATA-TF decoder), ``association`` (A-ASSOCIATE-RQ decoder, primitive, context
negotiation), ``store`` (data set walk and ``Ingest.store``). Each runs in its own
process with coverage instrumentation of ``dicom_node``, ``twin_archive`` and
``pynetdicom``, starting from valid inputs (plus ``--corpus DIR/<target>`` when given,
which then keeps what the run found), with a per-input time limit of 10 s and a
memory limit of 1 GiB (libFuzzer counts a larger peak as a crash: memory must stay
bounded whatever a peer declares).

Prints per target: executions, coverage (libFuzzer's edge count ``cov`` and feature
count ``ft``), crashes, and the crashing inputs' files. A crash becomes a regression
input under ``tests/fuzz_regressions/<target>/`` (replayed by ``tests/test_fuzz.py``)
once fixed. Exit status 1 when a target crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import fuzz_targets  # noqa: E402

_INSTRUMENTED = ["dicom_node", "twin_archive", "pynetdicom"]


@dataclass(kw_only=True)
class FuzzRun:
    """What one target's run did."""

    target: str
    seconds: float
    executions: int
    coverage: int
    features: int
    crashes: int
    crash_files: list[str] = field(default_factory=list)
    exit_code: int = 0
    tail: str = ""


#: Memory a fuzzing process may grow by, MiB (libFuzzer's ``-rss_limit_mb`` above its start).
RSS_LIMIT_MB = 1024


def inherited_peak_rss_mb() -> int:
    """The peak RSS this process already reports when it starts, MiB.

    libFuzzer checks ``getrusage(RUSAGE_SELF).ru_maxrss``, and Linux carries the parent's
    peak into a child across ``vfork``/``exec``: a fuzz run started from a test process that
    once held 2.3 GB (e.g. after the big-model tests) was killed as "out of memory" before
    its first input. The limit is therefore taken above what the process starts with.
    """
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _fuzz_in_this_process(target: str, libfuzzer_args: list[str]) -> None:
    import logging

    import atheris

    base = inherited_peak_rss_mb()
    libfuzzer_args = [f"-rss_limit_mb={base + RSS_LIMIT_MB}" if a.startswith("-rss_limit_mb=")
                      else a for a in libfuzzer_args]

    logging.disable(logging.CRITICAL)  # refusals are logged; millions of lines say nothing here
    with atheris.instrument_imports(include=_INSTRUMENTED):
        one_input = fuzz_targets.setup(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def run_target(target: str, seconds: float, corpus: Path | None = None) -> FuzzRun:
    """Fuzz ``target`` for ``seconds`` in a subprocess and return what it found."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as tmp:
        work = Path(tmp)
        corpus_dir = corpus / target if corpus is not None else work / "corpus"
        corpus_dir.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(fuzz_targets.seeds(target)):
            (corpus_dir / f"seed-{i}").write_bytes(seed)
        artifacts = work / "artifacts"
        artifacts.mkdir()
        args = [f"-max_total_time={int(seconds)}", "-timeout=10", f"-rss_limit_mb={RSS_LIMIT_MB}",
                "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus_dir)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        start = time.monotonic()
        done = subprocess.run([sys.executable, __file__, "--in-process", target, "--", *args],
                              capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=seconds + 120)
        elapsed = time.monotonic() - start
        out = done.stdout + done.stderr
        crash_files = []
        keep = REPO / "fuzz-crashes" / target
        for path in sorted(artifacts.iterdir()):
            keep.mkdir(parents=True, exist_ok=True)
            (keep / path.name).write_bytes(path.read_bytes())
            crash_files.append(str(keep / path.name))
    runs = re.findall(r"Done (\d+) runs", out) or re.findall(r"stat::number_of_executed_units: (\d+)", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    return FuzzRun(
        target=target, seconds=round(elapsed, 1), executions=int(runs[-1]) if runs else 0,
        coverage=int(cov[-1][0]) if cov else 0, features=int(cov[-1][1]) if cov else 0,
        crashes=len(crash_files), crash_files=crash_files, exit_code=done.returncode,
        tail=out[-3000:] if done.returncode else "",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--in-process"]:
        target, rest = argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:]
        _fuzz_in_this_process(target, rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*fuzz_targets.TARGETS, "all"], default="all")
    parser.add_argument("--seconds", type=float, default=300.0, help="per target (default 300)")
    parser.add_argument("--corpus", type=Path, help="keep and reuse the corpus in DIR/<target>")
    parser.add_argument("--json", action="store_true", help="one JSON object per target")
    args = parser.parse_args(argv)
    targets = fuzz_targets.TARGETS if args.target == "all" else (args.target,)
    crashed = False
    for target in targets:
        result = run_target(target, args.seconds, args.corpus)
        crashed |= bool(result.crashes or result.exit_code)
        if args.json:
            print(json.dumps(asdict(result)), flush=True)
        else:
            print(f"{target:12} {result.executions:>9} executions in {result.seconds:>6.1f} s, "
                  f"coverage {result.coverage} edges / {result.features} features, "
                  f"{result.crashes} crash(es) {' '.join(result.crash_files)}", flush=True)
            if result.tail:
                print(result.tail)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
