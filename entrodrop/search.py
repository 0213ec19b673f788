"""Our own criteria, measured on the model itself: ``ablation`` and ``recommended``.

Neither is the paper's method. Both measure the mean next-token loss (nats) of the model with
blocks skipped through the reversible preview (:func:`~entrodrop.prune.preview_plan`), on a few
*calibration* windows. Pass windows from the calibration part only: the held-out part is what
checks report on, and a choice tuned on it would be scored on the text it was picked with.

* :func:`iter_ablation` drops each eligible block alone and records the loss increase
  (one forward pass per block and window); ``ablation`` ranks blocks by it, smallest first.
* :func:`iter_recommend` is a greedy search over a candidate pool: the union of the best
  candidates of every score-based criterion (entropy increase, cosine importance, angular
  distance) and of ablation. At every step it adds the candidate whose removal, together with the
  blocks already chosen, gives the lowest measured loss.

  ``search="lazy"`` (default) re-measures candidates in the order of their last measured loss
  increase and stops a step as soon as the best fresh measurement is no worse than every stale one
  (lazy greedy). Dropping blocks together usually hurts at least as much as the sum of dropping
  them apart, so stale increases are optimistic and the lazy step picks what the full step would;
  when that does not hold it can differ, which is why ``search="greedy"`` (every candidate
  re-measured at every step) exists and ``benchmarks/bench_recommend.py`` compares the two.

  A greedy search on one window can walk past a plan another criterion finds whole (at 8 attention
  blocks on SmolLM2, angular's plan beat it on held-out text). So when given ``compare_on`` windows
  (calibration windows the search did not read), :func:`iter_recommend` ends with a race: the greedy plan
  and every other criterion's own plan for the same count (:func:`rival_plans`) race on those windows
  (:func:`entrodrop.race.iter_race`: clearly worse plans are set aside after the first round), and the
  lowest loss is recommended; ``meta["race"]`` names the winner, every candidate's loss and the margin.

The generators yield :class:`~entrodrop.progress.ProgressEvent` progress; ``partial`` of every event
after a completed step is the best plan so far, so a consumer that stops early keeps it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .criteria import (
    DEFAULT_CRITERION,
    criterion_estimator,
    get_criterion,
    ranked_criteria,
    resolve_estimator,
)
from .evaluate import mean_loss
from .plan import DroppedBlock, DropPlan
from .progress import ProgressEvent
from .race import COMPARE_WINDOWS, GREEDY, iter_race  # noqa: F401  (GREEDY: the greedy plan's name in the race)
from .scores import Scores
from .select import protected_layers, rank_blocks, select_blocks

logger = logging.getLogger(__name__)

SEARCHES = ("lazy", "greedy")
MEASURE_WINDOWS = 1  # calibration windows the loss is measured on (placed by benchmarks/bench_recommend.py)
POOL_EXTRA = 4  # each criterion puts its best count + POOL_EXTRA candidates into the pool (bench_recommend.py)
POOL_CRITERIA = ("entrodrop", "cosine", "angular")  # score-based criteria whose best candidates join the pool
# calibration windows the measured criteria read: the search's, then the race's (never the same windows)
SELECTION_WINDOWS = MEASURE_WINDOWS + COMPARE_WINDOWS
MIN_WINDOWS = 1


@dataclass
class Ablation:
    """Loss of the dense model and of the model with each block dropped alone."""

    kind: str
    dense_loss: float
    losses: dict[int, float]  # layer -> mean loss with that block dropped alone
    windows: int
    tokens: int

    def increase(self, layer: int) -> float:
        return self.losses[layer] - self.dense_loss

    def ranking(self) -> list[tuple[int, float]]:
        """(layer, loss increase) of every measured block, smallest increase first (ties: lower layer)."""
        return sorted(((layer, self.increase(layer)) for layer in self.losses), key=lambda lv: (lv[1], lv[0]))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dense_loss": self.dense_loss, "windows": self.windows, "tokens": self.tokens,
                "losses": {str(k): v for k, v in sorted(self.losses.items())}}


def check_windows(windows: torch.Tensor, what: str) -> None:
    """ValueError unless ``windows`` is a (windows, seq_len) tensor with at least one window of 2+ tokens."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] < MIN_WINDOWS:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"{what} measures the loss on calibration windows: pass a (windows, seq_len) tensor of "
                         f"token ids with at least {MIN_WINDOWS} window, got {shape}.")
    if windows.shape[1] < 2:
        raise ValueError(f"{what} needs windows of at least 2 tokens (one to read, one to predict).")


