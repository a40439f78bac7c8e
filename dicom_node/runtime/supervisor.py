"""The node's inference worker processes, supervised from the listener (``workers = N``).

The listener (network, archive, monitor, sender, scheduler) never imports torch
(DESIGN decision 10); inference runs in ``workers`` processes
(:mod:`dicom_node.runtime.worker_process`) that claim jobs from ``queue.sqlite`` (a claim and the
``running`` mark are one ``BEGIN IMMEDIATE`` transaction, so a job runs once whoever
claims it). :class:`WorkerPool` starts them, relays what they need to know (a job was
queued, the destinations were reloaded) and what the listener needs to know (results
were queued for sending), and watches them:

* a worker that dies (killed, out of memory, a crash in native code) gives back the job
  it held (:meth:`~dicom_node.queue.jobs.JobQueue.give_back`: queued again, the attempt
  counted, so a job that kills every worker that runs it ends ``failed`` after its last
  attempt), and is started again after a back-off: 1 s, doubled at each death up to
  60 s, back to 1 s once a worker has lived 60 s. Each death and restart is a line in
  the journal; :meth:`WorkerPool.describe` is what ``dicom-node status`` shows.
* The DICOM port is not touched by any of this: C-STOREs are answered throughout.
* What the listener is told (``on_change``: ``serve.json``) may fail, a full disk
  above all: no thread of the pool dies of it. The failure is one journal line
  (:class:`~dicom_node.foundation.faults.StateLog`), the write is tried again every
  :data:`RETELL_S` seconds until it works (one line again), and meanwhile workers are
  reaped, restarted and their jobs given back as ever.

Written by hand rather than with ``multiprocessing`` or a process
manager: the node's acceptor processes already use this pattern (socket pair, one JSON
object a line, ``python -m`` children that show what they are in ``systemctl status``),
``multiprocessing``'s spawn adds a resource-tracker process and names every child
``python -c 'from multiprocessing.spawn ...'``, and supervisord/circus would be a
second supervisor under systemd for three decisions (give back, back-off, report).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.foundation.clock import utc_now
from dicom_node.foundation.faults import StateLog
from dicom_node.queue.jobs import Job, JobQueue
from dicom_node.settings import Destination, Settings
from dicom_node.tasks import Task
from dicom_node.wire.childproc import pack, read_messages, send_message

LOG = logging.getLogger(__name__)

#: First delay before a dead worker is started again, seconds (doubled per death).
RESTART_INITIAL_S = 1.0
#: Longest delay between restarts, seconds.
RESTART_MAX_S = 60.0
#: A worker that lived this long before dying is restarted after the first delay again.
STABLE_AFTER_S = 60.0
#: How often the supervisor looks for queued jobs to announce and restarts that are due.
_TICK_S = 0.1
#: Seconds between two tries to tell a change (``serve.json``) after one failed.
RETELL_S = 1.0
#: Environment a worker must not inherit (only the listener talks to systemd).
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def describe_exit(code: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


#: What a worker can be doing, as ``status`` and ``/metrics`` name it.
WORKER_STATES = ("starting", "ready", "restarting", "stopped")


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerInfo:
    """One worker as ``status`` shows it."""

    name: str
    pid: int | None
    state: str  # one of WORKER_STATES
    job: int | None
    restarts: int
    last_exit: str  # what ended the previous process and when; '' if none did

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "state": self.state, "job": self.job,
                "restarts": self.restarts, "last_exit": self.last_exit}


class _Slot:
    """One worker position (``worker-2``) and the process that fills it now."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.lock = threading.Lock()
        self.state = "stopped"
        self.job: int | None = None
        self.restarts = 0
        self.started = 0.0
        self.restart_at: float | None = None
        self.backoff_s = RESTART_INITIAL_S
        self.last_exit = ""

    @property
    def owner(self) -> str:
        """The name its claims carry in the job queue."""
        return f"{self.name} pid {self.proc.pid if self.proc else '-'}"

    def tell(self, message: dict[str, Any]) -> None:
        if self.sock is not None and self.state in ("starting", "ready"):
            send_message(self.sock, self.lock, message)


