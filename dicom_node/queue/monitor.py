"""The stability monitor: a complete series becomes a job.

DICOM has no end-of-series message on the C-STORE side. DESIGN decision 3: a series is
complete when an MPPS COMPLETED lists it and all its instances are in
(:mod:`dicom_node.queue.mpps`), or when it reaches the size its scanner and protocol have been
learned to make, after ``guard_s`` without an instance (:mod:`dicom_node.queue.completeness`);
otherwise when no instance of it has arrived for ``stable_after`` seconds. The early
pass (MPPS, sizes) runs every :data:`EARLY_POLL_S` and when an N-SET wakes it; the
quiet pass every ``poll_s``. The archive says when each series' last instance arrived
(:class:`twin_archive.arrivals.Arrivals`); the monitor compares that with what it
already decided for the series (table ``monitored_series`` in ``queue.sqlite``, with how
it was decided: ``completed_by``). A series whose ``last_received`` changed since its
decision (a late instance) is decided again by the quiet period, and its new job's
result supersedes the earlier one; a series completed early and re-opened so is counted
against its scanner.

With ``ask_priors`` the early pass also queues a priors job for each new study, as the
first instance of a series a task's rules would take is filed (:meth:`StabilityMonitor._priors_pass`):
the priors are retrieved and measured while the study arrives and goes quiet.

The first pass looks at every series of the archive; later passes only at those whose
last instance arrived since :data:`LOOKBACK_S` before the previous pass's cutoff (an
instance's arrival time is taken inside its index transaction, so it commits well
within that), and at those the monitor could not read yet. The window is set from the
clock at each pass, so a clock set back costs at most one pass.

Decisions, each logged once per series state:

* ``ignored``: the series is a result or document object (SEG, SR, KO, PR,
  secondary capture...) from anywhere, or the node's own output (DESIGN decision 4);
* ``no-pipeline``: no enabled task's selection rules match (e.g. an MR): stored, left
  alone;
* ``queued``: one job per enabled task whose rules match (``[[tasks]]``,
  :mod:`dicom_node.tasks`), so one CT may get a job of several tasks;
* ``label``: a radiologist's SEG (not ours) referencing an archived series became that
  series' label (:mod:`dicom_node.learning.label_intake`); SEGs never become jobs;
* ``unclaimed``: such a SEG names no configured task's structure: kept as an unclaimed
  label until a task or model names its segments (never pruned on its own).

An instance file that is gone from disk (or is no DICOM file) does not stop a series:
it is decided on the instances that can be read, and its reason says how many could
not (``archive verify --repair`` marks such instances MISSING). A series none of whose
files can be read, or whose files cannot be read for another reason (permissions, an
I/O error), is set aside: one WARNING line when that starts, one INFO line when its
files can be read again and it is decided; the passes in between try it again quietly
(a missing file once logged an ERROR every second, forever: issue 28).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.queue.completeness import BY_MPPS, BY_QUIET, Completeness, SeriesShape, shape_of
from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.database import write
from dicom_node.foundation.errors import DicomNodeError
from dicom_node.foundation.faults import StateLog
from dicom_node.queue.jobs import JobQueue, connect_queue
from dicom_node.learning.label_intake import IntakeDecision
from dicom_node.queue.mpps import MppsSteps
from dicom_node.tasks import Task
from dicom_node.wire.priors import header_taken
from pipelines.selection import (
    NON_IMAGE_MODALITIES,
    SECONDARY_CAPTURE_PREFIX,
    is_node_output,
    matches,
)
from twin_archive import Archive
from twin_archive.arrivals import Arrivals, GrowingSeries, QuietSeries
from twin_archive.history import HistoryStore

LOG = logging.getLogger(__name__)

#: How far before the previous pass's cutoff a pass looks again, seconds.
LOOKBACK_S = 300.0
#: How often the early pass (MPPS, learned sizes) looks, seconds; an N-SET wakes it at once.
EARLY_POLL_S = 0.1


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesDecision:
    """What the monitor decided for a series that went quiet."""

    series_uid: str
    last_received: str
    decision: str  # queued, no-pipeline, ignored
    reason: str
    job_ids: tuple[int, ...] = ()
    completed_by: str = BY_QUIET  # quiet, mpps, learned, declared


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """Headers (no pixel data) of the instance files of one series."""
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def read_available_headers(paths: Sequence[Path]) -> tuple[list[Dataset], list[str]]:
    """Headers of the files that can be read, and why each of the others cannot.

    A file that is gone or is not DICOM is skipped; any other ``OSError`` (permissions,
    I/O) is raised, as it may pass.
    """
    headers: list[Dataset] = []
    unreadable: list[str] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except FileNotFoundError:
            unreadable.append(f"{path.name}: missing")
        except pydicom.errors.InvalidDicomError as exc:
            unreadable.append(f"{path.name}: {exc}")
    return headers, unreadable


class SeriesUnreadableError(DicomNodeError, OSError):
    """None of a series' instance files can be read."""

    def __init__(self, series_uid: str, count: int, first: str) -> None:
        super().__init__(f"none of its {count} instance file(s) can be read ({first})")
        self.series_uid = series_uid


