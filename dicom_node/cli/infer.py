"""``dicom-node infer INPUT_DIR --out OUT_DIR``: a model on a folder of DICOM files, no PACS.

The files are grouped by series (:func:`pipelines.run.group_series`); each series goes
to the first enabled configured task whose selection rules match it (``[[tasks]]``,
:mod:`dicom_node.tasks`; or only ``--task``), with the model the
registry would serve for that series' scanner (or ``--version``), through the same
:func:`pipelines.run.run_series` the node's worker uses. The SEG, SR and overlay are
written to ``OUT_DIR`` (:func:`pipelines.writers.save_results`).

Exit status: 0 when every selected series ran (a series in which the model found
nothing writes nothing and says so); 1 when a selected series was refused by the
pipeline (its geometry, its modality, a predicted memory need over ``max_memory_gb``);
2 when there is nothing to run: no DICOM files,
no series selected, no model for the task, an unknown version.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import pydicom

from dicom_node.logconfig import configure_logging
from dicom_node.settings import Settings
from dicom_node.tasks import Task
from pipelines.errors import EmptyResultError, PipelineError
from pipelines.memory import budget_bytes
from pipelines.selection import SelectionRules
from pipelines.types import SEG_TYPES, WriterOptions
from registry.errors import NoActiveModelError, VersionNotFoundError
from registry.records import ModelVersion
from registry.store import Registry

if TYPE_CHECKING:
    from pipelines.inference import LoadedModel
    from pipelines.run import SeriesFiles

# torch and MONAI (pipelines.inference) are imported when the first model is loaded,
# after the files are read and grouped: the DICOM listener never loads torch (DESIGN
# decision 10). Importing them in a thread while the files are read was measured
# (benchmarks/README.md, infer_vs_deploy.py --startup) and lost: both sides hold the
# GIL, the thread cost 0.17 s more CPU and brought the weights no sooner.

LOG = logging.getLogger(__name__)

#: Exit status when there is nothing to run (no files, no series selected, no model).
EXIT_NOTHING_TO_RUN = 2
#: Exit status when a selected series was refused by the pipeline.
EXIT_SERIES_REFUSED = 1


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "infer", parents=parents,
        help="run the matching pipeline on a folder of DICOM files; SEG/SR/overlay to --out",
        description="Run the node's pipelines on a folder of DICOM files (searched recursively) "
                    "and write the SEG, SR and overlay of each selected series to OUT_DIR - for "
                    "trying a model without a PACS. Uses the models of --data-dir's registry.")
    p.add_argument("input_dir", metavar="INPUT_DIR", help="folder of DICOM files (or one file)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="where the results are written")
    p.add_argument("--task", default=None,
                   help="only this task (default: every enabled task of the configuration; "
                        "see `dicom-node tasks list`)")
    p.add_argument("--version", dest="model_version", default=None, metavar="V",
                   help="this registered model version instead of the active one")
    p.add_argument("--no-overlay", action="store_true", help="write the SEG and SR only")
    p.add_argument("--seg-type", choices=SEG_TYPES, default="binary",
                   help="binary (default: every PACS takes it) or labelmap (Label Map "
                        "Segmentation: one frame per slice, much smaller with many labels)")
    p.add_argument("--max-memory-gb", type=float, default=None, metavar="GB",
                   help="refuse a series predicted to need more memory (default: the "
                        "max_memory_gb setting; 0 = derived from the machine)")
    p.add_argument("--json", action="store_true", help="machine-readable output, one object per series")
    p.set_defaults(func=cmd_infer)


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesReport:
    """What ``infer`` did with one series (printed, or emitted as JSON)."""

    series_uid: str
    modality: str
    series_description: str
    instances: int
    status: str  # "written", "nothing-found", "not-selected", "refused"
    reason: str = ""
    task: str = ""
    model_version: str = ""
    backend: str = ""
    segments: tuple[tuple[str, float], ...] = ()
    timings: tuple[tuple[str, float], ...] = ()
    files: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"series_uid": self.series_uid, "modality": self.modality,
                "series_description": self.series_description, "instances": self.instances,
                "status": self.status, "reason": self.reason, "task": self.task,
                "model_version": self.model_version, "backend": self.backend,
                "segments": [{"name": n, "volume_ml": v} for n, v in self.segments],
                "timings": dict(self.timings), "files": list(self.files)}


class _SeriesFields(TypedDict):
    """The :class:`SeriesReport` fields every series has."""

    series_uid: str
    modality: str
    series_description: str
    instances: int


class _ModelFields(TypedDict):
    """The :class:`SeriesReport` fields of a series a model was chosen for."""

    task: str
    model_version: str
    backend: str


class _Nothing(Exception):
    """Nothing to run; the message says why and what to do (exit 2)."""


def _input_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise _Nothing(f"{root} is neither a folder nor a file")
    return sorted(p for p in root.rglob("*") if p.is_file())


def _specs(task: str | None, model_version: ModelVersion | None,
           tasks: Sequence[Task]) -> tuple[Task | None, ...]:
    """The tasks to try; ``None`` stands for a task the node has no selection rules for
    (only the node's own output and result objects are refused then)."""
    task = task or (model_version.task if model_version else None)
    if task is None:
        return tuple(t for t in tasks if t.enabled)
    served = [t for t in tasks if t.name == task]
    return tuple(served) if served else (None,)


def _select(series: SeriesFiles, specs: Sequence[Task | None], task: str | None
            ) -> tuple[Task | None, str, SelectionRules | None]:
    """The first pipeline that accepts the series: (spec, task, rules).

    Only the headers are read (``run_series`` reads the files whole and lets each
    one's pixel data go once it is in the volume).

    Raises
    ------
    SeriesNotSelected
        If none does; the reason names each pipeline's refusal.
    """
    from pipelines.run import SeriesNotSelected, select_series

    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in series.paths]
    reasons = []
    for spec in specs:
        rules = spec.rules if spec is not None else None
        try:
            select_series(headers, rules)
        except SeriesNotSelected as exc:
            reasons.append(exc.reason)
            continue
        return spec, spec.task if spec is not None else str(task), rules
    raise SeriesNotSelected(series.series_uid, "; ".join(reasons))


