"""Confirmed delivery over DIMSE: Storage Commitment (PS3.4 Annex J).

Real parts: Orthanc 1.10 as the Storage Commitment SCP (it reports on a new association
to the node's listener, which runs here on a free port); pynetdicom peers that refuse
the SOP class, accept requests but never report, or report a failure on the same
association. Results are real SEG/SR/overlay files of a phantom.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.queue.commitment import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from dicom_node.queue.sender import Sender, SendState
from dicom_node.runtime.listener_services import listener_services
from dicom_node.wire.server import DicomServer
from dicom_node.settings import Destination, Settings
from loop_helpers import pacs
from orthanc.server import free_ports
from tests.test_destination_profiles import UNCOMPRESSED_ONLY, Scp, _record
from tests.waiting import wait_until
from twin_archive import Archive


def _wait_past(when: str, what: str) -> None:
    """Until the node's clock (the same text form as the sender's) is past ``when``."""
    wait_until(what, lambda: iso(utc_now()) > when, 10.0, poll=0.02)


@contextmanager
def node_listener(data_dir: Path, port: int) -> Iterator[DicomServer]:
    """The node's own DICOM listener (it takes the reports on new associations)."""
    settings = Settings(data_dir=data_dir, port=port, bind_address="127.0.0.1", ae_title="NODE")
    with Archive(data_dir) as archive:
        server = DicomServer(settings, archive.ingest, services=listener_services(settings))
        server.start()
        try:
            yield server
        finally:
            server.stop(0.0)


@pytest.mark.orthanc
def test_orthanc_commits_on_a_new_association_and_the_sends_are_confirmed(tmp_path: Path) -> None:
    results, result = _record(tmp_path / "node")
    node_port = free_ports(1)[0]
    with node_listener(tmp_path / "node", node_port), \
            pacs(tmp_path / "orthanc", known_modalities={"node": ("NODE", "127.0.0.1", node_port)}) \
            as orthanc:
        dest = Destination(name="orthanc", ae_title=orthanc.aet, host="127.0.0.1",
                           port=orthanc.dicom_port)
        assert dest.confirm == "commitment"  # the default
        sender = Sender(tmp_path / "node", ae_title="NODE", network_timeout_s=20,
                        destinations=[dest], confirm_timeout_s=30)
        sender.enqueue(result, [dest])
        assert sender.send_due() == len(results.all())
        wait_until("the report", lambda: all(r.state is SendState.CONFIRMED
                                             for r in sender.list()), 10.0, poll=0.05)
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.CONFIRMED}, [r.last_error for r in rows]
    last_ack = max(datetime.fromisoformat(r.sent_at) for r in rows)
    confirmed = max(datetime.fromisoformat(r.confirmed_at) for r in rows)
    assert (confirmed - last_ack).total_seconds() <= 1.0  # the goal


def test_a_peer_refusing_storage_commitment_leaves_sends_sent_and_says_it_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, result = _record(tmp_path)
    _, again = _record(tmp_path, job_key="job-2")
    with Scp(UNCOMPRESSED_ONLY) as peer:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=peer.port)
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10, destinations=[dest])
        sender.enqueue(result, [dest])
        sender.send_due()
        sender.enqueue(again, [dest])
        sender.send_due()
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.SENT}
    assert all(r.confirm_by == "" and "does not accept Storage Commitment" in r.last_error
               for r in rows)
    said = [m for m in caplog.messages if "does not accept Storage Commitment" in m]
    assert len(said) == 1


