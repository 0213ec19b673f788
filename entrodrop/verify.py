"""Selection checked against the model itself, and sweeps over criteria and drop counts.

* ``loss`` (loss-verified) criterion: take the best ``2K`` entropy candidates, then greedily add the
  candidate whose removal (really skipped, through a preview) gives the lowest loss on the windows
  given, until ``K`` blocks are chosen. It costs about ``2K x K`` forward passes over those windows.
  Pick with windows other than the ones you evaluate on (the sweep uses calibration windows).
* :func:`iter_sweep`: perplexity, KL(dense || pruned) and top-1 agreement for every criterion at
  every count, from ONE calibration and one pass over the held-out windows per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .criteria import get_criterion, model_criteria, ranked_criteria
from .evaluate import iter_compare_many, mean_loss
from .plan import DroppedBlock, DropPlan
from .progress import ProgressEvent, run_to_end
from .scores import Scores
from .select import select_blocks

logger = logging.getLogger(__name__)

LOSS = get_criterion("loss")


def _entropy_candidates(scores: Scores, kind: str, wanted: int, estimator: str, protect: str | None) -> DropPlan:
    """The ``wanted`` best entropy candidates, or as many as the protection leaves eligible."""
    last_error: ValueError | None = None
    for n in range(wanted, 0, -1):
        try:
            return select_blocks(scores, "entrodrop", kind, count=n, estimator=estimator, protect=protect)
        except ValueError as exc:  # too many for the eligible layers: try fewer
            last_error = exc
    raise ValueError(f"No {kind} block is eligible for the loss-verified criterion: {last_error}")


def iter_select_loss_verified(
    model: nn.Module,
    scores: Scores,
    windows: torch.Tensor,
    *,
    kind: str = "attn",
    count: int = 4,
    estimator: str = "bucket",
    candidate_factor: int = 2,
    protect: str | None = None,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Greedy loss-verified selection; events count loss evaluations, the last one's ``partial`` is
    the :class:`DropPlan` (criterion ``"loss"``, the losses in ``meta``)."""
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}.")
    if count == 0:
        yield ProgressEvent("select", 0, 0, DropPlan(scores.num_layers, [], criterion=LOSS.name,
                                                 meta={"kind": kind, "count": 0}))
        return
    candidates = _entropy_candidates(scores, kind, candidate_factor * count, estimator, protect)
    pool = [b.layer for b in candidates.blocks]
    if len(pool) < count:
        raise ValueError(f"Only {len(pool)} {kind} blocks are eligible; cannot choose {count}. Drop fewer.")
    total = sum(len(pool) - step for step in range(count))
    done = 0
    chosen: list[DroppedBlock] = []
    steps: list[dict] = []
    base_loss = mean_loss(model, windows, batch_size=batch_size)
    for step in range(count):
        trial_losses: dict[int, float] = {}
        for layer in pool:
            trial = DropPlan(scores.num_layers, [*chosen, DroppedBlock(layer, kind)])
            trial_losses[layer] = mean_loss(model, windows, trial, batch_size=batch_size)
            done += 1
            yield ProgressEvent("select", done, total, None)
        best = min(pool, key=lambda layer: (trial_losses[layer], layer))
        pool.remove(best)
        chosen.append(DroppedBlock(best, kind, f"loss-verified: step {step + 1}, loss {trial_losses[best]:.4f} "
                                               f"(dense {base_loss:.4f}) among {len(trial_losses)} candidates"))
        steps.append({"chosen": best, "losses": {str(k): v for k, v in trial_losses.items()}})
        logger.info("loss-verified step %d: %s %d -> loss %.4f", step + 1, kind, best, trial_losses[best])
    plan = DropPlan(scores.num_layers, chosen, criterion=LOSS.name, meta={
        "kind": kind, "count": count, "estimator": estimator, "dense_loss": base_loss,
        "candidates": [b.layer for b in candidates.blocks], "steps": steps, "windows": int(windows.shape[0]),
    })
    yield ProgressEvent("select", total, total, plan)


def select_loss_verified(model: nn.Module, scores: Scores, windows: torch.Tensor, **kwargs) -> DropPlan:
    """Run :func:`iter_select_loss_verified` to its end and return the plan."""
    return run_to_end(iter_select_loss_verified(model, scores, windows, **kwargs))


@dataclass
class SweepRow:
    criterion: str
    count: int
    plan: dict
    dense_perplexity: float
    pruned_perplexity: float
    kl_mean: float
    top1_agreement: float
    pruned_params: int
    dense_params: int

    def to_dict(self) -> dict:
        return asdict(self)


