"""``dicom-node drift [TASK] [--json]``: each scanner's recent series beside its baseline.

The figures and the test (population stability index) are described in
:mod:`dicom_node.learning.drift`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dicom_node.learning.drift import config_of, drift_report
from twin_archive.learning import FigureStore


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("drift", parents=parents,
                       help="drift per scanner: recent series beside the baseline (PSI)",
                       description="For each scanner (Manufacturer / Model / Station) and task: "
                                   "the input figures (HU inside the body, spacing, slices, kVp) "
                                   "and output figures (segment volumes, empty results) of its "
                                   "latest series beside its first ones, with the population "
                                   "stability index of each; PSI above drift_psi_threshold "
                                   "means the figure moved.")
    p.add_argument("task", metavar="TASK", nargs="?", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_drift)


def cmd_drift(args: argparse.Namespace, settings: Any) -> int:
    from dicom_node.runtime.node import open_archive

    config = config_of(settings)
    with open_archive(settings):  # migrates the index when the node never ran
        pass
    with FigureStore(settings.data_dir) as store:
        report = drift_report(store, config, args.task)
    if args.json:
        print(json.dumps([d.to_dict() for d in report], indent=2))
        return 0
    if not report:
        print("drift: no served series recorded yet")
        return 0
    print(f"drift: baseline = first {config.baseline_series} series of a scanner, window = its "
          f"latest {config.window_series}; a figure moved when PSI > {config.psi_threshold:g}")
    for d in report:
        head = {"collecting": f"collecting ({d.baseline_series}/{config.baseline_series} "
                              f"baseline, {d.window_series}/{config.window_series} window series)",
                "stable": "stable", "moved": "MOVED: " + ", ".join(d.moved)}[d.status]
        named = f" (named in the journal {d.named_at[:19]})" if d.named_at else ""
        print(f"{d.task}  {d.scanner}: {d.series} series, {head}{named}")
        for f in d.figures:
            b = "-" if f.baseline_mean is None else f"{f.baseline_mean:g}"
            w = "-" if f.window_mean is None else f"{f.window_mean:g}"
            value = "n/a" if f.psi is None else f"{f.psi:.3f}"
            mark = "  moved" if f.name in d.moved else ""
            print(f"    {f.part:<6} {f.name:<22} baseline {b:>10}  window {w:>10}  PSI {value:>7}{mark}")
    return 0