def eligible_layers(scores: Scores, protect: str, estimator: str | None = None) -> list[int]:
    """Layers that ``protect`` leaves droppable, in order."""
    protected = protected_layers(scores, protect, estimator=resolve_estimator(scores, estimator))
    return [layer for layer in range(scores.num_layers) if layer not in protected]


def iter_ablation(
    model: nn.Module,
    num_layers: int,
    windows: torch.Tensor,
    *,
    kind: str = "attn",
    layers: Sequence[int] | None = None,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Drop each block of ``kind`` in ``layers`` (default: all) alone and measure the mean loss.

    One event per measured block (stage ``"ablation"``); the last event's ``partial`` is the
    :class:`Ablation`. The shared model is restored after every measurement, also on errors."""
    check_windows(windows, "Ablation")
    layers = list(range(num_layers)) if layers is None else sorted(set(layers))
    if not layers:
        raise ValueError("No block is eligible for ablation: relax the protection or choose another kind.")
    total = len(layers) + 1
    dense = mean_loss(model, windows, batch_size=batch_size)
    yield ProgressEvent("ablation", 1, total, None)
    losses: dict[int, float] = {}
    for i, layer in enumerate(layers):
        losses[layer] = mean_loss(model, windows, DropPlan(num_layers, [DroppedBlock(layer, kind)]),
                                  batch_size=batch_size)
        done = i + 2
        result = Ablation(kind, dense, dict(losses), int(windows.shape[0]), int(windows.numel()))
        yield ProgressEvent("ablation", done, total, result if done == total else None)


def candidate_pool(scores: Scores, ablation: Ablation, kind: str, eligible: Sequence[int], per_criterion: int,
                   estimator: str | None = None) -> dict[int, list[str]]:
    """Union of the ``per_criterion`` best eligible candidates of every criterion: layer -> criteria naming it."""
    allowed = set(eligible)
    rankings = {c: [layer for layer, _ in rank_blocks(scores, c, kind, estimator=estimator if c == "entrodrop" else None)]
                for c in POOL_CRITERIA}
    rankings["ablation"] = [layer for layer, _ in ablation.ranking()]
    pool: dict[int, list[str]] = {}
    for criterion, order in rankings.items():
        for layer in [layer for layer in order if layer in allowed][:per_criterion]:
            pool.setdefault(layer, []).append(criterion)
    return dict(sorted(pool.items()))


def iter_recommend(
    model: nn.Module,
    scores: Scores,
    windows: torch.Tensor,
    *,
    kind: str = "attn",
    count: int = 4,
    estimator: str | None = None,
    protect: str = "none",
    pool_per_criterion: int | None = None,
    search: str = "lazy",
    ablation: Ablation | None = None,
    compare_on: torch.Tensor | None = None,
    race_from: int = 0,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Greedy, loss-measured choice of ``count`` blocks of ``kind`` (criterion ``"recommended"``).

    ``pool_per_criterion`` (default ``count + POOL_EXTRA``) is how many of each criterion's best candidates
    join the pool; ``None`` with ``search="greedy"`` and a pool as large as the eligible set is the
    full-pool greedy reference. Pass a precomputed ``ablation`` (same kind and windows) to reuse it.
    Events: stage ``"ablation"`` while single blocks are measured, then ``"recommend"``; after each
    chosen block ``partial`` is the plan so far (reasons per block), the last event's is the final plan.
    With ``compare_on`` (calibration windows the search did not read; ``race_from``: where they start among
    the selection windows, for the record), stage ``"compare"`` then races the greedy plan against every
    other criterion's plan for ``count`` (see :func:`entrodrop.race.iter_race`) and the final plan is the lowest.
    """
    if search not in SEARCHES:
        raise ValueError(f"Unknown search {search!r}; choose from {', '.join(SEARCHES)}.")
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}.")
    check_windows(windows, "The recommended criterion")
    est = criterion_estimator("entrodrop", scores, estimator)  # which entropy ranking joins the pool
    eligible = eligible_layers(scores, protect, est)
    if count > len(eligible):
        raise ValueError(f"Cannot drop {count} {kind} blocks: only {len(eligible)} of {scores.num_layers} are "
                         f"eligible under protection '{protect}'. Drop fewer or relax the protection.")
    L = scores.num_layers
    meta = {"kind": kind, "count": count, "protect": protect, "search": search, "estimator": est,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}
    if count == 0:
        yield ProgressEvent("recommend", 0, 0, DropPlan(L, [], criterion="recommended", meta=meta))
        return
    if ablation is None or ablation.kind != kind or not set(eligible) <= set(ablation.losses):
        for event in iter_ablation(model, L, windows, kind=kind, layers=eligible, batch_size=batch_size):
            if event.partial is not None:
                ablation = event.partial
            yield ProgressEvent(event.stage, event.done, event.total, None)  # partial is only ever a plan here
    per = pool_per_criterion if pool_per_criterion is not None else count + POOL_EXTRA
    pool = candidate_pool(scores, ablation, kind, eligible, per, est)
    if len(pool) < count:  # a tiny pool (few eligible blocks): widen with the ablation order
        for layer, _ in ablation.ranking():
            if layer in eligible:
                pool.setdefault(layer, ["ablation"])
            if len(pool) >= count:
                break
    meta.update(pool=sorted(pool), dense_loss=ablation.dense_loss, pool_per_criterion=per)

    chosen: list[DroppedBlock] = []
    loss_now = ablation.dense_loss
    bound = {layer: ablation.increase(layer) for layer in pool}  # last measured increase of each candidate
    worst_case = sum(len(pool) - step for step in range(count))
    done = 0
    steps = []
    for step in range(1, count + 1):
        fresh: dict[int, float] = {}  # layer -> loss with chosen + layer, measured at this step
        if step == 1:
            fresh = {layer: ablation.losses[layer] for layer in bound}
        order = sorted(bound, key=lambda layer: (bound[layer], layer))
        for layer in order:
            if layer in fresh:
                continue
            if search == "lazy" and fresh:
                best = min(fresh.values()) - loss_now
                if best <= bound[layer]:
                    break  # every remaining candidate's optimistic increase is already worse
            trial = DropPlan(L, [*chosen, DroppedBlock(layer, kind)])
            fresh[layer] = mean_loss(model, windows, trial, batch_size=batch_size)
            bound[layer] = fresh[layer] - loss_now
            done += 1
            yield ProgressEvent("recommend", done, worst_case, None)
        best_layer = min(fresh, key=lambda layer: (fresh[layer], layer))
        increase = fresh[best_layer] - ablation.dense_loss
        chosen.append(DroppedBlock(best_layer, kind, (
            f"recommended: chosen at step {step} of {count}, loss {increase:+.4f} nats over dense "
            f"({len(fresh)} of {len(bound)} candidates measured; pool from {', '.join(pool[best_layer])})")))
        steps.append({"chosen": best_layer, "loss": fresh[best_layer], "measured": len(fresh)})
        logger.info("recommended step %d: %s %d -> loss %.4f", step, kind, best_layer, fresh[best_layer])
        loss_now = fresh[best_layer]
        # the other bounds stay as measured (increase over the loss before this step): if dropping blocks
        # together hurts at least as much as apart, a block's increase can only grow, so they stay optimistic
        del bound[best_layer]
        plan = DropPlan(L, list(chosen), criterion="recommended", meta={**meta, "steps": list(steps),
                                                                        "loss": loss_now, "complete": step == count})
        yield ProgressEvent("recommend", done, worst_case if step < count else done, plan)
    if compare_on is not None:
        rivals = rival_plans(scores, ablation, kind, count, eligible, protect, est)
        yield from iter_race(model, plan, rivals, compare_on, first_window=race_from, batch_size=batch_size)


