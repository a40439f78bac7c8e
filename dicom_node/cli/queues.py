"""``dicom-node jobs`` and ``dicom-node sends``: what the node is doing, and what failed.

Both read ``<data-dir>/queue.sqlite`` and may run while the node serves.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from dicom_node.queue.jobs import JobKind, JobQueue, JobState
from dicom_node.queue.sender import Send, Sender, SendState
from dicom_node.settings import Settings


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("jobs", parents=parents, help="list inference jobs (queued, running, done, failed)",
                       description="List the inference jobs of the node, newest first.")
    p.add_argument("--state", choices=[s.value for s in JobState], help="only jobs in this state")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("sends", parents=parents, help="list results queued, sent, confirmed, held or failed per destination",
                       description="List the outbound objects of results (C-STORE or STOW-RS), "
                                   "newest first: sent is acknowledged, confirmed is kept by the "
                                   "archive (Storage Commitment or read-back).")
    p.add_argument("--state", choices=[s.value for s in SendState], help="only sends in this state")
    p.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sends)


def _plain(obj: Any) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(obj).items()}


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    queue = JobQueue(settings.data_dir)
    try:
        jobs = queue.list(args.state, limit=args.limit)
        counts = queue.counts()
    finally:
        queue.close()
    if args.json:
        print(json.dumps([_plain(j) for j in jobs], indent=2))
        return 0
    print("jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none yet"))
    if jobs:
        print(f"{'ID':>5}  {'STATE':<8} {'TASK':<12} {'TRIES':>5}  {'ENQUEUED':<19}  {'RESULT':>6}  "
              "SERIES / REASON")
    for j in jobs:
        print(f"{j.id:>5}  {j.state.value:<8} {j.task:<12} {j.attempts:>2}/{j.max_attempts:<2}  "
              f"{j.enqueued_at[:19]:<19}  {j.result_id if j.result_id else '-':>6}  "
              + (f"priors of study {j.study_uid}" if j.kind is JobKind.PRIORS else j.series_uid))
        if j.error:
            what = {JobState.FAILED: "reason", JobState.WAITING: "waiting"}.get(j.state, "note")
            print(f"{'':>7}{what}: {j.error}")
    return 0


def cmd_sends(args: argparse.Namespace, settings: Settings) -> int:
    sender = Sender(settings.data_dir, ae_title=settings.ae_title)
    try:
        sends = sender.list(args.state, limit=args.limit)
    finally:
        sender.close()
    if args.json:
        print(json.dumps([_plain(s) for s in sends], indent=2))
        return 0
    if not sends:
        print("sends: none yet")
        return 0
    print(f"{'ID':>5}  {'STATE':<9} {'KIND':<7} {'DESTINATION':<32} {'TRIES':>5}  {'RESULT':>6}  "
          "WHEN / LAST ERROR")
    for s in sends:
        print(f"{s.id:>5}  {s.state.value:<9} {s.kind:<7} {s.destination[:32]:<32} {s.attempts:>5}  "
              f"{s.result_id:>6}  {_when(s)}{'  ' + s.last_error if s.last_error else ''}")
    return 0


def _when(s: Send) -> str:
    """When the row was delivered, confirmed, or will be tried or confirmed by."""
    if s.state is SendState.CONFIRMED:
        return f"confirmed {s.confirmed_at[:19]} ({s.confirm})"
    if s.state is SendState.SENT:
        wait = f"; awaiting {s.confirm} until {s.confirm_by[:19]}" if s.confirm_by else ""
        return f"{s.sent_at[:19]}{wait}"
    if s.state is SendState.QUEUED:
        return f"next try {s.next_attempt_at[:19]}"
    return ""
