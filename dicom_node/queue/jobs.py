"""The durable inference job queue, in ``<data-dir>/queue.sqlite``.

A job is "run the matching pipeline on this series as it stood at this moment"
(``series_uid`` plus the series' ``last_received`` when it went quiet). A job of kind
``priors`` (:class:`JobKind`, migration 7) is "look for this new study's priors for this
task" instead, queued once per study and task as its first instance is filed
(:meth:`JobQueue.enqueue_priors`; issue 26). Jobs live in
SQLite, so they survive a restart; a job is claimed by one worker at a time
(``BEGIN IMMEDIATE``), runs once, is retried a bounded number of times with a delay
after a failure and then stays visible as ``failed`` with its reason.

A job whose task has no active model for the series' scanner is not a failure: it is
``waiting`` (its scanner recorded, the attempt not counted) until a model becomes
active for it (:meth:`JobQueue.release_waiting`) or the series is older than
``waiting_for_model_max_age_h`` (:meth:`JobQueue.expire_waiting`).

Jobs are run by worker processes (:mod:`dicom_node.runtime.supervisor`). A claim records which
worker took the job (``jobs.worker``, e.g. ``worker-2 pid 4242``), in the same
transaction that marks it running, so two workers never run one job. A worker that dies
mid-job gives its job back (:meth:`JobQueue.give_back`, called by the supervisor that
saw it die); a job found ``running`` when the node starts was interrupted by a crash
(SIGKILL, power loss): :meth:`JobQueue.recover` puts it back in the queue, and that
attempt does not count as a failed one (the job did not fail; the process was stopped).
A job that fails for lack of disk space is not failed either: :meth:`JobQueue.wait_for_space`
queues it again after :data:`SPACE_RETRY_S`, without counting the attempt, for as
long as the disk stays full, so it resumes by itself once space is freed (a job whose
inference has already run is not given back: its worker keeps it and the computed work,
and stores it once space is back; :mod:`dicom_node.runtime.worker`). The worker
makes a re-run harmless: a result is recorded under the job's key once (see
:mod:`twin_archive.results`).

The same database file holds the send queue (:mod:`dicom_node.queue.sender`) and the
stability monitor's memory (:mod:`dicom_node.queue.monitor`); its schema is applied here as
numbered migrations.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path

import sqlite_utils

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import Migration, connect, migrate, open_existing, write
from dicom_node.queue.durable_queue import DurableQueue
from twin_archive.retention import SettledSeries

LOG = logging.getLogger(__name__)

QUEUE_DB_NAME = "queue.sqlite"
#: Attempts of one job before it is left ``failed``.
DEFAULT_MAX_ATTEMPTS = 3
#: Delay before a failed job is tried again, seconds (doubled per attempt).
RETRY_DELAY_S = 5.0
#: Delay before a job that found the disk full is tried again, seconds (not an attempt).
SPACE_RETRY_S = 10.0
#: ``error`` of a job waiting for disk space starts with this.
WAITING_FOR_SPACE = "waiting for disk space"


# ----------------------------------------------------------------------- database
def _q1(db: sqlite_utils.Database) -> None:
    conn = db.conn
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL,"
        " study_uid TEXT NOT NULL, patient_key TEXT NOT NULL, task TEXT NOT NULL,"
        " series_last_received TEXT NOT NULL, instances INTEGER NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " max_attempts INTEGER NOT NULL, enqueued_at TEXT NOT NULL,"
        " not_before TEXT NOT NULL, started_at TEXT, finished_at TEXT,"
        " error TEXT NOT NULL DEFAULT '', result_id INTEGER,"
        " UNIQUE (series_uid, task, series_last_received))"
    )
    conn.execute("CREATE INDEX jobs_state ON jobs (state, not_before)")
    conn.execute(
        "CREATE TABLE sends (id INTEGER PRIMARY KEY, result_id INTEGER NOT NULL,"
        " kind TEXT NOT NULL, destination TEXT NOT NULL, ae_title TEXT NOT NULL,"
        " host TEXT NOT NULL, port INTEGER NOT NULL, path TEXT NOT NULL,"
        " sop_class_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,"
        " transfer_syntax_uid TEXT NOT NULL, state TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, enqueued_at TEXT NOT NULL,"
        " next_attempt_at TEXT NOT NULL, sent_at TEXT, last_error TEXT NOT NULL DEFAULT '',"
        " UNIQUE (sop_instance_uid, destination))"
    )
    conn.execute("CREATE INDEX sends_due ON sends (state, next_attempt_at)")
    conn.execute(
        "CREATE TABLE monitored_series (series_uid TEXT PRIMARY KEY,"
        " last_received TEXT NOT NULL, decision TEXT NOT NULL, reason TEXT NOT NULL,"
        " decided_at TEXT NOT NULL)"
    )


def _q2(db: sqlite_utils.Database) -> None:
    # The destination's transfer syntaxes (UIDs, most preferred first) at enqueue time;
    # '' for rows queued before: they are sent in the syntax they are stored in.
    db.execute("ALTER TABLE sends ADD COLUMN accept_syntaxes TEXT NOT NULL DEFAULT ''")


def _q3(db: sqlite_utils.Database) -> None:
    conn = db.conn
    # Jobs waiting for a model: the scanner of the series (to ask the registry whether a
    # model now serves it without reading the files again); '' for rows before.
    conn.execute("ALTER TABLE jobs ADD COLUMN manufacturer TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE jobs ADD COLUMN scanner_model TEXT NOT NULL DEFAULT ''")
    # Who claimed the job (the worker process, "worker-2 pid 4242"); '' before.
    conn.execute("ALTER TABLE jobs ADD COLUMN worker TEXT NOT NULL DEFAULT ''")


def _q4(db: sqlite_utils.Database) -> None:
    # Retention (dicom_node.runtime.retention) joins a series' jobs with their sends.
    db.execute("CREATE INDEX sends_result ON sends (result_id)")


def _q5_confirmed_delivery(db: sqlite_utils.Database) -> None:
    conn = db.conn
    # DICOMweb destinations (issue 25): the STOW-RS base; '' for a DIMSE destination.
    conn.execute("ALTER TABLE sends ADD COLUMN url TEXT NOT NULL DEFAULT ''")
    # Confirmed delivery: how ('commitment', 'read-back', 'none'; 'none' for rows before),
    # until when a sent row waits for its confirmation (NULL: it waits for none), when it
    # came, the Storage Commitment Transaction UID of the last request, and how many
    # times the row was sent again for want of a confirmation.
    conn.execute("ALTER TABLE sends ADD COLUMN confirm TEXT NOT NULL DEFAULT 'none'")
    conn.execute("ALTER TABLE sends ADD COLUMN confirm_by TEXT")
    conn.execute("ALTER TABLE sends ADD COLUMN confirmed_at TEXT")
    conn.execute("ALTER TABLE sends ADD COLUMN commitment_uid TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE sends ADD COLUMN resends INTEGER NOT NULL DEFAULT 0")
    conn.execute("CREATE INDEX sends_awaiting ON sends (confirm_by) WHERE confirm_by IS NOT NULL")
    conn.execute("CREATE INDEX sends_commitment ON sends (commitment_uid) WHERE commitment_uid != ''")


def _q6_completeness(db: sqlite_utils.Database) -> None:
    conn = db.conn
    # MPPS steps (dicom_node.queue.mpps): their status, and what a COMPLETED one lists.
    # resolved: '' (open), 'complete' (its series complete at once), 'fallback' (listed
    # instances never came: the quiet period decided), 'discontinued'.
    conn.execute(
        "CREATE TABLE mpps_steps (step_uid TEXT PRIMARY KEY, status TEXT NOT NULL,"
        " calling_ae TEXT NOT NULL, station TEXT NOT NULL DEFAULT '', study_uid TEXT NOT NULL"
        " DEFAULT '', created_at TEXT NOT NULL, updated_at TEXT NOT NULL,"
        " resolved TEXT NOT NULL DEFAULT '')")
    conn.execute("CREATE INDEX mpps_steps_open ON mpps_steps (status, resolved)")
    conn.execute(
        "CREATE TABLE mpps_series (step_uid TEXT NOT NULL REFERENCES mpps_steps(step_uid),"
        " series_uid TEXT NOT NULL, listed INTEGER NOT NULL, PRIMARY KEY (step_uid, series_uid))")
    conn.execute("CREATE INDEX mpps_series_series ON mpps_series (series_uid)")
    conn.execute(
        "CREATE TABLE mpps_instances (step_uid TEXT NOT NULL REFERENCES mpps_steps(step_uid),"
        " series_uid TEXT NOT NULL, sop_instance_uid TEXT NOT NULL,"
        " PRIMARY KEY (step_uid, sop_instance_uid))")
    # MPPS messages to pass on to the PACS (forward_mpps), in the order received.
    conn.execute(
        "CREATE TABLE mpps_forwards (id INTEGER PRIMARY KEY, step_uid TEXT NOT NULL,"
        " kind TEXT NOT NULL, dataset BLOB NOT NULL, destination TEXT NOT NULL,"
        " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " next_attempt_at TEXT NOT NULL, sent_at TEXT, last_error TEXT NOT NULL DEFAULT '')")
    conn.execute("CREATE INDEX mpps_forwards_due ON mpps_forwards (state, id)")
    # Learned completeness (dicom_node.queue.completeness): each decided series' size per
    # scanner and protocol, and per scanner how often an early completion was re-opened.
    conn.execute(
        "CREATE TABLE series_sizes (series_uid TEXT PRIMARY KEY, scanner TEXT NOT NULL,"
        " protocol TEXT NOT NULL, instances INTEGER NOT NULL, decided_at TEXT NOT NULL)")
    conn.execute("CREATE INDEX series_sizes_key ON series_sizes (scanner, protocol, decided_at)")
    conn.execute(
        "CREATE TABLE scanner_completeness (scanner TEXT PRIMARY KEY,"
        " early INTEGER NOT NULL DEFAULT 0, reopened INTEGER NOT NULL DEFAULT 0,"
        " last_reopened_at TEXT, early_start INTEGER NOT NULL DEFAULT 1)")
    # How the series' decision came: 'quiet', 'mpps', 'learned' or 'declared'.
    conn.execute("ALTER TABLE monitored_series ADD COLUMN completed_by TEXT NOT NULL"
                 " DEFAULT 'quiet'")
    conn.execute("ALTER TABLE monitored_series ADD COLUMN scanner TEXT NOT NULL DEFAULT ''")


def _q7_priors_jobs(db: sqlite_utils.Database) -> None:
    # What a job does (JobKind): 'series' (the pipeline on a series that went quiet;
    # every row before) or 'priors' (look for a new study's priors as soon as its first
    # instance is filed, issue 26); one 'priors' job per study and task.
    db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'series'")
    db.execute("CREATE INDEX jobs_priors ON jobs (study_uid, task) WHERE kind = 'priors'")


QUEUE_MIGRATIONS: tuple[Migration, ...] = (_q1, _q2, _q3, _q4, _q5_confirmed_delivery,
                                           _q6_completeness, _q7_priors_jobs)


def connect_queue(data_dir: Path | str, *, timeout_s: float = 30.0) -> sqlite_utils.Database:
    """Open ``<data_dir>/queue.sqlite`` (:func:`dicom_node.foundation.database.connect`) and migrate it.

    Every write goes through :func:`dicom_node.foundation.database.write`.
    """
    path = Path(data_dir) / QUEUE_DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    db = connect(path, timeout_s=timeout_s)
    migrate(db, QUEUE_MIGRATIONS, name="queue database")
    return db


def _erase_completeness(conn: sqlite3.Connection, series_uids: Sequence[str],
                       study_uids: Sequence[str], patient_id: str) -> int:
    """Delete what completeness keeps of a patient: the learned sizes of its series, and
    every MPPS step that lists one of them, names one of its studies, or whose message
    still queued for the PACS carries its Patient ID (a step IN PROGRESS lists no series
    yet), with the step's messages queued or sent (they carry the patient's name and
    ID). Inside the erasure's transaction; returns the rows deleted."""
    steps: set[str] = set()
    n = 0
    for uid in series_uids:
        steps.update(r[0] for r in conn.execute(
            "SELECT step_uid FROM mpps_series WHERE series_uid = ?", (uid,)))
        n += conn.execute("DELETE FROM series_sizes WHERE series_uid = ?", (uid,)).rowcount
    for uid in study_uids:
        steps.update(r[0] for r in conn.execute(
            "SELECT step_uid FROM mpps_steps WHERE study_uid = ?", (uid,)))
    if patient_id:
        for step, raw in conn.execute("SELECT step_uid, dataset FROM mpps_forwards"
                                      " WHERE length(dataset) > 0"):
            if _names_patient(raw, patient_id):
                steps.add(step)
    for step in steps:
        for table in ("mpps_forwards", "mpps_instances", "mpps_series", "mpps_steps"):
            n += conn.execute(f"DELETE FROM {table} WHERE step_uid = ?", (step,)).rowcount  # noqa: S608
    return n


