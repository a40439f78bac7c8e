"""The loop's parts on real SQLite files and a real pynetdicom Storage SCP.

Job queue: durable, runs once, bounded retries then failed with its reason. Send queue:
kept while the destination is down, delivered when it is up, only the needed
presentation contexts proposed. Results: recorded once per job, later ones supersede.
Settings: destinations and the quiet period validated per key.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.foundation.errors import ConfigError
from dicom_node.queue import monitor as monitor_module
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.queue.jobs import (
    JobCounts,
    JobQueue,
    JobState,
    WaitingJob,
    connect_queue,
    read_job_counts,
)
from dicom_node.queue.monitor import StabilityMonitor
from dicom_node.queue.sender import Sender, SendCounts, SendState, read_send_counts, sends_of_results
from dicom_node.tasks import default_tasks
from dicom_node.settings import Destination, load_settings, parse_destination
from node_harness import free_port, incoming, small_ct
from twin_archive import Archive
from twin_archive.results import ResultStore, SegmentMeasure
from waiting import wait_until


def _job(queue: JobQueue, uid: str = "1.2.3", last: str = "t1"):
    return queue.enqueue(series_uid=uid, study_uid="1.2", patient_key="k", task="spleen-ct",
                         series_last_received=last, instances=3)


def test_job_is_unique_per_series_state_and_survives_a_restart(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    assert _job(queue) is not None and _job(queue) is None
    assert _job(queue, last="t2") is not None  # re-opened series: a new job
    claimed = queue.claim()
    assert claimed is not None and claimed.state is JobState.RUNNING
    queue.close()  # the process dies here, mid-job
    again = JobQueue(tmp_path)
    assert again.recover() == 1
    states = sorted(j.state.value for j in again.list())
    assert states == ["queued", "queued"]
    first = again.claim()
    assert first is not None and first.id == claimed.id and first.attempts == 1  # a killed attempt is not a failed one (issue 13)


def test_failures_are_retried_a_bounded_number_of_times_then_visible(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path, max_attempts=3, retry_delay_s=0.0)
    job = _job(queue)
    assert job is not None
    for attempt in range(1, 4):
        claimed = queue.claim()
        assert claimed is not None and claimed.attempts == attempt
        state = queue.fail(claimed.id, f"boom {attempt}")
    assert state is JobState.FAILED and queue.claim() is None
    failed = queue.get(job.id)
    assert failed.state is JobState.FAILED and failed.error == "boom 3"
    refused = _job(queue, uid="9.9")
    assert refused is not None
    claimed = queue.claim()
    assert claimed is not None
    assert queue.fail(claimed.id, "geometry refused", permanent=True) is JobState.FAILED


def _result(tmp_path: Path, job_key: str = "job-1", series: str = "1.2.3"):
    with Archive(tmp_path) as archive:  # creates and migrates the index; a twin "k"
        archive.db.execute("INSERT OR IGNORE INTO twins (patient_key, patient_id, donate)"
                           " VALUES ('k', 'PAT-1', 0)")
        archive.db.conn.commit()
    store = ResultStore(tmp_path)
    ds = small_ct()
    result = store.record(
        job_key=job_key, patient_key="k", study_uid=str(ds.StudyInstanceUID),
        source_series_uid=series, source_last_received="t", source_instances=1,
        task="spleen-ct", model_name="m", model_version="1", backend="torch-cpu",
        segments=(SegmentMeasure(name="spleen", volume_ml=12.5),), timings={"x_s": 1.0},
        objects=[("overlay", ds)])
    return store, result


def test_results_are_recorded_once_per_job_and_later_ones_supersede(tmp_path: Path) -> None:
    store, first = _result(tmp_path)
    assert store.record(job_key="job-1", patient_key="k", study_uid=first.study_uid,
                        source_series_uid="1.2.3", source_last_received="t", source_instances=1,
                        task="spleen-ct", model_name="m", model_version="1", backend="b",
                        segments=(), timings={}, objects=[]).id == first.id
    ds = small_ct()
    second = store.record(job_key="job-2", patient_key="k", study_uid=first.study_uid,
                          source_series_uid="1.2.3", source_last_received="t2", source_instances=2,
                          task="spleen-ct", model_name="m", model_version="1", backend="b",
                          segments=(), timings={}, objects=[("overlay", ds)])
    assert store.get(first.id).superseded_by == second.id
    assert second.objects[0].path.is_file() and second.objects[0].series_uid != \
        first.objects[0].series_uid
    store.close()


def test_objects_added_to_a_result_are_stored_indexed_and_timed(tmp_path: Path) -> None:
    store, result = _result(tmp_path)
    ds = small_ct()
    more = store.add_objects(result.id, [("overlay", ds)], timings={"overlay_write_s": 0.5})
    assert [o.sop_instance_uid for o in more.objects] == \
        [result.objects[0].sop_instance_uid, str(ds.SOPInstanceUID)]
    assert more.objects[1].path.is_file()
    assert more.timings == {"x_s": 1.0, "overlay_write_s": 0.5}
    assert store.by_job_key("job-1") == more
    with pytest.raises(ValueError, match="kind must be one of"):
        store.add_objects(result.id, [("nifti", ds)])
    with pytest.raises(KeyError):
        store.add_objects(result.id + 99, [("overlay", small_ct())])
    store.close()


class _Scp:
    """A real Storage SCP that records the contexts proposed and the instances stored."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stored: list[str] = []
        self.proposed: list[str] = []
        self.server = None

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    def _on_request(self, event: evt.Event) -> None:
        self.proposed = [str(cx.abstract_syntax) for cx in event.assoc.requestor.requested_contexts]

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_ACSE_RECV, self._on_request)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def test_sends_are_kept_while_the_destination_is_down_and_delivered_once_it_is_up(
        tmp_path: Path) -> None:
    store, result = _result(tmp_path)
    port = free_port()
    # confirm = "none": no Storage Commitment context is proposed (checked below)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=port, send=("overlay",),
                       confirm="none")
    sender = Sender(tmp_path, ae_title="NODE", backoff_initial_s=0.2, backoff_max_s=0.4,
                    network_timeout_s=5)
    assert sender.enqueue(result, [dest]) == 1
    assert sender.enqueue(result, [dest]) == 0  # a re-run job queues nothing twice
    assert sender.send_due() == 0
    [row] = sender.list()
    assert row.state is SendState.QUEUED and row.attempts == 1 and row.last_error
    sender.close()
    sender = Sender(tmp_path, ae_title="NODE", backoff_initial_s=0.2, backoff_max_s=0.4)
    scp = _Scp(port)
    scp.start()
    try:
        # the same clock and text form as the sender's own "next_attempt_at <= now"
        wait_until("the retry to be due", lambda: iso(utc_now()) >= row.next_attempt_at, 10.0,
                   poll=0.02)
        assert sender.send_due() == 1
    finally:
        scp.stop()
    assert scp.stored == [result.objects[0].sop_instance_uid]
    # only what is sent: its SOP class, one context per syntax the destination accepts
    assert set(scp.proposed) == {result.objects[0].sop_class_uid} and len(scp.proposed) == 2
    assert [s.state for s in sender.list()] == [SendState.SENT]
    sender.close()
    store.close()


