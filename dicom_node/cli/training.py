"""``dicom-node train``, ``dicom-node queue`` and ``dicom-node dataset``: nightly learning by hand.

* ``train TASK --now [--epochs N]`` runs the nightly job of one task at once (in a
  subprocess at lower priority, like the scheduler does), whatever the number of new
  labels;
* ``train TASK --export-only [--out DIR]`` trains elsewhere: writes the task's dataset
  (as ``dataset export``) and the active version's bundle, and prints the ``torchrun``
  command for a GPU node or cluster and the ``models import --candidate-of`` command
  that brings the result back;
* ``queue list TASK`` / ``queue export TASK OUT_DIR``: the annotation queue (donated,
  unlabelled, matching series; NIfTI with the current model's pre-segmentation);
* ``dataset export TASK OUT_DIR``: the task's dataset, de-identified, in the Medical
  Segmentation Decathlon layout for training on a GPU node or cluster.
"""

from __future__ import annotations

import argparse
import getpass
import json
import shutil
from pathlib import Path
from typing import Any

from dicom_node.foundation.clock import utc_now
from dicom_node.settings import Settings
from dicom_node.learning.training import task_rules, train_task
from registry.store import Registry
from twin_archive import audit
from twin_archive.labels import LabelStore


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", parents=parents,
                       help="train a task's candidate model on donated, labelled series now",
                       description="Build the task's dataset (donating patients, current labels), "
                                   "fine-tune the active version (or train from scratch), "
                                   "evaluate candidate and active on the same validation "
                                   "patients and promote the candidate only if better.")
    p.add_argument("task", metavar="TASK")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--now", action="store_true",
                      help="run at once (the nightly schedule runs by itself inside serve)")
    when.add_argument("--export-only", action="store_true",
                      help="train elsewhere: write the dataset and the bundle, print the "
                           "torchrun command line")
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="with --export-only: a new folder (default <data-dir>/exports/TASK-TIME)")
    p.add_argument("--nproc-per-node", type=int, default=4, metavar="N",
                   help="with --export-only: GPUs of the training node (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_train)

    q = sub.add_parser("queue", parents=parents,
                       help="annotation queue: donated series of a task without a label")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    p = qsub.add_parser("list", parents=parents, help="list donated, unlabelled, matching series")
    p.add_argument("task", metavar="TASK")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_queue_list)
    p = qsub.add_parser("export", parents=parents,
                        help="write each queued series as NIfTI with the model's pre-segmentation")
    p.add_argument("task", metavar="TASK")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.set_defaults(func=cmd_queue_export)

    d = sub.add_parser("dataset", parents=parents, help="a task's training dataset")
    dsub = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = dsub.add_parser("export", parents=parents,
                        help="de-identified export in the Medical Segmentation Decathlon layout")
    p.add_argument("task", metavar="TASK")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    p.set_defaults(func=cmd_dataset_export)


def _archive(settings: Settings) -> Any:
    from dicom_node.runtime.node import open_archive

    return open_archive(settings)


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    task_rules(args.task, settings.tasks)  # ValueError naming the task before anything starts
    with _archive(settings):  # migrates the index when the node never ran
        pass
    if args.export_only:
        return _train_export_only(args, settings)
    outcome = train_task(settings, args.task, epochs=args.epochs, by="dicom-node train")
    if args.json:
        print(json.dumps(outcome.to_dict(), indent=2))
    else:
        print(outcome.summary())
    return 0


