"""Training beyond the node: a GPU node or a cluster trains, the node judges.

* :func:`torchrun_command` is the README's cluster recipe as one ready command line:
  MONAI's bundle runner under ``torchrun`` on the bundle of the task's active version
  and a dataset written by ``dataset export`` (:func:`trainer.export.export_decathlon`).
* :func:`import_candidate` takes the bundle trained there back: it is registered as a
  candidate of the task (its dataset manifest is the export it was trained on, and the
  twins record that their series were used), evaluated with the active version on the
  node's validation patients, and promoted only when better - by
  :func:`trainer.judging.judge_candidate`, the nightly job's own decision.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from pipelines.selection import SelectionRules
from trainer.dataset import build_dataset
from trainer.errors import TrainingError
from trainer.export import EXPORTS_DIR
from trainer.judging import register_and_judge, training_stores
from trainer.nightly import NightlyConfig, TrainingOutcome
from twin_archive.training_use import TrainingUse

LOG = logging.getLogger(__name__)


def torchrun_command(bundle_dir: Path | str, dataset_dir: Path | str, *, nproc_per_node: int = 4,
                     config_file: str = "configs/train.json") -> str:
    """The ``torchrun`` command line that trains ``bundle_dir`` on an exported dataset
    with MONAI's bundle runner (one node, ``nproc_per_node`` GPUs).

    Raises
    ------
    ValueError
        If ``nproc_per_node`` is < 1.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    b = Path(bundle_dir)
    q = shlex.quote
    return (f"torchrun --standalone --nproc_per_node={nproc_per_node} -m monai.bundle run "
            f"--meta_file {q(str(b / 'configs' / 'metadata.json'))} "
            f"--config_file {q(str(b / config_file))} --bundle_root {q(str(b))} "
            f"--dataset_dir {q(str(dataset_dir))}")


def latest_export(data_dir: Path | str, task: str) -> dict[str, Any]:
    """The node's record of the newest ``dataset export`` of ``task``
    (``<data-dir>/exports/<export id>.json``: manifest and case mapping).

    Raises
    ------
    TrainingError
        If the task was never exported.
    """
    found = []
    for path in (Path(data_dir) / EXPORTS_DIR).glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("manifest", {}).get("task") == task:
            found.append((path.stat().st_mtime, record))
    if not found:
        raise TrainingError(f"task {task!r} was never exported, so the node cannot say which "
                            "series trained this bundle; export first (dicom-node train "
                            f"{task} --export-only) and train on that export")
    return max(found, key=lambda f: f[0])[1]


def import_candidate(data_dir: Path | str, bundle_dir: Path | str, task: str,
                     rules: SelectionRules, config: NightlyConfig, *, candidate_of: str,
                     by: str = "admin") -> TrainingOutcome:
    """Register an externally trained bundle as a candidate of ``task``, evaluate it with
    the active version on the node's validation patients, promote it only when better.

    Parameters
    ----------
    data_dir : pathlib.Path or str
    bundle_dir : pathlib.Path or str
        The trained MONAI bundle.
    task : str
    rules : SelectionRules
        The task's selection rules (which series make its dataset).
    config : NightlyConfig
        Margin, validation fraction and device, as the nightly job has them.
    candidate_of : str
        The version it was trained from (its parent; a version of ``task``).
    by : str

    Returns
    -------
    TrainingOutcome
        ``promoted`` or ``candidate``, with both versions' Dice.

    Raises
    ------
    TrainingError
        ``candidate_of`` is not a version of ``task``, the task was never exported, or
        there are no validation patients.
    VersionNotFoundError, BundleError
    """
    data_dir = Path(data_dir)
    export = latest_export(data_dir, task)
    with training_stores(data_dir) as stores:
        parent = stores.registry.get(candidate_of)
        if parent.task != task:
            raise TrainingError(f"{candidate_of} is a version of {parent.task}, not of {task}")
        dataset = build_dataset(stores.archive, stores.labels, task, rules,
                                validation_fraction=config.validation_fraction)
        if not dataset.validation:
            raise TrainingError(f"task {task}: no validation patients (labelled series of "
                                "donating patients) to evaluate the bundle on")
        manifest = dict(export["manifest"])
        manifest["trained"] = f"outside the node on export {export.get('export_id', '?')}"
        candidate, j = register_and_judge(
            stores, task, bundle_dir, parent_version=parent.version, manifest=manifest,
            uses=[TrainingUse(patient_key=s["patient_key"], study_uid=s["study_uid"],
                              series_uid=s["series_uid"], label_id=s["label"]["id"],
                              split=s["split"]) for s in manifest.get("series", [])],
            dataset=dataset, model_labels=None, config=config,
            device=config.resolved_device(), by=by,
            reason=f"trained outside the node from {parent.version} on export "
                   f"{export.get('export_id', '?')}")
        out = TrainingOutcome(
            task=task, outcome=j.outcome, reason=j.reason, candidate=candidate.version,
            parent=parent.version, active_before=j.active_before,
            candidate_dice=j.candidate_dice, active_dice=j.active_dice,
            validation_set=dataset.validation_set_id,
            train_series=sum(1 for s in manifest.get("series", []) if s.get("split") == "train"),
            validation_series=len(dataset.validation), patients=len(dataset.patients),
            stopped_by="trained outside the node")
        LOG.info("import %s", out.summary())
        return out