def _names_patient(raw: bytes, patient_id: str) -> bool:
    """Whether an MPPS message kept for the PACS (explicit VR little endian, as
    :mod:`dicom_node.queue.mpps_handlers` encodes it and :mod:`~dicom_node.queue.mpps_forward`
    reads it) has this Patient ID; one that cannot be read counts when its bytes hold the ID."""
    from pynetdicom.dsutils import decode

    try:
        return str(decode(BytesIO(raw), False, True).get("PatientID", "") or "").strip() \
            == patient_id
    except Exception:  # noqa: BLE001 - unreadable: judged by its bytes
        return patient_id.encode("utf-8", "surrogateescape") in raw


# ----------------------------------------------------------------------- settled
_SETTLED_SQL = """
SELECT m.series_uid, m.last_received, m.decision, m.decided_at,
       COUNT(DISTINCT j.id) AS n, MAX(j.state NOT IN ('done', 'failed')) AS open,
       MAX(j.finished_at) AS finished, group_concat(DISTINCT j.task) AS tasks,
       (SELECT MAX(s.state = 'queued' OR s.confirm_by IS NOT NULL) FROM jobs a
        JOIN sends s ON s.result_id = a.result_id WHERE a.series_uid = m.series_uid) AS open_sends,
       (SELECT MAX(COALESCE(s.confirmed_at, s.sent_at, s.next_attempt_at)) FROM jobs a
        JOIN sends s ON s.result_id = a.result_id WHERE a.series_uid = m.series_uid)
         AS sends_settled
FROM monitored_series m
LEFT JOIN jobs j ON j.series_uid = m.series_uid AND j.series_last_received = m.last_received
WHERE m.decision IN ('queued', 'ignored', 'no-pipeline')
GROUP BY m.series_uid
"""
# The sends are those of every job of the series, also of its earlier states (a series
# re-opened by a late instance): result retention removes the files they send.


