"""Issue 26: a new study's priors are looked for as its first instance is filed.

The stability monitor queues one priors job per new study and task (durable: a restart
neither loses nor repeats it; never for a series retrieved as a prior), so that the
retrieval and the prior's inference run while today's series is still arriving and
quiet. Today's job then takes the priors job's word: it runs one not begun yet itself,
and waits for one another worker runs at most ``priors_wait_s``, then goes out without
the comparison, saying so. The whole loop with a real PACS: ``tests/test_priors_e2e.py``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from dicom_node.queue.jobs import JobKind, JobQueue, JobState
from dicom_node.queue.monitor import StabilityMonitor
from dicom_node.settings import Destination
from dicom_node.tasks import default_tasks
from dicom_node.wire.priors import PriorRetriever, PriorSettings
from node_harness import incoming, small_ct
from twin_archive import Archive
from twin_archive.history import HistoryStore


def _priors_jobs(queue: JobQueue) -> list:
    return [j for j in queue.list(limit=1000) if j.kind is JobKind.PRIORS]


def test_one_priors_job_per_new_study_from_its_first_instance_across_restarts(
        tmp_path: Path) -> None:
    archive, queue = Archive(tmp_path), JobQueue(tmp_path)
    first = small_ct(patient_id="EARLY-1", instance=1)
    archive.ingest.store(incoming(first))
    off = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=60)
    off.poll()
    off.stop()
    assert _priors_jobs(queue) == []  # no PACS to ask: no priors job
    monitor = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=60,
                               ask_priors=True)
    assert monitor.poll() == []  # the series is far from quiet ...
    [asked] = _priors_jobs(queue)  # ... and its study's priors are looked for already
    assert (asked.study_uid, asked.series_uid, asked.task, asked.state) == (
        str(first.StudyInstanceUID), str(first.SeriesInstanceUID), "spleen-ct", JobState.QUEUED)
    assert asked.patient_key == archive.twins.find_twin_keys("EARLY-1")[0]
    # more instances, another series of the same study: still one
    archive.ingest.store(incoming(small_ct(patient_id="EARLY-1", instance=2,
                                           study_uid=str(first.StudyInstanceUID),
                                           series_uid=str(first.SeriesInstanceUID))))
    archive.ingest.store(incoming(small_ct(patient_id="EARLY-1",
                                           study_uid=str(first.StudyInstanceUID))))
    monitor.poll()
    monitor.stop()
    again = StabilityMonitor(archive, queue, default_tasks(), stable_after_s=60,
                             ask_priors=True)  # a restart: the queue remembers
    again.poll()
    assert [j.id for j in _priors_jobs(queue)] == [asked.id]
    # a series retrieved as a prior (recorded before it is asked for) asks for nothing
    prior = small_ct(patient_id="EARLY-1")
    HistoryStore(tmp_path).expect_retrieved(
        series_uid=str(prior.SeriesInstanceUID), study_uid=str(prior.StudyInstanceUID),
        patient_key=asked.patient_key, source="PACS", for_study_uid=asked.study_uid)
    archive.ingest.store(incoming(prior))
    # a result object is no image study
    sr = small_ct(patient_id="EARLY-2")
    sr.Modality = "SR"
    archive.ingest.store(incoming(sr))
    # a series the task's rules would not take (an MR) asks for nothing, and leaves its
    # study's turn to the next series that they take
    mr = small_ct(patient_id="EARLY-3")
    mr.Modality = "MR"
    archive.ingest.store(incoming(mr))
    again.poll()
    assert [j.id for j in _priors_jobs(queue)] == [asked.id]
    ct = small_ct(patient_id="EARLY-3", study_uid=str(mr.StudyInstanceUID))
    archive.ingest.store(incoming(ct))
    again.poll()
    again.stop()
    [later, _] = _priors_jobs(queue)  # newest first
    assert (later.study_uid, later.series_uid) == (str(mr.StudyInstanceUID),
                                                   str(ct.SeriesInstanceUID))
    assert queue.enqueue_priors(series_uid="x", study_uid=asked.study_uid,
                                patient_key=asked.patient_key, task="spleen-ct") is None


def _worker(data: Path, archive: Archive, queue: JobQueue, port: int, wait_s: float):
    from dicom_node.queue.sender import Sender
    from dicom_node.runtime.worker import Worker
    from twin_archive.results import ResultStore

    retriever = PriorRetriever(
        settings=PriorSettings(years=5, max_studies=3, max_bytes=10**9, per_hour=100,
                               timeout_s=2.0, node_ae_title="DICOM_NODE"),
        destinations=[Destination(ae_title="GONE", host="127.0.0.1", port=port, query=True)],
        ingest=archive.ingest, history=HistoryStore(data), data_dir=data)
    return Worker(archive=archive, jobs=queue, results=ResultStore(data),
                  sender=Sender(data, ae_title="DICOM_NODE"), destinations=(),
                  tasks=default_tasks(), priors=retriever, priors_wait_s=wait_s)


def test_todays_job_runs_a_priors_job_not_begun_and_waits_a_bounded_time_for_a_running_one(
        tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    queue = JobQueue(tmp_path, worker="worker-1 pid 1")
    other = JobQueue(tmp_path, worker="worker-2 pid 2")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the PACS refuses at once
    worker = _worker(tmp_path, archive, queue, port, wait_s=0.6)
    spec = worker.tasks["spleen-ct"]
    jobs = {}
    for name in ("running", "queued"):
        ds = small_ct(patient_id=f"WAIT-{name}")
        archive.ingest.store(incoming(ds))
        key = archive.twins.find_twin_keys(f"WAIT-{name}")[0]
        kw = dict(series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
                  patient_key=key, task="spleen-ct")
        asked = queue.enqueue_priors(**kw)
        today = queue.enqueue(**kw, series_last_received="t1", instances=1)
        jobs[name] = (asked, today)
    # 1. another worker runs the priors job: today's job waits at most priors_wait_s
    asked, today = jobs["running"]
    assert other.claim().id == asked.id
    t0 = time.monotonic()
    note = worker._priors_asked(today, spec)  # noqa: SLF001 - the step under test
    waited = time.monotonic() - t0
    assert 0.6 <= waited < 3.0, waited
    assert note == ("no comparison: the priors were still being retrieved or measured after "
                    "0.6 s (priors_wait_s)")
    # ... and runs it itself when its worker died and gave it back meanwhile
    other.give_back("worker-2 pid 2", "worker-2 died", count_attempt=False)
    again = worker._priors_asked(today, spec)  # noqa: SLF001
    assert again.startswith("no comparison: PACS GONE did not answer"), again
    assert queue.get(asked.id).worker == "worker-1 pid 1"
    # ... and takes its word once it has ended
    t0 = time.monotonic()
    assert worker._priors_asked(today, spec) == again  # noqa: SLF001
    assert time.monotonic() - t0 < 0.5
    # 2. a priors job not begun (this worker had other work): today's job runs it itself,
    # once; the PACS refuses, and the result goes out without the comparison, saying why
    asked, today = jobs["queued"]
    note = worker._priors_asked(today, spec)  # noqa: SLF001
    assert note.startswith("no comparison: PACS GONE did not answer"), note
    done = queue.get(asked.id)
    assert (done.state, done.error, done.worker) == (JobState.DONE, note, "worker-1 pid 1")
    assert queue.take(asked.id) is None  # ended: nobody runs it again
    lookup = worker.priors.lookup(patient_key=today.patient_key, task="spleen-ct",
                                  study_uid=today.study_uid, series_uid=today.series_uid,
                                  files=archive.twins.series_files(today.series_uid),
                                  rules=spec.rules, run_prior=lambda uid: None, asked=note)
    assert lookup.prior is None and lookup.note == note


def test_a_priors_job_run_again_after_a_restart_measures_what_was_retrieved_not_again(
        tmp_path: Path) -> None:
    """Stopped after the C-MOVE, before the prior's inference: the job, queued again,
    does not ask the PACS again (the prior is in the twin) but measures the retrieved
    series (the worker's ``run_prior`` skips those with a result)."""
    from dicom_node.runtime.prior_results import JobPriors

    archive = Archive(tmp_path)
    today = small_ct(patient_id="AGAIN-1")
    archive.ingest.store(incoming(today))
    key = archive.twins.find_twin_keys("AGAIN-1")[0]
    prior = small_ct(patient_id="AGAIN-1")
    prior.StudyDate = "20250101"
    history = HistoryStore(tmp_path)
    history.expect_retrieved(series_uid=str(prior.SeriesInstanceUID),
                             study_uid=str(prior.StudyInstanceUID), patient_key=key,
                             source="PACS", for_study_uid=str(today.StudyInstanceUID))
    archive.ingest.store(incoming(prior))
    never = PriorRetriever(  # would refuse at once: it must not be asked
        settings=PriorSettings(years=5, max_studies=3, max_bytes=10**9, per_hour=100,
                               timeout_s=1.0, node_ae_title="DICOM_NODE"),
        destinations=[Destination(ae_title="GONE", host="127.0.0.1", port=9, query=True)],
        ingest=archive.ingest, history=history, data_dir=tmp_path)
    measured: list[str] = []
    note = JobPriors(history, never).ask(
        patient_key=key, study_uid=str(today.StudyInstanceUID),
        files=archive.twins.series_files(str(today.SeriesInstanceUID)),
        rules=default_tasks()[0].rules, run_prior=measured.append)
    assert note == "priors not asked for: a prior within the window is in the twin"
    assert measured == [str(prior.SeriesInstanceUID)]