def test_destinations_and_quiet_period_are_validated_per_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('stable_after = 2.5\n[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\n'
                   'port = 104\nsend = ["seg", "sr"]\n')
    settings = load_settings(cfg, env={})
    assert settings.stable_after == 2.5
    assert settings.destinations == (Destination(ae_title="PACS", host="10.0.0.5", port=104,
                                                 send=("seg", "sr")),)
    assert parse_destination("ARCHIVE@pacs.local:11112").send == ("seg", "sr", "overlay")
    for text, key in (('[[destinations]]\nae_title = "P"\nhost = "h"\nport = 0\n', "destinations[0].port"),
                      ('[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\nsend = ["pdf"]\n',
                       "destinations[0].send"),
                      ('[[destinations]]\nhost = "h"\nport = 1\n', "destinations[0].ae_title"),
                      ('[[destinations]]\nae_title = "P"\nhost = "h"\nport = 1\nfoo = 1\n',
                       "destinations[0].foo"),
                      ("stable_after = -1\n", "stable_after")):
        cfg.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(cfg, env={})
        assert info.value.key == key and info.value.source == str(cfg)
    with pytest.raises(ConfigError) as info:
        parse_destination("PACS:104")
    assert info.value.key == "--destination"


def test_results_of_a_study_their_sends_and_their_files_gone(tmp_path: Path) -> None:
    store, first = _result(tmp_path)
    study = first.study_uid

    def record(job_key: str, series: str, study_uid: str = study):
        return store.record(job_key=job_key, patient_key="k", study_uid=study_uid,
                            source_series_uid=series, source_last_received=job_key,
                            source_instances=1, task="spleen-ct", model_name="m",
                            model_version="1", backend="b", segments=(), timings={},
                            objects=[("overlay", small_ct())])

    second = record("job-2", "1.2.3")  # supersedes the first
    other_series = record("job-3", "1.2.4")
    record("job-4", "1.2.5", study_uid="1.2.999")  # another study
    assert [r.id for r in store.current_for_study(study)] == [second.id, other_series.id]
    assert store.current_for_study("1.2.0") == []

    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), send=("overlay",))
    sender = Sender(tmp_path, ae_title="NODE")
    for result in (first, second, other_series):
        sender.enqueue(result, [dest])
    sender.close()
    conn = connect_queue(tmp_path)
    sends = sends_of_results(conn, [other_series.id, second.id])
    assert [(s.result_id, s.sop_instance_uid, s.state) for s in sends] == [
        (second.id, second.objects[0].sop_instance_uid, SendState.QUEUED),
        (other_series.id, other_series.objects[0].sop_instance_uid, SendState.QUEUED)]
    assert sends_of_results(conn, []) == []
    conn.close()

    assert store.missing_files() == []
    second.objects[0].path.unlink()
    assert store.missing_files() == [str(second.objects[0].path.relative_to(tmp_path.resolve()))]
    store.close()


