"""DICOMweb (STOW-RS) destinations: per-instance outcomes, back-off, hold; read-back.

Real parts: a small HTTP server (tests/stow_server.py) answering 200, 202, 400, 409 with
a Failed SOP Sequence, 503, or stalling; Orthanc 1.10 with the Debian DICOMweb plugin
behind HTTP basic authentication. Results are real SEG/SR/overlay files of a phantom.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.errors import ConfigError
from dicom_node.queue.sender import Sender, SendState
from dicom_node.settings import Destination, load_settings
from dicom_node.wire import stow
from loop_helpers import pacs
from orthanc.server import free_ports
from tests.loop_helpers import results_in_orthanc
from tests.node_harness import DICOM_NODE
from tests.stow_server import StowServer, stored_response
from tests.test_destination_profiles import _record
from tests.tls_pki import make_pki
from tests.waiting import wait_until
from twin_archive.audit import AuditLog


def _sender(data_dir: Path, dests: list[Destination], **kwargs: object) -> Sender:
    kwargs.setdefault("network_timeout_s", 10)
    return Sender(data_dir, ae_title="NODE", destinations=dests, backoff_initial_s=0.2,
                  backoff_max_s=1.0, **kwargs)  # type: ignore[arg-type]


def _wait_past(when: str, what: str) -> None:
    """Until the node's clock (the same text form as the sender's) is past ``when``."""
    wait_until(what, lambda: iso(utc_now()) > when, 10.0, poll=0.02)


def _ok(uids: list[str]) -> tuple[int, dict[str, object]]:
    return 200, stored_response(uids)


def test_every_object_of_a_result_goes_in_one_request_and_is_sent(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with StowServer(_ok) as web:
        sender = _sender(tmp_path, [Destination(url=web.url, confirm="none")],
                         audit=AuditLog(tmp_path))
        assert sender.enqueue(result, [Destination(url=web.url, confirm="none")]) == len(results.all())
        assert sender.send_due() == len(results.all())
        rows = sender.list()
        sender.close()
    (event,) = [e for e in AuditLog(tmp_path).entries() if e.event_type.value == "results-sent"]
    assert event.detail["objects"] == len(results.all()) and event.detail["tls"] is False
    assert len(web.requests) == 1  # several instances per request
    assert sorted(web.requests[0]) == sorted(str(d.SOPInstanceUID) for d in results.all())
    assert {r.state for r in rows} == {SendState.SENT}
    assert {r.destination for r in rows} == {web.url}
    assert all(r.confirm_by == "" and r.last_error == "" for r in rows)


def test_a_400_holds_every_object_with_the_reason_and_never_retries(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with StowServer(lambda uids: (400, None)) as web:
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == 0
        sender.send_due()  # held: never due again
        rows = sender.list()
        sender.close()
    assert len(web.requests) == 1
    assert {r.state for r in rows} == {SendState.HELD}
    assert all("STOW-RS HTTP 400" in r.last_error for r in rows)


def test_a_409_failed_sop_sequence_holds_the_refused_object_and_retries_out_of_resources(
        tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    seg = str(results.seg.SOPInstanceUID)

    def answer(uids: list[str]) -> tuple[int, dict[str, object]]:
        return 409, stored_response(uids, failed={u: 0xC122 if u == seg else 0xA700 for u in uids})

    with StowServer(answer) as web:
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == 0
        rows = {r.sop_instance_uid: r for r in sender.list()}
        sender.close()
    assert rows[seg].state is SendState.HELD and "failure reason 0xC122" in rows[seg].last_error
    others = [r for u, r in rows.items() if u != seg]
    assert {r.state for r in others} == {SendState.QUEUED}
    assert all("0xA700" in r.last_error and r.attempts == 1 for r in others)


def test_a_202_stores_the_rest_holds_the_failed_one_and_logs_the_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, result = _record(tmp_path)
    seg, sr = str(results.seg.SOPInstanceUID), str(results.sr.SOPInstanceUID)
    with StowServer(lambda uids: (202, stored_response(uids, failed={seg: 0xA900},
                                                       warnings={sr: 0xB000}))) as web:
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == len(results.all()) - 1
        rows = {r.sop_instance_uid: r for r in sender.list()}
        sender.close()
    assert rows[seg].state is SendState.HELD and "0xA900" in rows[seg].last_error
    assert {r.state for u, r in rows.items() if u != seg} == {SendState.SENT}
    assert any(sr in m and "WarningReason 0xB000" in m for m in caplog.messages)


def test_a_200_that_is_not_a_store_response_is_no_success(tmp_path: Path) -> None:
    """A proxy's login page answered 200 is not taken for a stored instance."""
    results, result = _record(tmp_path)
    with StowServer(lambda uids: (200, None)) as web:
        web.raw_body = b"<html><body>Please log in</body></html>"
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == 0
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.QUEUED}
    assert all("not a DICOM JSON Store Instances Response (<html><body>Please log in" in r.last_error
               for r in rows)


