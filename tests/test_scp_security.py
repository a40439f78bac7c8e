"""Who may associate: calling AE allow-list and called AE check."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_client import echo, send, stored_rows
from node_harness import NodeProcess, small_ct


def test_unknown_calling_ae_is_rejected_and_logged_with_address(tmp_path: Path, fast_receive: bool) -> None:
    node = NodeProcess(tmp_path / "data", config='allowed_calling_aes = ["PACS_A", "CT_SCANNER"]\n',
                       fast_receive=fast_receive, workers=0).start()
    try:
        with pytest.raises(ConnectionRefusedError):
            send(node.port, [small_ct()], calling_ae="INTRUDER")
        assert echo(node.port, calling_ae="INTRUDER") == -1
        assert send(node.port, [small_ct()], calling_ae="CT_SCANNER") == [0]
        log = node.log()
        assert "association REJECTED from INTRUDER at 127.0.0.1:" in log
        assert "accepting associations only from: PACS_A, CT_SCANNER" in log
        assert "ANY calling AE" not in log
        assert len(stored_rows(node.data_dir)) == 1
    finally:
        node.stop()


def test_without_allow_list_all_are_accepted_with_a_warning(node: NodeProcess) -> None:
    assert echo(node.port, calling_ae="WHOEVER") == 0
    assert "allowed_calling_aes is empty: associations from ANY calling AE title are accepted" in node.log()


def test_called_ae_title_is_checked_when_required(tmp_path: Path, fast_receive: bool) -> None:
    node = NodeProcess(tmp_path / "data", config="require_called_ae = true\n",
                       fast_receive=fast_receive, workers=0).start()
    try:
        assert echo(node.port, called_ae="SOMEONE_ELSE") == -1
        assert echo(node.port, called_ae="DICOM_NODE") == 0
        assert "association REJECTED from TEST_SCU" in node.log()
    finally:
        node.stop()
