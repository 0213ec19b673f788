"""The race that ends ``recommended``: its greedy plan against every other criterion's own plan.

A greedy search on one calibration window can walk past a plan another criterion finds whole (at 8
attention blocks on SmolLM2, angular's plan beat it). So the search's plan and the plans of the other
criteria for the same count (:func:`rival_plans`) race on calibration windows *the search did not
read* (:func:`iter_race`; :func:`~entrodrop.search.rival_plans` builds the rivals): every plan still in the race reads the same windows in rounds (the first
:data:`FIRST_ROUND`, then twice as many, up to all of them); after a round, a plan that trails the
leader by more than :data:`RACE_Z` standard errors of their paired per-window difference is set aside.
The lowest mean loss wins, a tie keeps the greedy plan.

The winner is named: the plan's ``meta["race"]`` (:class:`RaceResult`) keeps every candidate's loss on
the race windows with its paired gap to the winner and the gap's error, the runner-up, and whether
the lead is within noise; :func:`race_lines` words it for the plan summary, the CLI and the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .evaluate import gap_verdict, paired_difference, window_losses
from .plan import DroppedBlock, DropPlan
from .progress import ProgressEvent

# placed by benchmarks/bench_recommend.py on development windows (docs/results.md, section 2b)
COMPARE_WINDOWS = 16  # calibration windows the race reads at most
FIRST_ROUND = 4  # windows every plan reads before clearly worse ones are set aside (then 8, 16, ...)
RACE_Z = 2.0  # standard errors of the paired per-window difference by which a plan must trail the leader
RACE_BATCH = 4  # windows per forward pass while racing (memory only: 4 x seq_len tokens)
GREEDY = "greedy search"  # the name of the search's own plan in the race


@dataclass
class Candidate:
    """One distinct plan in the race: the criteria that chose it, its loss on the windows it read, and its
    paired gap to the winner over those windows (0 for the winner)."""

    name: str  # "greedy search", "angular", "greedy search = cosine" for plans several criteria chose
    loss: float  # mean loss (nats) over the windows it read
    windows: int
    gap: float = 0.0  # its loss minus the winner's, paired over its windows
    error: float = float("nan")  # standard error of that paired gap
    set_aside: bool = False  # left the race after an early round


@dataclass
class RaceResult:
    """What the race measured, kept in the recommended plan's ``meta["race"]``."""

    winner: str
    windows: int  # windows the winner read (every window of the race)
    first_window: int  # index of the race's first window among the selection windows (after the search's)
    candidates: list[Candidate] = field(default_factory=list)  # the winner first, then by loss

    @property
    def runner_up(self) -> Candidate | None:
        others = [c for c in self.candidates if c.name != self.winner]
        return min(others, key=lambda c: (c.set_aside, c.loss)) if others else None

    @property
    def lead_verdict(self) -> str:
        """``"clear"`` when the runner-up trails by more than 2 paired errors, ``"noise"`` when not (or when it
        has no error estimate), ``"alone"`` when every criterion chose the same blocks."""
        runner = self.runner_up
        if runner is None:
            return "alone"
        return "clear" if gap_verdict(runner.gap, runner.error) == "higher" else "noise"

    def to_dict(self) -> dict:
        return {**asdict(self), "lead_verdict": self.lead_verdict}

    @classmethod
    def from_dict(cls, data: dict) -> RaceResult:
        fields = {k: data[k] for k in ("winner", "windows", "first_window")}
        return cls(**fields, candidates=[Candidate(**{k: c[k] for k in Candidate.__dataclass_fields__ if k in c})
                                         for c in data.get("candidates", [])])


def _rounds(n: int, first_round: int) -> list[int]:
    """Window counts after each round: first_round, twice that, ... up to n."""
    bounds, size = [], max(1, first_round)
    while not bounds or bounds[-1] < n:
        bounds.append(min(size, n))
        size *= 2
    return bounds


