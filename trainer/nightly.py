"""The training job of one task: dataset -> candidate -> evaluation -> promotion decision.

:func:`run_training` does one run in this process:

1. build the task's dataset from the archive as it is now (:mod:`trainer.dataset`:
   donating patients, current labels, selection rules, split by patient);
2. train a candidate with :func:`trainer.train.train` (the one training loop of the
   project): fine-tuned from the active version's weights at ``finetune_lr`` (1e-4)
   or, when the task has no active version, *de novo* (fresh weights) at ``scratch_lr``
   (1e-3) with the network and transforms of the task's latest registered bundle or,
   when it has none, of the template bundle the task names (``[[tasks]] template``,
   ``NightlyConfig.template``; the shipped task names the demo bundle); within a time
   budget, resumable from its checkpoint;
3. register it as a candidate with its dataset manifest and parent (registry), and
   record in the twins which series it was trained with;
4. evaluate the candidate and the active version on the *same* validation patients,
   in the served pipeline (:meth:`pipelines.inference.LoadedModel.segment` on the
   source grid), as mean Dice per label; record both in the registry;
5. promote the candidate only if its mean Dice reaches the task's floor ``min_dice``
   and beats the active's by ``margin`` (no active version: the floor alone decides;
   :mod:`trainer.promotion`); otherwise it stays a candidate with its metrics and
   the reason recorded (registry audit ``hold``, the journal, ``models show``).

Beside it: :mod:`trainer.judging` (evaluation and the promotion decision, shared with
candidates trained outside the node), :mod:`trainer.changes` (what the task gained
since its last version: the scheduler's question) and :mod:`trainer.child` (the same
run in a child process at a lower CPU priority, as the node runs it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.foundation.clock import utc_now
from pipelines.multiframe import VolumeChoice
from pipelines.selection import SelectionRules
from registry.records import ModelVersion
from registry.store import Registry
from trainer.dataset import DatasetItem, TrainingSet, build_dataset, load_case
from trainer.errors import TrainingError
from trainer.judging import register_and_judge, training_stores
from trainer.promotion import DEFAULT_MIN_DICE
from twin_archive import Archive

if TYPE_CHECKING:
    from trainer.train import TrainingResult, VolumeItem

# torch and MONAI (pipelines.inference, trainer.train) are imported where a model is run
# or trained, i.e. in the training subprocess: the node's listener imports this module
# for its scheduler (new_labelled_series, run_in_subprocess) and never loads torch.

LOG = logging.getLogger(__name__)

TRAINING_DIR = "training"
OUTCOMES = ("promoted", "candidate", "skipped")


@dataclass(frozen=True, kw_only=True, slots=True)
class NightlyConfig:
    """How one training run of a task is done.

    Parameters
    ----------
    finetune_lr, scratch_lr : float
        Learning rate when fine-tuning the active version / training from scratch.
    max_epochs : int
    time_budget_s : float
        Wall-clock budget of the training itself, seconds.
    margin : float
        The candidate's mean Dice must exceed the active's by more than this (>= 0).
    min_dice : float
        The quality floor of the task: a candidate whose mean validation Dice is below
        it is never promoted, active version or not (default 0.7; see
        :mod:`trainer.promotion`).
    validation_fraction : float
        Share of patients held out for validation, in (0, 1).
    patch_size : int
        Edge of the cubic training patch, voxels (>= 8).
    samples_per_volume : int
        Patches drawn from a volume per visit.
    min_patches_per_epoch : int
        Fewest patches of an epoch (>= 0; the volumes are visited again until drawn):
        with few labelled series the time budget, not the epoch cap, ends a run.
    device : str
        ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
    min_series : int
        Fewest labelled series (train + validation) to train at all (>= 2).
    seed : int
    template : str
        A MONAI bundle directory whose network and transforms train the task's first
        model de novo when it has no registered version ('' : none; the task's
        ``[[tasks]] template``). Its weights are never used.

    Raises
    ------
    ValueError
        A value out of range, naming the parameter.
    """

    finetune_lr: float = 1e-4
    scratch_lr: float = 1e-3
    max_epochs: int = 100
    time_budget_s: float = 7200.0
    margin: float = 0.01
    min_dice: float = DEFAULT_MIN_DICE
    promote_after_shadow: int = 0
    validation_fraction: float = 0.2
    patch_size: int = 96
    samples_per_volume: int = 4
    min_patches_per_epoch: int = 0
    device: str = "auto"
    min_series: int = 2
    seed: int = 0
    template: str = ""

    def __post_init__(self) -> None:
        for name in ("finetune_lr", "scratch_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.min_dice <= 1:
            raise ValueError(f"min_dice must be in [0, 1], got {self.min_dice}")
        if self.promote_after_shadow < 0:
            raise ValueError(f"promote_after_shadow must be >= 0, got {self.promote_after_shadow}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.patch_size < 8:
            raise ValueError(f"patch_size must be >= 8 voxels, got {self.patch_size}")
        if self.samples_per_volume < 1:
            raise ValueError(f"samples_per_volume must be >= 1, got {self.samples_per_volume}")
        if self.min_patches_per_epoch < 0:
            raise ValueError(f"min_patches_per_epoch must be >= 0, got "
                             f"{self.min_patches_per_epoch}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.min_series < 2:
            raise ValueError(f"min_series must be >= 2, got {self.min_series}")
        if not isinstance(self.template, str):
            raise TypeError(f"template must be a str (a bundle directory or ''), got "
                            f"{type(self.template).__name__}")

    def resolved_device(self) -> str:
        """``auto`` resolved: ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingOutcome:
    """What one training run of a task ended with.

    Parameters
    ----------
    task : str
    outcome : str
        ``promoted``, ``candidate`` (registered, not better) or ``skipped`` (not enough
        data; nothing registered).
    reason : str
        In words.
    candidate : str or None
        The registered candidate version.
    parent : str or None
        The version it was fine-tuned from (``None``: de novo).
    started_from : str
        What it was trained from, in words (``fine-tuned from spleen-ct-v1``, ``de novo
        from template /path/spleen_ct_demo``).
    active_before : str or None
        The active version when the run started.
    candidate_dice, active_dice : dict of str to float
        Mean Dice per label on the validation patients.
    validation_set : str
    train_series, validation_series, patients : int
    epochs : int
    train_seconds : float
    samples_per_s : float
    stopped_by : str
    """

    task: str
    outcome: str
    reason: str
    candidate: str | None = None
    parent: str | None = None
    active_before: str | None = None
    candidate_dice: dict[str, float] = dataclasses.field(default_factory=dict)
    active_dice: dict[str, float] = dataclasses.field(default_factory=dict)
    validation_set: str = ""
    train_series: int = 0
    validation_series: int = 0
    patients: int = 0
    epochs: int = 0
    train_seconds: float = 0.0
    samples_per_s: float = 0.0
    stopped_by: str = ""
    started_from: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> TrainingOutcome:
        """Inverse of :meth:`to_dict`."""
        return TrainingOutcome(**dict(d))

    def summary(self) -> str:
        """One line for the log and the CLI."""
        def mean(d: dict[str, float]) -> str:
            return f"{np.mean(list(d.values())):.4f}" if d else "-"
        if self.outcome == "skipped":
            return f"{self.task}: nothing trained: {self.reason}"
        how = "stays a candidate" if self.outcome == "candidate" else self.outcome
        start = f", {self.started_from}" if self.started_from else ""
        return (f"{self.task}: {self.candidate}{start} {how} ({self.reason}); mean Dice "
                f"{mean(self.candidate_dice)} vs {mean(self.active_dice)} of "
                f"{self.active_before or 'no active version'} on {self.validation_set}; "
                f"{self.train_series} train / {self.validation_series} validation series of "
                f"{self.patients} patients; {self.epochs} epochs in {self.train_seconds:.0f} s "
                f"({self.samples_per_s:.2f} samples/s, stopped by {self.stopped_by})")


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class ArchiveItem:
    """A dataset item as the training core's :class:`~trainer.train.ItemSource`."""

    archive: Archive
    item: DatasetItem
    model_labels: Mapping[int, str]
    name: str
    choice: VolumeChoice | None = None

    def load(self) -> VolumeItem:
        """Read the series and its label from the archive."""
        from trainer.train import VolumeItem

        case = load_case(self.archive, self.item, self.model_labels, choice=self.choice)
        return VolumeItem(name=self.name, image=case.image, label=case.label, affine=case.affine)


