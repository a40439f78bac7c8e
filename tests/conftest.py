"""Shared fixtures (a real node on a free loopback port) and the order modules run in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli import openmp_defaults
from node_harness import NodeProcess

# The test processes' own torch threads wait asleep, as the node's do (before torch loads).
openmp_defaults()

# pynetdicom logs every PDU at INFO when the root logger allows it; keep tests readable.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The SCP tests (``test_scp_*``) run in both receive modes: ``fast_receive`` true/false."""
    if "fast_receive" in metafunc.fixturenames and metafunc.module.__name__.startswith("test_scp_"):
        metafunc.parametrize("fast_receive", [True, False], ids=["fast", "plain"])


#: Each module's seconds in a whole run (``tests/module_seconds.txt``, refreshed by
#: ``tests/module_seconds.py`` from a JUnit report); a module not listed counts 0.
MODULE_SECONDS = {line.split()[1]: float(line.split()[0])
                  for line in (Path(__file__).with_name("module_seconds.txt")).read_text().splitlines()
                  if line.strip() and not line.startswith("#")}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first (``MODULE_SECONDS``), each module's tests in their order:
    with several worker processes (``scripts/test.sh``, which keeps this order with
    ``--no-loadscope-reorder``) a long module started last would end the run alone."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(module(item), i)
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (-MODULE_SECONDS.get(module(it), 0.0), first[module(it)],
                               position[id(it)]))


@pytest.fixture
def fast_receive() -> bool:
    """The receive mode of the test's node (both, in the SCP modules; else the default)."""
    return True


@pytest.fixture
def node(tmp_path: Path, fast_receive: bool) -> Iterator[NodeProcess]:
    """A running node with an empty data directory that receives and stores (no inference
    worker: ``workers = 0``); stopped after the test."""
    proc = NodeProcess(tmp_path / "data", fast_receive=fast_receive, workers=0).start()
    yield proc
    proc.stop()
