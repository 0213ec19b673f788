"""Ranking policies that turn calibration scores into a validated :class:`DropPlan`.

* ``entrodrop`` — smallest entropy increase (``delta_entropy[estimator]``) among eligible
  blocks, as the authors' released scorer runs it by default: KNN entropy, protection ``released``
  (layers 0, 1 and L-1 never dropped). Protection ``stage`` is the paper's two-stage rule: blocks in
  the compression stage (layers < stage boundary, the end of the initial decline of the sink-free
  curve) and the last layer are never dropped.
* ``cosine`` — LLM-Drop / ShortGPT block influence: smallest ``1 - cos(in, out)``.
* ``angular`` — for whole layers, Gromov et al.: the contiguous span of ``count`` layers whose input
  and output residual streams are closest in angle (all tokens); ``angular-last`` is the same on each
  window's last token, as published. For sub-blocks, ``angular`` is ours: the blocks with the smallest
  mean arccos(cos(in, out)) / pi, a cousin of cosine importance.
* ``manual`` — the layers the caller lists.

:func:`plan_from_ticks` turns the blocks a person ticked into a plan (``manual`` unless they match an
automatic choice). Ties break by layer index (lower first). Baselines run unprotected by default (as published),
except that nothing may drop every block. What each criterion is, how it ranks and its default
protection live in :mod:`entrodrop.criteria`; the criteria that measure the model (``recommended``,
``ablation``) in :mod:`entrodrop.search`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .arch import BLOCK_KINDS
from .criteria import (
    criterion_estimator,
    get_criterion,
    last_token_matrix,
    ranked_criteria,
    resolve_estimator,
    score_criteria,
)
from .plan import DroppedBlock, DropPlan
from .scores import Scores

PROTECTIONS = ("stage", "released", "none")


def protected_layers(scores: Scores, protect: str, *, estimator: str = "bucket", stage_boundary: int | None = None) -> dict[int, str]:
    """Layers that may not be dropped under ``protect``, each with the reason (for the UI)."""
    L = scores.num_layers
    if protect == "none":
        return {}
    if protect == "released":
        return {i: "protected in the authors' released code (layers 0, 1 and L-1)" for i in sorted({0, 1, L - 1})}
    if protect == "stage":
        boundary = stage_boundary if stage_boundary is not None else scores.stage_boundary.get(estimator)
        if boundary is None:
            raise ValueError(f"No stage boundary for estimator {estimator!r}; calibrate with it or pass stage_boundary.")
        if not 0 <= boundary <= L:
            raise ValueError(f"stage_boundary must be between 0 and {L}, got {boundary}.")
        reasons = {i: f"compression stage (entropy still falling before X_{boundary})" for i in range(boundary)}
        reasons[L - 1] = "last layer (writes the stream the LM head reads)"
        return reasons
    raise ValueError(f"Unknown protection {protect!r}; choose from {', '.join(PROTECTIONS)}.")


def resolve_count(num_layers: int, count: int | None, fraction: float | None) -> int:
    """Number of blocks to drop from an explicit count or a fraction of the L blocks of one kind."""
    if (count is None) == (fraction is None):
        raise ValueError("Give exactly one of count (number of blocks) or fraction (share of blocks).")
    if fraction is not None:
        if not 0 <= fraction < 1:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
        return round(fraction * num_layers)
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}.")
    return count


def rank_blocks(scores: Scores, criterion: str, kind: str, *, estimator: str | None = None) -> list[tuple[int, float]]:
    """All blocks of ``kind`` as (layer, score), best candidates to drop first.

    ``estimator`` (entropy criteria): the criterion's default when calibrated, else the first calibrated."""
    chosen_by = get_criterion(criterion)
    if chosen_by.rank is None:
        raise ValueError(f"Criterion {criterion!r} has no ranking; choose from {', '.join(ranked_criteria())}.")
    chosen_by.check_kind(kind)
    estimator = criterion_estimator(criterion, scores, estimator)
    return sorted(chosen_by.rank(scores, kind, estimator), key=lambda lv: (lv[1], lv[0]))


def block_ranks(scores: Scores, criterion: str, kind: str, *, estimator: str | None = None) -> dict[int, int]:
    """Rank of every block of ``kind`` under ``criterion``: layer -> 1 (dropped first) .. L."""
    return {layer: rank for rank, (layer, _) in enumerate(rank_blocks(scores, criterion, kind, estimator=estimator), 1)}


def _angular_span(matrix: list[list[float]], count: int, eligible: set[int]) -> tuple[int, float]:
    """Start layer of the contiguous span of ``count`` eligible layers whose input X_start and output
    X_start+count are closest in angle (Gromov et al.); ``matrix`` is (L+1) x (L+1)."""
    num_layers = len(matrix) - 1
    best: tuple[float, int] | None = None
    for start in range(num_layers - count + 1):
        if all(layer in eligible for layer in range(start, start + count)):
            dist = matrix[start][start + count]
            if best is None or (dist, start) < best:
                best = (dist, start)
    if best is None:
        raise ValueError(f"No contiguous span of {count} droppable layers; drop fewer or relax protection.")
    return best[1], best[0]


