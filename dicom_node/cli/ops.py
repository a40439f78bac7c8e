"""``dicom-node status`` and ``dicom-node audit``: the node at a glance, and its audit log.

Both read the data directory's SQLite files and work whether or not the node runs.
``status`` also says whether a node serves this data directory (its ``serve.json`` and
pid) and, when the metrics endpoint is on, asks its ``/healthz`` and ``/metrics`` for
the counters only the running process knows (associations, bytes received).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from dicom_node.runtime import retention
from dicom_node.queue.completeness import CompletenessCounts, read_completeness
from dicom_node.foundation.clock import utc_now
from dicom_node.runtime.node import STATE_FILE
from dicom_node.runtime.observability import NodeState, read_state
from dicom_node.settings import Settings
from twin_archive.audit import AuditEvent, AuditLog, AuditLogTamperedError


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", parents=parents, help="the node at a glance (running or not)",
                       description="Is the node running, what is archived, queued, sent and "
                                   "in service; read from the data directory.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("audit", parents=parents,
                       help="the audit log (associations, studies, results, consent, models)",
                       description="Print the append-only audit log, oldest first "
                                   "(DICOM PS3.15 A.5 / IHE ATNA event types).")
    p.add_argument("--since", default=None, metavar="WHEN",
                   help="only events since WHEN: an ISO date/time (2026-11-23, "
                        "2026-11-23T08:00) or an age such as 30m, 12h, 7d")
    p.add_argument("--type", dest="event_type", choices=[e.value for e in AuditEvent],
                   help="only events of this type")
    p.add_argument("--limit", type=int, default=None, help="only the last N events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--verify", action="store_true",
                   help="check the hash chain of the whole log (exit 1 if it was tampered with)")
    p.set_defaults(func=cmd_audit)


def parse_since(text: str) -> datetime:
    """``30m``/``12h``/``7d`` ago, or an ISO 8601 date/time (UTC unless it says otherwise).

    Raises
    ------
    ValueError
        Naming ``--since`` when the text is neither.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t[:-1].isdigit() and t[-1:] in units:
        return utc_now() - timedelta(seconds=int(t[:-1]) * units[t[-1]])
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"--since: expected an ISO date/time or an age like 12h, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _running(data_dir: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((data_dir / STATE_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except PermissionError:
        return info  # alive, another user's process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def _fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as rsp:
            return int(rsp.status), rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _live_counters(metrics_url: str) -> dict[str, float]:
    code, text = _fetch(metrics_url + "/metrics")
    if code != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())
                out[key] = sample.value
    return out


def _waiting_for_models(data_dir: Path) -> list[tuple[str, str]]:
    """(task, scanner in words) of the jobs waiting for a model."""
    from dicom_node.queue.jobs import JobQueue

    queue = JobQueue(data_dir)
    try:
        return [(task, " / ".join(x for x in (m, n) if x) or "any scanner")
                for task, m, n in queue.waiting_scanners()]
    finally:
        queue.close()
def describe_workers(workers: list[dict[str, Any]]) -> str:
    """One line: how many run, what each does, restarts and what ended the last one."""
    if not workers:
        return "none (workers = 0: jobs stay queued)"
    alive = [w for w in workers if w.get("state") in ("starting", "ready")]
    parts = []
    for w in workers:
        what = {"starting": "starting", "ready": f"job {w['job']}" if w.get("job") else "idle",
                "restarting": "restarting", "stopped": "stopped"}.get(w.get("state", ""), "?")
        text = f"{w['name']} " + (f"pid {w['pid']}: " if w.get("pid") else "") + what
        if w.get("restarts") or w.get("last_exit"):
            text += f", restarted {w.get('restarts', 0)} time(s), last end: {w.get('last_exit')}"
        parts.append(text)
    return f"{len(alive)} of {len(workers)} running (" + "; ".join(parts) + ")"