def settled_series(data_dir: Path | str) -> list[SettledSeries]:
    """The series whose purpose is served, from ``queue.sqlite`` (read only).

    The monitor decided on the series as it now stands, and either it needed no job
    (``ignored``, ``no-pipeline``) or every job of that state is ``done`` or ``failed``
    and every send of the results of the series (of earlier states too) ``sent`` (and
    not waiting for its confirmation),
    ``confirmed``, ``failed`` (given up) or ``held``; settled
    at the latest of the decision, the jobs' end and the sends' last attempt
    (retention counts from there, :mod:`dicom_node.runtime.retention`).
    """
    conn = open_queue_readonly(data_dir)
    if conn is None:
        return []
    out = []
    with contextlib.closing(conn):
        for r in conn.execute(_SETTLED_SQL):
            if r["open_sends"]:
                continue
            if r["decision"] == "queued":
                if not r["n"] or r["open"]:
                    continue
                at = max(x for x in (r["decided_at"], r["finished"], r["sends_settled"]) if x)
                tasks = tuple(sorted((r["tasks"] or "").split(","))) if r["tasks"] else ()
            else:
                at, tasks = r["decided_at"], ()
            out.append(SettledSeries(series_uid=r["series_uid"], last_received=r["last_received"],
                                     settled_at=at, tasks=tasks))
    return out