class StabilityMonitor:
    """Turns quiet series into jobs.

    Parameters
    ----------
    archive : twin_archive.Archive
        The node's archive (its files are read for the series headers).
    jobs : JobQueue
        Where jobs go.
    tasks : sequence of Task
        The tasks served, tried in order; every enabled, matching one gets a job
        (:meth:`set_tasks` replaces them, on SIGHUP).
    stable_after_s : float
        Quiet period, seconds (> 0).
    poll_s : float, optional
        How often the index is looked at; default ``min(1, stable_after_s / 4)``.
    label_intake : callable, optional
        Called with the files of a complete SEG series; returns its
        :class:`~dicom_node.learning.label_intake.IntakeDecision` (``label``, ``unclaimed`` or ``ignored``)
        (:func:`dicom_node.learning.label_intake.intake_seg_series`). Without it SEG series are
        ignored like other result objects. Never makes a job of a SEG.
    guard_s : float, optional
        Seconds without an instance after which a series at its expected size (learned,
        or Images in Acquisition) is complete (:mod:`dicom_node.queue.completeness`).
    learn_from : int, optional
        Series of one scanner and protocol that must agree on a size before it is used.
    reopen_limit : int, optional
        Re-opens after which a scanner's series wait for the quiet period.
    ask_priors : bool, optional
        Queue a priors job for each new study as its first instance is filed (a PACS is
        asked for priors: ``priors_years`` > 0 and a destination with ``query = true``).
    """

    def __init__(self, archive: Archive, jobs: JobQueue, tasks: Sequence[Task], *,
                 stable_after_s: float, poll_s: float | None = None,
                 label_intake: Callable[[Sequence[Path]], IntakeDecision] | None = None,
                 guard_s: float = 0.2, learn_from: int = 2, reopen_limit: int = 3,
                 ask_priors: bool = False) -> None:
        if not stable_after_s > 0:
            raise ValueError(f"stable_after_s must be > 0 seconds, got {stable_after_s}")
        self.archive = archive
        self.jobs = jobs
        self.tasks = tuple(tasks)
        self.stable_after_s = float(stable_after_s)
        self.poll_s = poll_s if poll_s is not None else min(1.0, self.stable_after_s / 4)
        self.label_intake = label_intake
        self._arrivals = Arrivals(archive.data_dir)
        self._db = connect_queue(archive.data_dir)  # its own: monitored_series
        self._conn = self._db.conn
        self.steps = MppsSteps(self._db)
        self.completeness = Completeness(self._db, learn_from=learn_from, reopen_limit=reopen_limit)
        self.guard_s = float(guard_s)
        self._shapes: dict[str, SeriesShape | None] = {}  # growing series: their header's word
        self._step_seen: dict[str, str] = {}  # open COMPLETED step -> latest arrival looked at
        self._wake = threading.Event()
        self._since: str | None = None  # where the next pass looks from (None: everything)
        self._set_aside: dict[str, str] = {}  # series UID -> why it cannot be decided yet
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ask_priors = ask_priors
        self._priors_seen: set[str] = set()  # studies whose priors job is queued
        self._priors_judged: set[str] = set()  # series looked at for it
        self._history = HistoryStore(archive.data_dir) if ask_priors else None

    # ----------------------------------------------------------------- one pass
    def quiet_series(self, until: str, since: str | None = None) -> list[QuietSeries]:
        """Series whose last instance arrived at or before ``until`` (and at or after
        ``since``) and whose current state is not yet decided, oldest arrival first."""
        quiet = self._arrivals.quiet(until, since=since)
        decided = self._decided([s.series_uid for s in quiet])
        return [s for s in quiet if decided.get(s.series_uid) != s.last_received]

    def _decided(self, uids: Sequence[str], chunk: int = 500) -> dict[str, str]:
        """Series UID -> the ``last_received`` last decided on, for those of ``uids``
        decided before."""
        out: dict[str, str] = {}
        for i in range(0, len(uids), chunk):
            part = uids[i:i + chunk]
            out.update(self._conn.execute(
                "SELECT series_uid, last_received FROM monitored_series WHERE series_uid IN"
                f" ({','.join('?' * len(part))})", part).fetchall())
        return out

    def poll(self) -> list[SeriesDecision]:
        """One early pass then one quiet pass; return the decisions of both."""
        return self.poll_early() + self.poll_quiet()

    def poll_quiet(self) -> list[SeriesDecision]:
        """Decide every series that went quiet since the last pass; return the decisions."""
        now = utc_now()
        cutoff = iso(now - timedelta(seconds=self.stable_after_s))
        out, unread = [], []
        for row in self.quiet_series(cutoff, self._since):
            decided = self._try(row, BY_QUIET)
            if decided is None:
                unread.append(row.last_received)
            else:
                out.append(decided)
        self._since = min([iso(now - timedelta(seconds=self.stable_after_s + LOOKBACK_S)),
                           *unread])
        return out

    def _try(self, row: QuietSeries, by: str, why: str = "") -> SeriesDecision | None:
        """Decide ``row``; None when its files cannot be read (set aside, tried again)."""
        try:
            decided = self._decide(row, by, why)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            self._setting_aside(row.series_uid, str(exc))
            return None
        why_aside = self._set_aside.pop(row.series_uid, None)
        if why_aside is not None:
            LOG.info("series %s: its instances can be read again (set aside for: %s); "
                     "decided", row.series_uid, why_aside)
        return decided

    # ----------------------------------------------------------------- early
    def poll_early(self) -> list[SeriesDecision]:
        """Decide the series complete before their quiet period: those a COMPLETED MPPS
        step lists once all its instances are in, and those at their expected size for
        ``guard_s`` (DESIGN decision 3). With ``ask_priors``, first queue the look for
        the priors of each new study whose first instances are arriving."""
        now = utc_now()
        growing = self._arrivals.growing(iso(now - timedelta(seconds=self.stable_after_s)))
        if self.ask_priors:
            self._priors_pass(growing)
        return self._mpps_pass() + self._sized_pass(growing, now)

    def _priors_pass(self, growing: Sequence[GrowingSeries]) -> None:
        """Queue one priors job per new study and task, as soon as the first instance of
        a series the task's rules would take (judged from its header, as a C-FIND answer
        is) is filed; the queue keeps it once per study, across restarts. Never for a
        series retrieved as a prior (the priors of a prior are not looked for)."""
        if len(self._priors_judged) > 10000:  # memory only: the queue keeps it once
            self._priors_seen.clear()
            self._priors_judged.clear()
        for g in growing:
            row = g.series
            if row.study_uid in self._priors_seen or row.series_uid in self._priors_judged \
                    or row.modality.upper() in NON_IMAGE_MODALITIES:
                continue
            self._priors_judged.add(row.series_uid)
            if self._history is not None and self._history.is_retrieved(row.series_uid):
                continue
            files = self.archive.twins.series_files(row.series_uid)
            try:
                head = pydicom.dcmread(files[0], stop_before_pixels=True) if files else None
            except (OSError, pydicom.errors.InvalidDicomError):
                head = None
            if head is None:
                self._priors_judged.discard(row.series_uid)  # tried again at the next pass
                continue
            for spec in self.tasks:
                if not spec.enabled or not header_taken(spec.rules, head):
                    continue
                self._priors_seen.add(row.study_uid)
                job = self.jobs.enqueue_priors(series_uid=row.series_uid,
                                               study_uid=row.study_uid,
                                               patient_key=row.patient_key, task=spec.task)
                if job is not None:
                    LOG.info("study %s: its first instance(s) are in; job %d looks for its "
                             "priors (%s) while it arrives", row.study_uid, job.id, spec.task)

    def _mpps_pass(self) -> list[SeriesDecision]:
        out = []
        cutoff = iso(utc_now() - timedelta(seconds=self.stable_after_s))
        for step in self.steps.completed_open():
            if not step.series_uids:
                self.steps.resolve(step.step_uid, "fallback")
                LOG.info("MPPS step %s lists no instance: its series complete after the quiet "
                         "period", step.step_uid)
                continue
            rows = self._arrivals.of(list(step.series_uids))
            latest = max([step.completed_at, *(r.last_received for r in rows)])
            if self._step_seen.get(step.step_uid) == latest and latest >= cutoff:
                continue  # nothing of its series arrived since the last look
            self._step_seen[step.step_uid] = latest
            wanted = [uid for s in self.steps.listing(step.step_uid) for uid in s.instances]
            have = self._arrivals.archived(wanted)
            if len(have) < len(set(wanted)):
                # Not all in yet. Given up only once nothing of its series arrived for the
                # quiet period since the N-SET (a slow transfer after the N-SET is no loss);
                # a series that arrived is decided by the quiet pass, which names them.
                if latest < cutoff:
                    self._give_up(step.step_uid, [u for u in wanted if u not in have])
                continue
            decided = self._decided([r.series_uid for r in rows])
            for row in rows:
                if decided.get(row.series_uid) != row.last_received:
                    found = self._try(row, BY_MPPS, f"MPPS step {step.step_uid} COMPLETED, its "
                                                    f"{len(wanted)} instance(s) in")
                    out += [found] if found is not None else []
            self.steps.resolve(step.step_uid, "complete")
            self._step_seen.pop(step.step_uid, None)
        return out

    def _sized_pass(self, growing: Sequence[GrowingSeries], now: datetime
                    ) -> list[SeriesDecision]:
        guard_until = iso(now - timedelta(seconds=self.guard_s))
        self._shapes = {g.series.series_uid: self._shapes[g.series.series_uid] for g in growing
                        if g.series.series_uid in self._shapes}
        ready = [g for g in growing if g.series.last_received <= guard_until
                 and g.series.modality.upper() not in NON_IMAGE_MODALITIES]
        decided = self._decided([g.series.series_uid for g in ready])
        out = []
        for g in ready:
            row = g.series
            if decided.get(row.series_uid) == row.last_received:
                continue
            shape = self._shape(row.series_uid)
            expected = shape and self.completeness.expected(shape, row.series_uid)
            if expected and g.instances == expected.instances:
                found = self._try(row, expected.by, expected.why)
                out += [found] if found is not None else []
        return out

    def _shape(self, series_uid: str) -> SeriesShape | None:
        """What the header of one of the series' instances says (read once per series)."""
        if series_uid not in self._shapes:
            files = self.archive.twins.series_files(series_uid)
            try:
                self._shapes[series_uid] = shape_of(read_headers(files[-1:])[0]) if files else None
            except (OSError, pydicom.errors.InvalidDicomError, IndexError):
                self._shapes[series_uid] = None
        return self._shapes[series_uid]

    def _give_up(self, step_uid: str, missing: list[str], series_uid: str = "") -> None:
        """Name the instances a COMPLETED step lists that never came, once; resolve it."""
        LOG.warning("MPPS step %s COMPLETED lists %d instance(s) never received (%s%s); %s",
                    step_uid, len(missing), ", ".join(missing[:5]),
                    f" and {len(missing) - 5} more" if len(missing) > 5 else "",
                    f"series {series_uid} complete by the quiet period instead" if series_uid
                    else f"its series complete by the quiet period ({self.stable_after_s:g} s "
                         "after the N-SET, none of them has instances still missing)")
        self.steps.resolve(step_uid, "fallback")
        self._step_seen.pop(step_uid, None)

    def _fall_back(self, series_uid: str) -> None:
        """A series decided by the quiet period that an open COMPLETED step lists: name the
        instances that never came, once, and resolve the step."""
        for step in self.steps.completed_open(series_uid):
            wanted = [uid for s in self.steps.listing(step.step_uid) if s.series_uid == series_uid
                      for uid in s.instances]
            have = self._arrivals.archived(wanted)
            missing = [uid for uid in wanted if uid not in have]
            if missing:
                self._give_up(step.step_uid, missing, series_uid)

    def _setting_aside(self, uid: str, why: str) -> None:
        """Log a series set aside once per reason; the passes after it retry quietly."""
        if self._set_aside.get(uid) == why:
            LOG.debug("series %s still set aside: %s", uid, why)
            return
        self._set_aside[uid] = why
        LOG.warning("series %s set aside, not decided: %s; tried again quietly at each pass "
                    "and said here once it can be read", uid, why)

    def _decide(self, row: QuietSeries, by: str = BY_QUIET, why: str = "") -> SeriesDecision:
        """Decide a series complete (``by`` the quiet period, MPPS, or its size: ``why``)."""
        uid, last = row.series_uid, row.last_received
        modality = row.modality.upper()
        files = self.archive.twins.series_files(uid)
        job_ids: list[int] = []
        count, shape = len(files), None
        if modality == "SEG" and files and self.label_intake is not None:
            intake = self.label_intake(files)  # never a job: a label, or left alone
            decision, reason = intake.decision, intake.reason
        elif modality in NON_IMAGE_MODALITIES:
            decision, reason = "ignored", f"{modality} is a result/document object; never inferred on"
        elif not files:
            decision, reason = "ignored", "no current instances"
        else:
            headers, unreadable = read_available_headers(files)
            if not headers:
                raise SeriesUnreadableError(uid, len(files), unreadable[0])
            decision, reason = self._decide_images(row, headers, job_ids)
            count, shape = len(headers), shape_of(headers[-1])
            if unreadable:
                reason += (f" (decided on the {len(headers)} of {len(files)} instance(s) that can "
                           f"be read; {len(unreadable)} cannot: {unreadable[0]})")
                LOG.warning("series %s: %d of its %d instance file(s) cannot be read (%s); "
                            "decided on the others", uid, len(unreadable), len(files), unreadable[0])
        if by == BY_QUIET:
            self._fall_back(uid)
        reopened = self._record(uid, last, decision, reason, by=by, shape=shape, count=count)
        self._say(uid, modality, decision, reason, count, job_ids, reopened,
                  by if by == BY_QUIET else f"{by}: {why}")
        return SeriesDecision(series_uid=uid, last_received=last, decision=decision,
                              reason=reason, job_ids=tuple(job_ids), completed_by=by)

    def _say(self, uid: str, modality: str, decision: str, reason: str, count: int,
             job_ids: list[int], reopened: bool, how: str) -> None:
        """The decision's one log line."""
        if decision == "queued":
            when = (f"quiet for {self.stable_after_s:.0f} s" if how == BY_QUIET
                    else f"complete early ({how})")
            LOG.info("series %s %s with %d instance(s)%s: job(s) %s queued", uid, when, count,
                     " (re-opened by later instances; the new result will supersede the old)"
                     if reopened else "", ", ".join(map(str, job_ids)) or "-")
        elif decision == "label":
            LOG.info("series %s (SEG, %d instance(s)) taken as label(s): %s", uid, count,
                     reason)
        elif decision == "unclaimed":
            LOG.info("series %s (SEG, %d instance(s)) kept as unclaimed label(s), claimed when "
                     "a task or model names its segments: %s", uid, count, reason)
        else:
            LOG.info("series %s (%s, %d instance(s)) left alone: %s", uid, modality or "?",
                     count, reason)

    def _decide_images(self, row: QuietSeries, headers: Sequence[Dataset],
                       job_ids: list[int]) -> tuple[str, str]:
        """Decision and reason for an image series from its readable headers; the ids of
        the jobs queued are added to ``job_ids``."""
        if any(is_node_output(ds) for ds in headers):
            return "ignored", "produced by this node; never inferred on"
        if any(str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_PREFIX)
               for ds in headers):
            return "ignored", "secondary capture; never inferred on"
        reasons = []
        for spec in self.tasks:  # one tuple, replaced whole by set_tasks
            if not spec.enabled:
                continue
            verdict = matches(spec.rules, headers)
            if not verdict.matched:
                reasons.append(verdict.reason)
                continue
            job = self.jobs.enqueue(
                series_uid=row.series_uid, study_uid=row.study_uid, patient_key=row.patient_key,
                task=spec.task, series_last_received=row.last_received, instances=len(headers))
            if job is not None:
                job_ids.append(job.id)
            reasons.append(verdict.reason)
        if job_ids:
            return "queued", "; ".join(reasons)
        if any("matched" in r for r in reasons):
            return "queued", "job already queued"
        return "no-pipeline", "; ".join(reasons) or "no task enabled"

    def _record(self, uid: str, last: str, decision: str, reason: str, *, by: str = BY_QUIET,
                shape: SeriesShape | None = None, count: int = 0) -> bool:
        """Remember the decision (with the series' size, for learning, and the scanner's
        early completions and re-opens); return whether the series had been decided before."""
        now = iso(utc_now())
        with write(self._db) as conn:
            before = conn.execute("SELECT last_received, completed_by, scanner FROM"
                                  " monitored_series WHERE series_uid = ?", (uid,)).fetchone()
            scanner = shape.scanner if shape is not None else (before[2] if before else "")
            conn.execute(
                "INSERT INTO monitored_series (series_uid, last_received, decision, reason,"
                " decided_at, completed_by, scanner) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT(series_uid) DO UPDATE SET"
                " last_received=excluded.last_received, decision=excluded.decision,"
                " reason=excluded.reason, decided_at=excluded.decided_at,"
                " completed_by=excluded.completed_by, scanner=excluded.scanner",
                (uid, last, decision, reason, now, by, scanner),
            )
            if shape is not None and decision in ("queued", "no-pipeline"):
                self.completeness.record(conn, uid, shape, count, now)
            reopened_early = (before is not None and before[1] != BY_QUIET
                              and before[0] != last)
            if reopened_early:
                LOG.info("series %s completed early (%s) was re-opened by a later instance "
                         "(scanner %s)", uid, before[1], scanner or "?")
            self.completeness.counted(conn, scanner, early=by != BY_QUIET,
                                      reopened=reopened_early)
        return before is not None

    def set_tasks(self, tasks: Sequence[Task]) -> None:
        """Serve ``tasks`` from the next series decided on (SIGHUP reload)."""
        self.tasks = tuple(tasks)

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Poll in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="stability-monitor", daemon=True)
        self._thread.start()
        LOG.info("stability monitor: a series is complete after %.1f s without new instances; "
                 "tasks: %s", self.stable_after_s,
                 ", ".join(t.name + ("" if t.enabled else " (disabled)") for t in self.tasks)
                 or "none")

    def wake(self) -> None:
        """Look at once (an MPPS step changed): the early pass runs without waiting."""
        self._wake.set()

    def _run(self) -> None:
        state = StateLog(LOG, "stability monitor")  # one line per change, not per pass
        next_quiet = 0.0
        while not self._stop.is_set():
            self._wake.wait(min(EARLY_POLL_S, self.poll_s))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.poll_early()
                if time.monotonic() >= next_quiet:
                    self.poll_quiet()
                    next_quiet = time.monotonic() + self.poll_s
                state.ok()
            except Exception as exc:  # keep watching; the next pass retries
                state.failed(exc, "pass failed")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling and close the connections."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._conn.close()
        self._arrivals.close()
        if self._history is not None:
            self._history.close()
