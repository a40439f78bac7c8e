"""``dicom-node archive verify [--deep] [--repair]`` and ``dicom-node archive rebuild-index``.

``verify`` checks what the archive believes against what is on disk: SQLite's
``integrity_check`` of every database of the data directory (and the audit log's hash
chain), rows whose file is gone, files no row names, and with ``--deep`` the SHA-256
of every instance file against its row. Exit status 0 when all is well, 1 with a
summary otherwise. It reads only, and runs beside a serving node (files written in the
last few seconds are not judged: a node may be between their rename and their commit).

``--repair`` (only while no node serves: it takes the data directory's lock) re-indexes
the intact files no row names, moves the others to ``<data-dir>/quarantine/``, moves a
file whose content changed there too, and marks instances whose file is gone as
missing (``twin show`` says so on their series). It is recorded in the audit log.

``rebuild-index`` (also under the lock) sets a damaged or lost ``index.sqlite`` aside
and builds a new one from the instance files (they carry their headers), then replays
the consent decisions and twin merges from the hash-chained audit log, so losing the
index loses no consent decision. AI results and labels are not rebuilt (their rows
hold what the files do not: the job, the model, the provenance); their files stay.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.foundation.database import connect
from dicom_node.runtime.datadir_lock import DataDirInUseError, DataDirLock
from dicom_node.settings import Settings
from twin_archive import Archive, StoreOutcome, StoreResult, audit
from twin_archive.labels import LabelStore
from twin_archive.layout import INDEX_NAME, QUARANTINE_DIR
from twin_archive.rebuild import rebuild_index
from twin_archive.reconcile import hash_instance_file, quarantine, stray_files
from twin_archive.results import ResultStore

#: Every SQLite database of a data directory.
DATABASES = ("index.sqlite", "queue.sqlite", "registry.sqlite", "audit.sqlite")
#: Files changed this recently are not judged by a ``verify`` beside a running node.
IN_FLIGHT_S = 10.0


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    arch = sub.add_parser("archive", parents=parents,
                          help="check, repair or rebuild the archive and its index")
    asub = arch.add_subparsers(dest="archive_command", metavar="ACTION", required=True)
    p = asub.add_parser("verify", parents=parents,
                        help="check the databases, the files and their rows (exit 1 if wrong)",
                        description="Check every database (SQLite integrity check, audit hash "
                                    "chain), rows without files and files without rows.")
    p.add_argument("--deep", action="store_true",
                   help="also re-hash every instance file against its index SHA-256")
    p.add_argument("--repair", action="store_true",
                   help="index intact files without rows, quarantine the rest, mark "
                        "missing instances (stop the node first)")
    p.set_defaults(func=cmd_verify)
    p = asub.add_parser("rebuild-index", parents=parents,
                        help="rebuild index.sqlite from the files and the audit log "
                             "(stop the node first)")
    p.set_defaults(func=cmd_rebuild)
    from dicom_node.cli import retention

    retention.register_archive(asub, parents)


@dataclass(kw_only=True, slots=True)
class Findings:
    """What ``verify`` found; anything in ``problems`` makes the exit status 1."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_databases(data_dir: Path) -> list[str]:
    """Problems of the data directory's SQLite files (``integrity_check``, audit chain)."""
    problems = []
    for name in DATABASES:
        path = data_dir / name
        if not path.exists():
            if name == INDEX_NAME:
                problems.append(f"{path}: missing (rebuild it: dicom-node archive rebuild-index)")
            continue
        try:
            with closing(connect(path, timeout_s=10, readonly=True)) as db:
                rows = [r[0] for r in db.conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:
            rows = [str(exc)]
        if rows != ["ok"]:
            problems.append(f"{path}: damaged ({'; '.join(rows[:3])})")
    if (data_dir / audit.AUDIT_DB_NAME).exists() and not any(
            audit.AUDIT_DB_NAME in p for p in problems):
        try:
            with audit.AuditLog(data_dir) as log:
                log.verify()
        except audit.AuditLogTamperedError as exc:
            problems.append(f"{data_dir / audit.AUDIT_DB_NAME}: {exc}")
    return problems


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir).resolve()
    try:
        lock: DataDirLock | None = DataDirLock(data_dir)
    except DataDirInUseError:
        if args.repair:  # repair changes files and rows: no node may serve meanwhile
            raise
        lock = None  # a node serves: verify beside it, leaving files in flight alone
    try:
        return _verify(data_dir, settings, deep=args.deep, repair=args.repair,
                       in_flight_s=0.0 if lock is not None else IN_FLIGHT_S)
    finally:
        if lock is not None:
            lock.release()