def _storage(settings: Settings) -> retention.Storage | None:
    """Bytes by kind and what retention could free; None before the index has its tables."""
    if not (Path(settings.data_dir) / "index.sqlite").exists():  # status creates nothing
        return None
    try:
        return retention.storage(settings)
    except (RuntimeError, sqlite3.DatabaseError):  # no index yet, not migrated, or disk full
        return None


def describe_disk_full(free: int, unreadable: tuple[str, ...]) -> str:
    """The ``disk:`` line of ``status`` while the data directory's disk is full."""
    line = (f"disk:      FULL ({free >> 10} KiB free): new instances are refused (A700), jobs "
            "and sends wait; all resume by themselves once space is freed (nothing to repair)")
    if unreadable:
        line += (f"; unreadable until then: {', '.join(unreadable)} (counted as 0 below: "
                 "SQLite cannot create its shared-memory file)")
    return line


def status_json(data_dir: Path, running: dict[str, Any] | None, health: dict[str, Any] | None,
                live: dict[str, float], state: NodeState) -> dict[str, Any]:
    """What ``status --json`` prints."""
    return {"data_dir": str(data_dir), "running": running, "health": health, "live": live,
            "state": {
                "twins": state.twins, "studies": state.studies, "instances": state.instances,
                "archived_bytes": state.archived_bytes, "jobs": state.jobs, "sends": state.sends,
                "jobs_waiting": list(state.waiting),
                "send_failed_attempts": state.send_failed_attempts, "results": state.results,
                "stages": {k: {"count": v.count, "total_s": v.total_s}
                           for k, v in state.stages.items()},
                "active_models": [{"task": m.task, "version": m.version, "scope": m.scope}
                                  for m in state.active_models],
                "waiting_for_models": [{"task": t, "scanner": sc} for t, sc in
                                       (_waiting_for_models(data_dir)
                                        if state.jobs.get("waiting") else [])],
                "audit_events": state.audit_events, "last_audit_at": state.last_audit_at,
                "free_bytes": state.free_bytes, "disk_full": state.disk_full,
                "unreadable": list(state.unreadable)}}


def completeness_lines(found: CompletenessCounts) -> list[str]:
    """``status`` lines: how series were completed, and each scanner's early starts."""
    if not found.by and not found.scanners:
        return []
    lines = ["complete:  " + (", ".join(f"{n} by {how}" for how, n in sorted(found.by.items()))
                              or "none yet")]
    for sc in found.scanners:
        lines.append(f"scanner:   {sc.scanner}: {sc.early} series complete early, {sc.reopened} "
                     "re-opened" + ("" if sc.early_start else
                                    " - early start OFF (early_reopen_limit reached)"))
    return lines


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir)
    state = read_state(data_dir)
    running = _running(data_dir)
    health: dict[str, Any] | None = None
    live: dict[str, float] = {}
    if running and running.get("metrics"):
        code, body = _fetch(running["metrics"] + "/healthz")
        try:
            health = json.loads(body) if code else {"healthy": False, "error": body}
        except ValueError:
            health = {"healthy": False, "error": body[:200]}
        live = _live_counters(running["metrics"])
    disk = _storage(settings)
    complete = read_completeness(data_dir)
    if args.json:
        out = status_json(data_dir, running, health, live, state)
        out["storage"] = disk.to_dict() if disk is not None else None
        out["completeness"] = {"by": complete.by, "scanners": [
            {"scanner": sc.scanner, "early": sc.early, "reopened": sc.reopened,
             "early_start": sc.early_start} for sc in complete.scanners]}
        print(json.dumps(out, indent=2))
        return 0
    _print_node(running, health, live)
    _print_data(data_dir, state, disk)
    _print_queues(data_dir, state, complete)
    print(f"audit:     {state.audit_events} event(s)"
          + (f", last at {state.last_audit_at[:19]}" if state.last_audit_at else ""))
    return 0


