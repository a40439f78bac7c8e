"""The journal carries the node's lines; other libraries' only from WARNING (issue 30 item 6)."""

from __future__ import annotations

import logging

import pytest

from dicom_node.logconfig import configure_logging


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_third_party_info_lines_only_at_debug(level: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging(level)
        logging.getLogger("highdicom.base").info('copy attributes of module "General Study"')
        logging.getLogger("apscheduler.executors.default").info("Running job")
        logging.getLogger("highdicom.seg").warning("a library's warning")
        logging.getLogger("dicom_node.runtime.retention").info("archive prune: removed 3 file(s)")
        out = capsys.readouterr().out
    finally:
        root.handlers[:], root.level = saved
    assert "archive prune: removed 3 file(s)" in out and "a library's warning" in out
    assert ("copy attributes" in out) == (level == "DEBUG")
    assert ("Running job" in out) == (level == "DEBUG")
