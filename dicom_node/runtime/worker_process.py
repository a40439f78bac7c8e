"""One inference worker process: ``python -m dicom_node.runtime.worker_process FD PARENT_PID NAME``.

Started and supervised by the node's listener (:mod:`dicom_node.runtime.supervisor`). torch,
MONAI and the models are loaded here, never in the listener (DESIGN decision 10), so a
model that runs out of memory or crashes takes this process down, not the DICOM port.

Inside, the job logic is the node's :class:`~dicom_node.runtime.worker.Worker` as it is; this
module wraps it:

* its :class:`~dicom_node.queue.jobs.JobQueue` records this process with every claim
  (``worker-2 pid 4242``), so the supervisor can give back what a dead worker held;
* its :class:`~dicom_node.queue.sender.Sender` only queues (the listener's sender sends) and
  tells the listener when it queued something, so results leave at once;
* torch gets this worker's share of the CPUs (CPUs // ``workers``, at least one
  thread), so that N workers do not oversubscribe the cores.

The listener talks to it over a socket pair, one JSON object a line (the same protocol
as the acceptor processes of :mod:`dicom_node.wire.acceptor`):

* listener -> worker: ``{"op": "settings", "blob": ...}`` first (the node's settings,
  pickled), then ``{"op": "wake"}`` (a job was queued), ``{"op": "destinations",
  "blob": ...}``, ``{"op": "tasks", "blob": ...}`` and ``{"op": "log_level",
  "level": "DEBUG"}`` (SIGHUP reload),
  ``{"op": "stop", "grace_s": 5}`` (a job still
  running after the grace goes back to the queue, its attempt not counted);
* worker -> listener: ``{"op": "ready"}`` once the pipeline runner is loaded,
  ``{"op": "job", "id": N}`` / ``{"op": "idle"}`` around each job, ``{"op":
  "queued"}`` when results were queued for sending.

A worker dies with the listener: it asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``) and exits at once when its end of the socket pair closes; a job
it was running stays ``running`` and the next start's recovery queues it again.
Ctrl-C in a terminal reaches the whole process group: the worker ignores SIGINT and
waits for the listener's stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from dicom_node.wire.childproc import die_with_parent, read_messages, send_message, unpack
from dicom_node.queue.jobs import Job, JobQueue
from dicom_node.queue.sender import Sender
from dicom_node.settings import Destination, Settings

LOG = logging.getLogger("dicom_node.runtime.worker_process")  # also when run as __main__

Report = Callable[[dict[str, Any]], bool]


# ------------------------------------------------------------------ wrapped collaborators
class ReportingQueue(JobQueue):
    """The job queue as one worker process uses it: says which job it runs."""

    def __init__(self, data_dir: Any, *, worker: str, report: Report) -> None:
        super().__init__(data_dir, worker=worker)
        self._report = report

    def claim(self) -> Job | None:
        job = super().claim()
        if job is not None:
            self._report({"op": "job", "id": job.id})
        return job

    def complete(self, job_id: int, *, result_id: int | None, note: str = "") -> None:
        super().complete(job_id, result_id=result_id, note=note)
        self._report({"op": "idle"})

    def fail(self, job_id: int, reason: str, *, permanent: bool = False) -> Any:
        state = super().fail(job_id, reason, permanent=permanent)
        self._report({"op": "idle"})
        return state

    def wait_for_model(self, job_id: int, reason: str, *, manufacturer: str,
                       scanner_model: str) -> None:
        super().wait_for_model(job_id, reason, manufacturer=manufacturer,
                               scanner_model=scanner_model)
        self._report({"op": "idle"})

    def postpone(self, job_id: int, reason: str, *, delay_s: float) -> None:
        super().postpone(job_id, reason, delay_s=delay_s)
        self._report({"op": "idle"})

    def wait_for_space(self, job_id: int, reason: str, **kwargs: Any) -> None:
        super().wait_for_space(job_id, reason, **kwargs)
        self._report({"op": "idle"})


class QueueingSender(Sender):
    """A sender that only queues: the listener's sender sends, woken by a report."""

    def __init__(self, data_dir: Any, *, report: Report, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self._report = report

    def enqueue(self, result: Any, destinations: Sequence[Destination],
                held: Mapping[str, str] | None = None) -> int:
        added = super().enqueue(result, destinations, held=held)
        if added:
            self._report({"op": "queued"})
        return added


# ------------------------------------------------------------------ the process
def _work(sock: socket.socket, messages: Iterator[dict[str, Any]], settings: Settings,
          name: str, t0: float) -> int:
    from dicom_node.wire.tls import client_tls_context
    import torch

    from dicom_node.runtime.worker import Worker, triton_target  # torch and MONAI: in this process only
    from twin_archive import Archive
    from twin_archive.results import ResultStore

    # N workers share the CPUs: each gets its share of torch's threads instead of all of
    # them (N x all oversubscribes the cores and every job slows down).
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, settings.workers))
    torch.set_num_threads(threads)

    lock = threading.Lock()

    def report(message: dict[str, Any]) -> bool:
        return send_message(sock, lock, message)

    me = f"{name} pid {os.getpid()}"
    archive = Archive(settings.data_dir, min_free_bytes=settings.min_free_mb << 20)
    jobs = ReportingQueue(settings.data_dir, worker=me, report=report)
    results = ResultStore(settings.data_dir)
    sender = QueueingSender(settings.data_dir, report=report, ae_title=settings.ae_title,
                            tls_context=client_tls_context(settings),
                            tls_destinations=frozenset(d.key for d in settings.destinations if d.tls))
    from dicom_node.learning.live_learning import LiveLearning
    from dicom_node.wire.priors import retriever_for
    from pipelines.memory import budget_bytes

    triton = triton_target(settings)
    worker = Worker(archive=archive, jobs=jobs, results=results, sender=sender,
                    destinations=settings.destinations, tasks=settings.tasks,
                    waiting_max_age_h=settings.waiting_for_model_max_age_h, name=name,
                    triton=triton, wait_backoff_max_s=settings.triton_backoff_max_s,
                    live=LiveLearning.from_settings(settings),
                    max_memory_bytes=budget_bytes(settings.max_memory_gb),
                    priors=retriever_for(settings, archive.ingest),
                    send_prior_results=settings.send_prior_results,
                    priors_wait_s=settings.priors_wait_s)
    if triton is not None:
        LOG.info("%s: inference on Triton at %s (%s models); pre- and post-processing here",
                 name, triton.url, settings.triton_variant)
    worker.start()
    LOG.info("%s ready for jobs (started in %.1f s; torch uses %d CPU thread(s))", me,
             time.perf_counter() - t0, threads)
    report({"op": "ready"})
    stop_grace = _follow(messages, worker, jobs)
    if stop_grace is None:  # the listener is gone: stop at once, like it
        os._exit(1)
    worker.stop(stop_grace)  # a job still running goes back to the queue
    for closeable in (jobs, sender, results, archive):
        closeable.close()
    return 0