def _print_node(running: dict[str, Any] | None, health: dict[str, Any] | None,
                live: dict[str, float]) -> None:
    """``status``: the process, its workers, health and the counters since it started."""
    if running:
        how = f"pid {running['pid']}, AE {running['ae_title']} on {running['bind_address']}:" \
              f"{running['port']}{' (TLS)' if running.get('tls') else ''}, since {running['started_at']}"
        print(f"node:      RUNNING ({how})")
        if "workers" in running:
            print("workers:   " + describe_workers(running["workers"]))
    else:
        print("node:      not running")
    if health is not None:
        bad = [k for k, v in health.get("checks", {}).items() if v is False]
        print("health:    " + ("healthy" if health.get("healthy") else
                               "UNHEALTHY: " + (", ".join(bad) or str(health.get("error", "")))))
    if live:
        acc = {k.split("{")[1].rstrip("}"): int(v) for k, v in live.items()
               if k.startswith("dicom_node_associations_total")}
        rx = sum(int(v) for k, v in live.items() if k.startswith("dicom_node_instances_received_total"))
        print(f"since start: {rx} instance(s), {int(live.get('dicom_node_received_bytes_total', 0)) >> 20}"
              f" MiB received; associations " + ", ".join(f"{n} {k}" for k, n in acc.items()))


def _print_data(data_dir: Path, state: Any, disk: Any) -> None:
    """``status``: the disk, retention's figures and the archive's size."""
    print(f"data:      {data_dir} ({state.free_bytes >> 30} GiB free)")
    if state.disk_full:
        print(describe_disk_full(state.free_bytes, state.unreadable))
    for line in retention.storage_lines(disk) if disk is not None else ():
        print(line)
    print(f"archive:   {state.twins} twin(s), {state.studies} study(ies), {state.instances} "
          f"instance(s), {state.archived_bytes >> 20} MiB")


def _print_queues(data_dir: Path, state: Any, complete: CompletenessCounts) -> None:
    """``status``: jobs, what waits and why, sends, results and the models in service."""
    print("jobs:      " + (", ".join(f"{n} {s}" for s, n in sorted(state.jobs.items())) or "none"))
    for line in state.waiting:
        print(f"waiting:   {line}")
    for task, scanner in _waiting_for_models(data_dir) if state.jobs.get("waiting") else ():
        print(f"waiting:   task {task} has no active model for {scanner}: import one with "
              f"`dicom-node models import BUNDLE_DIR --task {task} --activate`")
    print("sends:     " + (", ".join(f"{n} {s}" for s, n in sorted(state.sends.items())) or "none")
          + (f"; {state.send_failed_attempts} failed attempt(s)" if state.send_failed_attempts else ""))
    for line in completeness_lines(complete):
        print(line)
    if state.stages:
        print(f"results:   {state.results}; mean seconds per stage: " + ", ".join(
            f"{k} {v.total_s / v.count:.2f}" for k, v in state.stages.items() if v.count))
    else:
        print(f"results:   {state.results}")
    if state.active_models:
        for m in state.active_models:
            print(f"model:     {m.task}: {m.version} ({m.scope})")
    else:
        print("model:     none active")


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    since = parse_since(args.since) if args.since else None
    with AuditLog(settings.data_dir) as log:
        if args.verify:
            try:
                n = log.verify()
            except AuditLogTamperedError as exc:
                print(f"dicom-node: {exc}")
                return 1
            print(f"audit log intact: {n} event(s), hash chain verified")
            return 0
        entries = log.entries(since=since, event_type=args.event_type, limit=args.limit)
    if args.json:
        for e in entries:
            print(json.dumps(e.to_dict(), sort_keys=True))
        return 0
    if not entries:
        print("no audit events" + (f" since {since.isoformat(timespec='seconds')}" if since else ""))
        return 0
    for e in entries:
        detail = " ".join(f"{k}={v}" for k, v in e.detail.items())
        outcome = "ok" if e.outcome == 0 else e.outcome.name.lower()
        print(f"{e.at[:23]}  {e.event_type.value:<21} {outcome:<15} {e.who:<28} {e.what}"
              + (f"  [{detail}]" if detail else ""))
    return 0
