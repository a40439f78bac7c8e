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

:func:`run_in_subprocess` runs the same in a child process (``python -m
trainer.nightly``) at a lower CPU priority (``os.nice``), so that the node keeps
serving studies while it trains (STYLE rule 15); the outcome comes back as JSON. The
child dies with the process that started it (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.database import utc_now
from pipelines.multiframe import VolumeChoice
from pipelines.selection import SelectionRules
from registry.records import Metrics, ModelVersion
from registry.store import Registry
from trainer.dataset import DatasetItem, LoadedCase, TrainingSet, build_dataset, load_case
from trainer.errors import TrainingError
from trainer.promotion import AWAITING_SHADOW, DEFAULT_MIN_DICE, decide
from twin_archive import Archive
from twin_archive import audit
from twin_archive.labels import LabelStore
from twin_archive.training_use import record_training_use

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


def _dice(pred: np.ndarray, truth: np.ndarray, labels: Mapping[int, str]) -> dict[str, float]:
    out = {}
    for value, name in labels.items():
        p, t = pred == value, truth == value
        denom = int(p.sum()) + int(t.sum())
        out[name] = 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return out


def evaluate(version: ModelVersion, cases: Sequence[LoadedCase], registry: Registry | None = None,
             *, backend: str | None = None) -> dict[str, float]:
    """Mean Dice per label of a registered version on labelled cases, in the served pipeline.

    Raises
    ------
    TrainingError
        If there are no cases.
    """
    if not cases:
        raise TrainingError(f"no validation cases to evaluate {version.version} on")
    from pipelines.inference import load_model

    loaded = load_model(version, registry=registry, backend=backend)
    per_case = []
    for case in cases:
        labels = loaded.segment(case.image, case.affine).labels
        per_case.append(_dice(labels, case.label, version.label_names))
    return {name: float(np.mean([d[name] for d in per_case])) for name in per_case[0]}


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
    archive = Archive(data_dir)
    labels = LabelStore(data_dir)
    reg = Registry(data_dir)
    try:
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
        candidate = reg.register_candidate(
            work / "bundle", task=task, parent_version=parent.version if parent else None,
            dataset_manifest=dataset.manifest_json(), by=by,
            reason=f"nightly training run {run_id}: {len(dataset.train)} train, "
                   f"{len(dataset.validation)} validation series")
        record_training_use(data_dir, model_version=candidate.version, task=task,
                            uses=dataset.uses())
        cases = [load_case(archive, i, model_labels, choice=dataset.volume)
                 for i in dataset.validation]
        j = judge_candidate(data_dir, reg, task, candidate, cases, dataset.validation_set_id,
                            config=config, device=device, by=by)
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
    finally:
        reg.close()
        labels.close()
        archive.close()


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Judgement:
    """The promotion decision on a candidate (:func:`judge_candidate`).

    Parameters
    ----------
    outcome : str
        ``promoted`` or ``candidate``.
    reason : str
    candidate_dice, active_dice : dict of str to float
        Mean Dice per label on the validation cases (``active_dice`` empty without an
        active version).
    active_before : str or None
        The version active when the decision was taken.
    """

    outcome: str
    reason: str
    candidate_dice: dict[str, float]
    active_dice: dict[str, float]
    active_before: str | None


def judge_candidate(data_dir: Path | str, reg: Registry, task: str, candidate: ModelVersion,
                    cases: Sequence[LoadedCase], validation_set: str, *, config: NightlyConfig,
                    device: str, by: str) -> Judgement:
    """Evaluate a registered candidate and the task's active version on the same
    validation cases, record both metrics, and promote the candidate only when it reaches
    the quality floor (``config.min_dice``) and is better than the active one by the
    margin (:func:`trainer.promotion.decide`); with ``promote_after_shadow`` it goes into
    shadow mode instead (the nightly job's decision; ``models import --candidate-of``
    uses it too).

    Raises
    ------
    TrainingError
        If there are no cases.
    """
    cand_dice = evaluate(candidate, cases, reg, backend=_torch_backend(device))
    reg.record_metrics(candidate.version, Metrics(dice=cand_dice, validation_set=validation_set),
                       by=by)
    active = reg.active(task)
    active_dice: dict[str, float] = {}
    if active is not None:
        active_dice = evaluate(active, cases, reg, backend=_torch_backend(device))
        reg.record_metrics(active.version, Metrics(dice=active_dice, validation_set=validation_set),
                           by=by)
    decision = decide(cand_dice, active_dice or None, margin=config.margin,
                      min_dice=config.min_dice,
                      active_version=active.version if active else None,
                      validation_set=validation_set)
    reason = decision.reason
    if decision.promote and config.promote_after_shadow > 0:
        reason = (f"{AWAITING_SHADOW}: promoted after {config.promote_after_shadow} live "
                  f"series in shadow without a disagreement; {decision.reason}")
        reg.set_shadow(candidate.version, on=True, by=by, reason="train_promote_after_shadow")
        reg.hold(candidate.version, by=by, reason=reason)
        LOG.info("training %s: %s goes into shadow mode: %s", task, candidate.version, reason)
        outcome = "candidate"
    elif decision.promote:
        reg.promote(candidate.version, by=by, reason=reason)
        audit.record(data_dir, audit.AuditEvent.MODEL_PROMOTED, audit.AuditOutcome.SUCCESS,
                     by, candidate.version, {"task": task, "reason": reason,
                                             "previous": active.version if active else None})
        outcome = "promoted"
    else:
        reg.hold(candidate.version, by=by, reason=reason)
        LOG.warning("training %s: %s stays a candidate, not served: %s", task,
                    candidate.version, reason)
        outcome = "candidate"
    return Judgement(outcome=outcome, reason=reason, candidate_dice=cand_dice,
                     active_dice=active_dice, active_before=active.version if active else None)


def _torch_backend(device: str) -> str:
    return "pytorch-cuda" if device.startswith("cuda") else "pytorch-cpu"


def last_trained_series(reg: Registry, task: str) -> set[tuple[str, str]]:
    """(series UID, label SHA-256) pairs of the newest version of ``task`` with a manifest."""
    for mv in reversed(reg.list(task)):
        manifest = mv.manifest()
        if isinstance(manifest, dict) and "series" in manifest:
            return {(s["series_uid"], s["label"]["sha256"]) for s in manifest["series"]}
    return set()


def new_labelled_series(data_dir: Path | str, task: str, rules: SelectionRules) -> int:
    """How many labelled, donated, matching series (or newer label versions) the task
    has gained since its last trained version (all of them when never trained)."""
    archive = Archive(data_dir)
    labels = LabelStore(data_dir)
    reg = Registry(data_dir)
    try:
        dataset = build_dataset(archive, labels, task, rules)
        seen = last_trained_series(reg, task)
        return sum(1 for i in dataset.items if (i.series_uid, i.label.sha256) not in seen)
    finally:
        reg.close()
        labels.close()
        archive.close()


# --------------------------------------------------------------------- subprocess
#: prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def run_in_subprocess(data_dir: Path | str, task: str, rules: SelectionRules,
                      config: NightlyConfig, *, nice: int = 10, by: str = "trainer",
                      timeout_s: float | None = None,
                      cancel: threading.Event | None = None) -> TrainingOutcome:
    """Run :func:`run_training` in a child process at lower priority; return its outcome.

    The child inherits stdout/stderr (its log lines go where the node's go). It dies
    with its parent (``PR_SET_PDEATHSIG``, SIGKILL, as the node's other children do), so
    a killed node leaves no training behind that writes to the data directory after its
    lock is gone; the calling thread waits for the child, so the signal (tied by Linux
    to the thread that started the child) comes only when the process dies.

    Parameters
    ----------
    nice : int
        Niceness added to the child (0..19).
    timeout_s : float, optional
        Kill the child after this many seconds (default: the time budget plus 10 min
        for caching, evaluation and registration).
    cancel : threading.Event, optional
        When set (the node stops), the child is terminated; a later run on the same
        dataset resumes from its checkpoint.

    Raises
    ------
    TrainingError
        If the child fails or times out (its exit status and last error in the message).
    ValueError
        If ``nice`` is out of range.
    """
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be in 0..19, got {nice}")
    data_dir = Path(data_dir)
    req_dir = data_dir / TRAINING_DIR / task
    req_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    request = req_dir / f"request-{stamp}.json"
    result = req_dir / f"result-{stamp}.json"
    request.write_text(json.dumps({
        "data_dir": str(data_dir), "task": task, "rules": dataclasses.asdict(rules),
        "config": dataclasses.asdict(config), "by": by, "result": str(result)}))
    cmd = [sys.executable, "-m", "trainer.nightly", str(request)]
    timeout = timeout_s if timeout_s is not None else config.time_budget_s + 600
    LOG.info("training %s in a subprocess (nice +%d, timeout %.0f s)", task, nice, timeout)

    proc = subprocess.Popen(cmd, preexec_fn=_child_setup(nice),
                            cwd=str(Path(__file__).resolve().parents[1]))
    try:
        _wait_for_child(proc, task, timeout, cancel)
    finally:
        request.unlink(missing_ok=True)
    return _read_outcome(proc.returncode, result, task)