def select_blocks(
    scores: Scores,
    criterion: str = "entrodrop",
    kind: str = "attn",
    *,
    count: int | None = None,
    fraction: float | None = None,
    estimator: str | None = None,
    protect: str | None = None,
    stage_boundary: int | None = None,
    layers: Iterable[int] | None = None,
) -> DropPlan:
    """Choose blocks of ``kind`` to drop with ``criterion`` from the scores alone; a validated plan with reasons.

    ``estimator`` (entropy criteria): the criterion's default when calibrated (knn for entrodrop), else
    the first calibrated. Criteria that run the model (``recommended``, ``ablation``) are chosen by
    :func:`entrodrop.search.iter_select`."""
    if criterion not in score_criteria():
        raise ValueError(f"Unknown criterion {criterion!r} for selection from scores; choose from "
                         f"{', '.join(score_criteria())} (criteria that run the model are in entrodrop.verify).")
    chosen_by = get_criterion(criterion)
    if kind not in BLOCK_KINDS:
        raise ValueError(f"Unknown block kind {kind!r}; choose from {', '.join(BLOCK_KINDS)}.")
    chosen_by.check_kind(kind)
    estimator = criterion_estimator(criterion, scores, estimator) if chosen_by.uses_estimator else (
        estimator or resolve_estimator(scores))
    L = scores.num_layers
    meta = {"kind": kind, "estimator": estimator}
    if chosen_by.rank is None:  # a hand-made list
        chosen = sorted(set(layers or []))
        blocks = [DroppedBlock(layer, kind, "chosen by hand") for layer in chosen]
        return DropPlan(num_layers=L, blocks=blocks, criterion=criterion, meta=meta)

    n = resolve_count(L, count, fraction)
    protect = protect or chosen_by.default_protection
    protected = protected_layers(scores, protect, estimator=estimator, stage_boundary=stage_boundary)
    eligible = {layer for layer in range(L) if layer not in protected}
    meta.update(protect=protect, protected=sorted(protected), count=n)
    if chosen_by.uses_estimator and protect == "stage":
        meta["stage_boundary"] = stage_boundary if stage_boundary is not None else scores.stage_boundary[estimator]
    if n > len(eligible):
        raise ValueError(
            f"Cannot drop {n} {kind} blocks: only {len(eligible)} of {L} are eligible under protection "
            f"'{protect}'. Drop fewer, or use protection 'released' or 'none'."
        )
    if n == 0:
        return DropPlan(num_layers=L, blocks=[], criterion=criterion, meta=meta)

    if criterion in ("angular", "angular-last") and kind == "layer":  # Gromov et al.: a contiguous span
        matrix = last_token_matrix(scores) if criterion == "angular-last" else scores.angular_matrix
        start, dist = _angular_span(matrix, n, eligible)
        reason = f"{criterion}: span {start}..{start + n - 1}, distance(X_{start}, X_{start + n}) = {dist:.4f}"
        blocks = [DroppedBlock(layer, kind, reason) for layer in range(start, start + n)]
        return DropPlan(num_layers=L, blocks=blocks, criterion=criterion, meta=meta)

    ranked = [(layer, v) for layer, v in rank_blocks(scores, criterion, kind, estimator=estimator) if layer in eligible]
    label = chosen_by.reason_score(estimator)
    blocks = [
        DroppedBlock(layer, kind, f"{criterion}: {label} = {value:.4g}, rank {rank + 1} of {len(ranked)} eligible")
        for rank, (layer, value) in enumerate(ranked[:n])
    ]
    return DropPlan(num_layers=L, blocks=blocks, criterion=criterion, meta=meta)


def plan_from_ticks(scores: Scores, kind: str, ticked: Iterable[int], auto_plan: DropPlan | None = None) -> DropPlan:
    """A plan dropping the ticked blocks of ``kind``; reasons come from ``auto_plan`` where it chose
    the same block, otherwise "ticked by hand". Raises ValueError for a plan that drops everything."""
    ticked = sorted(set(int(t) for t in ticked))
    auto = {b.layer: b.reason for b in (auto_plan.blocks if auto_plan else []) if b.kind == kind}
    blocks = [DroppedBlock(layer, kind, auto.get(layer, "ticked by hand")) for layer in ticked]
    same = auto_plan is not None and set(ticked) == set(auto)
    criterion = auto_plan.criterion if same else "manual"
    meta = dict(auto_plan.meta) if auto_plan is not None else {"kind": kind}
    meta["kind"] = kind
    if not same:
        meta["edited_from"] = auto_plan.criterion if auto_plan is not None else None
    return DropPlan(num_layers=scores.num_layers, blocks=blocks, criterion=criterion, meta=meta)