def rival_plans(scores: Scores, ablation: Ablation, kind: str, count: int, eligible: Sequence[int], protect: str,
                estimator: str) -> dict[str, DropPlan]:
    """Every other criterion's own plan for ``count`` blocks of ``kind`` (criterion name -> plan).

    Each criterion keeps its default protection (as a user choosing it would get it) unless that
    reaches outside ``eligible``; then it gets ``protect``. A criterion that cannot reach the count
    there is left out."""
    allowed = set(eligible)
    plans: dict[str, DropPlan] = {}
    for name in ranked_criteria(kind):
        record = get_criterion(name)
        for guard in dict.fromkeys((record.default_protection, protect)):
            try:
                plan = select_blocks(scores, name, kind, count=count, protect=guard,
                                     estimator=estimator if record.uses_estimator else None)
            except ValueError:
                continue
            if set(plan.layers_of(kind)) <= allowed:
                plans[name] = plan
                break
    try:
        plans["ablation"] = ablation_plan(scores, ablation, kind, count, protect, estimator)
    except ValueError:
        pass
    return plans


def windows_read_bound(num_layers: int, count: int, *, num_windows: int = MEASURE_WINDOWS,
                       compare_windows: int = COMPARE_WINDOWS) -> int:
    """The most windows one ``recommended`` run of ``count`` blocks can read: the single-block ablation,
    a search that re-measures every block at every step, and a final comparison that sets no plan aside
    (every score criterion's plan, ablation's and the greedy one). Typical runs read far fewer; this
    bounds what a request may cost before it runs."""
    plans = len(ranked_criteria()) + 2
    return num_layers * num_windows * (1 + count) + plans * compare_windows


