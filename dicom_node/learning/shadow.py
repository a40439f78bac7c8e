"""Shadow mode: a candidate model also runs on the live series of its task, unseen.

``dicom-node models shadow VERSION`` puts a candidate in shadow (registry audit
``shadow``). From then on, every series the worker serves with the task's active
version is also run through the candidate (:func:`pipelines.run.run_series`, the
served pipeline). The candidate's SEG and SR are stored in the twin
(:class:`~twin_archive.learning.ShadowStore`, a folder of their own) and never queued
for sending; its masks are compared with the active version's on the same series -
Dice per label and volume difference - and the agreement is kept per scanner.
``models show VERSION`` reports the count and the agreement.

With ``train_promote_after_shadow = N`` the nightly job promotes a candidate that
passed the quality floor and the margin only after it has shadowed N series with no
label's Dice below ``train_shadow_min_agreement`` (:func:`promote_after_shadow`); a
disagreement stops its shadow and keeps it a candidate, with the reason.

This module does not import torch (the listener's scheduler uses it); the runner that
the worker calls is :class:`dicom_node.learning.live_learning.ShadowRunner`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.store import Registry
from trainer.promotion import AWAITING_SHADOW
from twin_archive import audit
from twin_archive.learning import LabelAgreement, Scanner, ShadowResult, ShadowStore

LOG = logging.getLogger(__name__)

def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def agreement(active: Sequence[Any], shadow: Sequence[Any]) -> tuple[LabelAgreement, ...]:
    """Per label (by name): Dice of the two masks and both volumes (mL).

    ``active`` and ``shadow`` are segments (``name``, ``mask``, ``volume_ml``) on the
    same grid; a label missing on one side counts as empty there.
    """
    by_name = {s.name: s for s in shadow}
    out = []
    for a in active:
        s = by_name.pop(a.name, None)
        mask = s.mask if s is not None else np.zeros_like(a.mask)
        out.append(LabelAgreement(name=a.name, dice=round(dice(a.mask, mask), 4),
                                  active_ml=round(float(a.volume_ml), 3),
                                  shadow_ml=round(float(s.volume_ml) if s is not None else 0.0, 3)))
    for s in by_name.values():
        out.append(LabelAgreement(name=s.name, dice=0.0 if s.mask.any() else 1.0,
                                  active_ml=0.0, shadow_ml=round(float(s.volume_ml), 3)))
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannerAgreement:
    """Shadow agreement of a version on one scanner."""

    scanner: Scanner
    series: int
    mean_dice: dict[str, float]
    min_dice: float
    mean_volume_diff_ml: dict[str, float]
    disagreements: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ShadowSummary:
    """What a version's shadow mode has shown so far."""

    version: str
    in_shadow: bool
    series: int
    disagreements: int
    min_agreement: float
    by_scanner: tuple[ScannerAgreement, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"in_shadow": self.in_shadow, "series": self.series,
                "disagreements": self.disagreements, "min_agreement": self.min_agreement,
                "by_scanner": [{"scanner": str(s.scanner), "series": s.series,
                                "mean_dice": s.mean_dice, "min_dice": s.min_dice,
                                "mean_volume_diff_ml": s.mean_volume_diff_ml,
                                "disagreements": s.disagreements} for s in self.by_scanner]}


def summarize(version: str, results: Sequence[ShadowResult], *, in_shadow: bool,
              min_agreement: float) -> ShadowSummary:
    """Count and agreement per scanner of a version's shadow results."""
    groups: dict[Scanner, list[ShadowResult]] = defaultdict(list)
    for r in results:
        groups[r.scanner].append(r)
    rows = []
    for scanner, rs in sorted(groups.items()):
        names = sorted({a.name for r in rs for a in r.agreement})
        per = {n: [a for r in rs for a in r.agreement if a.name == n] for n in names}
        rows.append(ScannerAgreement(
            scanner=scanner, series=len(rs),
            mean_dice={n: round(float(np.mean([a.dice for a in v])), 4) for n, v in per.items()},
            min_dice=round(min(r.min_dice for r in rs), 4),
            mean_volume_diff_ml={n: round(float(np.mean([a.volume_diff_ml for a in v])), 2)
                                 for n, v in per.items()},
            disagreements=sum(1 for r in rs if r.min_dice < min_agreement)))
    return ShadowSummary(version=version, in_shadow=in_shadow, series=len(results),
                         disagreements=sum(s.disagreements for s in rows),
                         min_agreement=min_agreement, by_scanner=tuple(rows))


def shadow_summary(data_dir: Path | str, reg: Registry, version: str, *,
                   min_agreement: float) -> ShadowSummary:
    """:func:`summarize` of a version's stored shadow results (none when the archive
    index does not exist yet)."""
    try:
        store = ShadowStore(data_dir)
    except RuntimeError:
        results: list[ShadowResult] = []
    else:
        try:
            results = store.for_version(version)
        finally:
            store.close()
    return summarize(version, results, in_shadow=reg.in_shadow(version),
                     min_agreement=min_agreement)


def promote_after_shadow(data_dir: Path | str, *, series: int, min_agreement: float,
                         by: str = "nightly") -> list[str]:
    """Promote candidates in shadow that passed the floor and the margin (their hold
    says so) and have shadowed ``series`` series without a disagreement; stop the
    shadow of those that disagreed. Returns one line per decision."""
    lines = []
    with Registry(data_dir) as reg:
        for mv in reg.list(status="candidate"):
            if not reg.in_shadow(mv.version):
                continue
            held = reg.held_because(mv.version) or ""
            s = shadow_summary(data_dir, reg, mv.version, min_agreement=min_agreement)
            if s.disagreements:
                reason = (f"disagreed with the active version in shadow on {s.disagreements} of "
                          f"{s.series} series (a label's Dice < {min_agreement:g})")
                reg.set_shadow(mv.version, on=False, by=by, reason=reason)
                reg.hold(mv.version, by=by, reason=reason)
                LOG.warning("%s stays a candidate: %s", mv.version, reason)
                lines.append(f"{mv.version}: stays a candidate: {reason}")
            elif s.series >= series and held.startswith(AWAITING_SHADOW):
                reason = f"shadowed {s.series} series without a disagreement (Dice >= " \
                         f"{min_agreement:g}); {held[len(AWAITING_SHADOW):].strip('; ')}"
                reg.set_shadow(mv.version, on=False, by=by, reason="promoted")
                reg.promote(mv.version, by=by, reason=reason)
                audit.record(data_dir, audit.AuditEvent.MODEL_PROMOTED,
                             audit.AuditOutcome.SUCCESS, by, mv.version,
                             {"task": mv.task, "reason": reason})
                lines.append(f"{mv.version}: promoted: {reason}")
            else:
                lines.append(f"{mv.version}: in shadow, {s.series} of {series} series")
    return lines

