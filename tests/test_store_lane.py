"""The C-STORE lane (dicom_node/wire/fast_receive/store_lane.py) against pynetdicom's own receive path.

An in-process pynetdicom SCP with the node's spooling and lane installed, and a
handler that keeps what it was given, is driven by real clients (pynetdicom and dcmtk
``storescu``). Each test checks both what arrived and which path carried it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import encode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.wire.fast_receive import spooling, store_lane
from dicom_client import store_pdus
from dicom_node.wire.fast_receive.spooling import encode_file_meta
from node_harness import small_ct
from waiting import wait_until


class _Scp:
    """A pynetdicom SCP with the lane; the handler keeps each data set it is handed."""

    def __init__(self, tmp: Path, *, status: int = 0x0000, max_pdu: int = 0,
                 extra: list[Any] | None = None) -> None:
        self.tmp = tmp
        self.status = status
        self.received: list[dict[str, Any]] = []
        self.ae = AE(ae_title="LANE_SCP")
        self.ae.add_supported_context(Verification)
        self.ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae.maximum_pdu_size = max_pdu
        assert spooling.install(self.ae, tmp)
        assert store_lane.install(self.ae)
        handlers = [(evt.EVT_C_STORE, self._store),
                    (evt.EVT_CONN_CLOSE, spooling.discard_unclaimed)] + (extra or [])
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event: Any) -> int:
        spool = event.request._dataset_file.spool  # noqa: SLF001
        spool.claim()
        self.received.append({
            "uid": str(event.request.AffectedSOPInstanceUID),
            "message_id": event.request.MessageID,
            "transfer_syntax": str(event.context.transfer_syntax),
            "bytes": spool.path.read_bytes(),
            "meta_length": spool.meta_length,
            "sha256": spool.sha256,
            "lane_stores": store_lane.stores(event.assoc),
            "in_dul": isinstance(threading.current_thread(), DULServiceProvider),
        })
        spool.discard(force=True)
        if self.status == -1:
            raise RuntimeError("handler failed")
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def quiet_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the node runs it: pynetdicom's logging handlers not bound (the lane's condition)."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")


@pytest.fixture
def scp(tmp_path: Path, quiet_pynetdicom: None) -> Any:
    made: list[_Scp] = []

    def make(**kwargs: Any) -> _Scp:
        s = _Scp(tmp_path / f"spool{len(made)}", **kwargs)
        (tmp_path / f"spool{len(made)}").mkdir(exist_ok=True)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _associate(port: int, ts: str = ExplicitVRLittleEndian) -> Any:
    ae = AE(ae_title="LANE_SCU")
    ae.add_requested_context(CTImageStorage, ts)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LANE_SCP")
    assert assoc.is_established
    return assoc


def _expected_file(ds: Dataset, ts: str, calling_ae: str) -> bytes:
    implicit = ts == ImplicitVRLittleEndian
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ts, calling_ae)
    assert meta is not None
    return meta + encode(ds, implicit, True)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_lane_receives_byte_for_byte_what_was_sent(scp: Any, ts: str) -> None:
    server = scp(max_pdu=16_384)  # a 512x512 slice arrives in about 32 PDUs
    datasets = [small_ct(size=512, instance=i) for i in range(1, 4)]
    assoc = _associate(server.port, ts)
    try:
        statuses = [assoc.send_c_store(ds, msg_id=10 + i).Status for i, ds in enumerate(datasets)]
        assert assoc.send_c_echo(msg_id=18).Status == 0x0000  # pynetdicom's, between two stores
        statuses.append(assoc.send_c_store(small_ct(size=64, instance=9), msg_id=19).Status)
    finally:
        assoc.release()
    assert statuses == [0, 0, 0, 0]
    got = server.received
    for ds, item in zip(datasets, got):
        assert item["uid"] == ds.SOPInstanceUID and item["transfer_syntax"] == ts
        assert item["bytes"] == _expected_file(ds, ts, "LANE_SCU")
    assert [item["lane_stores"] for item in got] == [0, 1, 2, 3]  # counted after the handler
    assert all(item["in_dul"] for item in got)  # the lane's: no hand-off to another thread
    assert [item["message_id"] for item in got] == [10, 11, 12, 19]
    assert list(server.tmp.iterdir()) == []


def test_storescu_is_served_by_the_lane(scp: Any, tmp_path: Path) -> None:
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk storescu is not installed (scripts/setup.sh installs it)")
    server = scp()
    files = []
    for i in range(1, 6):
        ds = small_ct(size=512, instance=i)
        path = tmp_path / f"ct{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    env = {**os.environ, "TCP_NODELAY": "1"}
    run = subprocess.run(["storescu", "-aet", "DCMTK", "-aec", "LANE_SCP", "127.0.0.1",
                          str(server.port), *map(str, files)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    assert len(server.received) == 5
    assert server.received[-1]["lane_stores"] == 4
    for path, item in zip(files, server.received):
        sent = dcmread(path)
        ts = str(sent.file_meta.TransferSyntaxUID)
        assert item["bytes"][item["meta_length"]:] == encode(sent, ts == ImplicitVRLittleEndian, True)


@pytest.mark.parametrize("status", [0xA700, 0xC000, -1])
def test_lane_sends_the_handlers_failure_status(scp: Any, status: int) -> None:
    server = scp(status=status)
    assoc = _associate(server.port)
    try:
        first = assoc.send_c_store(small_ct(instance=1)).Status
        second = assoc.send_c_store(small_ct(instance=2)).Status
    finally:
        assoc.release()
    expected = 0xC211 if status == -1 else status  # a raising handler: as pynetdicom answers
    assert (first, second) == (expected, expected)
    assert server.received[-1]["lane_stores"] == 1


def test_first_request_before_the_association_is_marked_established(scp: Any) -> None:
    """A peer that sends at once, while EVT_ACCEPTED's handler still runs, is answered."""
    def slow_accepted(event: Any) -> None:
        time.sleep(0.3)

    server = scp(extra=[(evt.EVT_ACCEPTED, slow_accepted)])
    assoc = _associate(server.port)
    try:
        statuses = [assoc.send_c_store(small_ct(instance=i)).Status for i in (1, 2, 3)]
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
    # The first was pynetdicom's (it serves only once established); then the lane's.
    assert [item["lane_stores"] for item in server.received] == [0, 0, 1]
    assert [item["in_dul"] for item in server.received] == [False, True, True]


