"""Shared fixtures (a real node on a free loopback port) and the order modules run in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_harness import NodeProcess

# pynetdicom logs every PDU at INFO when the root logger allows it; keep tests readable.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The SCP tests (``test_scp_*``) run in both receive modes: ``fast_receive`` true/false."""
    if "fast_receive" in metafunc.fixturenames and metafunc.module.__name__.startswith("test_scp_"):
        metafunc.parametrize("fast_receive", [True, False], ids=["fast", "plain"])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a ``slow`` or ``viewer`` test first, then those that start Orthanc,
    then the rest, each module's tests in their order: with several worker processes
    (``scripts/test.sh``) the long modules start early rather than end the run alone."""
    rank: dict[str, int] = {}
    for item in items:
        weight = 2 if item.get_closest_marker("slow") or item.get_closest_marker("viewer") else \
            1 if item.get_closest_marker("orthanc") else 0
        rank[item.nodeid.split("::")[0]] = max(weight, rank.get(item.nodeid.split("::")[0], 0))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (-rank[it.nodeid.split("::")[0]], first[it.nodeid.split("::")[0]],
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