def _follow(messages: Iterator[dict[str, Any]], worker: Any, jobs: Any) -> float | None:
    """Follow the listener's messages until it says stop (its grace, in seconds), or None
    when the listener is gone (the socket closed)."""
    from dicom_node.logconfig import configure_logging

    for message in messages:
        op = message.get("op")
        if op == "wake":
            jobs.wakeup.set()
        elif op == "destinations":
            worker.destinations = tuple(unpack(message["blob"]))
        elif op == "tasks":
            worker.set_tasks(tuple(unpack(message["blob"])))
        elif op == "log_level":
            configure_logging(str(message["level"]))
        elif op == "stop":
            return float(message.get("grace_s", 5.0))
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m dicom_node.runtime.worker_process FD PARENT_PID NAME``."""
    t0 = time.perf_counter()
    args = sys.argv[1:] if argv is None else argv
    fd, parent_pid, name = int(args[0]), int(args[1]), args[2]
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the listener, which tells us
    sock = socket.socket(fileno=fd)
    messages = read_messages(sock)
    first = next(messages, None)
    if first is None or first.get("op") != "settings":
        return 1
    settings: Settings = unpack(first["blob"])
    from dicom_node.logconfig import configure_logging

    configure_logging(settings.log_level)
    code = _work(sock, messages, settings, name, t0)
    logging.shutdown()
    os._exit(code)  # the worker thread is a daemon that may sit in torch; do not wait on it


if __name__ == "__main__":
    sys.exit(main())