def test_a_response_past_its_byte_bound_is_not_read_whole_and_the_objects_stay_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stow, "MAX_RESPONSE_BYTES", 4096)
    results, result = _record(tmp_path)
    with StowServer(_ok) as web:
        web.raw_body = b"[" + b" " * 100_000 + b"]"
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == 0
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.QUEUED}
    assert all("ResponseTooLarge" in r.last_error for r in rows)


def test_read_back_pages_with_offset_and_stops_at_a_server_that_ignores_it(
        tmp_path: Path) -> None:
    uids = [f"1.2.3.{n}" for n in range(5)]

    def item(uid: str) -> dict[str, object]:
        return {"00080018": {"vr": "UI", "Value": [uid]}}

    with StowServer(_ok) as web, requests.Session() as session:
        web.qido = lambda q: [item(u) for u in uids[int(q["offset"]):][:2]]  # pages of 2
        assert stow.present(session, web.url, "1.2", "1.2.3", timeout_s=5) == set(uids)
        assert web.gets == 4  # 2 + 2 + 1, then the empty page
        web.gets = 0
        web.qido = lambda q: [item(u) for u in uids[:2]]  # the first page, whatever the offset
        assert stow.present(session, web.url, "1.2", "1.2.3", timeout_s=5) == set(uids[:2])
        assert web.gets == 2