def test_job_and_send_counts_are_read_without_creating_the_queue(tmp_path: Path) -> None:
    assert read_job_counts(tmp_path) == JobCounts(by_state={}, waiting=())
    assert read_send_counts(tmp_path) == SendCounts(by_state={}, failed_attempts=0)
    assert list(tmp_path.iterdir()) == []
    queue = JobQueue(tmp_path)
    _job(queue, last="t1")
    _job(queue, last="t2")
    claimed = queue.claim()
    assert claimed is not None
    queue.wait_for_space(claimed.id, "data directory full", delay_s=60)
    [waiting] = queue.waiting()
    counts = read_job_counts(tmp_path)
    assert counts.by_state == {"queued": 2}
    assert counts.waiting == (WaitingJob(id=claimed.id, reason=waiting.error,
                                         not_before=counts.waiting[0].not_before),)
    assert counts.waiting[0].reason.startswith("waiting for disk space")
    assert counts.waiting[0].not_before > iso(utc_now())
    queue.close()

    store, result = _result(tmp_path)
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), send=("overlay",))
    sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=5)
    sender.enqueue(result, [dest])
    assert sender.send_due() == 0  # nobody listens: one failed attempt
    sender.close()
    store.close()
    assert read_send_counts(tmp_path) == SendCounts(by_state={"queued": 1}, failed_attempts=1)


def test_the_monitor_decides_each_quiet_series_once_and_again_after_a_late_instance(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # look back no further than the previous pass: what is not read must still be retried
    monkeypatch.setattr(monitor_module, "LOOKBACK_S", 0.0)
    archive = Archive(tmp_path)
    queue = JobQueue(tmp_path)
    one, two = small_ct(patient_id="P1"), small_ct(patient_id="P2")
    archive.ingest.store(incoming(two))  # the older one: tried in the pass that decides the first
    archive.ingest.store(incoming(one))
    unreadable = archive.twins.series_files(str(two.SeriesInstanceUID))[0]
    kept = unreadable.read_bytes()
    unreadable.unlink()
    monitor = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=0.05)
    decided: list[str] = []

    def decided_on(uid: object) -> bool:
        decided.extend(d.series_uid for d in monitor.poll())
        return str(uid) in decided

    wait_until("the first series decided", lambda: decided_on(one.SeriesInstanceUID), 10.0,
               poll=0.02)
    assert str(two.SeriesInstanceUID) not in decided  # its file cannot be read: not decided
    assert monitor.poll() == []  # still unreadable; the window has moved past it since
    unreadable.write_bytes(kept)
    wait_until("the unreadable series decided once it can be read",
               lambda: decided_on(two.SeriesInstanceUID), 10.0, poll=0.02)
    assert sorted(decided) == sorted([str(one.SeriesInstanceUID), str(two.SeriesInstanceUID)])

    late = small_ct(patient_id="P1", study_uid=str(one.StudyInstanceUID),
                    series_uid=str(one.SeriesInstanceUID), instance=2)
    archive.ingest.store(incoming(late))
    wait_until("the series re-opened by a late instance decided again",
               lambda: decided_on(one.SeriesInstanceUID)
               and decided.count(str(one.SeriesInstanceUID)) == 2, 10.0, poll=0.02,
               explain=lambda: decided)
    assert sorted(decided) == sorted([str(one.SeriesInstanceUID)] * 2
                                     + [str(two.SeriesInstanceUID)])
    # the previous pass ran with the clock far ahead, then it was set back: one pass later
    # the window follows the clock again
    third = small_ct(patient_id="P3")
    archive.ingest.store(incoming(third))
    monitor._since = "9999"  # noqa: SLF001 - as that pass left it
    wait_until("a series decided after the clock was set back",
               lambda: decided_on(third.SeriesInstanceUID), 10.0, poll=0.02)
    monitor.stop()
    again = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=0.05)
    assert again.poll() == []  # a restarted monitor remembers what it decided
    again.stop()
    queue.close()
    archive.close()


