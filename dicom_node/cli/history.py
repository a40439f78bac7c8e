"""``dicom-node twin history PATIENT [--task T] [--json] [--plot FILE.png]``: a twin's
measurements over time, per task and segment, each with its change since the one before."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings
from twin_archive import printable


def register_twin(tsub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = tsub.add_parser("history", parents=parents,
                        help="a patient's measurements over time, per task and segment",
                        description="Every segment volume of the patient's current AI results, "
                                    "oldest study first, with the change since the study before "
                                    "(mL, %%, days). Points from priors retrieved from the PACS "
                                    "are marked.")
    p.add_argument("patient_id", metavar="PATIENT", help="Patient ID (or twin key)")
    p.add_argument("--issuer", default=None, help="Issuer of Patient ID, when several share the ID")
    p.add_argument("--task", default=None, help="only this task")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw each segment's volume over time into this PNG file")
    p.set_defaults(func=cmd_history)


def rows_with_changes(points: list[Any]) -> list[dict[str, Any]]:
    """The points as dicts, each with its change since the previous point of the same
    task and segment (``change_ml``, ``change_pct``, ``interval_days``; None for the first)."""
    from pipelines.comparison import volume_change
    from twin_archive.history import study_day

    last: dict[tuple[str, str], Any] = {}
    out = []
    for p in points:
        row = {**p.to_dict(), "change_ml": None, "change_pct": None, "interval_days": None}
        before = last.get((p.task, p.segment))
        day, prev_day = study_day(p.study_date), study_day(before.study_date) if before else None
        if before is not None:
            row["change_ml"], row["change_pct"] = volume_change(p.volume_ml, before.volume_ml)
            row["interval_days"] = (day - prev_day).days if day and prev_day else None
        last[(p.task, p.segment)] = p
        out.append(row)
    return out


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    from dicom_node.cli.twin import _archive
    from twin_archive.history import HistoryStore

    with _archive(settings) as archive:
        detail = archive.twins.twin(args.patient_id, args.issuer)
    with HistoryStore(settings.data_dir) as store:
        points = list(store.history(detail.twin.patient_key, args.task))
    rows = rows_with_changes(points)
    if args.plot is not None:
        _plot(points, args.plot)
    if args.json:
        print(json.dumps({"patient_key": detail.twin.patient_key, "points": rows}, indent=2))
        return 0
    print(f"Patient {printable(detail.twin.patient_id)}  twin {detail.twin.patient_key}: "
          f"{len(rows)} measurement(s)" + (f" of task {args.task}" if args.task else ""))
    if not rows:
        return 0
    print(f"  {'TASK':<14} {'SEGMENT':<16} {'STUDY DATE':<10} {'VOLUME mL':>10} {'CHANGE':>18} "
          f"{'DAYS':>5}  MODEL VERSION     RESULT")
    for r in rows:
        change = "" if r["change_ml"] is None else (
            f"{r['change_ml']:+.1f} mL" + (f" {r['change_pct']:+.0f} %" if r["change_pct"]
                                           is not None else ""))
        days = "" if r["interval_days"] is None else str(r["interval_days"])
        print(f"  {r['task'][:14]:<14} {r['segment'][:16]:<16} {r['study_date'] or '(no date)':<10} "
              f"{r['volume_ml']:>10.1f} {change:>18} {days:>5}  {r['model_version'][:16]:<16}  "
              f"{r['result_id']}" + ("  (prior from the PACS)" if r["retrieved"] else ""))
    if args.plot is not None:
        print(f"  plot: {args.plot}")
    return 0


def _plot(points: list[Any], path: Path) -> None:
    """Draw the dated points (segment names prefixed by their task when several)."""
    from PIL import Image

    from pipelines.writers.history_plot import VolumePoint, plot_volumes
    from twin_archive.history import study_day

    several = len({p.task for p in points}) > 1
    dated = [VolumePoint(segment=f"{p.task}/{p.segment}" if several else p.segment,
                         study_date=day, volume_ml=p.volume_ml)
             for p in points if (day := study_day(p.study_date)) is not None]
    if not dated:
        raise SystemExit("dicom-node: twin history --plot: no dated measurement to draw")
    Image.fromarray(plot_volumes(dated), "RGB").save(path, format="PNG")