# ----------------------------------------------------------------------- jobs
def open_queue_readonly(data_dir: Path | str) -> sqlite3.Connection | None:
    """A read-only connection to ``<data_dir>/queue.sqlite``, or None when there is none
    or it has no queue tables yet (nothing is created)."""
    return open_existing(Path(data_dir) / QUEUE_DB_NAME, "jobs")


@dataclass(frozen=True, kw_only=True, slots=True)
class WaitingJob:
    """A queued job that waits for something outside it (a model, disk space)."""

    id: int
    reason: str
    not_before: str  # ISO 8601 UTC: its next try


@dataclass(frozen=True, kw_only=True, slots=True)
class JobCounts:
    """How many jobs are in each state, and which queued ones wait."""

    by_state: dict[str, int]
    waiting: tuple[WaitingJob, ...]


def read_job_counts(data_dir: Path | str) -> JobCounts:
    """The jobs of ``<data_dir>/queue.sqlite`` counted, read only (the node need not
    run; no queue counts as empty)."""
    conn = open_queue_readonly(data_dir)
    if conn is None:
        return JobCounts(by_state={}, waiting=())
    with contextlib.closing(conn):
        by_state = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        waiting = tuple(WaitingJob(id=i, reason=reason, not_before=nb) for i, reason, nb in
                        conn.execute("SELECT id, error, not_before FROM jobs WHERE state = ?"
                                     " AND error LIKE 'waiting for %' ORDER BY id",
                                     (JobState.QUEUED.value,)))
    return JobCounts(by_state=by_state, waiting=waiting)


