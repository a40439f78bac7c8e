"""The one switch for the fast path (issue 13 item 7): setting, pin and self-check."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom import dul as pynetdicom_dul

from dicom_node.wire import fast_receive
from dicom_node.wire.server import DicomServer
from dicom_node.settings import Settings
from twin_archive import Archive

REPO = Path(__file__).resolve().parents[1]


def test_installed_pynetdicom_is_inside_the_pinned_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("pynetdicom"))
    assert pin.startswith("pynetdicom>=3.0.4,<3.1")
    assert pynetdicom.__version__.startswith(fast_receive.TESTED_VERSIONS)
    assert fast_receive.self_check() is None


def test_changed_internals_fall_back_to_plain_pynetdicom_with_one_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fast_receive.store_lane, "_installed", False)  # as in a fresh process
    monkeypatch.delattr(pynetdicom_dul.DULServiceProvider, "_read_pdu_data")
    assert "_read_pdu_data" in (fast_receive.self_check() or "")
    caplog.set_level(logging.WARNING, logger="dicom_node.wire.fast_receive")
    assert fast_receive.install(AE(), tmp_path) is False
    warnings = [r for r in caplog.records if r.name == "dicom_node.wire.fast_receive"]
    assert len(warnings) == 1 and "plain pynetdicom" in warnings[0].getMessage()


def test_untested_pynetdicom_version_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert "not a tested version" in (fast_receive.self_check() or "")


@pytest.mark.parametrize("enabled", [True, False])
def test_the_setting_decides_the_mode(tmp_path: Path, enabled: bool) -> None:
    settings = Settings(data_dir=tmp_path, port=0, bind_address="127.0.0.1", fast_receive=enabled)
    with Archive(tmp_path) as archive:
        server = DicomServer(settings, archive.ingest)
        assert server.fast_receive is enabled
        assert (fast_receive.spooling.spools_for(server.ae) is not None) is enabled