def test_a_503_backs_off_and_the_objects_go_once_the_server_is_back(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    answers = [(503, None)]
    with StowServer(lambda uids: answers[-1] if answers[-1][0] != 200 else _ok(uids)) as web:
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == 0
        rows = sender.list()
        assert {r.state for r in rows} == {SendState.QUEUED}
        assert all("HTTP 503" in r.last_error for r in rows)
        assert all(datetime.fromisoformat(r.next_attempt_at) > utc_now() for r in rows)
        assert sender.send_due() == 0 and len(web.requests) == 1  # not before the back-off
        answers.append((200, None))
        _wait_past(max(r.next_attempt_at for r in rows), "the retry to be due")
        assert sender.send_due() == len(results.all())
        sender.close()
    assert len(web.requests) == 2


def test_a_stalled_server_is_given_up_at_the_deadline_and_retried_later(tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with StowServer(_ok) as web:
        web.stall_s = 4.0
        dest = Destination(url=web.url, confirm="none")
        sender = _sender(tmp_path, [dest], network_timeout_s=1.0)
        sender.enqueue(result, [dest])
        t0 = time.monotonic()
        assert sender.send_due() == 0
        took = time.monotonic() - t0
        rows = sender.list()
        sender.close()
    assert took < 3.0
    assert {r.state for r in rows} == {SendState.QUEUED}
    assert all("ReadTimeout" in r.last_error for r in rows)


def test_an_unreachable_server_and_an_unreadable_password_keep_the_objects_queued(
        tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    down = Destination(url=f"http://127.0.0.1:{free_ports(1)[0]}/dicom-web", confirm="none")
    nopw = Destination(url="http://127.0.0.1:9/dicom-web", auth="basic", username="u",
                       password_file=tmp_path / "missing", confirm="none")
    sender = _sender(tmp_path, [down, nopw])
    sender.enqueue(result, [down, nopw])
    assert sender.send_due() == 0
    rows = sender.list()
    sender.close()
    assert {r.state for r in rows} == {SendState.QUEUED}
    assert all("ConnectionError" in r.last_error for r in rows if r.destination == down.key)
    assert all("cannot read" in r.last_error for r in rows if r.destination == nopw.key)


def test_an_archive_without_qido_never_confirms_so_the_objects_are_sent_again_then_held(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, result = _record(tmp_path)
    with StowServer(_ok) as web:  # answers no GET: the read-back fails
        dest = Destination(url=web.url)
        assert dest.confirm == "read-back"
        sender = _sender(tmp_path, [dest], confirm_timeout_s=0.3, confirm_resends=1)
        sender.enqueue(result, [dest])
        n = len(results.all())
        assert sender.send_due() == n
        assert all(r.state is SendState.SENT and r.confirm_by for r in sender.list())
        _wait_past(max(r.confirm_by for r in sender.list()), "the confirmation deadline")
        assert sender.send_due() == n  # sent again
        _wait_past(max(r.confirm_by for r in sender.list()), "the second deadline")
        assert sender.send_due() == 0
        rows = sender.list()
        sender.close()
    assert len(web.requests) == 2
    assert {r.state for r in rows} == {SendState.HELD}
    assert all("not found by read-back within 0.3 s; held after 1 re-send(s)" in r.last_error
               for r in rows)
    assert len([m for m in caplog.messages if "read-back from" in m]) == 1


def test_https_is_verified_with_tls_ca_and_a_bearer_token_is_read_from_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets this variable override a session's CA bundle (found here: it is set on
    # this machine); tls_ca must win over it
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    pki = make_pki(tmp_path / "pki")
    results, result = _record(tmp_path / "node")
    (tmp_path / "token").write_text("tok-1\n")
    with StowServer(_ok, tls=(pki.server_cert, pki.server_key)) as web:
        trusted = Destination(name="trusted", url=web.url, tls_ca=pki.ca, auth="bearer",
                              token_file=tmp_path / "token", confirm="none", send=("sr",))
        system = Destination(name="system", url=web.url.replace("localhost", "127.0.0.1"),
                             confirm="none", send=("sr",))  # the test CA is not the system's
        sender = _sender(tmp_path / "node", [trusted, system])
        sender.enqueue(result, [trusted, system])
        assert sender.send_due() == 1
        (tmp_path / "token").write_text("tok-2\n")  # rotated in place: no restart
        _, again = _record(tmp_path / "node", job_key="job-2")
        sender.enqueue(again, [trusted])
        assert sender.send_due() == 1
        rows = {r.destination: r for r in sender.list() if r.result_id == result.id}
        sender.close()
    assert rows[trusted.key].state is SendState.SENT
    assert rows[system.key].state is SendState.QUEUED and "SSLError" in rows[system.key].last_error
    assert web.authorization == ["Bearer tok-1", "Bearer tok-2"]


@pytest.mark.parametrize("table, key", [
    ('url = "ftp://x/dicom-web"', "url"),
    ('url = "http://u:p@x/dicom-web"', "url"),
    ('url = "http://x/dicom-web"\nauth = "basic"\nusername = "u"', "password_file"),
    ('url = "http://x/dicom-web"\nauth = "bearer"', "token_file"),
    ('url = "http://x/dicom-web"\nauth = "digest"', "auth"),
    ('url = "http://x/dicom-web"\nconfirm = "commitment"', "confirm"),
    ('url = "http://x/dicom-web"\ntls_ca = "/etc/ca.pem"', "tls_ca"),
    ('url = "http://x/dicom-web"\nae_title = "PACS"', "ae_title"),
    ('url = "http://x/dicom-web"\ntransfer_syntaxes = ["rle", "explicit"]', "transfer_syntaxes"),
    ('ae_title = "PACS"\nhost = "h"\nport = 104\nconfirm = "read-back"', "confirm"),
    ('ae_title = "PACS"\nhost = "h"\nport = 104\nauth = "basic"', "auth"),
    ('url = "http://x/dicom-web"\n[[destinations]]\nurl = "http://x/dicom-web/"\nname = "y"', ""),
])
def test_dicomweb_keys_are_validated_and_errors_name_the_key(tmp_path: Path, table: str,
                                                           key: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"[[destinations]]\n{table}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(config, env={})
    assert (f"destinations[0].{key}" if key else "destinations[1]") in str(exc.value)


def test_a_dicomweb_table_is_read_with_its_defaults(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[[destinations]]\nurl = "https://archive.example/dicom-web/"\n'
                      'auth = "bearer"\ntoken_file = "/etc/dicom-node/token"\n'
                      'tls_ca = "/etc/dicom-node/ca.pem"\nsend = ["seg"]\n'
                      '[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n')
    web, dimse = load_settings(config, env={}).destinations
    assert web.web and web.name == "archive.example" and web.confirm == "read-back"
    assert web.key == "https://archive.example/dicom-web" and web.tls_ca == Path("/etc/dicom-node/ca.pem")
    assert not dimse.web and dimse.confirm == "commitment"


@pytest.mark.orthanc
def test_orthanc_dicomweb_behind_basic_auth_stores_and_read_back_confirms(tmp_path: Path) -> None:
    results, result = _record(tmp_path / "node")
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "bad").write_text("wrong\n")
    with pacs(tmp_path / "orthanc", dicomweb=True, http_user=("node", "s3cret")) as orthanc:
        good = Destination(name="orthanc", url=f"{orthanc.url}/dicom-web/", auth="basic",
                           username="node", password_file=tmp_path / "pw")
        bad = Destination(name="bad", url=f"http://localhost:{orthanc.http_port}/dicom-web", auth="basic",
                          username="node", password_file=tmp_path / "bad", send=("sr",))
        sender = _sender(tmp_path / "node", [good, bad])
        sender.enqueue(result, [good, bad])
        assert sender.send_due() == len(results.all())
        rows = sender.list()
        sender.close()
        found = results_in_orthanc(orthanc, str(results.sr.StudyInstanceUID))
        config = tmp_path / "node.toml"
        config.write_text(f'[[destinations]]\nname = "orthanc"\nurl = "{good.url}"\nauth = "basic"\n'
                          f'username = "node"\npassword_file = "{tmp_path / "pw"}"\n'
                          f'[[destinations]]\nname = "bad"\nurl = "{bad.url}"\nauth = "basic"\n'
                          f'username = "node"\npassword_file = "{tmp_path / "bad"}"\n')
        probes = {name: subprocess.run([*DICOM_NODE, "--config", str(config), "--data-dir",
                                        str(tmp_path / "node"), "destinations", "test", name],
                                       capture_output=True, text=True, timeout=120)
                  for name in ("orthanc", "bad")}
    assert probes["orthanc"].returncode == 0 and "QIDO-RS answered" in probes["orthanc"].stdout
    assert probes["bad"].returncode == 1 and "HTTP 401" in probes["bad"].stdout
    mine = [r for r in rows if r.destination == good.key]
    assert {r.state for r in mine} == {SendState.CONFIRMED}  # read back at once
    assert all(r.confirm == "read-back" and r.confirmed_at >= r.sent_at for r in mine)
    (refused,) = [r for r in rows if r.destination == bad.key]
    assert refused.state is SendState.HELD and "HTTP 401" in refused.last_error
    assert len(found["seg"]) == 1 and len(found["sr"]) == 1
    assert len(found["overlay"]) == len(results.overlay)
    run = subprocess.run([*DICOM_NODE, "--data-dir", str(tmp_path / "node"), "sends", "--json"],
                         capture_output=True, text=True, timeout=120)
    states = {r["destination"]: r["state"] for r in json.loads(run.stdout)}
    assert states == {good.key: "confirmed", bad.key: "held"}


@pytest.mark.orthanc
def test_the_node_delivers_a_study_s_results_by_stow_rs_and_c_store_both_confirmed(
        tmp_path: Path) -> None:
    """The whole node (subprocess, demo model): results go to Orthanc's DICOMweb behind
    basic auth (read-back) and to its DICOM port (Storage Commitment, reported to the
    node's listener); every send ends confirmed; status and sends say so."""
    from loop_helpers import install_model, node_json, small_study, storescu, write_files
    from node_harness import NodeProcess
    from waiting import wait_until

    (tmp_path / "pw").write_text("s3cret\n")
    data = tmp_path / "data"
    data.mkdir()
    install_model(data)
    dicom_port, http_port = free_ports(2)
    config = (f'[[destinations]]\nname = "web"\nurl = "http://127.0.0.1:{http_port}/dicom-web"\n'
              f'auth = "basic"\nusername = "node"\npassword_file = "{tmp_path / "pw"}"\n'
              f'[[destinations]]\nname = "dimse"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
              f"port = {dicom_port}\n")
    node = NodeProcess(data, config=config, extra_args=["--stable-after", "1.5"])
    with pacs(tmp_path / "orthanc", dicom_port=dicom_port, http_port=http_port, dicomweb=True,
              http_user=("node", "s3cret"),
              known_modalities={"node": (node.ae_title, "127.0.0.1", node.port)}):
        node.start()
        try:
            datasets = small_study("WEB-1", slices=20, size=64)
            storescu(node.port, write_files(datasets, tmp_path / "study"), node.ae_title)

            def all_confirmed() -> bool:
                sends = Sender(data, ae_title="T")
                try:
                    rows = sends.list(limit=1000)
                finally:
                    sends.close()
                return bool(rows) and len({r.destination for r in rows}) == 2 and all(
                    r.state is SendState.CONFIRMED for r in rows)

            wait_until("every send confirmed", all_confirmed, 180)
            rows = node_json(node, "sends")
            status = node.cli("status").stdout
        finally:
            node.stop()
    assert {r["state"] for r in rows} == {"confirmed"}
    assert {r["confirm"] for r in rows} == {"read-back", "commitment"}
    assert f"{len(rows)} confirmed" in status
