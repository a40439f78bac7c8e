"""Shared fixtures: a real node on a free loopback port."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_harness import NodeProcess

# pynetdicom logs every PDU at INFO when the root logger allows it; keep tests readable.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A running node with an empty data directory; stopped after the test."""
    proc = NodeProcess(tmp_path / "data").start()
    yield proc
    proc.stop()