def _verify(data_dir: Path, settings: Settings, *, deep: bool, repair: bool,
            in_flight_s: float) -> int:
    t0 = time.perf_counter()
    found = Findings()
    db_problems = check_databases(data_dir)
    found.problems += db_problems
    if any(INDEX_NAME in p for p in db_problems):
        _report(found, data_dir, time.perf_counter() - t0)
        print("the index cannot be checked against the files; rebuild it first: "
              "dicom-node archive rebuild-index")
        return 1
    from dicom_node.runtime.node import open_archive

    repaired: dict[str, int] = {}
    with open_archive(settings) as archive:
        strays = stray_files(archive.ingest, skip_recent_s=in_flight_s)
        rows = archive.ingest.instance_files()
        gone, damaged = [], []
        for row in rows:
            path = data_dir / row["path"]
            if not path.is_file():
                if row["missing_at"] is None:
                    gone.append(row)
                continue
            if deep:
                try:
                    ok = hash_instance_file(path).sha256 == row["sha256"]
                except (OSError, ValueError):
                    ok = False
                if not ok:
                    damaged.append(row)
        results_gone = _result_rows_without_files(data_dir)
        marked = sum(1 for r in rows if r["missing_at"] is not None)
        if strays:
            found.problems.append(f"{len(strays)} file(s) without an index row: "
                                  + _sample(str(p.relative_to(data_dir)) for _, p in strays))
        if gone:
            found.problems.append(f"{len(gone)} instance row(s) whose file is gone: "
                                  + _sample(r["path"] for r in gone))
        if results_gone:
            found.problems.append(f"{len(results_gone)} result/label row(s) whose file is gone: "
                                  + _sample(results_gone))
        if damaged:
            found.problems.append(f"{len(damaged)} instance file(s) whose content no longer "
                                  "has its index SHA-256: " + _sample(r["path"] for r in damaged))
        if marked:
            found.notes.append(f"{marked} instance(s) marked missing by an earlier repair "
                               "(their series say so in 'twin show')")
        found.notes.append(f"{len(rows)} instance row(s) checked"
                           + (", every file re-hashed" if deep else ""))
        if repair and (strays or gone or damaged):
            repaired = _repair(archive, data_dir, strays, gone, damaged)
    _report(found, data_dir, time.perf_counter() - t0)
    if repaired:
        audit.record(data_dir, audit.AuditEvent.ARCHIVE_REPAIRED, audit.AuditOutcome.SUCCESS,
                     getpass.getuser(), str(data_dir), repaired)
        print("repaired: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in repaired.items())
              + f" (quarantine: {data_dir / QUARANTINE_DIR}); checking again:")
        return _verify(data_dir, settings, deep=deep, repair=False, in_flight_s=in_flight_s)
    return 1 if found.problems else 0


def _repair(archive: Archive, data_dir: Path, strays: list[tuple[str, Path]],
            gone: list[dict[str, Any]], damaged: list[dict[str, Any]]) -> dict[str, int]:
    out = {"files_indexed": 0, "files_quarantined": 0, "instances_marked_missing": 0}
    for row in damaged:  # the file is not what was received: set aside, its row says missing
        quarantine(data_dir, data_dir / row["path"], "content no longer matches its SHA-256")
        out["files_quarantined"] += 1
    instances = [p for kind, p in strays if kind == "instance"]
    for path, outcome in archive.ingest.index_files(instances):
        if isinstance(outcome, StoreResult) and outcome.outcome is not StoreOutcome.DUPLICATE:
            out["files_indexed"] += 1
        else:
            why = ("the same content is indexed under another file"
                   if isinstance(outcome, StoreResult) else f"not intact ({outcome})")
            quarantine(data_dir, path, why)
            out["files_quarantined"] += 1
    for kind, path in strays:
        if kind == "result":
            quarantine(data_dir, path, "result or label file without its row")
            out["files_quarantined"] += 1
    out["instances_marked_missing"] = archive.ingest.mark_missing([r["id"] for r in gone + damaged])
    return out


def _result_rows_without_files(data_dir: Path) -> list[str]:
    with closing(ResultStore(data_dir)) as results, LabelStore(data_dir) as labels:
        return results.missing_files() + labels.missing_files()


def _sample(items: Any, n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _report(found: Findings, data_dir: Path, seconds: float) -> None:
    if found.problems:
        print(f"archive {data_dir}: {len(found.problems)} problem(s) found in {seconds:.1f} s")
        for p in found.problems:
            print(f"  PROBLEM: {p}")
        print("  repair with: dicom-node archive verify --repair (stop the node first)")
    else:
        print(f"archive {data_dir}: all well ({seconds:.1f} s)")
    for n in found.notes:
        print(f"  {n}")


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(settings.data_dir).resolve()
    with DataDirLock(data_dir):
        report = rebuild_index(data_dir)
    print(f"index rebuilt in {report.seconds:.1f} s: {report.instances} instance(s) of "
          f"{report.twins} twin(s), {report.studies} study(ies); {report.consent_events} "
          f"consent decision(s) and legal hold(s), and {report.merges} twin merge(s) replayed from the audit log")
    if report.set_aside:
        print(f"  the old index was kept as {report.set_aside}")
    if report.quarantined:
        print(f"  {report.quarantined} file(s) not intact, moved to {data_dir / QUARANTINE_DIR}")
    if report.audit_problem:
        print(f"  WARNING: {report.audit_problem}; decisions after that point were NOT replayed "
              "(donation stays off for them: check with 'dicom-node audit')")
        return 1
    return 0
