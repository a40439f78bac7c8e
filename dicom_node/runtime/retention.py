"""Retention in the running node: settled series, the scheduled prune, disk watermarks.

The archive knows twins, consent and holds (:mod:`twin_archive.retention`); whether a
series has served its purpose is the queues' knowledge
(:func:`dicom_node.queue.jobs.settled_series`): the monitor decided on the series as it now stands, and
either it needed no job (``ignored``, ``no-pipeline``) or every job of that state is
``done`` or ``failed`` and every send of their results is ``sent``, ``failed`` (given
up) or ``held``.

* :func:`prune` - one prune (``archive prune``, the scheduled job, the disk guard),
  audited in the hash chain;
* :class:`DiskGuard` - above ``disk_high_water_pct`` prunes under pressure down to
  ``disk_low_water_pct``, and is asked by the C-STORE path before it would refuse an
  instance for lack of space (:attr:`twin_archive.ingest.Ingest.make_room`). When
  nothing is prunable it says so once in the journal and on ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dicom_node.foundation.clock import iso, utc_now
from dicom_node.foundation.durable import write_durably
from dicom_node.foundation.faults import is_disk_full
from dicom_node.queue.jobs import settled_series
from dicom_node.settings import Settings
from twin_archive.audit import AuditEvent, AuditLog, AuditOutcome
from twin_archive.retention import (
    PruneItem,
    PruneReport,
    Retention,
    RetentionPolicy,
    Usage,
)

LOG = logging.getLogger(__name__)

#: Seconds between two looks at the disk by the guard.
GUARD_INTERVAL_S = 1.0
#: Seconds before the guard plans again after finding nothing prunable, at least; twice
#: the last plan's time when that is longer (a plan at a million instances takes ~2 s).
NOTHING_PRUNABLE_RETRY_S = 1.0



def policy(settings: Settings) -> RetentionPolicy:
    """The retention policy of the settings and their tasks' overrides."""
    days = {t.name: t.retention_days for t in settings.tasks if t.retention_days is not None}
    result_days: dict[str, float | None] = {}
    for t in settings.tasks:
        if t.result_retention_days == "forever":
            result_days[t.name] = None
        elif isinstance(t.result_retention_days, float):
            result_days[t.name] = t.result_retention_days
    return RetentionPolicy(retention_days=settings.retention_days,
                           result_retention_days=settings.result_retention_days,
                           revoke_grace_days=settings.revoke_grace_days,
                           task_retention_days=days, task_result_retention_days=result_days)


@dataclass(frozen=True, kw_only=True, slots=True)
class PruneRun:
    """A prune: what was allowed, and what was removed (``None`` for a dry run)."""

    items: tuple[PruneItem, ...]
    report: PruneReport | None
    seconds: float


def prune(settings: Settings, *, dry_run: bool = False, pressure: bool = False, by: str,
          stop_when: Callable[[], bool] | None = None,
          audit: AuditLog | None = None) -> PruneRun:
    """Plan and (unless ``dry_run``) carry out one prune; audited when it removed anything.

    Parameters
    ----------
    by : str
        Who prunes (``scheduler``, ``disk-guard``, a user name) for the audit log.
    """
    t0 = time.perf_counter()
    settled = settled_series(settings.data_dir)
    with Retention(settings.data_dir) as store:
        items = tuple(store.plan(policy(settings), settled, pressure=pressure))
        if not pressure:  # the figures status and /metrics show until the next prune
            pressed = store.plan(policy(settings), settled, pressure=True)
            _write_outlook(settings.data_dir, now=sum(i.bytes for i in items),
                           pressed=sum(i.bytes for i in pressed))
        if dry_run or not items:
            return PruneRun(items=items, report=None, seconds=time.perf_counter() - t0)
        total = sum(i.files for i in items)
        LOG.info("archive prune: %d file(s) of %d series allowed by retention (%.1f MB)%s",
                 total, len(items), sum(i.bytes for i in items) / 1e6,
                 " under disk pressure" if pressure else "")
        report = store.prune(items, stop_when=stop_when, progress=_progress(total))
    _audit(settings.data_dir, report, by=by, pressure=pressure, audit=audit)
    LOG.info("archive prune: removed %d file(s) of %d series of %d patient(s), %.1f MB, in %.1f s"
             "%s", report.files, report.series, len(report.patients), report.bytes / 1e6,
             time.perf_counter() - t0,
             f"; {len(report.skipped)} series re-opened since, kept" if report.skipped else "")
    return PruneRun(items=items, report=report, seconds=time.perf_counter() - t0)


#: What the last scheduled prune found prunable (``status``, ``/metrics``): planning
#: reads every settled series, too slow for a status at a million instances.
OUTLOOK_FILE = "retention-outlook.json"


def _write_outlook(data_dir: Path, *, now: int, pressed: int) -> None:
    try:
        write_durably(Path(data_dir) / OUTLOOK_FILE, [json.dumps(
            {"at": iso(utc_now()), "prunable_bytes": now,
             "prunable_under_pressure_bytes": pressed}).encode()])
    except OSError as exc:  # a full disk: the figures are only as old as the last one
        LOG.warning("archive prune: cannot record what is prunable (%s)", exc)


