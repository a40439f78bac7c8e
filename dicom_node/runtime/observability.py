"""What the node reports about itself: Prometheus ``/metrics``, ``/healthz``, ``status``.

Two kinds of figures:

* counted by the running process (:class:`~dicom_node.wire.metrics.NodeMetrics`): instances
  and bytes received, associations accepted/rejected/aborted, C-STORE failures;
* asked of the stores and the queue at each scrape (:func:`read_state`), read-only:
  queue depths, send failures (:mod:`dicom_node.queue.jobs`, :mod:`dicom_node.queue.sender`), job
  stage durations, index and audit totals (:mod:`twin_archive.counts`), active model
  versions (:mod:`registry.in_service`). ``dicom-node status`` reads the same, so it
  works whether or not the node runs.

The HTTP endpoint is off unless ``metrics_port`` is set, and binds ``metrics_bind``
(127.0.0.1 by default): it has no authentication, so expose it only to the local
Prometheus (or a reverse proxy).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from dicom_node import __version__
from dicom_node.learning.drift import DriftConfig, drift_gauges
from dicom_node.foundation.faults import FULL_BELOW_BYTES, free_bytes, is_disk_full
from dicom_node.queue.completeness import COMPLETED_BY, CompletenessCounts, read_completeness
from dicom_node.queue.jobs import JobCounts, JobState, read_job_counts
from dicom_node.wire.metrics import NodeMetrics
from dicom_node.queue.sender import SendCounts, SendState, read_send_counts
from registry.in_service import ActiveVersion, active_versions
from dicom_node.runtime.supervisor import WORKER_STATES
from twin_archive.counts import (ArchiveCounts, AuditCounts, archive_counts, audit_counts,
                                 result_timings)

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Upper bounds (seconds) of the job stage duration histogram.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class ActiveModel:
    """A model version in service."""

    task: str
    version: str
    scope: str  # "any scanner" or "MANUFACTURER/MODEL"


@dataclass(frozen=True, kw_only=True, slots=True)
class StageDurations:
    """Cumulative histogram of one pipeline stage over all recorded results."""

    count: int
    total_s: float
    buckets: tuple[int, ...]  # cumulative counts per STAGE_BUCKETS bound


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeState:
    """What the data directory says, read without the node's help."""

    twins: int = 0
    studies: int = 0
    instances: int = 0
    archived_bytes: int = 0
    jobs: dict[str, int] = field(default_factory=dict)
    sends: dict[str, int] = field(default_factory=dict)
    send_failed_attempts: int = 0
    results: int = 0
    stages: dict[str, StageDurations] = field(default_factory=dict)
    active_models: tuple[ActiveModel, ...] = ()
    audit_events: int = 0
    last_audit_at: str = ""
    free_bytes: int = 0
    #: Queued jobs waiting for something outside them: "job N: <reason>; next try <time>".
    waiting: tuple[str, ...] = ()
    #: The data directory's file system is full (:data:`~dicom_node.foundation.faults.FULL_BELOW_BYTES`).
    disk_full: bool = False
    #: Stores that could not be read for lack of space (their figures count as 0).
    unreadable: tuple[str, ...] = ()