def ablation_plan(scores: Scores, ablation: Ablation, kind: str, count: int, protect: str = "none",
                  estimator: str | None = None) -> DropPlan:
    """The ``count`` eligible blocks whose single-block loss increase is smallest (criterion ``"ablation"``)."""
    eligible = set(eligible_layers(scores, protect, estimator))
    ranked = [(layer, inc) for layer, inc in ablation.ranking() if layer in eligible]
    if count > len(ranked):
        raise ValueError(f"Cannot drop {count} {kind} blocks: only {len(ranked)} were measured and eligible. "
                         "Drop fewer or relax the protection.")
    blocks = [DroppedBlock(layer, kind, f"ablation: loss {inc:+.4f} nats when dropped alone, rank {rank} of "
                                        f"{len(ranked)} eligible") for rank, (layer, inc) in enumerate(ranked[:count], 1)]
    return DropPlan(scores.num_layers, blocks, criterion="ablation",
                    meta={"kind": kind, "count": count, "protect": protect, "dense_loss": ablation.dense_loss,
                          "windows": ablation.windows})


def iter_select(
    model: nn.Module,
    scores: Scores,
    windows: torch.Tensor | None,
    *,
    criterion: str = DEFAULT_CRITERION,
    kind: str = "attn",
    count: int = 4,
    estimator: str | None = None,
    protect: str | None = None,
    stage_boundary: int | None = None,
    ablation: Ablation | None = None,
    num_windows: int = MEASURE_WINDOWS,
    compare_windows: int = COMPARE_WINDOWS,
    batch_size: int = 1,
    **search_options,
) -> Iterator[ProgressEvent]:
    """Choose ``count`` blocks of ``kind`` with any criterion; the last event's ``partial`` is the plan.

    Criteria that read only the scores answer at once (one event); ``ablation`` and ``recommended``
    measure the model on the first ``num_windows`` of ``windows`` (calibration windows only);
    ``recommended`` then races whole plans on the next ``compare_windows`` (0: no race), never on a window
    the search read; pass :data:`SELECTION_WINDOWS` windows for the defaults (fewer: the race reads what
    is left after the search's, and needs at least one). ``search_options`` go to
    :func:`iter_recommend` (``pool_per_criterion``, ``search``). Pass
    ``ablation`` (measured on the same windows) to reuse single-block losses across counts.
    """
    chosen_by = get_criterion(criterion)
    chosen_by.check_kind(kind)
    protect = protect or chosen_by.default_protection
    if not chosen_by.needs_model:
        plan = select_blocks(scores, criterion, kind, count=count, estimator=estimator, protect=protect,
                             stage_boundary=stage_boundary)
        yield ProgressEvent("select", 1, 1, plan)
        return
    if windows is None:
        raise ValueError(f"The {criterion} criterion measures the model: pass calibration windows (windows=...).")
    if num_windows < 1 or compare_windows < 0:
        raise ValueError(f"num_windows must be at least 1 and compare_windows at least 0, got {num_windows} "
                         f"and {compare_windows}.")
    compare_on = windows[num_windows:num_windows + compare_windows] if compare_windows else None
    if compare_on is not None and compare_on.shape[0] == 0 and criterion == "recommended":
        raise ValueError(f"recommended races whole plans on calibration windows its search did not read: pass more "
                         f"than num_windows={num_windows} windows ({num_windows + compare_windows} for the defaults), "
                         "or compare_windows=0 to skip the race.")
    windows = windows[:num_windows]
    if criterion == "ablation":
        eligible = eligible_layers(scores, protect, estimator)
        if count > len(eligible):
            raise ValueError(f"Cannot drop {count} {kind} blocks: only {len(eligible)} of {scores.num_layers} are "
                             f"eligible under protection '{protect}'. Drop fewer or relax the protection.")
        if ablation is None or ablation.kind != kind or not set(eligible) <= set(ablation.losses):
            for event in iter_ablation(model, scores.num_layers, windows, kind=kind, layers=eligible,
                                       batch_size=batch_size):
                ablation = event.partial if event.partial is not None else ablation
                yield ProgressEvent(event.stage, event.done, event.total, None)
        plan = ablation_plan(scores, ablation, kind, count, protect, estimator)
        yield ProgressEvent("select", 1, 1, plan)
        return
    yield from iter_recommend(model, scores, windows, kind=kind, count=count, estimator=estimator, protect=protect,
                              ablation=ablation, compare_on=compare_on, race_from=num_windows, batch_size=batch_size,
                              **search_options)
