"""Judging a candidate: evaluation on the validation patients and the promotion decision.

One path for every candidate, trained by the nightly job (:mod:`trainer.nightly`) or
outside the node (:mod:`trainer.external`): :func:`register_and_judge` registers it with
its dataset manifest, records which series trained it, loads the validation cases and
hands them to :func:`judge_candidate`, which evaluates the candidate and the active
version on the *same* cases (:func:`evaluate`, in the served pipeline) and promotes the
candidate only when it is better (DESIGN decision 7; :mod:`trainer.promotion`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from registry.records import Metrics, ModelVersion
from registry.store import Registry
from trainer.dataset import LoadedCase, TrainingSet, load_case
from trainer.errors import TrainingError
from trainer.promotion import AWAITING_SHADOW, decide
from twin_archive import Archive, audit
from twin_archive.labels import LabelStore
from twin_archive.training_use import TrainingUse, record_training_use

if TYPE_CHECKING:
    from trainer.nightly import NightlyConfig

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrainingStores:
    """The three stores a training run reads and writes, opened together."""

    data_dir: Path
    archive: Archive
    labels: LabelStore
    registry: Registry


@contextmanager
def training_stores(data_dir: Path | str) -> Iterator[TrainingStores]:
    """Open the archive, the label store and the registry of ``data_dir``; close all three."""
    data_dir = Path(data_dir)
    archive = Archive(data_dir)
    labels = LabelStore(data_dir)
    reg = Registry(data_dir)
    try:
        yield TrainingStores(data_dir, archive, labels, reg)
    finally:
        reg.close()
        labels.close()
        archive.close()


def register_and_judge(stores: TrainingStores, task: str, bundle_dir: Path | str, *,
                       parent_version: str | None, manifest: Mapping[str, Any] | str,
                       uses: Sequence[TrainingUse], dataset: TrainingSet,
                       model_labels: Mapping[int, str] | None, config: NightlyConfig,
                       device: str, by: str, reason: str) -> tuple[ModelVersion, Judgement]:
    """Register ``bundle_dir`` as a candidate of ``task``, record its training use, and
    judge it on the dataset's validation cases (labels by channel: ``model_labels``, or
    the candidate's own when None).

    Raises
    ------
    TrainingError
        If there are no validation cases.
    BundleError
        If the registry refuses the bundle.
    """
    reg = stores.registry
    candidate = reg.register_candidate(bundle_dir, task=task, parent_version=parent_version,
                                       dataset_manifest=manifest, by=by, reason=reason)
    record_training_use(stores.data_dir, model_version=candidate.version, task=task, uses=uses)
    labels = dict(model_labels) if model_labels is not None else dict(candidate.label_names)
    cases = [load_case(stores.archive, i, labels, choice=dataset.volume)
             for i in dataset.validation]
    judgement = judge_candidate(stores.data_dir, reg, task, candidate, cases,
                                dataset.validation_set_id, config=config, device=device, by=by)
    return candidate, judgement


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
    reg.record_metrics(candidate.version, Metrics(dice=tuple(cand_dice.items()),
                                                  validation_set=validation_set),
                       by=by)
    active = reg.active(task)
    active_dice: dict[str, float] = {}
    if active is not None:
        active_dice = evaluate(active, cases, reg, backend=_torch_backend(device))
        reg.record_metrics(active.version, Metrics(dice=tuple(active_dice.items()),
                                                   validation_set=validation_set),
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
