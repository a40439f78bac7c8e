"""The Orthanc fixture (``orthanc/server.py``) against a real Orthanc and real dcmtk tools."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `orthanc/` is a namespace package at the repo root, not installed
    sys.path.insert(0, str(REPO))

from orthanc.server import (  # noqa: E402
    STATUS_REFUSED_OUT_OF_RESOURCES,
    OrthancServer,
    free_ports,
)
from pipelines.phantom import Anatomy, SliceGeometry, StudyInfo, ct_series  # noqa: E402
from waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.orthanc

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # dcmtk waits on Nagle's algorithm otherwise


def _ct_files(folder: Path, n: int = 1, size: int = 128) -> list[Path]:
    """``n`` phantom CT slices written as Part 10 files."""
    folder.mkdir(parents=True, exist_ok=True)
    series = ct_series(Anatomy.random(3), SliceGeometry(rows=size, columns=size, slices=n),
                       StudyInfo(patient_id="ORTHANC-TEST"))
    paths = []
    for k, ds in enumerate(series):
        path = folder / f"ct{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _echoscu(port: int, aet: str = "ORTHANC") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", "TESTSCU", "-aec", aet, "127.0.0.1", str(port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)


def _storescu(port: int, files: list[Path], aet: str = "ORTHANC") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", aet, "127.0.0.1", str(port),
                           *map(str, files)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def _port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True


def test_start_echo_store_rest_stop(tmp_path: Path) -> None:
    files = _ct_files(tmp_path / "in")
    sent = pydicom.dcmread(files[0])
    server = OrthancServer(tmp_path / "orthanc", aet="TESTPACS")
    with server:
        assert server.running
        assert server.dicom_port != server.http_port
        system = server.system()
        assert system["DicomAet"] == "TESTPACS"
        assert system["DicomPort"] == server.dicom_port
        assert server.count_instances() == 0

        echo = _echoscu(server.dicom_port, "TESTPACS")
        assert echo.returncode == 0, echo.stderr

        store = _storescu(server.dicom_port, files, "TESTPACS")
        assert store.returncode == 0, store.stderr

        assert server.count_instances() == 1
        assert len(server.list_studies()) == 1
        assert len(server.list_series()) == 1
        assert server.study_uids() == [sent.StudyInstanceUID]
        (instance,) = server.list_instances()
        assert server.find_instance(sent.SOPInstanceUID) == instance
        assert server.instance_tags(instance)["SOPClassUID"] == CTImageStorage
        got = pydicom.dcmread(io.BytesIO(server.instance_file(instance)))
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert np.array_equal(got.pixel_array, sent.pixel_array)
        # Storage and configuration stay inside the working directory.
        assert server.config_path.is_file()
        assert any(server.storage_dir.rglob("*"))
        config = json.loads(server.config_path.read_text())
        assert config["RemoteAccessAllowed"] is False
        assert config["AuthenticationEnabled"] is False
        dicom_port, http_port = server.dicom_port, server.http_port
    assert not server.running
    assert server.process is not None and server.process.returncode == 0
    assert _port_closed(dicom_port) and _port_closed(http_port)


def test_two_orthancs_at_once(tmp_path: Path) -> None:
    files = _ct_files(tmp_path / "in")
    with OrthancServer(tmp_path / "a", aet="PACS_A") as a, OrthancServer(tmp_path / "b", aet="PACS_B") as b:
        assert len({a.dicom_port, a.http_port, b.dicom_port, b.http_port}) == 4
        assert a.system()["DicomAet"] == "PACS_A" and b.system()["DicomAet"] == "PACS_B"
        assert _echoscu(a.dicom_port, "PACS_A").returncode == 0
        assert _echoscu(b.dicom_port, "PACS_B").returncode == 0
        assert _storescu(a.dicom_port, files, "PACS_A").returncode == 0
        assert (a.count_instances(), b.count_instances()) == (1, 0)


def test_known_modality_receives_cstore_from_orthanc(tmp_path: Path) -> None:
    """A registered modality (here dcmtk storescp standing in for the node) gets C-ECHO/C-STORE."""
    files = _ct_files(tmp_path / "in")
    (scp_port,) = free_ports(1)
    out = tmp_path / "scp-out"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "-aet", "NODE_SCP", "-od", str(out), str(scp_port)],
                           env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until("storescp listening", lambda: not _port_closed(scp_port), 10.0, poll=0.05)
        modalities = {"node": ("NODE_SCP", "127.0.0.1", scp_port)}
        with OrthancServer(tmp_path / "orthanc", known_modalities=modalities) as server:
            assert "node" in server.get_json("/modalities")
            assert server.echo_modality("node")
            assert _storescu(server.dicom_port, files).returncode == 0
            server.store_to_modality("node", server.list_instances())
            received = list(out.glob("*"))
            assert len(received) == 1
            assert pydicom.dcmread(received[0]).SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID
    finally:
        scp.terminate()
        scp.wait(timeout=10)


def test_refused_sop_class_gets_failure_status_and_is_not_stored(tmp_path: Path) -> None:
    files = _ct_files(tmp_path / "in")
    ds = pydicom.dcmread(files[0])
    with OrthancServer(tmp_path / "orthanc", refuse_sop_classes=[CTImageStorage]) as server:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context(SecondaryCaptureImageStorage, ds.file_meta.TransferSyntaxUID)
        other = pydicom.dcmread(files[0])  # same pixels, a SOP class that is not refused
        other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assoc = ae.associate("127.0.0.1", server.dicom_port, ae_title="ORTHANC")
        assert assoc.is_established
        try:
            refused = assoc.send_c_store(ds)
            accepted = assoc.send_c_store(other)
        finally:
            assoc.release()
        assert refused.Status == STATUS_REFUSED_OUT_OF_RESOURCES
        assert accepted.Status == 0x0000
        assert server.count_instances() == 1
        assert server.find_instance(ds.SOPInstanceUID) is None
        assert server.find_instance(other.SOPInstanceUID) is not None


def test_cli_start_status_stop(tmp_path: Path) -> None:
    workdir = tmp_path / "demo-orthanc"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "orthanc.server"]
    start = subprocess.run([*cli, "start", "--workdir", str(workdir)], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stderr
    state = json.loads((workdir / "orthanc.json").read_text())
    pid = int((workdir / "orthanc.pid").read_text())
    try:
        assert str(state["dicom_port"]) in start.stdout and str(state["http_port"]) in start.stdout
        assert _echoscu(state["dicom_port"]).returncode == 0
        status = subprocess.run([*cli, "status", "--workdir", str(workdir)], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0
    finally:
        stop = subprocess.run([*cli, "stop", "--workdir", str(workdir)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert not (workdir / "orthanc.pid").exists()
    assert _port_closed(state["dicom_port"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="aet"):
        OrthancServer("/tmp/unused", aet="THIS_AE_TITLE_IS_TOO_LONG")
    with pytest.raises(ValueError, match="dicom_port"):
        OrthancServer("/tmp/unused", dicom_port=70000)
    with pytest.raises(ValueError, match="refuse_sop_classes"):
        OrthancServer("/tmp/unused", refuse_sop_classes=["not-a-uid"])
    with pytest.raises(ValueError, match="known_modalities"):
        OrthancServer("/tmp/unused", known_modalities={"x": ("AET", "127.0.0.1")})  # type: ignore[dict-item]