class _StageAggregator:
    """Folds new ``ai_results.timings`` rows into histograms (each row is read once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_id = 0
        self.results = 0
        self.stages: dict[str, list[float]] = {}  # stage -> [count, sum, *bucket counts]

    def update(self, data_dir: Path) -> None:
        with self._lock:
            for row in result_timings(data_dir, after_id=self.last_id):
                self.last_id = row.id
                self.results += 1
                for key, seconds in row.timings.items():
                    stage = key[:-2] if key.endswith("_s") else key
                    acc = self.stages.setdefault(stage, [0.0, 0.0] + [0.0] * len(STAGE_BUCKETS))
                    acc[0] += 1
                    acc[1] += seconds
                    for i, bound in enumerate(STAGE_BUCKETS):
                        if seconds <= bound:
                            acc[2 + i] += 1

    def snapshot(self) -> tuple[int, dict[str, StageDurations]]:
        with self._lock:
            return self.results, {
                stage: StageDurations(count=int(a[0]), total_s=a[1],
                                      buckets=tuple(int(x) for x in a[2:]))
                for stage, a in sorted(self.stages.items())}


def read_state(data_dir: Path | str, stages: _StageAggregator | None = None) -> NodeState:
    """Read the node's state from the stores of ``data_dir`` (read-only).

    Missing files count as empty; the node need not run. On a full disk a store that
    cannot be opened (SQLite cannot create its shared-memory file) counts as empty and
    is named in ``unreadable``; any other error is raised.
    """
    data_dir = Path(data_dir)
    stages = stages or _StageAggregator()
    unreadable: list[str] = []

    def read(store: str, fn: Callable[[Path], _T], empty: _T) -> _T:
        try:
            return fn(data_dir)
        except (OSError, sqlite3.Error) as exc:
            if not is_disk_full(exc, data_dir):
                raise
            LOG.debug("%s unreadable on a full disk: %s", store, exc)
            if store not in unreadable:
                unreadable.append(store)
            return empty

    read("index.sqlite", stages.update, None)
    archive = read("index.sqlite", archive_counts, ArchiveCounts())
    jobs = read("queue.sqlite", read_job_counts, JobCounts(by_state={}, waiting=()))
    sends = read("queue.sqlite", read_send_counts, SendCounts(by_state={}, failed_attempts=0))
    audit = read("audit.sqlite", audit_counts, AuditCounts())
    models: tuple[ActiveVersion, ...] = read("registry.sqlite", active_versions, ())
    values: dict[str, Any] = {
        "twins": archive.twins, "studies": archive.studies, "instances": archive.instances,
        "archived_bytes": archive.archived_bytes,
        "jobs": jobs.by_state,
        "waiting": tuple(f"job {j.id}: {j.reason}; next try {j.not_before[:19]}"
                         for j in jobs.waiting),
        "sends": sends.by_state, "send_failed_attempts": sends.failed_attempts,
        "active_models": tuple(
            ActiveModel(task=m.task, version=m.version,
                        scope=f"{m.manufacturer}/{m.model_name}"
                        if m.manufacturer or m.model_name else "any scanner")
            for m in models),
        "audit_events": audit.events, "last_audit_at": audit.last_at,
        "unreadable": tuple(unreadable),
    }
    values["results"], values["stages"] = stages.snapshot()
    if data_dir.exists():
        values["free_bytes"] = shutil.disk_usage(data_dir).free
        values["disk_full"] = bool(unreadable) or (free_bytes(data_dir) or 0) < FULL_BELOW_BYTES
    return NodeState(**values)


class NodeCollector(Collector):
    """Prometheus collector: the process's counters plus :func:`read_state` at each scrape.

    Parameters
    ----------
    metrics : NodeMetrics
        The running node's counters.
    data_dir : pathlib.Path
        The node's data directory.
    healthy : callable, optional
        Returns True while the node is healthy (``dicom_node_up``).
    workers : callable, optional
        Returns the inference workers' ``(state, restarts)`` pairs
        (``dicom_node_workers``, ``dicom_node_worker_restarts_total``).
    """

    def __init__(self, metrics: NodeMetrics, data_dir: Path,
                 healthy: Callable[[], bool] | None = None,
                 workers: Callable[[], list[tuple[str, int]]] | None = None,
                 drift: DriftConfig | None = None,
                 storage: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.metrics = metrics
        self.storage = storage
        self.drift = drift or DriftConfig()
        self.data_dir = Path(data_dir)
        self.healthy = healthy
        self.workers = workers
        self.started = time.time()
        self._stages = _StageAggregator()

    def collect(self) -> Iterator[Metric]:
        counts = self.metrics.snapshot()
        up = GaugeMetricFamily("dicom_node_up", "1 while the node is healthy")
        up.add_metric([], 1.0 if self.healthy is None or self.healthy() else 0.0)
        yield up
        info = GaugeMetricFamily("dicom_node_info", "Version of the running node", labels=["version"])
        info.add_metric([__version__], 1.0)
        yield info
        start = GaugeMetricFamily("dicom_node_start_time_seconds", "Start time, Unix seconds")
        start.add_metric([], self.started)
        yield start

        received = CounterMetricFamily("dicom_node_instances_received",
                                       "C-STORE instances answered Success, by archive outcome",
                                       labels=["outcome"])
        for outcome in ("stored", "duplicate", "new_version"):
            received.add_metric([outcome], counts.get(f"instances_{outcome}", 0))
        yield received
        size = CounterMetricFamily("dicom_node_received_bytes", "Bytes of instances received")
        size.add_metric([], counts.get("bytes_received", 0))
        yield size
        failed = CounterMetricFamily("dicom_node_store_failures", "C-STORE requests refused",
                                     labels=["reason"])
        for reason in ("cannot_understand", "sop_class_mismatch", "out_of_resources",
                       "context_mismatch"):
            failed.add_metric([reason], counts.get(f"store_failed_{reason}", 0))
        yield failed
        assocs = CounterMetricFamily("dicom_node_associations",
                                     "Associations by what became of them", labels=["result"])
        for what in ("accepted", "rejected", "aborted", "refused"):  # refused: closed at accept
            assocs.add_metric([what], counts.get(f"associations_{what}", 0))
        yield assocs
        lockouts = CounterMetricFamily("dicom_node_lockouts",
                                       "Lock-outs started: a peer address, or every peer, refused "
                                       "(dicom_node/wire/handlers/admission.py)")
        lockouts.add_metric([], counts.get("associations_lockouts", 0))
        yield lockouts
        if self.workers is not None:
            now = self.workers()
            by_state = GaugeMetricFamily("dicom_node_workers", "Inference worker processes by state",
                                         labels=["state"])
            for w in WORKER_STATES:
                by_state.add_metric([w], sum(1 for s, _ in now if s == w))
            yield by_state
            restarts = CounterMetricFamily("dicom_node_worker_restarts",
                                           "Inference worker processes started again after dying")
            restarts.add_metric([], sum(n for _, n in now))
            yield restarts
        yield from self.stored_families(read_state(self.data_dir, self._stages))
        yield from drift_families(self.data_dir, self.drift)
        yield from completeness_families(read_completeness(self.data_dir))
        if self.storage is not None:
            yield from self.storage()

    @staticmethod
    def stored_families(state: NodeState) -> Iterator[Metric]:
        """The figures of the stores (:func:`read_state`) as metric families."""
        jobs = GaugeMetricFamily("dicom_node_jobs", "Inference jobs by state", labels=["state"])
        for js in JobState:  # every state, from the queue's own enum
            jobs.add_metric([js.value], state.jobs.get(js.value, 0))
        yield jobs
        sends = GaugeMetricFamily("dicom_node_sends", "Outbound objects by state", labels=["state"])
        for ss in SendState:
            sends.add_metric([ss.value], state.sends.get(ss.value, 0))
        yield sends
        sf = CounterMetricFamily("dicom_node_send_failures",
                                 "Failed send attempts (unreachable, aborted or refused)")
        sf.add_metric([], state.send_failed_attempts)
        yield sf
        hist = HistogramMetricFamily("dicom_node_job_stage_seconds",
                                     "Duration of each pipeline stage of finished jobs",
                                     labels=["stage"])
        for stage, d in state.stages.items():
            buckets = [(str(b), float(c)) for b, c in zip(STAGE_BUCKETS, d.buckets, strict=True)]
            buckets.append(("+Inf", float(d.count)))
            hist.add_metric([stage], buckets, d.total_s)
        yield hist
        models = GaugeMetricFamily("dicom_node_model_active", "Model versions in service (1)",
                                   labels=["task", "version", "scope"])
        for m in state.active_models:
            models.add_metric([m.task, m.version, m.scope], 1.0)
        yield models
        archive = GaugeMetricFamily("dicom_node_archive_instances", "Current instances in the archive")
        archive.add_metric([], state.instances)
        yield archive
        archived = GaugeMetricFamily("dicom_node_archive_bytes", "Bytes of current archived instances")
        archived.add_metric([], state.archived_bytes)
        yield archived
        free = GaugeMetricFamily("dicom_node_data_dir_free_bytes", "Free space on the data directory")
        free.add_metric([], state.free_bytes)
        yield free
        full = GaugeMetricFamily("dicom_node_disk_full", "1 while the data directory's disk is "
                                 "full (stores it holds may then be unreadable)")
        full.add_metric([], 1.0 if state.disk_full else 0.0)
        yield full
        audit = CounterMetricFamily("dicom_node_audit_events", "Events in the audit log")
        audit.add_metric([], state.audit_events)
        yield audit


def completeness_families(found: CompletenessCounts) -> Iterator[Metric]:
    """How series were completed, and per scanner its early completions and re-opens."""
    by = GaugeMetricFamily("dicom_node_series_completed", "Series with jobs, by how their "
                           "completion was decided (quiet period, MPPS, learned or declared "
                           "size)", labels=["by"])
    for how in COMPLETED_BY:
        by.add_metric([how], found.by.get(how, 0))
    yield by
    early = CounterMetricFamily("dicom_node_series_completed_early",
                                "Series completed before their quiet period, per scanner",
                                labels=["scanner"])
    reopened = CounterMetricFamily("dicom_node_series_reopened", "Series completed early that "
                                   "a later instance re-opened, per scanner", labels=["scanner"])
    start = GaugeMetricFamily("dicom_node_scanner_early_start", "1 while a scanner's series may "
                              "complete by size (0 once it re-opened early_reopen_limit times)",
                              labels=["scanner"])
    for sc in found.scanners:
        early.add_metric([sc.scanner], sc.early)
        reopened.add_metric([sc.scanner], sc.reopened)
        start.add_metric([sc.scanner], 1.0 if sc.early_start else 0.0)
    yield early
    yield reopened
    yield start


def drift_families(data_dir: Path, config: DriftConfig) -> Iterator[Metric]:
    """Drift per scanner (:mod:`dicom_node.learning.drift`) as gauges."""
    help_ = {"series": "Served series recorded per task and scanner",
             "moved": "1 when a scanner's recent series moved from its baseline (PSI above "
                      "drift_psi_threshold)",
             "psi": "Population stability index of a figure: latest series vs baseline"}
    fams = {"series": GaugeMetricFamily("dicom_node_drift_series", help_["series"],
                                        labels=["task", "scanner"]),
            "moved": GaugeMetricFamily("dicom_node_drift_moved", help_["moved"],
                                       labels=["task", "scanner"]),
            "psi": GaugeMetricFamily("dicom_node_drift_psi", help_["psi"],
                                     labels=["task", "scanner", "figure"])}
    try:
        gauges = list(drift_gauges(data_dir, config))
    except (OSError, sqlite3.Error) as exc:  # a full disk: no drift figures this scrape
        if not is_disk_full(exc, data_dir):
            raise
        gauges = []
    for g in gauges:
        keys = ["task", "scanner", "figure"] if g.name == "psi" else ["task", "scanner"]
        fams[g.name].add_metric([g.labels[k] for k in keys], g.value)
    yield from fams.values()


def build_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) and ``GET /healthz`` on a local port.

    Parameters
    ----------
    bind, port : str, int
        Where to listen (port 0 picks a free one).
    registry : prometheus_client.CollectorRegistry
        What ``/metrics`` exports.
    health : callable
        Returns ``(healthy, {check: detail})``; ``/healthz`` answers 200 or 503 with it
        as JSON.
    """

    def __init__(self, bind: str, port: int, registry: CollectorRegistry,
                 health: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(outer.registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok, checks = outer.health()
                    body = json.dumps({"healthy": ok, "checks": checks}).encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found: /metrics or /healthz\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                LOG.debug("metrics endpoint: " + format, *args)

        self.registry = registry
        self.health = health
        self.httpd = ThreadingHTTPServer((bind, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()
        LOG.info("metrics: http://%s:%d/metrics and /healthz", self.httpd.server_address[0],
                 self.port)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