class JobState(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # for an active model of its task (not a failure)
    DONE = "done"
    FAILED = "failed"


class JobKind(str, enum.Enum):
    """What a job does."""

    SERIES = "series"  # the task's pipeline on a series that went quiet
    PRIORS = "priors"  # look for a new study's priors (retrieve, measure) while it arrives


#: ``series_last_received`` of a priors job (its series has not gone quiet: it is
#: the study's first series, named for its files' headers).
PRIORS_MARK = "priors"


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One job as stored in the queue (an inference job unless ``kind`` says otherwise)."""

    id: int
    series_uid: str
    study_uid: str
    patient_key: str
    task: str
    series_last_received: str
    instances: int
    state: JobState
    attempts: int
    max_attempts: int
    enqueued_at: str
    started_at: str
    finished_at: str
    error: str
    result_id: int | None
    manufacturer: str = ""
    scanner_model: str = ""
    worker: str = ""
    kind: JobKind = JobKind.SERIES

    @property
    def key(self) -> str:
        """Identity of the job's input: the series as it stood when it went quiet."""
        return f"{self.series_uid}@{self.series_last_received}/{self.task}"

    @staticmethod
    def from_row(r: sqlite3.Row) -> Job:
        return Job(
            id=r["id"], series_uid=r["series_uid"], study_uid=r["study_uid"],
            patient_key=r["patient_key"], task=r["task"],
            series_last_received=r["series_last_received"], instances=r["instances"],
            state=JobState(r["state"]), attempts=r["attempts"], max_attempts=r["max_attempts"],
            enqueued_at=r["enqueued_at"], started_at=r["started_at"] or "",
            finished_at=r["finished_at"] or "", error=r["error"] or "", result_id=r["result_id"],
            manufacturer=r["manufacturer"], scanner_model=r["scanner_model"],
            worker=r["worker"], kind=JobKind(r["kind"]),
        )


class JobQueue(DurableQueue):
    """The inference jobs of one node.

    Thread-safe (one connection, one lock); several processes may share the file.

    Parameters
    ----------
    data_dir : pathlib.Path or str
        The node's data directory (the queue is ``queue.sqlite`` in it).
    max_attempts : int
        Attempts of a job before it is left failed (>= 1).
    retry_delay_s : float
        Delay before the second attempt, seconds; doubled for each further attempt.
    worker : str
        The worker process that claims through this queue (recorded with each claim;
        ``''`` where nothing is claimed, e.g. in the listener).
    """

    table = "jobs"

    def __init__(self, data_dir: Path | str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 retry_delay_s: float = RETRY_DELAY_S, worker: str = "") -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if retry_delay_s < 0:
            raise ValueError(f"retry_delay_s must be >= 0, got {retry_delay_s}")
        super().__init__(connect_queue(data_dir))
        self.max_attempts = max_attempts
        self.retry_delay_s = retry_delay_s
        self.worker = worker

    def enqueue(self, *, series_uid: str, study_uid: str, patient_key: str, task: str,
                series_last_received: str, instances: int) -> Job | None:
        """Queue a job for a series that went quiet; ``None`` if that job already exists."""
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, study_uid, patient_key, task,"
                " series_last_received, instances, state, max_attempts, enqueued_at, not_before)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (series_uid, study_uid, patient_key, task, series_last_received, instances,
                 JobState.QUEUED.value, self.max_attempts, now, now),
            )
            if cur.rowcount == 0:
                return None
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
        self.wakeup.set()
        return Job.from_row(row)

    def enqueue_priors(self, *, series_uid: str, study_uid: str, patient_key: str,
                       task: str) -> Job | None:
        """Queue the look for priors of a new study for ``task`` (its first series:
        ``series_uid``); ``None`` when the study already has one (once per study and
        task, whatever restarts come between)."""
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE kind = ? AND study_uid = ? AND task = ?",
                            (JobKind.PRIORS.value, study_uid, task)).fetchone() is not None:
                return None
            cur = conn.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, study_uid, patient_key, task,"
                " series_last_received, instances, state, max_attempts, enqueued_at, not_before,"
                " kind) VALUES (?,?,?,?,?,0,?,?,?,?,?)",
                (series_uid, study_uid, patient_key, task, PRIORS_MARK, JobState.QUEUED.value,
                 self.max_attempts, now, now, JobKind.PRIORS.value))
            if cur.rowcount == 0:
                return None
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone()
        self.wakeup.set()
        return Job.from_row(row)

    def priors_job(self, study_uid: str, task: str) -> Job | None:
        """The look for priors of a study for ``task``, if one was queued."""
        with self._lock:
            row = self.conn.execute("SELECT * FROM jobs WHERE kind = ? AND study_uid = ? AND"
                                    " task = ?", (JobKind.PRIORS.value, study_uid, task)).fetchone()
        return None if row is None else Job.from_row(row)

    def take(self, job_id: int) -> Job | None:
        """Claim one queued job by its id, due or not (a job that needs it now runs it
        itself); ``None`` when it is not queued any more."""
        with self._lock, write(self.db) as conn:
            n = conn.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, worker = ?"
                " WHERE id = ? AND state = ?", (JobState.RUNNING.value, iso(utc_now()),
                                                self.worker, job_id, JobState.QUEUED.value)
            ).rowcount
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if n else None

    def claim(self) -> Job | None:
        """Take the oldest due queued job for this worker (marks it running), or ``None``."""
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND not_before <= ? ORDER BY id LIMIT 1",
                (JobState.QUEUED.value, now),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, worker = ?"
                " WHERE id = ?", (JobState.RUNNING.value, now, self.worker, row["id"]),
            )
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return Job.from_row(row)

    def complete(self, job_id: int, *, result_id: int | None, note: str = "") -> None:
        """Mark a job done (``result_id`` of what it produced, ``note`` why none)."""
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, result_id = ?, error = ? WHERE id = ?",
                (JobState.DONE.value, iso(utc_now()), result_id, note, job_id),
            )

    def fail(self, job_id: int, reason: str, *, permanent: bool = False) -> JobState:
        """Record a failed attempt; re-queue with a delay or leave failed. Returns the new state."""
        with self._lock, write(self.db) as conn:
            row = conn.execute("SELECT attempts, max_attempts FROM jobs WHERE id = ?",
                               (job_id,)).fetchone()
            attempts, limit = row["attempts"], row["max_attempts"]
            if permanent or attempts >= limit:
                state = JobState.FAILED
                conn.execute(
                    "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                    (state.value, iso(utc_now()), reason, job_id),
                )
            else:
                state = JobState.QUEUED
                delay = self.retry_delay_s * (2 ** max(0, attempts - 1))
                conn.execute(
                    "UPDATE jobs SET state = ?, not_before = ?, error = ? WHERE id = ?",
                    (state.value, iso(utc_now() + timedelta(seconds=delay)), reason, job_id),
                )
        return state

    def postpone(self, job_id: int, reason: str, *, delay_s: float) -> None:
        """Give a claimed job back to wait ``delay_s`` seconds for something outside it
        (the Triton server, its model); the attempt is not counted. ``reason`` stays on
        the job (``dicom-node status`` shows it) until it runs again."""
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), not_before = ?,"
                " error = ? WHERE id = ? AND state = ?",
                (JobState.QUEUED.value, iso(utc_now() + timedelta(seconds=delay_s)), reason,
                 job_id, JobState.RUNNING.value),
            )

    def waiting(self) -> list[Job]:
        """Queued jobs that wait for something outside them (see :meth:`postpone`)."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND error LIKE 'waiting for %' ORDER BY id",
                (JobState.QUEUED.value,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def wait_for_model(self, job_id: int, reason: str, *, manufacturer: str,
                       scanner_model: str) -> None:
        """Park a claimed job until a model serves its task for that scanner.

        The attempt is not counted (nothing failed); ``reason`` says what to do.
        """
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), error = ?,"
                " manufacturer = ?, scanner_model = ? WHERE id = ?",
                (JobState.WAITING.value, reason, manufacturer, scanner_model, job_id),
            )

    def waiting_scanners(self) -> list[tuple[str, str, str]]:
        """Distinct (task, manufacturer, scanner model) of the jobs waiting for a model."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT DISTINCT task, manufacturer, scanner_model FROM jobs WHERE state = ?"
                " ORDER BY task, manufacturer, scanner_model", (JobState.WAITING.value,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def release_waiting(self, task: str, manufacturer: str, scanner_model: str, *,
                        received_after: datetime) -> list[Job]:
        """Queue the jobs of ``task`` waiting for a model for that scanner whose series
        was received after ``received_after`` (older ones stay for :meth:`expire_waiting`).

        Returns the jobs queued again.
        """
        now = iso(utc_now())
        with self._lock, write(self.db) as conn:
            rows = conn.execute(
                "SELECT id FROM jobs WHERE state = ? AND task = ? AND manufacturer = ?"
                " AND scanner_model = ? AND series_last_received >= ? ORDER BY id",
                (JobState.WAITING.value, task, manufacturer, scanner_model,
                 iso(received_after))).fetchall()
            ids = [r[0] for r in rows]
            conn.executemany(
                "UPDATE jobs SET state = ?, not_before = ?, error = 'a model became active'"
                " WHERE id = ?", [(JobState.QUEUED.value, now, i) for i in ids])
            jobs = [Job.from_row(r) for r in conn.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
                ids).fetchall()] if ids else []
        if jobs:
            self.wakeup.set()
        return jobs

    def expire_waiting(self, *, received_before: datetime, max_age_h: float) -> list[Job]:
        """Leave failed the jobs still waiting for a model whose series was received
        before ``received_before`` (``max_age_h`` is named in the reason)."""
        with self._lock, write(self.db) as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE state = ? AND series_last_received < ? ORDER BY id",
                (JobState.WAITING.value, iso(received_before))).fetchall()
            now = iso(utc_now())
            conn.executemany(
                "UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                [(JobState.FAILED.value, now,
                  f"no model for task {r['task']!r} became active within {max_age_h:g} h of the "
                  f"series' arrival (waiting_for_model_max_age_h); not run: {r['error']}", r["id"])
                 for r in rows])
        return [Job.from_row(r) for r in rows]

    def for_series(self, series_uids: list[str] | tuple[str, ...]) -> list[Job]:
        """The jobs of these series, newest first."""
        if not series_uids:
            return []
        with self._lock:
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE series_uid IN ({','.join('?' * len(series_uids))})"
                " ORDER BY id DESC", tuple(series_uids)).fetchall()
        return [Job.from_row(r) for r in rows]

    def running_for_patient(self, patient_keys: list[str]) -> list[Job]:
        """The jobs of these twins that a worker is running now."""
        marks = ",".join("?" * len(patient_keys))
        with self._lock:
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE state = ? AND patient_key IN ({marks})",  # noqa: S608
                (JobState.RUNNING.value, *patient_keys)).fetchall()
        return [Job.from_row(r) for r in rows]

    def erase_patient(self, patient_keys: list[str], series_uids: Sequence[str], *,
                      study_uids: Sequence[str] = (), result_ids: Sequence[int] = (),
                      patient_id: str = "") -> int:
        """Delete every row naming these twins (their jobs, the sends of their results,
        the monitor's decisions on their series, what completeness keeps of them: see
        :func:`_erase_completeness`) in one transaction, then truncate the WAL (twin
        erasure); return how many rows went. ``result_ids`` are the twins' results (a
        prior's result may be queued before its series has a job). Running jobs are not
        touched: the caller refuses while there are any (:meth:`running_for_patient`)."""
        from dicom_node.foundation.database import checkpoint_truncate

        marks = ",".join("?" * len(patient_keys))
        n = 0
        with self._lock:
            with write(self.db) as conn:
                n += conn.execute(
                    "DELETE FROM sends WHERE result_id IN (SELECT result_id FROM jobs WHERE"
                    f" patient_key IN ({marks}) AND result_id IS NOT NULL)",  # noqa: S608
                    patient_keys).rowcount
                for rid in result_ids:
                    n += conn.execute("DELETE FROM sends WHERE result_id = ?", (rid,)).rowcount
                n += conn.execute(f"DELETE FROM jobs WHERE patient_key IN ({marks})"  # noqa: S608
                                  " AND state <> ?", (*patient_keys, JobState.RUNNING.value)).rowcount
                for uid in series_uids:
                    n += conn.execute("DELETE FROM monitored_series WHERE series_uid = ?",
                                      (uid,)).rowcount
                n += _erase_completeness(conn, series_uids, study_uids, patient_id)
            if not checkpoint_truncate(self.db):
                LOG.warning("job queue: the WAL could not be truncated after the erasure (a "
                            "reader kept it busy); it is at the next checkpoint")
        return n

    def wait_for_space(self, job_id: int, reason: str, *,
                       delay_s: float = SPACE_RETRY_S) -> None:
        """The job failed for lack of disk space: queue it again after ``delay_s``
        without counting the attempt (it waits for space, it never fails for it)."""
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), not_before = ?,"
                " error = ? WHERE id = ? AND state = ?",
                (JobState.QUEUED.value, iso(utc_now() + timedelta(seconds=delay_s)),
                 f"{WAITING_FOR_SPACE}: {reason}", job_id, JobState.RUNNING.value),
            )

    def recover(self) -> int:
        """Put jobs left ``running`` by a crash back in the queue; return how many.

        The interrupted attempt is not counted: a killed process is not a failed job.
        """
        with self._lock, write(self.db) as conn:
            n = conn.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0),"
                " error = 'interrupted (node stopped during the job)'"
                " WHERE state = ?", (JobState.QUEUED.value, JobState.RUNNING.value),
            ).rowcount
        if n:
            LOG.warning("job queue: %d job(s) interrupted by the last stop are queued again", n)
        return n

    def give_back(self, worker: str, reason: str, *, count_attempt: bool = True) -> list[Job]:
        """Put the jobs ``worker`` was running back in the queue (the worker died); return them.

        As :meth:`recover` does, the interrupted attempt counts (``count_attempt``), so a
        job that kills its worker every time is left ``failed`` after its last attempt
        instead of taking workers down for ever; without it (the node stopped the
        worker) the attempt is not counted. One transaction.
        """
        with self._lock, write(self.db) as conn:
            rows = conn.execute("SELECT id, attempts, max_attempts FROM jobs WHERE state = ?"
                                " AND worker = ?", (JobState.RUNNING.value, worker)).fetchall()
            for row in rows:
                if count_attempt and row["attempts"] >= row["max_attempts"]:
                    conn.execute("UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                                 (JobState.FAILED.value, iso(utc_now()),
                                  f"{reason} during each of its {row['attempts']} attempt(s)",
                                  row["id"]))
                else:
                    conn.execute("UPDATE jobs SET state = ?, error = ?, attempts = attempts - ?"
                                  " WHERE id = ?", (JobState.QUEUED.value, reason,
                                                    0 if count_attempt else 1, row["id"]))
            given = [Job.from_row(r) for r in conn.execute(
                f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(rows))})",
                [r["id"] for r in rows])] if rows else []
        if given:
            self.wakeup.set()
        return given

    def requeue_running(self, job_id: int) -> None:
        """Give a claimed job back untouched (the node is stopping); its attempt is not counted."""
        with self._lock, write(self.db) as conn:
            conn.execute(
                "UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = ?",
                (JobState.QUEUED.value, job_id, JobState.RUNNING.value),
            )

    def get(self, job_id: int) -> Job:
        """One job by id.

        Raises
        ------
        KeyError
            If there is no such job.
        """
        with self._lock:
            row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        return Job.from_row(row)

    def list(self, state: JobState | str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally only those in ``state``."""
        return [Job.from_row(r) for r in self._rows(
            JobState(state).value if state is not None else None, limit)]

