"""What ``dicom-node COMMAND`` imports before its work (issue 29 item 4, a quick start).

``main`` builds the parser of the named command only (``COMMAND_MODULES``), so that
``infer`` starts without the listener's modules and ``serve`` without the
trainer's; the whole parser answers ``--help``, ``--version`` and mistakes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import _MODULE_ORDER, COMMAND_MODULES, build_parser, command_of, main

REPO = Path(__file__).resolve().parents[1]


def _registered_by(module: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    importlib.import_module(f"dicom_node.cli.{module}").register(sub, [])
    return set(sub.choices)


def test_the_command_table_names_the_module_that_registers_each_command() -> None:
    found = {name: module for module in _MODULE_ORDER for name in _registered_by(module)}
    assert found == COMMAND_MODULES
    full = build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMAND_MODULES)


@pytest.mark.parametrize(("argv", "command"), [
    (["infer", "x", "--out", "y"], "infer"),
    (["--data-dir", "d", "infer", "x"], "infer"),
    (["--data-dir=d", "--log-level", "DEBUG", "serve"], "serve"),
    (["--config", "infer"], None),          # "infer" is the configuration file's name
    (["--data-dir"], None),                 # the whole parser says what is missing
    (["--log-level", "LOUD", "serve"], None),  # the whole parser refuses LOUD
    (["--unknown", "infer"], None),
    (["bogus"], None), (["-h"], None), (["--version"], None), ([], None),
])
def test_the_command_is_found_after_the_common_options(argv: list[str], command: str | None
                                                        ) -> None:
    assert command_of(argv) == command


def test_mistakes_and_help_get_the_whole_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMAND_MODULES)
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--log-level", "LOUD", "status"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


_PROBE = r"""
import json, sys
from dicom_node.cli import build_parser, command_of
argv = sys.argv[1:]
build_parser(command_of(argv)).parse_args(argv)
heavy = ("torch", "monai", "highdicom", "pynetdicom", "dicom_node.runtime", "dicom_node.wire",
         "dicom_node.learning", "trainer", "apscheduler")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _loaded_after_parsing(*argv: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=REPO, check=True,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    return json.loads(proc.stdout)


def test_infer_parses_its_arguments_without_the_listener_torch_or_the_trainer() -> None:
    assert _loaded_after_parsing("--data-dir", "d", "infer", "in", "--out", "out") == []


def test_serve_parses_its_arguments_without_torch() -> None:
    assert not {"torch", "monai"} & set(_loaded_after_parsing("serve"))


def test_openmp_threads_wait_asleep_unless_the_environment_says_otherwise(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Set before any command imports torch (above: parsing imports none); spinning
    OpenMP threads burned 5 s of CPU in one `infer` on a shared machine."""
    import os

    monkeypatch.setenv("OMP_WAIT_POLICY", "unset below")  # restored after the test
    monkeypatch.delenv("OMP_WAIT_POLICY")
    with pytest.raises(SystemExit):
        main(["bogus"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main(["bogus"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    capsys.readouterr()
