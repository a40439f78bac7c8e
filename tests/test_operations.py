"""Running the node like hospital software: SIGTERM mid-transfer, SIGHUP reload,
/metrics and /healthz, ``dicom-node status``, the audit trail of it all, DICOM TLS."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_client import send, stored_rows
from node_harness import NodeProcess, free_port, small_ct
from tls_pki import make_pki
from waiting import wait_until


def _audit(node: NodeProcess) -> list[dict]:
    out = node.cli("audit", "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_healthz_status_and_audit_once_per_study(tmp_path: Path) -> None:
    mport = free_port()
    node = NodeProcess(tmp_path / "data", config=f'metrics_port = {mport}\n'
                       'allowed_calling_aes = ["CT_1"]\n', workers=0).start()
    try:
        study_a, study_b = generate_uid(), generate_uid()
        series = [small_ct(study_uid=study_a, instance=i) for i in range(1, 7)]
        series += [small_ct(study_uid=study_b, patient_id="PAT-2", instance=i) for i in range(1, 5)]
        assert send(node.port, series, calling_ae="CT_1") == [0] * 10
        with pytest.raises(ConnectionRefusedError):
            send(node.port, [small_ct()], calling_ae="INTRUDER")

        code, body = _get(f"http://127.0.0.1:{mport}/healthz")
        assert code == 200 and json.loads(body)["healthy"] is True
        code, text = _get(f"http://127.0.0.1:{mport}/metrics")
        assert code == 200
        m = _samples(text)
        assert m[("dicom_node_instances_received_total", (("outcome", "stored"),))] == 10
        assert m[("dicom_node_received_bytes_total", ())] > 10 * 16 * 16 * 2
        assert m[("dicom_node_associations_total", (("result", "accepted"),))] == 1
        assert m[("dicom_node_associations_total", (("result", "rejected"),))] == 1
        assert m[("dicom_node_jobs", (("state", "queued"),))] == 0
        assert m[("dicom_node_sends", (("state", "queued"),))] == 0
        assert m[("dicom_node_send_failures_total", ())] == 0
        assert m[("dicom_node_archive_instances", ())] == 10
        assert m[("dicom_node_up", ())] == 1
        assert ("dicom_node_data_dir_free_bytes", ()) in m
        assert _get(f"http://127.0.0.1:{mport}/nothing")[0] == 404

        status = node.cli("status").stdout
        assert "node:      RUNNING" in status and "health:    healthy" in status
        assert "2 study(ies), 10 instance(s)" in status
        assert "10 instance(s)" in status.split("since start:")[1]

        wait_until("two study-received events", lambda: sum(
            e["event_type"] == "study-received" for e in _audit(node)) == 2, 10.0, poll=0.05)
        events = _audit(node)
        kinds = [e["event_type"] for e in events]
        assert kinds.count("application-start") == 1
        assert kinds.count("association-accepted") == 1
        assert kinds.count("association-refused") == 1
        received = {e["what"]: e for e in events if e["event_type"] == "study-received"}
        assert set(received) == {study_a, study_b}  # once per study, not per instance
        assert received[study_a]["detail"]["instances"] == 6
        assert received[study_b]["detail"]["instances"] == 4
        assert received[study_a]["who"] == "CT_1@127.0.0.1"
        refused = next(e for e in events if e["event_type"] == "association-refused")
        assert refused["who"] == "INTRUDER@127.0.0.1" and refused["outcome"] == 4
    finally:
        assert node.stop() == 0
    status = node.cli("status", "--json").stdout
    st = json.loads(status)
    assert st["running"] is None and st["state"]["instances"] == 10
    assert "node:      not running" in node.cli("status").stdout
    assert [e["event_type"] for e in _audit(node)][-1] == "application-stop"
    assert node.cli("audit", "--verify").returncode == 0


def _seed_queued_send(data_dir: Path) -> None:
    """One result object queued for a destination that is down (a closed port)."""
    from dicom_node.foundation.clock import iso, utc_now
    from dicom_node.queue.jobs import connect_queue

    conn = connect_queue(data_dir)
    now, port = iso(utc_now()), free_port()
    conn.execute("INSERT INTO sends (result_id, kind, destination, ae_title, host, port, path,"
                 " sop_class_uid, sop_instance_uid, transfer_syntax_uid, state, enqueued_at,"
                 " next_attempt_at) VALUES (1, 'seg', ?, 'PACS', '127.0.0.1', ?, 'results/x.dcm',"
                 " '1.2.840.10008.5.1.4.1.1.66.4', '1.2.3.4.5', '1.2.840.10008.1.2.1', 'queued', ?, ?)",
                 (f"PACS@127.0.0.1:{port}", port, now, now))
    conn.close()


def test_sigterm_during_a_200_instance_transfer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _seed_queued_send(data)
    node = NodeProcess(data, config="stop_grace_s = 1.0\nstable_after = 3600\n",
                       workers=0).start()
    study, series_uid = generate_uid(), generate_uid()
    datasets = [small_ct(study_uid=study, series_uid=series_uid, instance=i) for i in range(1, 201)]
    acknowledged: list[str] = []
    outcome: dict[str, object] = {}

    def client() -> None:
        ae = AE(ae_title="CT_1")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        try:
            for ds in datasets:
                rsp = assoc.send_c_store(ds)
                if "Status" in rsp and int(rsp.Status) == 0:
                    acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    break
                time.sleep(0.02)  # a scanner's pace: the transfer outlasts the grace
        except RuntimeError as exc:  # "association ... must be established": aborted
            outcome["error"] = str(exc)
        finally:
            outcome["established"] = assoc.is_established
            if assoc.is_established:
                assoc.release()

    t = threading.Thread(target=client)
    t.start()
    wait_until("50 acknowledged", lambda: len(acknowledged) >= 50, 60, poll=0.05)
    node.proc.send_signal(signal.SIGTERM)
    # New associations are refused at once while the one in progress finishes its grace.
    wait_until("the listener stopped", lambda: "listener stopped" in node.log(), 10.0, poll=0.05)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
    assert node.proc.wait(60) == 0
    t.join(30)

    # The node aborted the association after the grace: the client got no further.
    assert 50 <= len(acknowledged) < 200
    log = node.log()
    assert "aborting association with CT_1 after 1 s grace" in log
    assert "left for the next start: 0 job(s) queued, 1 object(s) to send" in log
    assert "stopped cleanly" in log
    rows = {r["sop_instance_uid"]: r for r in stored_rows(data)}
    missing = [uid for uid in acknowledged if uid not in rows]
    assert missing == []
    for uid in acknowledged:
        ds = dcmread(data / rows[uid]["path"])
        assert ds.SOPInstanceUID == uid and ds.PixelData
    # The queues are intact: the send still queued, the series still monitored for its job.
    conn = sqlite3.connect(data / "queue.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT state FROM sends").fetchall() == [("queued",)]
        assert conn.execute("SELECT COUNT(*) FROM monitored_series WHERE series_uid = ?",
                            (series_uid,)).fetchone()[0] in (0, 1)
    finally:
        conn.close()
    idx = sqlite3.connect(data / "index.sqlite")
    assert idx.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    idx.close()
    received = [e for e in _audit(node) if e["event_type"] == "study-received"]
    assert len(received) == 1 and received[0]["what"] == study
    assert received[0]["detail"]["association"] == "aborted at stop"
    assert received[0]["detail"]["instances"] >= len(acknowledged)
    # And the next start serves the same archive with the queue as it was.
    node.start()
    try:
        assert send(node.port, [small_ct(study_uid=study, series_uid=series_uid, instance=999)],
                    calling_ae="CT_1") == [0]
        assert "1 object(s) waiting from before the restart" in node.log()
    finally:
        assert node.stop() == 0


def test_sighup_reloads_allow_list_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", config='allowed_calling_aes = ["CT_1"]\n').start()
    try:
        with pytest.raises(ConnectionRefusedError):
            send(node.port, [small_ct()], calling_ae="CT_2")
        cfg = tmp_path / "data-config.toml"
        cfg.write_text('allowed_calling_aes = ["CT_1", "CT_2"]\nmin_free_mb = 10\n'
                       '[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n')
        node.proc.send_signal(signal.SIGHUP)
        wait_until("the reload", lambda: "configuration reloaded" in node.log(), 10.0, poll=0.05)
        assert send(node.port, [small_ct()], calling_ae="CT_2") == [0]
        log = node.log()
        assert "applied allowed_calling_aes, destinations" in log
        assert "NOT applied until a restart: min_free_mb" in log
        cfg.write_text("port = [not valid\n")
        node.proc.send_signal(signal.SIGHUP)
        wait_until("the refused reload",
                   lambda: "configuration NOT reloaded" in node.log(), 10.0, poll=0.05)
        assert send(node.port, [small_ct()], calling_ae="CT_2") == [0]  # still serving
    finally:
        assert node.stop() == 0


def _tls_send(port: int, cert: Path | None, key: Path | None, ca: Path) -> list[int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="CT_TLS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        raise ConnectionRefusedError("no association over TLS")
    try:
        rsp = assoc.send_c_store(small_ct(patient_id="TLS-1"))
        return [int(rsp.Status)] if "Status" in rsp else [-1]
    finally:
        if assoc.is_established:
            assoc.release()


def test_tls_trusted_client_stores_untrusted_is_refused_and_sender_uses_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    node = NodeProcess(tmp_path / "data", config=(
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\ntls_ca = "{pki.ca}"\n'),
        workers=0).start()
    try:
        assert "with TLS, client certificate required" in node.log()
        assert _tls_send(node.port, pki.client_cert, pki.client_key, pki.ca) == [0]
        with pytest.raises(ConnectionRefusedError):
            _tls_send(node.port, pki.rogue_cert, pki.rogue_key, pki.ca)  # signed by another CA
        with pytest.raises(ConnectionRefusedError):
            _tls_send(node.port, None, None, pki.ca)  # no client certificate
        with pytest.raises(ConnectionRefusedError):
            send(node.port, [small_ct()], calling_ae="PLAIN")  # no TLS at all
        assert len(stored_rows(node.data_dir)) == 1
        # The sender, over TLS with the node's certificate, to this TLS node.
        from dicom_node.foundation.clock import iso, utc_now
        from dicom_node.queue.jobs import connect_queue
        from dicom_node.queue.sender import Sender
        from dicom_node.wire.tls import client_tls_context
        from dicom_node.settings import Settings

        out_dir = tmp_path / "sender"
        ds = small_ct(patient_id="TLS-2")
        (out_dir / "results").mkdir(parents=True)
        ds.save_as(out_dir / "results" / "seg.dcm", enforce_file_format=True)
        dest = f"DICOM_NODE@127.0.0.1:{node.port}"
        conn = connect_queue(out_dir)
        now = iso(utc_now())
        conn.execute("INSERT INTO sends (result_id, kind, destination, ae_title, host, port, path,"
                     " sop_class_uid, sop_instance_uid, transfer_syntax_uid, state, enqueued_at,"
                     " next_attempt_at) VALUES (1, 'seg', ?, 'DICOM_NODE', 'localhost', ?,"
                     " 'results/seg.dcm', ?, ?, ?, 'queued', ?, ?)",
                     (dest, node.port, CTImageStorage, ds.SOPInstanceUID, ExplicitVRLittleEndian,
                      now, now))
        conn.close()
        settings = Settings(data_dir=out_dir, tls_cert=pki.client_cert, tls_key=pki.client_key,
                            tls_ca=pki.ca)
        from twin_archive.audit import AuditLog

        with AuditLog(out_dir) as audit:
            sender = Sender(out_dir, ae_title="SENDER", tls_context=client_tls_context(settings),
                            tls_destinations=[dest], audit=audit)
            try:
                assert sender.send_due() == 1
            finally:
                sender.close()
            sent = audit.entries(event_type="results-sent")
        assert len(sent) == 1 and sent[0].detail["tls"] is True and sent[0].what == dest
        assert ds.SOPInstanceUID in {r["sop_instance_uid"] for r in stored_rows(node.data_dir)}

        # Two peers connect and say nothing: the handshake waits in their own threads, so a
        # trusted client is served at once, while both are still connected (with the
        # handshake in the accept loop it waited their 10 s handshake timeouts, one by one).
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
        try:
            time.sleep(0.3)  # both accepted
            assert _tls_send(node.port, pki.client_cert, pki.client_key, pki.ca) == [0]
            for peer in silent:  # not closed by a handshake timeout yet
                peer.setblocking(False)
                with pytest.raises(BlockingIOError):
                    peer.recv(1, socket.MSG_PEEK)
        finally:
            for peer in silent:
                peer.close()
        wait_until("the silent peers' handshakes to be refused",
                   lambda: node.log().count("TLS connection REFUSED") >= 5, timeout=20)
    finally:
        assert node.stop() == 0
    events = _audit(node)
    accepted = [e for e in events if e["event_type"] == "association-accepted"]
    assert len(accepted) == 3 and all(e["detail"]["tls"] for e in accepted)
    refused = [e for e in events if e["event_type"] == "association-refused"]
    assert len(refused) == 5 and all("TLS handshake failed" in e["detail"]["reason"] for e in refused)