class CommitmentPeer:
    """A Storage SCP that accepts Storage Commitment requests; ``report`` decides what it
    answers on the same association: None (never), or ``{uid: failure reason or 0}``."""

    def __init__(self, report: bool, fail: set[str] | None = None) -> None:
        self.port = free_ports(1)[0]
        self.report = report
        self.fail = fail or set()
        self.stored: list[str] = []
        self.requests: list[list[str]] = []

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in info.ReferencedSOPSequence]
        self.requests.append([u for _, u in refs])
        if self.report:
            threading.Thread(target=self._report, args=(event.assoc, str(info.TransactionUID), refs),
                             daemon=True).start()
        return 0, None

    def _report(self, assoc: object, uid: str, refs: list[tuple[str, str]]) -> None:
        time.sleep(0.1)  # after the N-ACTION response
        ds = Dataset()
        ds.TransactionUID = uid
        ok, bad = [], []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            if sop_instance in self.fail:
                item.FailureReason = 0x0110
                bad.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if bad:
            ds.FailedSOPSequence = bad
        assoc.send_n_event_report(ds, 2 if bad else 1, STORAGE_COMMITMENT,  # type: ignore[attr-defined]
                                  STORAGE_COMMITMENT_INSTANCE)

    def __enter__(self) -> CommitmentPeer:
        ae = AE(ae_title="PACS")
        for sop, syntaxes in UNCOMPRESSED_ONLY.items():
            ae.add_supported_context(sop, syntaxes)
        ae.add_supported_context(STORAGE_COMMITMENT)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_N_ACTION, self._on_action)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_a_report_on_the_same_association_confirms_and_a_failure_is_sent_again(
        tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    seg = str(results.seg.SOPInstanceUID)
    with CommitmentPeer(report=True, fail={seg}) as peer:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=peer.port)
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10, destinations=[dest],
                        backoff_initial_s=0.1)
        sender.enqueue(result, [dest])
        sender.send_due()
        rows = {r.sop_instance_uid: r for r in sender.list()}
        peer.fail.clear()
        _wait_past(rows[seg].next_attempt_at, "the re-send to be due")
        sender.send_due()  # the failed one again: committed this time
        again = {r.sop_instance_uid: r for r in sender.list()}
        sender.close()
    assert {r.state for u, r in rows.items() if u != seg} == {SendState.CONFIRMED}
    assert rows[seg].state is SendState.QUEUED and rows[seg].resends == 1
    assert "storage commitment failed: failure reason 0x0110" in rows[seg].last_error
    assert again[seg].state is SendState.CONFIRMED
    assert peer.stored.count(seg) == 2 and len(peer.requests) == 2


def test_a_report_that_cannot_be_read_is_refused_in_one_line_without_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_ports(1)[0]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(STORAGE_COMMITMENT)
    with node_listener(tmp_path, port):
        assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
        assert assoc.is_established
        info = Dataset()
        item = Dataset()
        item.ReferencedSOPInstanceUID = "1.2.3"
        info.ReferencedSOPSequence = [item]  # no Transaction UID
        status, _ = assoc.send_n_event_report(info, 1, STORAGE_COMMITMENT,
                                              STORAGE_COMMITMENT_INSTANCE)
        assoc.release()
    assert status.Status == 0x0110
    [record] = [r for r in caplog.records if "storage commitment report" in r.getMessage()]
    assert "without a Transaction UID" in record.getMessage() and record.exc_info is None


def test_unconfirmed_objects_are_sent_again_a_bounded_number_of_times_then_held(
        tmp_path: Path) -> None:
    results, result = _record(tmp_path)
    with CommitmentPeer(report=False) as peer:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=peer.port)
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=10, destinations=[dest],
                        confirm_timeout_s=0.3, confirm_resends=1)
        sender.enqueue(result, [dest])
        n = len(results.all())
        assert sender.send_due() == n
        assert all(r.state is SendState.SENT and r.confirm_by for r in sender.list())
        _wait_past(max(r.confirm_by for r in sender.list()), "the confirmation deadline")
        assert sender.send_due() == n  # past the deadline: queued again and sent
        assert all(r.resends == 1 and r.state is SendState.SENT for r in sender.list())
        _wait_past(max(r.confirm_by for r in sender.list()), "the second deadline")
        assert sender.send_due() == 0
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.HELD}
    assert all("no Storage Commitment report within 0.3 s; held after 1 re-send(s)" in r.last_error
               for r in rows)
    assert len(peer.stored) == 2 * n and len(peer.requests) == 2


