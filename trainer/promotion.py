"""The promotion decision of a trained candidate: a quality floor, then the margin.

A candidate is promoted only when

1. its mean validation Dice reaches the task's floor ``min_dice`` (default 0.7), and
2. it beats the active version's mean Dice on the *same* validation patients by more
   than ``margin``; with no active version the floor alone decides.

Without the floor, a task with nothing active promoted any candidate, however poor
(a scratch model at Dice 0.039 went live and its SEGs went to the PACS).

The decision is a pure function of the figures, so that the trainer, the nightly job
and the tests share one rule; it says why in words (``train``, the journal and
``models show`` print that reason).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: The start of the hold reason of a candidate that passed the floor and the margin
#: and waits for its shadow series (``train_promote_after_shadow``).
AWAITING_SHADOW = "awaiting shadow series"
#: The default quality floor: mean validation Dice a candidate must reach to serve.
DEFAULT_MIN_DICE = 0.7


@dataclass(frozen=True, kw_only=True, slots=True)
class PromotionDecision:
    """Whether a candidate goes into service, and why.

    Parameters
    ----------
    promote : bool
    reason : str
        In words, with the figures.
    below_floor : bool
        The candidate did not reach ``min_dice``.
    """

    promote: bool
    reason: str
    below_floor: bool = False


def _mean(d: Mapping[str, float]) -> float:
    return float(sum(d.values()) / len(d))


def decide(candidate_dice: Mapping[str, float], active_dice: Mapping[str, float] | None, *,
           margin: float, min_dice: float = DEFAULT_MIN_DICE, active_version: str | None = None,
           validation_set: str = "") -> PromotionDecision:
    """Decide the promotion of a candidate from mean Dice per label.

    Parameters
    ----------
    candidate_dice : mapping of str to float
        The candidate's mean Dice per label on the validation patients.
    active_dice : mapping of str to float or None
        The active version's on the same patients (``None`` or empty: no active version).
    margin : float
        Dice the candidate must gain over the active version (>= 0).
    min_dice : float
        The floor, in [0, 1].
    active_version : str, optional
        For the reason.
    validation_set : str, optional
        For the reason.

    Raises
    ------
    ValueError
        If ``candidate_dice`` is empty or ``min_dice``/``margin`` is out of range.
    """
    if not candidate_dice:
        raise ValueError("candidate_dice must name at least one label")
    if not 0.0 <= min_dice <= 1.0:
        raise ValueError(f"min_dice must be in [0, 1], got {min_dice}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    cand = _mean(candidate_dice)
    act = _mean(active_dice) if active_dice else None
    on = f" on {validation_set}" if validation_set else ""
    if cand < min_dice:
        versus = f"; active {active_version} {act:.4f}" if act is not None else "; no active version"
        if act is not None and not cand > act + margin:
            versus += f"; also not better by the margin {margin}"
        return PromotionDecision(
            promote=False, below_floor=True,
            reason=f"below the quality floor: mean Dice {cand:.4f} < min_dice {min_dice:g}"
                   f"{on}{versus}")
    if act is None:
        return PromotionDecision(
            promote=True, reason=f"mean Dice {cand:.4f} reaches min_dice {min_dice:g}{on}; "
                                 "no active version")
    if cand > act + margin:
        return PromotionDecision(
            promote=True, reason=f"mean Dice {cand:.4f} vs {act:.4f} of {active_version}{on} "
                                 f"(margin {margin}, min_dice {min_dice:g})")
    return PromotionDecision(
        promote=False, reason=f"not better by the margin {margin}: mean Dice {cand:.4f} vs "
                              f"{act:.4f} of {active_version or '-'}{on}")