def _scanner(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["Manufacturer", "ManufacturerModelName"])
    return str(ds.get("Manufacturer", "") or ""), str(ds.get("ManufacturerModelName", "") or "")


def _loaded(mv: ModelVersion, models: dict[str, LoadedModel], reg: Registry) -> LoadedModel:
    """``mv`` loaded once per command (torch and MONAI are imported by the first)."""
    if mv.version not in models:
        from pipelines.inference import load_model

        models[mv.version] = load_model(mv, registry=reg)
    return models[mv.version]


def infer_folder(input_dir: Path, out_dir: Path, reg: Registry, *, tasks: Sequence[Task],
                 task: str | None = None, model_version: str | None = None,
                 write_overlay: bool = True, seg_type: str = "binary",
                 max_memory_bytes: int = 0) -> list[SeriesReport]:
    """Run the configured ``tasks`` on every series of ``input_dir``; results to ``out_dir``.

    Raises
    ------
    _Nothing
        No DICOM files, or no series selected by any pipeline.
    VersionNotFoundError
        ``model_version`` is not registered.
    NoActiveModelError
        No active model serves a selected series' task and scanner.
    """
    from pipelines.run import SeriesNotSelected, group_series, run_series
    from pipelines.writers import save_results

    fixed = reg.get(model_version) if model_version else None  # VersionNotFoundError
    if fixed is not None and task is not None and fixed.task != task:
        raise ValueError(f"--version {fixed.version} is a {fixed.task!r} model, not {task!r}")
    if task is not None and not task.strip():
        raise ValueError("--task must not be empty")
    files = _input_files(input_dir)
    series, unreadable = group_series(files)
    for bad in unreadable:
        LOG.debug("skipped %s: %s", bad.path, bad.reason)
    if not series:
        raise _Nothing(f"no DICOM files in {input_dir} ({len(files)} file(s) looked at, "
                       f"{len(unreadable)} not DICOM or without a Series Instance UID)")
    specs = _specs(task, fixed, tasks)
    models: dict[str, LoadedModel] = {}
    reports: list[SeriesReport] = []
    options = WriterOptions(write_overlay=write_overlay, seg_type=seg_type)
    for s in series:
        base: _SeriesFields = {"series_uid": s.series_uid, "modality": s.modality,
                                "series_description": s.series_description,
                                "instances": len(s.paths)}
        try:
            _spec, chosen_task, rules = _select(s, specs, task)
        except SeriesNotSelected as exc:
            reports.append(SeriesReport(**base, status="not-selected", reason=exc.reason))
            continue
        mv = fixed or reg.resolve(chosen_task, *_scanner(s.paths[0]))  # NoActiveModelError
        loaded = _loaded(mv, models, reg)
        model_fields: _ModelFields = {"task": chosen_task, "model_version": mv.version,
                                      "backend": loaded.backend.value}
        try:
            outcome = run_series(list(s.paths), loaded, rules=rules, options=options,
                                 max_memory_bytes=max_memory_bytes)
        except EmptyResultError as exc:
            reports.append(SeriesReport(**base, **model_fields, status="nothing-found",
                                        reason=f"no segment found, nothing written ({exc})"))
            continue
        except PipelineError as exc:
            reports.append(SeriesReport(**base, **model_fields, status="refused", reason=str(exc)))
            continue
        paths = save_results(outcome.results, out_dir)
        reports.append(SeriesReport(
            **base, **model_fields, status="written",
            segments=tuple((seg.name, round(float(seg.volume_ml), 3)) for seg in outcome.segments),
            timings=tuple(outcome.timings.as_dict().items()),
            files=tuple(str(p) for p in paths)))
    if not any(r.status != "not-selected" for r in reports):
        why = "; ".join(f"series {r.series_uid} ({r.modality}, {r.instances} file(s)): {r.reason}"
                        for r in reports)
        raise _Nothing(f"no series in {input_dir} is selected by a pipeline: {why}")
    return reports


