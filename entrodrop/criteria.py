"""The criteria that choose blocks to drop: one record each, read by selection, reports, sweeps and
the front ends.

A :class:`Criterion` says what a criterion is called (``name``, human ``label``), how it ranks the
blocks of one kind (``rank``: the blocks as (layer, score), smallest score dropped first), which
protection it gets when the caller names none, whether it needs the model itself (not only the
calibration scores) and which score a dropped block's reason quotes. To add a criterion, write its
ranking function and add its record to :data:`REGISTRY`.

``entrodrop`` is the paper's; ``cosine`` and ``angular`` are the published baselines (run
unprotected, as published); ``manual`` is a hand-made list; ``loss`` is ours (see
:mod:`entrodrop.verify`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .scores import Scores

Ranking = Callable[[Scores, str, str], list[tuple[int, float]]]  # (scores, kind, estimator) -> (layer, score)


def resolve_estimator(available: Scores | Sequence[str], estimator: str | None = None) -> str:
    """``estimator`` when it was calibrated, else the first calibrated one (the default everywhere).

    ``available`` is a :class:`Scores` or the estimator names themselves."""
    names = list(available.estimators if isinstance(available, Scores) else available)
    if not names:
        raise ValueError("No entropy estimator was calibrated; calibrate with at least one.")
    return estimator if estimator in names else names[0]


def check_estimator(scores: Scores, estimator: str) -> None:
    """Raise a ValueError unless ``estimator`` was calibrated into ``scores``."""
    if estimator not in scores.estimators:
        raise ValueError(f"Estimator {estimator!r} was not calibrated; available: {', '.join(scores.estimators)}.")


# -- ranking functions: every block of one kind as (layer, score); the smallest score goes first --
def rank_by_entropy_increase(scores: Scores, kind: str, estimator: str) -> list[tuple[int, float]]:
    """EntroDrop: the entropy a block adds, ``delta_entropy[estimator]``."""
    check_estimator(scores, estimator)
    return [(b.layer, b.delta_entropy[estimator]) for b in scores.blocks_of(kind)]


def rank_by_cosine_importance(scores: Scores, kind: str, estimator: str) -> list[tuple[int, float]]:
    """LLM-Drop / ShortGPT: ``1 - cos(in, out)`` averaged over tokens."""
    return [(b.layer, b.cosine_importance) for b in scores.blocks_of(kind)]


def rank_by_angular_distance(scores: Scores, kind: str, estimator: str) -> list[tuple[int, float]]:
    """Gromov et al.: the angle between a block's input and output, over pi."""
    return [(b.layer, b.angular_distance) for b in scores.blocks_of(kind)]


@dataclass(frozen=True)
class Criterion:
    """One way of choosing blocks to drop."""

    name: str  # as in plans, the API and the command line
    label: str  # what people read
    rank: Ranking | None  # None: the criterion has no ranking of its own (hand-made, or runs the model)
    default_protection: str  # protection when the caller names none (see select.PROTECTIONS)
    needs_model: bool = False  # chooses by running the model, so select_blocks cannot apply it from scores
    uses_estimator: bool = False  # depends on which entropy estimator is chosen
    score_label: str = ""  # the score a dropped block's reason quotes; "{estimator}" is filled in

    def reason_score(self, estimator: str) -> str:
        return self.score_label.format(estimator=estimator)


REGISTRY: dict[str, Criterion] = {c.name: c for c in (
    Criterion("entrodrop", "entropy increase (EntroDrop)", rank_by_entropy_increase, "stage",
              uses_estimator=True, score_label="delta_entropy[{estimator}]"),
    Criterion("cosine", "cosine importance (LLM-Drop / ShortGPT)", rank_by_cosine_importance, "none",
              score_label="cosine importance"),
    Criterion("angular", "angular distance (Gromov et al.)", rank_by_angular_distance, "none",
              score_label="angular distance"),
    Criterion("manual", "chosen by hand", None, "none"),
    # greedy search by measured loss over the best entropy candidates, so protected like entrodrop
    Criterion("loss", "loss-verified (ours: measured loss of dropping each candidate)", None, "stage",
              needs_model=True, uses_estimator=True),
)}


def get_criterion(name: str) -> Criterion:
    """The record of criterion ``name``; a ValueError lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown criterion {name!r}; choose from {', '.join(REGISTRY)}.") from None


def ranked_criteria() -> tuple[str, ...]:
    """Criteria that rank every block from the scores alone (compared side by side in reports)."""
    return tuple(c.name for c in REGISTRY.values() if c.rank is not None)


def score_criteria() -> tuple[str, ...]:
    """Criteria :func:`~entrodrop.select.select_blocks` applies from the scores (no model run)."""
    return tuple(c.name for c in REGISTRY.values() if not c.needs_model)


def model_criteria() -> tuple[str, ...]:
    """Criteria that run the model to choose (see :mod:`entrodrop.verify`)."""
    return tuple(c.name for c in REGISTRY.values() if c.needs_model)
