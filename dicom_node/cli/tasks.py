"""``dicom-node tasks list`` and ``dicom-node tasks explain SERIES_DIR``: what the node serves.

* ``tasks list [--json]``: each configured task (``[[tasks]]``, or the shipped default),
  its rules, whether it is enabled, and the model version that would serve it per
  scanner scope - or "no active model" (its jobs then wait for one).
* ``tasks explain SERIES_DIR [--json]``: for a folder of DICOM files, per series, which
  tasks select it and, for each other task, the first rule that refused it - decided by
  the same :func:`pipelines.selection.matches` the node uses. A multi-frame (Enhanced)
  series also gets its dimensions (stacks, temporal positions, echoes, image types) and
  the volume each selecting task segments.

Both read the configuration and the registry only; they work while the node serves.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.settings import Settings
from dicom_node.tasks import Task
from pipelines.errors import PipelineError
from pipelines.multiframe import choose_frames, describe_dimensions, is_multiframe, read_frames
from pipelines.selection import matches
from registry.records import ModelStatus
from registry.store import Registry


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    t = sub.add_parser("tasks", parents=parents,
                       help="the tasks the node serves: their rules and models; why a series is "
                            "(not) selected")
    tsub = t.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    p = tsub.add_parser("list", parents=parents,
                        help="each task, its rules, enabled, and the model serving it per scanner")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)
    p = tsub.add_parser("explain", parents=parents,
                        help="which tasks select each series of a folder, and why the others do not")
    p.add_argument("series_dir", metavar="SERIES_DIR", type=Path,
                   help="folder of DICOM files (searched recursively)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_explain)


def task_models(reg: Registry, task: Task) -> list[dict[str, str]]:
    """The active versions of a task, one per scanner scope (most specific first)."""
    active = reg.list(task.name, status=ModelStatus.ACTIVE)
    active.sort(key=lambda mv: -mv.scope.specificity)
    return [{"scope": str(mv.scope), "manufacturer": mv.scope.manufacturer,
             "scanner_model": mv.scope.model_name, "version": mv.version,
             "labels": ", ".join(lab.name for lab in mv.labels)} for mv in active]


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with Registry(settings.data_dir) as reg:
        rows = [(t, task_models(reg, t)) for t in settings.tasks]
    source = "configuration" if settings.config_path and any(
        t.source == str(settings.config_path) for t in settings.tasks) else "shipped default"
    if args.json:
        print(json.dumps([{**t.to_dict(), "from": source, "models": models}
                          for t, models in rows], indent=2))
        return 0
    if not rows:
        print("tasks: none configured (the configuration's [[tasks]] list is empty)")
        return 0
    print(f"tasks ({source}): {len(rows)}")
    for t, models in rows:
        print(f"{t.name}  {'enabled' if t.enabled else 'DISABLED'}  outputs {'/'.join(t.outputs)}")
        print(f"  rules: {t.describe_rules()}")
        print(f"  segments: {t.describe_segments()}"
              + (f"; first model from template {t.template}" if t.template else ""))
        if not models:
            print("  model: no active model (its series wait for one: `dicom-node models import "
                  f"BUNDLE_DIR --task {t.name} --activate`)")
        for m in models:
            names = m["labels"].split(", ")
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} labels)" if len(names) > 8 else "")
            print(f"  model: {m['version']} for {m['scope']} (labels: {shown})")
    return 0


def explain(series_dir: Path, tasks: Sequence[Task]) -> list[dict[str, Any]]:
    """Per series of a folder: the tasks that select it and the first refusal of each other.

    Raises
    ------
    ValueError
        If the folder holds no DICOM series.
    """
    if not series_dir.exists():
        raise ValueError(f"SERIES_DIR: {series_dir} does not exist")
    files = [series_dir] if series_dir.is_file() else sorted(
        p for p in series_dir.rglob("*") if p.is_file())
    from pipelines.run import group_series  # torch: loaded by the command, not by `serve`

    series, _unreadable = group_series(files)
    if not series:
        raise ValueError(f"SERIES_DIR: no DICOM series in {series_dir} ({len(files)} file(s))")
    out = []
    for s in series:
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in s.paths]
        selected, refused = [], []
        for t in tasks:
            verdict = matches(t.rules, headers)
            if verdict.matched and t.enabled:
                selected.append(t.name)
            elif verdict.matched:
                refused.append({"task": t.name, "reason": "the task is disabled (enabled = false)"})
            else:
                prefix = f"rules {t.name!r}: "
                reason = verdict.reason[len(prefix):] if verdict.reason.startswith(prefix) \
                    else verdict.reason
                refused.append({"task": t.name, "reason": reason})
        out.append({"series_uid": s.series_uid, "modality": s.modality,
                    "series_description": s.series_description, "instances": len(s.paths),
                    "multiframe": _multiframe(headers, tasks, selected),
                    "selected_by": selected, "refused_by": refused})
    return out


def _multiframe(headers: Sequence[pydicom.Dataset], tasks: Sequence[Task],
                selected: Sequence[str]) -> dict[str, Any] | None:
    """For a multi-frame (Enhanced) series: its dimensions, and which volume each selecting
    task takes (``None`` for a single-frame series)."""
    multi = [h for h in headers if is_multiframe(h)]
    if not multi:
        return None
    try:
        frames = [f for h in multi for f in read_frames(h)]
    except PipelineError as exc:
        return {"dimensions": f"unreadable functional groups: {exc}", "volumes": {}}
    volumes = {t.name: f"{t.volume.describe()} "
                       f"({len(choose_frames(frames, t.volume, str(multi[0].SeriesInstanceUID)))}"
                       " frames)"
               for t in tasks if t.name in selected}
    return {"dimensions": describe_dimensions(frames), "volumes": volumes}


def cmd_explain(args: argparse.Namespace, settings: Settings) -> int:
    report = explain(args.series_dir, settings.tasks)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for r in report:
        what = f"{r['modality']} {r['series_description']!r}" if r["series_description"] \
            else r["modality"]
        print(f"series {r['series_uid']} ({what}, {r['instances']} instance(s))")
        if r["multiframe"]:
            print(f"  multi-frame: {r['multiframe']['dimensions']}")
            for task, volume in r["multiframe"]["volumes"].items():
                print(f"  {task} segments: {volume}")
        print("  selected by: " + (", ".join(r["selected_by"]) or "no task"))
        for item in r["refused_by"]:
            print(f"  not {item['task']}: {item['reason']}")
    return 0