class WorkerPool:
    """Start, watch, restart and stop the node's inference worker processes.

    Parameters
    ----------
    settings : Settings
        The node's settings; ``workers`` processes are run, each gets these settings.
    jobs : JobQueue
        The listener's queue: its ``wakeup`` is relayed to the workers, and jobs of a
        dead worker are given back through it.
    on_queued : callable
        Called when a worker queued results for sending (wakes the listener's sender).
    on_change : callable, optional
        Called after a worker started, became ready, died or was restarted.
    """

    def __init__(self, settings: Settings, jobs: JobQueue, on_queued: Callable[[], None],
                 on_change: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.on_queued = on_queued
        self.on_change = on_change or (lambda: None)
        self._slots = [_Slot(f"worker-{i}") for i in range(1, settings.workers + 1)]
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._spawn_lock = threading.Lock()
        self._kick = threading.Event()
        self._exits: list[tuple[_Slot, subprocess.Popen[bytes], int]] = []
        self._exits_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tell_lock = threading.Lock()
        self._tell_state = StateLog(LOG, "worker supervisor")
        self._retell_at: float | None = None  # a change not yet told (its telling failed)
        self._queue_state = StateLog(LOG, "worker supervisor")
        self._owed: list[tuple[str, str, bool]] = []  # give-backs the queue refused (disk full)
        self._owed_at = 0.0

    # ----------------------------------------------------------------- listener side
    def start(self) -> None:
        """Start the supervisor thread; it starts the workers (they get ready in seconds)."""
        if not self._slots:
            LOG.warning("workers = 0: no inference worker runs here; jobs stay queued")
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor",
                                        daemon=True)
        self._thread.start()

    def supervising(self) -> bool:
        """True while the supervisor thread runs (what the watchdog asks)."""
        return self._thread is not None and self._thread.is_alive()

    def running(self) -> int:
        """Worker processes alive now."""
        return sum(1 for s in self._slots if s.state in ("starting", "ready"))

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every worker has loaded its pipeline runner; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while any(s.state != "ready" for s in self._slots):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def describe(self) -> list[WorkerInfo]:
        """Each worker: pid, state, the job it runs, restarts, what ended the last one."""
        return [WorkerInfo(name=s.name, pid=s.proc.pid if s.proc and s.state != "restarting" else None,
                           state=s.state, job=s.job, restarts=s.restarts, last_exit=s.last_exit)
                for s in self._slots]

    def set_destinations(self, destinations: Sequence[Destination]) -> None:
        """Give reloaded destinations to every worker (results of later jobs go there)."""
        self.settings = self.settings.replace(destinations=tuple(destinations))
        blob = pack(tuple(destinations))
        for slot in self._slots:
            slot.tell({"op": "destinations", "blob": blob})

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Give reloaded tasks to every worker (later jobs run with their rules and outputs)."""
        self.settings = self.settings.replace(tasks=tuple(tasks))
        blob = pack(tuple(tasks))
        for slot in self._slots:
            slot.tell({"op": "tasks", "blob": blob})

    def set_log_level(self, level: str) -> None:
        """Give a reloaded log level to every worker."""
        self.settings = self.settings.replace(log_level=level)
        for slot in self._slots:
            slot.tell({"op": "log_level", "level": level})

    def stopping(self) -> None:
        """The node is stopping (its signal handler): a worker that dies from now on went
        with it (a SIGTERM to the whole process group), and is neither a death nor
        restarted. Safe in a signal handler."""
        self._stopping.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop every worker: a job still running after ``grace_s`` goes back to the queue
        (its attempt not counted); a worker that does not exit is killed."""
        with self._spawn_lock:  # no restart from here on
            self._stopping.set()
        for slot in self._slots:
            if slot.state == "ready":
                slot.tell({"op": "stop", "grace_s": grace_s})
            elif slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()  # still loading: it holds no job
        deadline = time.monotonic() + grace_s + 10.0
        for slot in self._slots:
            proc = slot.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.error("%s did not stop; killing it", slot.owner)
                proc.kill()
                proc.wait()
        # Only now may the supervisor thread end: a worker's PR_SET_PDEATHSIG fires when
        # the thread that started it ends, which would cut the grace short.
        self._done.set()
        if self._thread is not None:
            self._kick.set()
            self._thread.join(10.0)
        for slot in self._slots:  # exits the supervisor had no time for
            if slot.proc is not None:  # (a full disk: said once; the next start requeues it)
                self._give_back(slot.owner, f"interrupted ({slot.name} stopped with the node)",
                                count_attempt=False)
            if slot.sock is not None:
                slot.sock.close()
            slot.state, slot.job = "stopped", None

    # ----------------------------------------------------------------- supervisor thread
    def _supervise(self) -> None:
        # Workers are started from this thread, which lives until they have stopped: their
        # PR_SET_PDEATHSIG is tied to the thread that started them.
        with self._spawn_lock:
            if not self._stopping.is_set():
                for slot in self._slots:
                    self._spawn(slot)
        while not self._done.is_set():
            self._kick.wait(_TICK_S)
            self._kick.clear()
            try:
                self._handle_exits()
                if self._stopping.is_set():
                    continue
                if self.jobs.wakeup.is_set():
                    self.jobs.wakeup.clear()
                    for slot in self._slots:
                        slot.tell({"op": "wake"})
                now = time.monotonic()
                if self._retell_at is not None and now >= self._retell_at:
                    self._changed()
                with self._spawn_lock:
                    for slot in self._slots:
                        if (not self._stopping.is_set() and slot.restart_at is not None
                                and now >= slot.restart_at):
                            slot.restart_at = None
                            slot.restarts += 1
                            self._spawn(slot)
            except Exception:  # the supervisor must outlive any one failure
                LOG.exception("worker supervisor: pass failed; trying again shortly")

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = socket.socketpair()
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.runtime.worker_process", str(theirs.fileno()),
                 str(os.getpid()), slot.name],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            ours.close()
            LOG.error("%s could not be started (%s); trying again in %.0f s", slot.name, exc,
                      slot.backoff_s)
            self._schedule_restart(slot)
            return
        finally:
            theirs.close()
        slot.proc, slot.sock, slot.state, slot.job = proc, ours, "starting", None
        slot.started = time.monotonic()
        send_message(ours, slot.lock, {"op": "settings", "blob": pack(self.settings)})
        threading.Thread(target=self._read, args=(slot, proc, ours), name=f"{slot.name}-reader",
                         daemon=True).start()
        LOG.info("%s started (pid %d), loading the pipeline runner", slot.name, proc.pid)
        self._changed()

    def _changed(self) -> None:
        """Tell ``on_change`` (the listener writes ``serve.json``). A failure (the disk
        full) is one journal line, not the end of the calling thread; the supervisor
        tries again every :data:`RETELL_S` seconds until it works (one line then too)."""
        with self._tell_lock:
            try:
                self.on_change()
            except Exception as exc:  # noqa: BLE001 - every caller must live on
                self._retell_at = time.monotonic() + RETELL_S
                self._tell_state.failed(exc, "could not record the workers' state (serve.json)")
                return
            self._retell_at = None
            self._tell_state.ok()

    def _read(self, slot: _Slot, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        """The reader thread of one worker: its messages, then its exit, always reported
        (an exit that is never reported is a worker never reaped nor restarted)."""
        try:
            for message in read_messages(sock):
                try:
                    self._on_message(slot, message)
                except Exception:  # noqa: BLE001 - a bad message must not end the reader
                    LOG.exception("%s: message %r not handled", slot.name, message.get("op"))
        finally:
            code = proc.wait()
            with self._exits_lock:
                self._exits.append((slot, proc, code))
            self._kick.set()

    def _on_message(self, slot: _Slot, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "queued":
            self.on_queued()
        elif op == "job":
            slot.job = int(message["id"])
            self._changed()
        elif op == "idle":
            slot.job = None
            self._changed()
        elif op == "ready":
            slot.state = "ready"
            self._changed()

    def _handle_exits(self) -> None:
        with self._exits_lock:
            exits, self._exits = self._exits, []
        for slot, proc, code in exits:
            if proc is slot.proc:
                self._reap(slot, proc, code)
        if self._owed and time.monotonic() >= self._owed_at:
            owed, self._owed = self._owed, []
            for owner, reason, count in owed:
                self._log_given(self._give_back(owner, reason, count_attempt=count) or [])

    def _reap(self, slot: _Slot, proc: subprocess.Popen[bytes], code: int) -> None:
        """A worker process ended: give back its job, say so, schedule its restart."""
        how = describe_exit(code)
        owner = slot.owner
        if slot.sock is not None:
            slot.sock.close()
            slot.sock = None
        when = utc_now().isoformat(timespec="seconds")
        if self._stopping.is_set():
            self._give_back(owner, f"interrupted ({slot.name} stopped with the node)",
                            count_attempt=False)
            slot.state, slot.job = "stopped", None
            return
        given = self._give_back(owner, f"interrupted: {slot.name} (pid {proc.pid}) died ({how})")
        was = ("before it was ready" if slot.state == "starting" else
               "(a job it ran is given back once the queue can be written)" if given is None
               else f"during job {', '.join(str(j.id) for j in given)}" if given else "while idle")
        slot.last_exit = f"{how} {was}, at {when}"
        slot.state, slot.job = "restarting", None
        if time.monotonic() - slot.started >= STABLE_AFTER_S:
            slot.backoff_s = RESTART_INITIAL_S
        LOG.warning("%s (pid %d) died: %s %s; restarting it in %.0f s (restart %d)", slot.name,
                    proc.pid, how, was, slot.backoff_s, slot.restarts + 1)
        self._log_given(given or [])
        self._schedule_restart(slot)
        self._changed()

    def _give_back(self, owner: str, reason: str, *,
                   count_attempt: bool = True) -> list[Job] | None:
        """:meth:`JobQueue.give_back`; None when the queue cannot be written now (the disk
        full): said once, and tried again every :data:`RETELL_S` seconds (the dead
        worker's job stays ``running`` meanwhile, so no other worker takes it)."""
        try:
            given = self.jobs.give_back(owner, reason, count_attempt=count_attempt)
        except Exception as exc:  # noqa: BLE001 - the restart must not wait for the queue
            self._owed.append((owner, reason, count_attempt))
            self._owed_at = time.monotonic() + RETELL_S
            self._queue_state.failed(exc, f"could not give back the job of {owner}")
            return None
        self._queue_state.ok()
        return given

    @staticmethod
    def _log_given(given: Sequence[Job]) -> None:
        for job in given:
            if job.state.value == "failed":
                LOG.error("job %d failed, not retried: %s", job.id, job.error)
            else:
                LOG.warning("job %d is back in the queue (attempt %d of %d used)", job.id,
                            job.attempts, job.max_attempts)

    def _schedule_restart(self, slot: _Slot) -> None:
        slot.state = "restarting"
        slot.restart_at = time.monotonic() + slot.backoff_s
        slot.backoff_s = min(RESTART_MAX_S, slot.backoff_s * 2)
