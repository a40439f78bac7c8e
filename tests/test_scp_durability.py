"""Nothing acknowledged is lost; nothing unacknowledged is half-kept."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_client import archive_files, echo, send, store_pdus, stored_rows
from node_harness import NodeProcess, small_ct
from waiting import wait_until


def _bytes_acked(sock: socket.socket) -> int:
    """Bytes of this connection the peer's kernel has acknowledged (TCP_INFO tcpi_bytes_acked)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("<Q", info, 120)[0])  # after 8 u8, 24 u32, 2 u64 (linux/tcp.h)


def _unread(local_port: int, remote_port: int) -> int | None:
    """Bytes received on a loopback TCP socket that its process has not read yet (rx_queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)) == (
                local_port, remote_port):
            return int(fields[4].split(":")[1], 16)
    return None


def _wire_size(pdus: list[Any]) -> int:
    """Bytes on the wire of P-DATA-TF PDUs: 6 per PDU, 5 per PDV, plus each PDV's value
    (its message control header and fragment)."""
    return sum(6 + sum(5 + len(data) for _, data in pdu.presentation_data_value_list)
               for pdu in pdus)


def test_association_aborted_mid_transfer_leaves_no_row_and_no_file(node: NodeProcess,
                                                                    fast_receive: bool) -> None:
    ds = small_ct(size=512, patient_id="ABORT")
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    pdus = store_pdus(assoc, ds, 16384)
    assert len(pdus) > 10
    sock = assoc.dul.socket.socket
    client_port = sock.getsockname()[1]
    acked_before = _bytes_acked(sock)
    half = pdus[: len(pdus) // 2]  # the command and half of the data set
    for pdu in half:
        assoc.dul.send_pdu(pdu)
    # The half data set has reached the node's kernel and the node has read all of it.
    wait_until("the node to read the half data set", lambda: (
        _bytes_acked(sock) - acked_before >= _wire_size(half)
        and _unread(node.port, client_port) == 0), 30.0, poll=0.02, explain=lambda: (
        f"{_bytes_acked(sock) - acked_before} of {_wire_size(half)} bytes acknowledged, "
        f"{_unread(node.port, client_port)} unread"))
    if fast_receive:  # plain pynetdicom receives the data set in memory
        # The half data set is being spooled into the archive's tmp folder (dicom_node/wire/fast_receive/spooling.py).
        wait_until("the half data set in the spool",
                   lambda: len(list((node.data_dir / "tmp").glob("*.part"))) == 1, 30.0, poll=0.02)
    assoc.abort()
    wait_until("the abort in the node's log", lambda: "association aborted" in node.log(), 30.0,
               poll=0.02)
    if fast_receive:
        wait_until("the spool file removed",
                   lambda: "1 unfinished data set(s) removed, none was acknowledged" in node.log(),
                   30.0, poll=0.02)
    assert stored_rows(node.data_dir) == []
    assert archive_files(node.data_dir) == []
    assert list((node.data_dir / "tmp").iterdir()) == []
    assert "association aborted" in node.log()
    if fast_receive:
        assert "1 unfinished data set(s) removed, none was acknowledged" in node.log()
    assert echo(node.port) == 0


def test_four_concurrent_associations_of_200_instances_each_are_indexed_once(node: NodeProcess) -> None:
    batches = []
    for a in range(4):
        study, series = generate_uid(), generate_uid()
        batches.append([small_ct(patient_id=f"CONC-{a}", study_uid=study, series_uid=series,
                                 instance=i) for i in range(1, 201)])
    results: dict[int, list[int]] = {}

    def run(a: int) -> None:
        results[a] = send(node.port, batches[a], calling_ae=f"SCU{a}")

    threads = [threading.Thread(target=run, args=(a,)) for a in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(results[a] == [0] * 200 for a in range(4))
    rows = stored_rows(node.data_dir)
    sent = {str(ds.SOPInstanceUID) for batch in batches for ds in batch}
    assert len(rows) == 800
    assert {r["sop_instance_uid"] for r in rows} == sent
    assert len(archive_files(node.data_dir)) == 800
    listing = node.cli("twin", "list", "--json")
    import json

    twins = {t["patient_id"]: t for t in json.loads(listing.stdout)}
    assert all(twins[f"CONC-{a}"]["instances"] == 200 for a in range(4))


def test_sigkill_mid_study_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", workers=0).start()
    study, series = generate_uid(), generate_uid()
    datasets = [small_ct(patient_id="KILL", study_uid=study, series_uid=series, instance=i, size=128)
                for i in range(1, 401)]
    acknowledged: list[str] = []
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    for i, ds in enumerate(datasets):
        if i == 150:
            node.kill()  # no SIGTERM, no clean-up: the middle of a study
        try:
            rsp = assoc.send_c_store(ds)
        except Exception:
            break
        if "Status" not in rsp or not assoc.is_established:
            break
        if rsp.Status == 0:
            acknowledged.append(str(ds.SOPInstanceUID))
    assoc.release()
    assert 100 <= len(acknowledged) <= 151
    node.start()  # same data directory, after the crash
    try:
        rows = stored_rows(node.data_dir)
        indexed = [r["sop_instance_uid"] for r in rows]
        assert len(indexed) == len(set(indexed))
        assert set(acknowledged) <= set(indexed)
        # At most the one instance in flight at the kill may be indexed without its answer.
        assert len(set(indexed) - set(acknowledged)) <= 1
        assert set(indexed) <= {str(ds.SOPInstanceUID) for ds in datasets}
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        for row in rows:
            stored = pydicom.dcmread(node.data_dir / str(row["path"]))
            assert stored.PixelData == by_uid[row["sop_instance_uid"]].PixelData
        assert list((node.data_dir / "tmp").iterdir()) == []
        # The study goes on after the restart.
        rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(indexed)]
        assert set(send(node.port, rest)) == {0}
        assert len(stored_rows(node.data_dir)) == 400
    finally:
        node.stop()