def _child_setup(nice: int) -> Callable[[], None]:
    """What the training child runs before exec: lower its priority by ``nice`` and ask
    the kernel for SIGKILL when its parent dies (exit at once if it already has). libc
    is loaded here, in the parent: a child forked from a threaded process does no
    ``dlopen``. The node's own children do the same (``dicom_node.childproc``, which
    this room may not import)."""
    parent = os.getpid()
    prctl: Any
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        prctl = None

    def setup() -> None:
        os.nice(nice)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def _wait_for_child(proc: subprocess.Popen[bytes], task: str, timeout: float,
                    cancel: threading.Event | None) -> None:
    """Wait for the training child; stop it (TERM, then KILL after 30 s) on the way out.

    Raises
    ------
    TrainingError
        If ``cancel`` is set or the child runs past ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                raise TrainingError(f"training {task} cancelled (the node is stopping); the next "
                                    "run on the same dataset resumes from the checkpoint")
            if time.monotonic() > deadline:
                raise TrainingError(f"training {task} did not finish within {timeout:.0f} s")
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _read_outcome(returncode: int | None, result: Path, task: str) -> TrainingOutcome:
    """The outcome the child wrote to ``result`` (removed after reading).

    Raises
    ------
    TrainingError
        If the child failed or wrote an error.
    """
    if returncode != 0 or not result.is_file():
        detail = result.read_text() if result.is_file() else "no result written"
        result.unlink(missing_ok=True)
        raise TrainingError(f"training {task} failed (exit status {returncode}): {detail}")
    data = json.loads(result.read_text())
    result.unlink(missing_ok=True)
    if "error" in data:
        raise TrainingError(f"training {task} failed: {data['error']}")
    return TrainingOutcome.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: ``python -m trainer.nightly REQUEST.json``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.nightly")
    parser.add_argument("request", type=Path)
    args = parser.parse_args(argv)
    req = json.loads(args.request.read_text())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [trainer %(process)d] %(name)s: %(message)s")
    result = Path(req["result"])
    try:
        rules = SelectionRules.from_dict(req["rules"])
        config = NightlyConfig(**req["config"])
        outcome = run_training(req["data_dir"], req["task"], rules, config, by=req["by"])
    except Exception as exc:  # reported to the parent, which raises TrainingError
        LOG.exception("training %s failed", req.get("task"))
        result.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    result.write_text(json.dumps(outcome.to_dict()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
