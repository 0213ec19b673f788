"""The criteria that choose blocks to drop: one record each, read by selection, reports, sweeps and
the front ends.

A :class:`Criterion` says what a criterion is called (``name``, human ``label``), how it ranks the
blocks of one kind (``rank``: the blocks as (layer, score), smallest score dropped first), which
protection it gets when the caller names none, whether it needs the model itself (not only the
calibration scores) and which score a dropped block's reason quotes. To add a criterion, write its
ranking function and add its record to :data:`REGISTRY`.

``entrodrop`` is the paper's method as the authors' released code runs it (KNN entropy, layers 0, 1
and L-1 protected); ``cosine`` and the whole-layer ``angular`` / ``angular-last`` spans are the
published baselines (run unprotected, as published); the sub-block ``angular`` ranking, ``ablation``
and ``recommended`` (the default) are ours (see :mod:`entrodrop.search`); ``manual`` is a hand-made list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .arch import BLOCK_KINDS
from .scores import Scores

DEFAULT_CRITERION = "recommended"  # what the CLI, the library's iter_select and the app choose by default

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
    """Mean over tokens of arccos(cos(in, out)) / pi of each block. For whole layers this is Gromov et
    al.'s distance over a span of one layer (``select_blocks`` searches the span of ``count`` layers);
    for sub-blocks it is ours, a monotone-in-spirit cousin of cosine importance."""
    return [(b.layer, b.angular_distance) for b in scores.blocks_of(kind)]


def rank_by_last_token_angle(scores: Scores, kind: str, estimator: str) -> list[tuple[int, float]]:
    """Gromov et al. as published: the angle between X_l and X_{l+1} at each window's last token."""
    matrix = last_token_matrix(scores)
    return [(layer, matrix[layer][layer + 1]) for layer in range(scores.num_layers)]


def last_token_matrix(scores: Scores) -> list[list[float]]:
    """The last-token angular matrix, or a ValueError for scores calibrated before it was recorded."""
    if not scores.angular_matrix_last:
        raise ValueError("These scores have no last-token angular matrix (written by an older version): "
                         "calibrate again to use angular-last.")
    return scores.angular_matrix_last


@dataclass(frozen=True)
class Criterion:
    """One way of choosing blocks to drop."""

    name: str  # as in plans, the API and the command line
    label: str  # what people read
    rank: Ranking | None  # None: the criterion has no ranking of its own (hand-made, or runs the model)
    default_protection: str  # protection when the caller names none (see select.PROTECTIONS)
    needs_model: bool = False  # chooses by running the model (entrodrop.search), not from the scores alone
    uses_estimator: bool = False  # depends on which entropy estimator is chosen
    score_label: str = ""  # the score a dropped block's reason quotes; "{estimator}" is filled in
    default_estimator: str | None = None  # used when the caller names none and it was calibrated
    kinds: tuple[str, ...] = BLOCK_KINDS  # block kinds it can choose
    kind_labels: tuple[tuple[str, str], ...] = ()  # (kind, label) where a kind is named differently
    ours: bool = False  # our own method, never the paper's or a published baseline

    def reason_score(self, estimator: str) -> str:
        return self.score_label.format(estimator=estimator)

    def label_for(self, kind: str) -> str:
        """The label for blocks of ``kind`` (the angular criterion means different things per kind)."""
        return dict(self.kind_labels).get(kind, self.label)

    def check_kind(self, kind: str) -> None:
        if kind not in self.kinds:
            raise ValueError(f"Criterion {self.name!r} chooses {' and '.join(self.kinds)} blocks only, not {kind!r}.")


_BLOCK_ANGLE = "block angle (ours: mean arccos(cos(in, out))/pi per block, a cousin of cosine importance)"

REGISTRY: dict[str, Criterion] = {c.name: c for c in (
    Criterion("recommended", "recommended (ours: greedy search by measured loss over every criterion's best "
              "candidates, then the lowest of that plan and every criterion's own)", None, "none",
              needs_model=True, uses_estimator=True, ours=True),
    Criterion("entrodrop", "entropy increase (EntroDrop, as in the released code)", rank_by_entropy_increase,
              "released", uses_estimator=True, score_label="delta_entropy[{estimator}]", default_estimator="knn"),
    Criterion("cosine", "cosine importance (LLM-Drop / ShortGPT)", rank_by_cosine_importance, "none",
              score_label="cosine importance"),
    Criterion("angular", "angular distance (Gromov et al. for whole layers; ours per sub-block)",
              rank_by_angular_distance, "none", score_label="angular distance",
              kind_labels=(("attn", _BLOCK_ANGLE), ("mlp", _BLOCK_ANGLE),
                           ("layer", "angular distance span (Gromov et al., all tokens)"))),
    Criterion("angular-last", "angular distance span, last token (Gromov et al. as published)",
              rank_by_last_token_angle, "none", score_label="last-token angular distance", kinds=("layer",)),
    Criterion("ablation", "ablation (ours: measured loss of dropping each block alone)", None, "none",
              needs_model=True, ours=True),
    Criterion("manual", "chosen by hand", None, "none"),
)}


def criterion_estimator(criterion: str, scores: Scores, estimator: str | None = None) -> str:
    """The estimator ``criterion`` ranks with: ``estimator`` when given (it must have been calibrated),
    else the criterion's default when calibrated, else the first calibrated one."""
    if estimator is not None:
        check_estimator(scores, estimator)
        return estimator
    return resolve_estimator(scores, get_criterion(criterion).default_estimator)


def get_criterion(name: str) -> Criterion:
    """The record of criterion ``name``; a ValueError lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown criterion {name!r}; choose from {', '.join(REGISTRY)}.") from None


def ranked_criteria(kind: str | None = None) -> tuple[str, ...]:
    """Criteria that rank every block (of ``kind``, when given) from the scores alone (compared side by
    side in reports)."""
    return tuple(c.name for c in REGISTRY.values() if c.rank is not None and (kind is None or kind in c.kinds))


def score_criteria() -> tuple[str, ...]:
    """Criteria :func:`~entrodrop.select.select_blocks` applies from the scores (no model run)."""
    return tuple(c.name for c in REGISTRY.values() if not c.needs_model)


def model_criteria() -> tuple[str, ...]:
    """Criteria that run the model to choose (see :mod:`entrodrop.search`)."""
    return tuple(c.name for c in REGISTRY.values() if c.needs_model)