def test_command_set_split_over_fragments_goes_to_pynetdicom(scp: Any) -> None:
    server = scp(max_pdu=64)  # the command set (about 170 bytes) arrives in pieces
    assoc = _associate(server.port)
    try:
        ds = small_ct(instance=1)
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert server.received[0]["lane_stores"] == 0
    assert server.received[0]["bytes"] == _expected_file(ds, ExplicitVRLittleEndian, "LANE_SCU")


def test_watched_associations_do_not_use_the_lane(scp: Any) -> None:
    seen: list[int] = []
    server = scp(extra=[(evt.EVT_PDU_RECV, lambda event: seen.append(1))])
    assoc = _associate(server.port)
    try:
        assert assoc.send_c_store(small_ct(instance=1)).Status == 0
        assert assoc.send_c_store(small_ct(instance=2)).Status == 0
    finally:
        assoc.release()
    assert [item["lane_stores"] for item in server.received] == [0, 0]
    assert seen  # the watcher saw every PDU


def test_data_fragment_on_another_context_aborts_and_keeps_nothing(scp: Any) -> None:
    server = scp()
    assoc = _associate(server.port)
    pdus = store_pdus(assoc, small_ct(size=256, instance=1), 16_384, message_id=7)
    assert len(pdus) > 4
    for pdu in pdus[:2]:  # command, first data fragment: the lane has the message
        assoc.dul.send_pdu(pdu)
    context_id, data = pdus[2].presentation_data_value_list[0]
    bad = P_DATA()
    bad.presentation_data_value_list.append((context_id + 2, data))
    assoc.dul.send_pdu(bad)
    wait_until("the lane to abort", lambda: assoc.is_aborted, 5.0, poll=0.02)
    assert server.received == []
    wait_until("the spool emptied", lambda: list(server.tmp.iterdir()) == [], 5.0, poll=0.02)


def test_release_in_the_middle_of_a_data_set_keeps_nothing(scp: Any) -> None:
    server = scp()
    assoc = _associate(server.port)
    pdus = store_pdus(assoc, small_ct(size=256, instance=1), 16_384, message_id=7)
    for pdu in pdus[:3]:
        assoc.dul.send_pdu(pdu)
    wait_until("one spool file", lambda: len(list(server.tmp.iterdir())) == 1, 5.0, poll=0.02)
    assoc.release()
    assert server.received == []
    wait_until("the spool emptied", lambda: list(server.tmp.iterdir()) == [], 5.0, poll=0.02)