def cmd_queue_list(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.export import annotation_queue  # torch: loaded by the command, not by `serve`

    rules = task_rules(args.task, settings.tasks)
    with _archive(settings) as archive, LabelStore(settings.data_dir) as labels:
        items = annotation_queue(archive, labels, args.task, rules)
    if args.json:
        print(json.dumps([i.to_dict() for i in items], indent=2))
        return 0
    if not items:
        print(f"queue {args.task}: empty (every donated, matching series has a label)")
        return 0
    print(f"queue {args.task}: {len(items)} series to label")
    print(f"{'CASE':<18} {'PATIENT ID':<20} {'RECEIVED':<19}  SERIES")
    for i in items:
        print(f"{i.case_id:<18} {i.patient_id:<20} {i.last_received[:19]:<19}  {i.series_uid}")
    return 0


def cmd_queue_export(args: argparse.Namespace, settings: Settings) -> int:
    from trainer.export import export_annotation_queue  # torch: loaded by the command, not by `serve`

    rules = task_rules(args.task, settings.tasks)
    with _archive(settings) as archive, LabelStore(settings.data_dir) as labels, \
            Registry(settings.data_dir) as reg:
        cases = export_annotation_queue(archive, labels, reg, args.task, rules, args.out_dir)
    with_pre = sum(1 for c in cases if c.get("preseg"))
    print(f"queue {args.task}: {len(cases)} case(s) written to {args.out_dir} "
          f"({with_pre} with a pre-segmentation); see queue.json")
    return 0


def _train_export_only(args: argparse.Namespace, settings: Settings) -> int:
    """``train TASK --export-only``: dataset + bundle in a new folder, and the commands."""
    from trainer.external import torchrun_command

    out: Path = args.out or (Path(settings.data_dir) / "exports" / (
        f"{args.task}-{utc_now().strftime('%Y%m%dT%H%M%SZ')}"))
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty; give a new folder")
    desc, mv = _export_dataset(settings, args.task, out / "dataset")
    shutil.copytree(mv.path, out / "bundle", ignore=shutil.ignore_patterns("onnx", "tensorrt"))
    command = torchrun_command("bundle", "dataset", nproc_per_node=args.nproc_per_node)
    print(f"dataset {args.task}: {desc['numTraining']} case(s) ({len(desc['validation'])} "
          f"validation) written to {out / 'dataset'} (Decathlon layout, de-identified); "
          f"bundle of {mv.version} in {out / 'bundle'}")
    if not (out / "bundle" / "configs" / "train.json").is_file():
        print(f"note: the bundle of {mv.version} has no configs/train.json; copy the training "
              "config of the Model Zoo bundle it was made from into bundle/configs/ first")
    print("on the GPU node, in a copy of that folder:")
    print(f"  {command}")
    print("back on the node:")
    print(f"  dicom-node models import {out / 'bundle'} --task {args.task} "
          f"--candidate-of {mv.version}")
    return 0


def _export_dataset(settings: Settings, task: str, out_dir: Path) -> tuple[dict[str, Any], Any]:
    """Write ``task``'s de-identified Decathlon dataset (audited); the dataset.json and
    the version that names its labels."""
    from trainer.export import export_decathlon  # torch: loaded by the command, not by `serve`

    rules = task_rules(task, settings.tasks)
    with Registry(settings.data_dir) as reg:
        versions = reg.list(task)
        if not versions:
            raise ValueError(f"task: {task!r} has no registered model to name its labels")
        mv = reg.active(task) or versions[-1]
    with _archive(settings) as archive, LabelStore(settings.data_dir) as labels:
        desc = export_decathlon(archive, labels, Path(settings.data_dir), task, rules,
                                out_dir, model_labels=mv.label_names,
                                modality=mv.modality or rules.modality,
                                validation_fraction=settings.train_validation_fraction)
    audit.record(settings.data_dir, audit.AuditEvent.DATASET_EXPORTED, audit.AuditOutcome.SUCCESS,
                 getpass.getuser(), task,
                 {"cases": desc["numTraining"], "validation": len(desc["validation"]),
                  "out_dir": str(out_dir), "layout": "Decathlon, de-identified"})
    return desc, mv


def cmd_dataset_export(args: argparse.Namespace, settings: Settings) -> int:
    desc, _ = _export_dataset(settings, args.task, args.out_dir)
    print(f"dataset {args.task}: {desc['numTraining']} case(s) ({len(desc['validation'])} "
          f"validation) written to {args.out_dir} (Decathlon layout, de-identified)")
    return 0