def iter_race(model: nn.Module, greedy: DropPlan, rivals: dict[str, DropPlan], windows: torch.Tensor, *,
              first_round: int = FIRST_ROUND, first_window: int = 0, batch_size: int = 1) -> Iterator[ProgressEvent]:
    """Race the greedy plan and each rival plan on ``windows``; the last event's ``partial`` is the lowest.

    Pass windows the greedy search did not read (``first_window``: where they start among the selection
    windows, for the record). Plans with the same blocks are measured once. The winner's blocks get reasons
    naming the plan and the margin; ``meta["race"]`` is the :class:`RaceResult`, ``meta["chosen_plan"]`` the
    winner's name and ``meta["compared"]`` every plan's loss and window count."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"The race of whole plans reads calibration windows: pass a (windows, seq_len) tensor of "
                         f"token ids with at least one window of 2 tokens or more, got {shape}.")
    named: dict[tuple, list[str]] = {}
    plans: dict[tuple, DropPlan] = {}
    for name, plan in [(GREEDY, greedy), *rivals.items()]:
        key = tuple(sorted(plan.keys()))
        named.setdefault(key, []).append(name)
        plans.setdefault(key, plan)
    bounds = _rounds(int(windows.shape[0]), first_round)
    per_window: dict[tuple, list[float]] = {key: [] for key in plans}
    racing = list(plans)  # insertion order: the greedy plan first, so it wins a tie
    total, done, begin = len(plans) * len(bounds), 0, 0
    for end in bounds:
        if len(racing) == 1:
            break
        for key in racing:
            per_window[key] += window_losses(model, windows[begin:end], plans[key],
                                             batch_size=max(batch_size, RACE_BATCH))
            done += 1
            yield ProgressEvent("compare", done, total, None)
        begin = end
        leader = min(racing, key=lambda key: _mean(per_window[key]))
        racing = [key for key in racing if key == leader or not _clearly_worse(per_window[key], per_window[leader])]
    best = min(racing, key=lambda key: _mean(per_window[key]))
    result = _result(best, named, per_window, racing, first_window)
    verdict = _verdict(result, len(plans), len(plans) - len(racing), bounds[0])
    blocks = [DroppedBlock(b.layer, b.kind, f"{b.reason}; {verdict}" if named[best][0] == GREEDY else
                           f"recommended: {verdict} (in {named[best][0]}'s plan: {b.reason})")
              for b in plans[best].blocks]
    compared = {c.name: {"loss": c.loss, "windows": c.windows} for c in result.candidates}
    meta = {**greedy.meta, "compared": compared, "compare_windows": result.windows, "chosen_plan": result.winner,
            "race": result.to_dict()}
    yield ProgressEvent("compare", total, total, DropPlan(greedy.num_layers, blocks, criterion="recommended", meta=meta))


def _result(best: tuple, named: dict, per_window: dict, racing: list, first_window: int) -> RaceResult:
    winner = " = ".join(named[best])
    candidates = []
    for key, losses in per_window.items():
        if not losses:  # one distinct plan: nothing was measured
            continue
        gap, error = (0.0, float("nan")) if key == best else \
            paired_difference(losses, per_window[best][:len(losses)])
        candidates.append(Candidate(" = ".join(named[key]), _mean(losses), len(losses), gap, error,
                                    set_aside=key not in racing))
    candidates.sort(key=lambda c: (c.name != winner, c.loss))
    return RaceResult(winner, len(per_window[best]), first_window, candidates)


def _verdict(result: RaceResult, plans: int, set_aside: int, first_round: int) -> str:
    if plans == 1:
        return f"every other criterion chose the same blocks ({result.winner})"
    runner = result.runner_up
    best = result.candidates[0]
    margin = (f", {runner.gap:.4f} ± {runner.error:.4f} nats below the next best ({runner.name}; "
              f"{'a clear lead' if result.lead_verdict == 'clear' else 'within noise'})" if runner else "")
    return (f"lowest of {plans} plans on {result.windows} calibration windows the search did not read: "
            f"{result.winner}, loss {best.loss:.4f} nats{margin}"
            + (f"; {set_aside} clearly worse set aside after {first_round} windows" if set_aside else ""))


def race_lines(meta: dict) -> list[str]:
    """The race of a recommended plan's ``meta`` in words: one line for the winner and its lead, one per
    candidate (loss on the race windows, paired gap to the winner with its error); [] when no race ran."""
    if not meta.get("race"):
        return []
    race = RaceResult.from_dict(meta["race"])
    start = race.first_window + 1
    where = f"calibration windows {start}-{start + race.windows - 1}, which the greedy search did not read"
    if race.lead_verdict == "alone":
        return [f"Race of whole plans: every criterion chose these blocks ({race.winner}); nothing to race."]
    runner = race.runner_up
    lead = ("a clear lead (more than 2 paired errors)" if race.lead_verdict == "clear" else
            "a lead within noise (at most 2 paired errors): the two plans are not told apart on these windows")
    lines = [f"Race of whole plans on {where}: **{race.winner}** kept, {runner.gap:+.4f} ± {runner.error:.4f} nats "
             f"ahead of {runner.name}, {lead}."]
    for c in race.candidates:
        gap = "winner" if c.name == race.winner else f"{c.gap:+.4f} ± {c.error:.4f} nats vs the winner"
        aside = ", set aside early" if c.set_aside else ""
        lines.append(f"{c.name}: loss {c.loss:.4f} nats on {c.windows} window(s), {gap}{aside}")
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("inf")


def _clearly_worse(losses: Sequence[float], leader: Sequence[float]) -> bool:
    """Whether ``losses`` exceed ``leader``'s (same windows) by more than RACE_Z standard errors of the paired
    per-window difference. With one window there is no error estimate, and nothing is set aside."""
    mean, error = paired_difference(losses, leader)
    return not math.isnan(error) and mean > RACE_Z * error