@pytest.mark.orthanc
def test_orthanc_refusing_the_request_of_an_unknown_node_leaves_sends_sent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    results, result = _record(tmp_path / "node")
    with pacs(tmp_path / "orthanc") as orthanc:  # the node is not in its DicomModalities
        dest = Destination(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
        sender = Sender(tmp_path / "node", ae_title="NODE", network_timeout_s=20,
                        destinations=[dest])
        sender.enqueue(result, [dest])
        assert sender.send_due() == len(results.all())
        rows = sender.list()
        sender.close()
    assert {r.state for r in rows} == {SendState.SENT}
    assert all(r.confirm_by == "" and "refused the Storage Commitment request" in r.last_error
               for r in rows)
    assert len([m for m in caplog.messages if "refused the Storage Commitment" in m]) == 1


class SilentCommitmentPeer(CommitmentPeer):
    """Answers the N-ACTION late (never within the sender's wait) and counts the requests;
    ``abort``: aborts the association at the request instead, as Orthanc does for a
    calling AE it does not know."""

    def __init__(self, abort: bool) -> None:
        super().__init__(report=False)
        self.abort = abort

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        self.requests.append([])
        if self.abort:
            event.assoc.abort()
        else:
            time.sleep(12)  # past the sender's wait (COMMITMENT_ANSWER_S)
        return 0, None


@pytest.mark.parametrize("abort", [True, False], ids=["aborting", "silent"])
def test_a_peer_that_refuses_or_never_answers_the_request_holds_no_delivery_up(
        tmp_path: Path, abort: bool) -> None:
    """A peer that aborts at the request is not asked again for a while (each further
    association would end the same way); one that never answers the N-ACTION holds the
    sender for a bounded time, not its whole DIMSE timeout (60 s: every delivery of the
    node waited behind it)."""
    results, result = _record(tmp_path)
    _, second = _record(tmp_path, "job-2")
    with SilentCommitmentPeer(abort=abort) as peer:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=peer.port)
        sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=60,
                        destinations=[dest])
        sender.enqueue(result, [dest])
        t0 = time.monotonic()
        assert sender.send_due() == len(results.all())
        assert time.monotonic() - t0 < 20
        if abort:  # the next result goes without the request
            sender.enqueue(second, [dest])
            sender.send_due()
        rows = sender.list()
        sender.close()
    assert len(peer.requests) == 1
    assert {r.state for r in rows} == {SendState.SENT}
    assert len(rows) == (2 if abort else 1) * len(results.all())


def test_a_series_is_settled_only_once_its_sends_no_longer_wait_for_a_confirmation(
        tmp_path: Path) -> None:
    from dicom_node.queue.jobs import JobQueue, JobState, settled_series

    queue = JobQueue(tmp_path)
    job = queue.enqueue(series_uid="1.2.3", study_uid="1.2", patient_key="k", task="spleen-ct",
                        series_last_received="t", instances=3)
    assert job is not None
    now = iso(utc_now())
    with queue.conn:
        queue.conn.execute("UPDATE jobs SET state = ?, finished_at = ?, result_id = 7 WHERE id = ?",
                           (JobState.DONE.value, now, job.id))
        queue.conn.execute("INSERT INTO monitored_series (series_uid, last_received, decision,"
                           " reason, decided_at) VALUES ('1.2.3', 't', 'queued', 'x', ?)",
                           (now,))
        queue.conn.execute(
            "INSERT INTO sends (result_id, kind, destination, ae_title, host, port, path,"
            " sop_class_uid, sop_instance_uid, transfer_syntax_uid, state, enqueued_at,"
            " next_attempt_at, sent_at, confirm, confirm_by) VALUES (7, 'seg', 'P@h:1', 'P', 'h', 1,"
            " 'r/x.dcm', '1.2', '1.2.9', '1.2.840.10008.1.2.1', 'sent', ?, ?, ?, 'commitment', ?)",
            (now, now, now, "9999-01-01T00:00:00+00:00"))

    def settled() -> list[str]:
        return [s.series_uid for s in settled_series(tmp_path)]

    assert settled() == []  # acknowledged, still waiting for its Storage Commitment report
    with queue.conn:
        queue.conn.execute("UPDATE sends SET state = 'confirmed', confirm_by = NULL,"
                           " confirmed_at = ?", (now,))
    assert settled() == ["1.2.3"]
    queue.close()


def test_a_node_killed_between_the_acknowledgement_and_the_request_sends_again_after_restart(
        tmp_path: Path) -> None:
    """The acknowledgement is recorded with its deadline before anything else: a process
    killed there (no N-ACTION went out) leaves rows that the next sender sends again once
    the deadline passes, and that are then confirmed."""
    results, result = _record(tmp_path)
    with CommitmentPeer(report=True) as peer:
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=peer.port)
        first = Sender(tmp_path, ae_title="NODE", destinations=[dest], confirm_timeout_s=0.3)
        first.enqueue(result, [dest])
        first.mark_sent([s.id for s in first.list()])  # acknowledged; then SIGKILL
        first.close()
        again = Sender(tmp_path, ae_title="NODE", network_timeout_s=10, destinations=[dest],
                       confirm_timeout_s=30)
        _wait_past(max(r.confirm_by for r in again.list()), "the deadline of the first life")
        assert again.send_due() == len(results.all())
        rows = again.list()
        again.close()
    assert {r.state for r in rows} == {SendState.CONFIRMED} and {r.resends for r in rows} == {1}
    assert len(peer.requests) == 1