def _base_bundle(reg: Registry, task: str, template: str = ""
                 ) -> tuple[ModelVersion | None, Path, str]:
    """The version to fine-tune (the active general one), the bundle to copy the
    configuration of, and where the candidate starts from, in words.

    Without an active version the candidate is trained de novo with the configuration
    of the task's latest registered version or, without one, of ``template``.

    Raises
    ------
    TrainingError
        If the task has no registered version and names no usable template.
    """
    active = reg.active(task)
    if active is not None:
        return active, active.path, f"fine-tuned from {active.version}"
    versions = reg.list(task)
    if versions:
        return None, versions[-1].path, f"de novo with the configuration of {versions[-1].version}"
    if template:
        path = Path(template)
        if not (path / "configs").is_dir():
            raise TrainingError(f"task {task!r}: its template {template} is not a bundle "
                                "directory (no configs/)")
        return None, path, f"de novo from template {path.name}"
    raise TrainingError(f"task {task!r} has no registered model and names no template bundle "
                        "to train a first one from: add `template = \"BUNDLE_DIR\"` to its "
                        "[[tasks]] table, or import a bundle (dicom-node models import)")


def _prepare_bundle(src: Path, dest: Path, *, how: str, run_id: str,
                    dataset: TrainingSet) -> None:
    """Copy the configs (not the weights) and note the run in metadata.json's changelog."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src / "configs", dest / "configs")
    for extra in ("docs", "LICENSE", "README.md"):
        if (src / extra).exists():
            (shutil.copytree if (src / extra).is_dir() else shutil.copy2)(src / extra, dest / extra)
    (dest / "models").mkdir(parents=True)
    meta_path = dest / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    base = str(meta.get("version", "0.0.0")).split("+")[0]
    meta["version"] = f"{base}+{run_id}"
    changelog = dict(meta.get("changelog") or {})
    meta["changelog"] = {meta["version"]: f"{how} on {len(dataset.train)} series of donating "
                         f"patients (dicom-node nightly training)", **changelog}
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


def run_training(data_dir: Path | str, task: str, rules: SelectionRules, config: NightlyConfig,
                 *, by: str = "trainer") -> TrainingOutcome:
    """One training run of ``task`` in this process (see the module docstring).

    Raises
    ------
    TrainingError
        If the task has no trainable bundle, or training fails.
    """
    data_dir = Path(data_dir)
    run_id = utc_now().strftime("%Y%m%dT%H%M%SZ")
    with training_stores(data_dir) as stores:
        archive, labels, reg = stores.archive, stores.labels, stores.registry
        dataset = build_dataset(archive, labels, task, rules,
                                validation_fraction=config.validation_fraction)
        if len(dataset.items) < config.min_series or not dataset.train or not dataset.validation:
            reason = (f"{len(dataset.items)} labelled series of {len(dataset.patients)} donating "
                      f"patient(s) ({len(dataset.train)} train, {len(dataset.validation)} "
                      f"validation); at least {config.min_series} series of two patients needed")
            LOG.info("training %s skipped: %s", task, reason)
            return TrainingOutcome(task=task, outcome="skipped", reason=reason,
                                   patients=len(dataset.patients))
        parent, src, how = _base_bundle(reg, task, config.template)
        # One work folder per dataset and parent: a run interrupted (node stopped, budget
        # of the night spent) resumes from its checkpoint when the dataset is unchanged.
        key = hashlib.sha256(f"{parent.version if parent else '-'}\n{dataset.manifest_key()}"
                             .encode()).hexdigest()[:16]
        work = data_dir / TRAINING_DIR / task / f"run-{key}"
        _prepare_bundle(src, work / "bundle", how=how, run_id=run_id, dataset=dataset)
        result, model_labels, device = _train_candidate(archive, task, work, dataset, parent,
                                                        config)
        candidate, j = register_and_judge(
            stores, task, work / "bundle", parent_version=parent.version if parent else None,
            manifest=dataset.manifest_json(), uses=dataset.uses(), dataset=dataset,
            model_labels=model_labels, config=config, device=device, by=by,
            reason=f"nightly training run {run_id}: {len(dataset.train)} train, "
                   f"{len(dataset.validation)} validation series")
        out = TrainingOutcome(
            task=task, outcome=j.outcome, reason=j.reason, candidate=candidate.version,
            parent=parent.version if parent else None,
            active_before=j.active_before, candidate_dice=j.candidate_dice,
            active_dice=j.active_dice, validation_set=dataset.validation_set_id,
            train_series=len(dataset.train), validation_series=len(dataset.validation),
            patients=len(dataset.patients), epochs=result.epochs,
            train_seconds=round(result.seconds, 3), samples_per_s=round(result.samples_per_s, 3),
            stopped_by=result.stopped_by, started_from=how)
        (work / "outcome.json").write_text(json.dumps(out.to_dict(), indent=2))
        shutil.rmtree(work, ignore_errors=True)  # the bundle is copied into the registry
        LOG.info("training %s", out.summary())
        return out


def _train_candidate(archive: Archive, task: str, work: Path, dataset: TrainingSet,
                     parent: ModelVersion | None, config: NightlyConfig
                     ) -> tuple[TrainingResult, dict[int, str], str]:
    """Train the bundle prepared in ``work/bundle`` (resuming from ``work``'s checkpoint).

    Returns the result, the bundle's labels by channel and the device it ran on.

    Raises
    ------
    TrainingError
        If training fails.
    """
    from trainer.train import TrainableBundle, TrainingConfig, train

    bundle = work / "bundle"
    model_labels = dict(enumerate(TrainableBundle(bundle).label_names, start=1))
    make = lambda items: [ArchiveItem(archive=archive, item=i, model_labels=model_labels,  # noqa: E731
                                      name=i.case_id, choice=dataset.volume) for i in items]
    device = config.resolved_device()
    tc = TrainingConfig(
        learning_rate=config.finetune_lr if parent else config.scratch_lr,
        max_epochs=config.max_epochs, time_budget_s=config.time_budget_s, seed=config.seed,
        device=device, patch_size=(config.patch_size,) * 3,
        samples_per_volume=config.samples_per_volume,
        min_patches_per_epoch=config.min_patches_per_epoch)
    LOG.info("training %s: %s, lr %.0e, %d train / %d validation series, device %s, budget "
             "%.0f s, up to %d epochs", task,
             f"fine-tuning {parent.version}" if parent else "de novo (fresh weights)",
             tc.learning_rate,
             len(dataset.train), len(dataset.validation), device, config.time_budget_s,
             config.max_epochs)
    result = train(bundle, make(dataset.train), make(dataset.validation), tc,
                   weights_out=bundle / "models" / "model.pt", checkpoint=work / "checkpoint.pt",
                   init_weights=(parent.path / "models" / "model.pt") if parent else None)
    return result, model_labels, device


