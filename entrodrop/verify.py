"""Sweeps: every criterion at every drop count, from one calibration.

:func:`iter_sweep` builds the plan of every (criterion, count) — criteria that measure the model
(``recommended``, ``ablation``, see :mod:`entrodrop.search`) pick on calibration windows and share one
single-block ablation — then reports perplexity, KL(dense || pruned) and top-1 agreement of every plan
in one pass over the held-out windows per batch. A :class:`Variant` pins a criterion's estimator and
protection, so one sweep can compare, say, entrodrop with KNN and with bucket entropy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .costs import BlockCosts, summarize_plan
from .criteria import get_criterion, ranked_criteria
from .evaluate import gap_verdict, iter_compare_many, paired_difference
from .plan import DropPlan
from .progress import ProgressEvent, run_to_end
from .scores import Scores
from .search import MEASURE_WINDOWS, eligible_layers, iter_ablation, iter_select

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Variant:
    """One criterion with its estimator and protection pinned, shown in sweep rows as ``label``."""

    criterion: str
    estimator: str | None = None
    protect: str | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.criterion


def _as_variant(entry: str | Variant) -> Variant:
    variant = entry if isinstance(entry, Variant) else Variant(entry)
    get_criterion(variant.criterion)  # an unknown name fails before anything is measured
    return variant


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
    window_nll: list[float] = field(default_factory=list)  # pruned loss of each held-out window (paired errors)

    def to_dict(self) -> dict:
        return asdict(self)


def check_sweep(scores: Scores, criteria: Sequence[str | Variant], kind: str, counts: Sequence[int], *,
                estimator: str | None = None, protect: str | None = None) -> list[Variant]:
    """The sweep's criteria as variants, or a ValueError naming the first thing it could not answer: an
    unknown criterion, a count out of range, or a count a criterion's protection cannot reach."""
    variants = [_as_variant(c) for c in criteria]
    if not variants:
        raise ValueError("Name at least one criterion to sweep.")
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("Each criterion may appear once in a sweep; give variants distinct labels.")
    bad = [n for n in counts if not isinstance(n, int) or not 0 <= n < scores.num_layers]
    if bad:
        raise ValueError(f"Counts must be whole numbers from 0 to {scores.num_layers - 1}; got {bad}.")
    for v in variants:  # reachability, so a long sweep never ends in a silently missing row
        record = get_criterion(v.criterion)
        record.check_kind(kind)
        if record.rank is None and not record.needs_model:
            raise ValueError(f"The {v.criterion} criterion cannot be swept: it has no ranking of its own.")
        rule = v.protect or protect or record.default_protection
        eligible = eligible_layers(scores, rule, v.estimator or estimator)
        if max(counts, default=0) > len(eligible):
            raise ValueError(f"{v.name} at count {max(counts)}: cannot drop {max(counts)} {kind} blocks, only "
                             f"{len(eligible)} of {scores.num_layers} are eligible under protection '{rule}'. "
                             "Sweep smaller counts or relax the protection.")
    return variants