def test_every_job_send_and_worker_state_is_on_metrics(tmp_path: Path) -> None:
    """Issue 30: ``/metrics`` names each state of the queues' own enums (jobs waiting for
    a model and held sends were left out, so Prometheus never saw them)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dicom_node.wire.metrics import NodeMetrics
    from dicom_node.runtime.observability import NodeCollector, build_registry
    from dicom_node.runtime.supervisor import WORKER_STATES

    queue = JobQueue(tmp_path)
    _job(queue, last="t1")
    _job(queue, last="t2")
    claimed = queue.claim()
    assert claimed is not None
    queue.wait_for_model(claimed.id, "no model", manufacturer="ACME", scanner_model="X1")
    queue.close()
    store, result = _result(tmp_path)
    [obj] = result.objects
    dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), send=("overlay",))
    sender = Sender(tmp_path, ae_title="NODE", network_timeout_s=5)
    sender.enqueue(result, [dest], held={obj.sop_instance_uid: "fails its check"})
    sender.close()
    store.close()
    collector = NodeCollector(NodeMetrics(), tmp_path, workers=lambda: [("ready", 0)])
    text = generate_latest(build_registry(collector)).decode()
    got = {(s.name, s.labels.get("state")): s.value
           for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert {s.value for s in JobState} <= {st for n, st in got if n == "dicom_node_jobs"}
    assert {s.value for s in SendState} <= {st for n, st in got if n == "dicom_node_sends"}
    assert set(WORKER_STATES) <= {st for n, st in got if n == "dicom_node_workers"}
    assert got[("dicom_node_jobs", "waiting")] == 1 and got[("dicom_node_jobs", "queued")] == 1
    assert got[("dicom_node_sends", "held")] == 1 and got[("dicom_node_sends", "queued")] == 0
    assert got[("dicom_node_workers", "ready")] == 1


def test_a_missing_instance_file_is_said_once_and_its_series_decided_on_what_is_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 28 item 5: a missing archived file made the monitor log an ERROR every
    second, forever. Now: a series with a file missing is decided on the others (the
    reason says so); a series none of whose files can be read is set aside with one
    WARNING line, retried quietly, and one INFO line says when it can be read again."""
    archive = Archive(tmp_path)
    queue = JobQueue(tmp_path)
    series = str(generate_uid())
    three = [small_ct(patient_id="P1", series_uid=series, instance=i) for i in (1, 2, 3)]
    for ds in three:
        three[0].StudyInstanceUID = ds.StudyInstanceUID = three[0].StudyInstanceUID
        archive.ingest.store(incoming(ds))
    alone = small_ct(patient_id="P2")
    archive.ingest.store(incoming(alone))
    archive.twins.series_files(series)[1].unlink()
    gone = archive.twins.series_files(str(alone.SeriesInstanceUID))[0]
    kept = gone.read_bytes()
    gone.unlink()
    monitor = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=0.05)
    decided: dict[str, str] = {}
    caplog.set_level(logging.DEBUG, logger="dicom_node.queue.monitor")

    def passes(n: int) -> None:
        for _ in range(n):
            decided.update((d.series_uid, d.reason) for d in monitor.poll())
            time.sleep(0.02)

    wait_until("the series with a missing file decided",
               lambda: passes(1) or series in decided, 10.0, poll=0.02)
    assert "decided on the 2 of 3 instance(s) that can be read; 1 cannot" in decided[series]
    passes(20)  # about as many passes as 20 s of a running node
    assert str(alone.SeriesInstanceUID) not in decided
    warnings_ = [r for r in caplog.records if r.levelno >= logging.WARNING
                 and str(alone.SeriesInstanceUID) in r.getMessage()]
    assert len(warnings_) == 1 and "set aside" in warnings_[0].getMessage(), warnings_
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    gone.write_bytes(kept)
    wait_until("the set-aside series decided once readable",
               lambda: passes(1) or str(alone.SeriesInstanceUID) in decided, 10.0, poll=0.02)
    again = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
             and "can be read again" in r.getMessage()]
    assert len(again) == 1 and str(alone.SeriesInstanceUID) in again[0]
    monitor.stop()
    queue.close()
    archive.close()