def _read_outlook(data_dir: Path) -> dict[str, object]:
    try:
        return dict(json.loads((Path(data_dir) / OUTLOOK_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def _progress(total: int) -> Callable[[int, int], None]:
    last = [time.monotonic()]

    def show(done: int, _total: int) -> None:
        if time.monotonic() - last[0] >= 10.0 and done < total:
            last[0] = time.monotonic()
            LOG.info("archive prune: %d of %d file(s) removed", done, total)
    return show


def _audit(data_dir: Path, report: PruneReport, *, by: str, pressure: bool,
           audit: AuditLog | None) -> None:
    if not report.files:
        return
    detail = {**report.to_dict(), "pressure": pressure, "patient_keys": list(report.patients)}
    if audit is not None:
        audit.record(AuditEvent.ARCHIVE_PRUNED, AuditOutcome.SUCCESS, by, "retention", detail)
    else:
        with AuditLog(data_dir) as log:
            log.record(AuditEvent.ARCHIVE_PRUNED, AuditOutcome.SUCCESS, by, "retention", detail)


def disk_use_pct(path: Path) -> float:
    """Use of the file system holding ``path``, percent."""
    u = shutil.disk_usage(path)
    return 100.0 * (u.total - u.free) / u.total if u.total else 0.0


class DiskGuard:
    """Keeps the data directory's file system below its high water mark by pruning.

    Parameters
    ----------
    settings : Settings
        ``disk_high_water_pct``, ``disk_low_water_pct`` and the retention settings.
    audit : AuditLog, optional
        The node's audit log (prunes are recorded there).
    """

    def __init__(self, settings: Settings, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.nothing_prunable = False  # for /metrics
        self.pressure = False
        self.full = False  # the disk too full to record a prune
        self._lock = threading.Lock()  # one prune at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="disk-guard", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(GUARD_INTERVAL_S):
            try:
                self.check()
            except Exception:  # the guard must outlive any one failure (a full disk included)
                LOG.exception("disk guard: check failed; trying again")

    def check(self) -> bool:
        """Prune under pressure when above high water; return whether anything was removed."""
        use = disk_use_pct(self.settings.data_dir)
        if use < self.settings.disk_high_water_pct:
            if self.pressure:
                LOG.info("disk: %.1f %% used, below the high water mark (%.0f %%) again",
                         use, self.settings.disk_high_water_pct)
            self.pressure = self.nothing_prunable = False
            return False
        if not self.pressure:
            LOG.warning("disk: %.1f %% used, above the high water mark (%.0f %%): pruning what "
                        "retention allows down to %.0f %%", use, self.settings.disk_high_water_pct,
                        self.settings.disk_low_water_pct)
            self.pressure = True
        return self.make_room()

    def make_room(self, need_bytes: int = 0) -> bool:
        """Prune under pressure now (also from the C-STORE path before an A700); return
        whether anything was removed."""
        if time.monotonic() < self._retry_at:
            return False
        t0 = time.monotonic()
        try:
            with self._lock:
                if need_bytes and self._room_for(need_bytes):
                    return True  # another association's prune, while this one waited, made it
                low = self.settings.disk_low_water_pct
                run = prune(self.settings, pressure=True, by="disk-guard", audit=self.audit,
                            stop_when=lambda: disk_use_pct(self.settings.data_dir) < low)
        except (sqlite3.Error, OSError) as exc:
            if not is_disk_full(exc, self.settings.data_dir):
                raise
            # Recording a removal needs a little space (the index's journal): a disk
            # filled to the last byte cannot be pruned until something else frees some.
            self._retry_at = time.monotonic() + NOTHING_PRUNABLE_RETRY_S
            if not self.full:
                LOG.error("disk: completely full; the index cannot record a prune (%s). "
                          "Trying again every %.0f s; keep min_free_mb above 0 so that it can",
                          exc, NOTHING_PRUNABLE_RETRY_S)
            self.full = True
            return False
        if self.full:
            LOG.info("disk: a prune can be recorded again")
        self.full = False
        removed = run.report is not None and run.report.files > 0
        if not removed:
            self._retry_at = time.monotonic() + max(NOTHING_PRUNABLE_RETRY_S,
                                                    2 * (time.monotonic() - t0))
            if not self.nothing_prunable:
                LOG.warning("disk: %.1f %% used and nothing is prunable (donors' and held "
                            "patients' images, unsettled series and kept results stay); the "
                            "min_free_mb reserve refuses C-STOREs when it is reached",
                            disk_use_pct(self.settings.data_dir))
            self.nothing_prunable = True
        else:
            self.nothing_prunable = False
        return removed


    def _room_for(self, need_bytes: int) -> bool:
        """Whether ``need_bytes`` fit above the ``min_free_mb`` reserve now."""
        free = shutil.disk_usage(self.settings.data_dir).free
        return free - need_bytes >= self.settings.min_free_mb << 20


def summarize(items: Sequence[PruneItem]) -> dict[str, int]:
    """Counts of a plan by kind (``archive prune`` output)."""
    out = {"series": len({i.series_uid for i in items}), "files": 0, "bytes": 0,
           "patients": len({i.patient_key for i in items})}
    for i in items:
        out["files"] += i.files
        out["bytes"] += i.bytes
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Storage:
    """The data directory's bytes by kind, what retention could free, and the outlook
    (``status``, ``/metrics``)."""

    usage: Usage
    models: int
    prunable: int  # allowed now
    prunable_under_pressure: int  # allowed above the high water mark
    prunable_at: str  # when the last scheduled prune found them ('' before the first)
    disk_use_pct: float
    free: int
    days_to_full: float | None  # at the last 7 days' intake; None without intake

    def to_dict(self) -> dict[str, object]:
        return {"bytes": {**self.usage.to_dict(), "models": self.models},
                "prunable_bytes": self.prunable,
                "prunable_under_pressure_bytes": self.prunable_under_pressure,
                "prunable_as_of": self.prunable_at or None,
                "disk_use_pct": round(self.disk_use_pct, 2), "free_bytes": self.free,
                "days_to_full": None if self.days_to_full is None else round(self.days_to_full, 1)}


def storage(settings: Settings) -> Storage:
    """Bytes by kind (from the index), what retention could free (as the last scheduled
    prune found it) and days to full."""
    data_dir = Path(settings.data_dir)
    with Retention(data_dir) as store:
        usage = store.usage()
    outlook = _read_outlook(data_dir)
    models = sum(p.stat().st_size for p in (data_dir / "models").rglob("*") if p.is_file()) \
        if (data_dir / "models").is_dir() else 0
    disk = shutil.disk_usage(data_dir)
    rate = usage.received_last_7d / 7.0
    return Storage(usage=usage, models=models,
                   prunable=int(outlook.get("prunable_bytes", 0)),  # type: ignore[call-overload]
                   prunable_under_pressure=int(
                       outlook.get("prunable_under_pressure_bytes", 0)),  # type: ignore[call-overload]
                   prunable_at=str(outlook.get("at", "")),
                   disk_use_pct=disk_use_pct(data_dir), free=disk.free,
                   days_to_full=disk.free / rate if rate > 0 else None)


def storage_lines(s: Storage) -> list[str]:
    """``status`` lines about the disk and retention."""
    u = s.usage
    mib = 1 << 20
    out = [f"storage:   source images {(u.donors + u.non_donors + u.held) // mib} MiB "
           f"(donors {u.donors // mib}, non-donors {u.non_donors // mib}, held {u.held // mib}), "
           f"results {u.results // mib} MiB, labels {u.labels // mib} MiB, models {s.models // mib} MiB",
           f"retention: prunable {s.prunable // mib} MiB, under disk pressure "
           f"{s.prunable_under_pressure // mib} MiB (as of "
           f"{s.prunable_at[:19] or 'the first scheduled prune'}); pruned so far {u.pruned_files} file(s), "
           f"{u.pruned_bytes // mib} MiB",
           f"disk:      {s.disk_use_pct:.1f} % used; "
           + (f"full in about {s.days_to_full:.0f} day(s) at the last 7 days' intake "
              f"({u.received_last_7d / 7 / mib:.0f} MiB/day)" if s.days_to_full is not None
              else "no intake in the last 7 days")]
    return out


def storage_families(s: Storage, *, nothing_prunable: bool) -> list[Metric]:
    """Prometheus families of :func:`storage` (``/metrics``)."""
    by_kind = GaugeMetricFamily("dicom_node_storage_bytes", "Bytes in the data directory by kind",
                                labels=["kind"])
    for kind, value in {**s.usage.to_dict(), "models": s.models}.items():
        if kind not in ("pruned_files", "pruned_bytes", "received_last_7d"):
            by_kind.add_metric([kind], value)
    prunable = GaugeMetricFamily("dicom_node_prunable_bytes", "Bytes retention allows to remove",
                                 labels=["when"])
    prunable.add_metric(["now"], s.prunable)
    prunable.add_metric(["under_pressure"], s.prunable_under_pressure)
    pruned = CounterMetricFamily("dicom_node_pruned_bytes", "Bytes removed by retention so far")
    pruned.add_metric([], s.usage.pruned_bytes)
    use = GaugeMetricFamily("dicom_node_disk_use_ratio", "Use of the data directory's file system")
    use.add_metric([], s.disk_use_pct / 100.0)
    days = GaugeMetricFamily("dicom_node_days_to_full",
                             "Days until the disk is full at the last 7 days' intake (-1: no intake)")
    days.add_metric([], -1.0 if s.days_to_full is None else s.days_to_full)
    stuck = GaugeMetricFamily("dicom_node_disk_nothing_prunable",
                              "1 while the disk is above high water and nothing is prunable")
    stuck.add_metric([], 1.0 if nothing_prunable else 0.0)
    return [by_kind, prunable, pruned, use, days, stuck]