def sweep_plans(
    model: nn.Module,
    scores: Scores,
    criteria: Sequence[str | Variant],
    kind: str,
    counts: Sequence[int],
    *,
    estimator: str | None = None,
    protect: str | None = None,
    selection_windows: torch.Tensor | None = None,
    num_windows: int = MEASURE_WINDOWS,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Build the plan of every (criterion, count); ``partial`` of the last event is ``{(name, count):
    DropPlan}``. Criteria that measure the model pick on ``selection_windows`` (calibration windows)
    and share one single-block ablation. Unknown criteria and counts a criterion cannot reach raise a
    ValueError before anything is measured."""
    variants = check_sweep(scores, criteria, kind, counts, estimator=estimator, protect=protect)
    measured = any(get_criterion(v.criterion).needs_model for v in variants) and any(counts)
    if measured and selection_windows is None:
        raise ValueError("Criteria that measure the model need selection_windows (calibration windows).")
    ablation = None
    if measured:  # one single-block ablation serves every measured criterion and count
        for event in iter_ablation(model, scores.num_layers, selection_windows[:num_windows], kind=kind,
                                   batch_size=batch_size):
            ablation = event.partial if event.partial is not None else ablation
            yield ProgressEvent(event.stage, event.done, event.total, None)
    plans: dict[tuple[str, int], DropPlan] = {}
    jobs = [(v, n) for v in variants for n in counts]
    for i, (v, n) in enumerate(jobs):
        if n == 0:
            plans[(v.name, n)] = DropPlan(scores.num_layers, [], criterion=v.criterion)
        else:
            plans[(v.name, n)] = run_to_end(iter_select(
                model, scores, selection_windows, criterion=v.criterion, kind=kind, count=n,
                estimator=v.estimator or estimator, protect=v.protect or protect, ablation=ablation,
                num_windows=num_windows, batch_size=batch_size))
        yield ProgressEvent("select", i + 1, len(jobs), dict(plans) if i + 1 == len(jobs) else None)


def iter_sweep(
    model: nn.Module,
    scores: Scores,
    windows: torch.Tensor,
    *,
    criteria: Sequence[str | Variant] | None = None,
    kind: str = "attn",
    counts: Sequence[int] = (0, 2, 4, 6, 8),
    estimator: str | None = None,
    protect: str | None = None,
    selection_windows: torch.Tensor | None = None,
    num_windows: int = MEASURE_WINDOWS,
    batch_size: int = 1,
) -> Iterator[ProgressEvent]:
    """Select (stage ``select``) then compare every plan on ``windows`` in one pass (stage ``sweep``);
    the last event's ``partial`` is the list of :class:`SweepRow` (criterion order, then count).
    ``criteria`` (names or :class:`Variant`) defaults to every criterion that ranks from the scores."""
    criteria = ranked_criteria() if criteria is None else criteria
    plans: dict[tuple[str, int], DropPlan] = {}
    for event in sweep_plans(model, scores, criteria, kind, counts, estimator=estimator, protect=protect,
                             selection_windows=selection_windows, num_windows=num_windows, batch_size=batch_size):
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
    for (name, n), plan in plans.items():
        r = reports[unique[tuple(sorted(plan.keys()))]]
        rows.append(SweepRow(criterion=name, count=n, plan=plan.to_dict(), dense_perplexity=r.dense_perplexity,
                             pruned_perplexity=r.pruned_perplexity, kl_mean=r.kl_mean,
                             top1_agreement=r.top1_agreement, pruned_params=r.pruned_params,
                             dense_params=r.dense_params, window_nll=r.window_nll))
    yield ProgressEvent("sweep", len(rows), len(rows), rows)


def sweep(model: nn.Module, scores: Scores, windows: torch.Tensor, **kwargs) -> list[SweepRow]:
    """Run :func:`iter_sweep` to its end and return its rows (the last event carries them)."""
    return run_to_end(iter_sweep(model, scores, windows, **kwargs))


def tradeoff_points(rows: Sequence[SweepRow], costs: BlockCosts) -> list[dict]:
    """Every sweep row with what its plan saves: ``expected_speedup`` (FLOPs-bound, at the costs'
    sequence length) and ``params_removed_share``, for :func:`entrodrop.plots.tradeoff_figure`."""
    points = []
    for r in rows:
        summary = summarize_plan(DropPlan.from_dict(r.plan), costs)
        points.append({**r.to_dict(), "expected_speedup": summary.ideal_speedup,
                       "params_removed_share": summary.params_share})
    return points


def format_sweep_table(rows: Sequence[SweepRow]) -> str:
    """Plain-text table: one line per (criterion, count)."""
    width = max([9, *(len(r.criterion) for r in rows)])
    head = f"{'criterion':<{width}} {'count':>5} {'ppl dense':>10} {'ppl pruned':>11} {'KL':>9} {'top-1':>7}  blocks"
    lines = [head, "-" * len(head)]
    for r in rows:
        blocks = DropPlan.from_dict(r.plan).compact() or "-"
        lines.append(f"{r.criterion:<{width}} {r.count:>5} {r.dense_perplexity:>10.3f} {r.pruned_perplexity:>11.3f} "
                     f"{r.kl_mean:>9.4f} {r.top1_agreement:>7.3f}  {blocks}")
    return "\n".join(lines)


def gap_to_best_other(rows: Sequence[SweepRow], criterion: str, count: int) -> dict | None:
    """``criterion``'s held-out loss at ``count`` minus that of the lowest other criterion's row there, paired
    over the held-out windows: ``{"other", "same_plan", "gap", "error", "verdict"}`` with verdict ``lower``,
    ``higher`` or ``noise`` (within 2 errors). None when either row is missing or has no per-window losses."""
    mine = next((r for r in rows if r.criterion == criterion and r.count == count), None)
    others = [r for r in rows if r.criterion != criterion and r.count == count]
    if mine is None or not others or not mine.window_nll:
        return None
    other = min(others, key=lambda r: r.pruned_perplexity)
    if len(other.window_nll) != len(mine.window_nll):
        return None
    gap, error = paired_difference(mine.window_nll, other.window_nll)
    same = DropPlan.from_dict(mine.plan).keys() == DropPlan.from_dict(other.plan).keys()
    verdict = "noise" if same else gap_verdict(gap, error)
    return {"other": other.criterion, "same_plan": same, "gap": gap, "error": error, "verdict": verdict}


def describe_gap(gap: dict) -> str:
    """One :func:`gap_to_best_other` result as text: the gap, its error, the other criterion and the verdict."""
    if gap["same_plan"]:
        return f"same blocks as {gap['other']}"
    word = {"lower": "lower (by more than 2 errors)", "higher": "higher (by more than 2 errors)",
            "noise": "within noise"}[gap["verdict"]]
    return f"{gap['gap']:+.4f} +- {gap['error']:.4f} nats against {gap['other']}: {word}"


def format_gaps(rows: Sequence[SweepRow], criterion: str) -> str:
    """One line per count > 0: ``criterion`` against the lowest other criterion, with the paired error, so a
    difference within the noise of the held-out windows reads as such."""
    lines = []
    for count in sorted({r.count for r in rows if r.count > 0}):
        g = gap_to_best_other(rows, criterion, count)
        if g is not None:
            lines.append(f"{count:>5}  {describe_gap(g)}")
    return "\n".join(lines)