def _print(reports: Sequence[SeriesReport], out_dir: Path) -> None:
    for r in reports:
        what = f"{r.modality} {r.series_description!r}" if r.series_description else r.modality
        print(f"series {r.series_uid} ({what}, {r.instances} instance(s)): {r.status}")
        if r.status == "not-selected":
            print(f"  not selected: {r.reason}")
            continue
        print(f"  task {r.task}, model {r.model_version} on {r.backend}")
        if r.status != "written":
            print(f"  {r.reason}")
            continue
        for name, ml in r.segments:
            print(f"  {name}: {ml:.1f} mL" + ("" if ml else " (empty, not written)"))
        t = dict(r.timings)
        print("  stages: " + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in t.items())
              + f" (total {sum(t.values()):.2f} s)")
        # save_results writes the SEG first, then the SR, then the overlay images
        print(f"  wrote {len(r.files)} file(s) to {out_dir}: SEG {r.files[0]}, SR {r.files[1]}"
              + (f", {len(r.files) - 2} overlay image(s)" if len(r.files) > 2 else ""))


def cmd_infer(args: argparse.Namespace, settings: Settings) -> int:
    """``dicom-node infer``: see the module docstring for the exit status."""
    configure_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    input_dir, out_dir = Path(args.input_dir), Path(args.out)
    registered = False
    try:
        with Registry(settings.data_dir) as reg:
            registered = bool(reg.list())
            reports = infer_folder(input_dir, out_dir, reg, tasks=settings.tasks, task=args.task,
                                   model_version=args.model_version,
                                   write_overlay=not args.no_overlay,
                                   seg_type=args.seg_type,
                                   max_memory_bytes=budget_bytes(
                                       settings.max_memory_gb if args.max_memory_gb is None
                                       else args.max_memory_gb))
    except (_Nothing, NoActiveModelError, VersionNotFoundError) as exc:
        print(f"dicom-node infer: {exc}", file=sys.stderr)
        if isinstance(exc, NoActiveModelError) and not registered:
            print(f"dicom-node infer: the data directory {settings.data_dir} holds no model "
                  "version at all (is --data-dir the node's?)", file=sys.stderr)
        return EXIT_NOTHING_TO_RUN
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        _print(reports, out_dir)
    return EXIT_SERIES_REFUSED if any(r.status == "refused" for r in reports) else 0