def sweep_plans(
    model: nn.Module,
    scores: Scores,
    criteria: Sequence[str],
    kind: str,
    counts: Sequence[int],
    *,
    estimator: str = "bucket",
    protect: str | None = None,
    selection_windows: torch.Tensor | None = None,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Build the plan of every (criterion, count); ``partial`` of the last event is ``{(criterion,
    count): DropPlan}``. Counts a criterion cannot reach (protection) are skipped with a log line."""
    plans: dict[tuple[str, int], DropPlan] = {}
    jobs = [(c, n) for c in criteria for n in counts]
    for i, (criterion, n) in enumerate(jobs):
        if n == 0:
            plans[(criterion, n)] = DropPlan(scores.num_layers, [], criterion=criterion)
        elif criterion in model_criteria():  # the loss-verified search, the one criterion that runs the model
            if selection_windows is None:
                raise ValueError("The loss criterion needs selection_windows (calibration windows) to pick with.")
            plans[(criterion, n)] = select_loss_verified(model, scores, selection_windows, kind=kind, count=n,
                                                         estimator=estimator, protect=protect, batch_size=batch_size)
        else:
            try:
                plans[(criterion, n)] = select_blocks(scores, criterion, kind, count=n, estimator=estimator,
                                                      protect=protect)
            except ValueError as exc:
                logger.warning("Skipping %s at count %d: %s", criterion, n, exc)
        yield ProgressEvent("select", i + 1, len(jobs), dict(plans) if i + 1 == len(jobs) else None)


def iter_sweep(
    model: nn.Module,
    scores: Scores,
    windows: torch.Tensor,
    *,
    criteria: Sequence[str] | None = None,
    kind: str = "attn",
    counts: Sequence[int] = (0, 2, 4, 6, 8),
    estimator: str = "bucket",
    protect: str | None = None,
    selection_windows: torch.Tensor | None = None,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Select (stage ``select``) then compare every plan on ``windows`` in one pass (stage ``sweep``);
    the last event's ``partial`` is the list of :class:`SweepRow` (criterion order, then count).
    ``criteria`` defaults to every criterion that ranks from the scores."""
    criteria = ranked_criteria() if criteria is None else criteria
    plans: dict[tuple[str, int], DropPlan] = {}
    for event in sweep_plans(model, scores, criteria, kind, counts, estimator=estimator, protect=protect,
                             selection_windows=selection_windows, batch_size=batch_size):
        if event.partial is not None:
            plans = event.partial
        yield event
    # identical plans (every count 0, or criteria that agree) are evaluated once
    unique: dict[tuple, str] = {}
    named: dict[str, DropPlan] = {}
    for plan in plans.values():
        key = tuple(sorted(plan.keys()))
        if key not in unique:
            unique[key] = f"plan{len(unique)}"
            named[unique[key]] = plan
    reports: dict = {}
    for event in iter_compare_many(model, named, windows, batch_size=batch_size):
        reports = event.partial
        yield ProgressEvent("sweep", event.done, event.total, None)
    rows = []
    for (criterion, n), plan in plans.items():
        r = reports[unique[tuple(sorted(plan.keys()))]]
        rows.append(SweepRow(criterion=criterion, count=n, plan=plan.to_dict(), dense_perplexity=r.dense_perplexity,
                             pruned_perplexity=r.pruned_perplexity, kl_mean=r.kl_mean,
                             top1_agreement=r.top1_agreement, pruned_params=r.pruned_params,
                             dense_params=r.dense_params))
    yield ProgressEvent("sweep", len(rows), len(rows), rows)


def sweep(model: nn.Module, scores: Scores, windows: torch.Tensor, **kwargs) -> list[SweepRow]:
    """Run :func:`iter_sweep` to its end and return its rows (the last event carries them)."""
    return run_to_end(iter_sweep(model, scores, windows, **kwargs))


def format_sweep_table(rows: Sequence[SweepRow]) -> str:
    """Plain-text table: one line per (criterion, count)."""
    head = f"{'criterion':<10} {'count':>5} {'ppl dense':>10} {'ppl pruned':>11} {'KL':>9} {'top-1':>7}  blocks"
    lines = [head, "-" * len(head)]
    for r in rows:
        blocks = ",".join(f"{b['kind']}:{b['layer']}" for b in r.plan["blocks"]) or "-"
        lines.append(f"{r.criterion:<10} {r.count:>5} {r.dense_perplexity:>10.3f} {r.pruned_perplexity:>11.3f} "
                     f"{r.kl_mean:>9.4f} {r.top1_agreement:>7.3f}  {blocks}")
    return "\n".join(lines)
