"""Checks of a drop plan, run and shown the same way by every front end.

* :class:`ChecksResult` — the typed result: quality (:class:`~entrodrop.evaluate.QualityReport`),
  speed (:class:`~entrodrop.evaluate.SpeedReport`), greedy :class:`Generation` pairs and a
  description of the held-out text; ``to_dict`` is what ``entrodrop.json`` stores;
* :func:`check_rows` — the one set of rows (measure, dense, pruned, change) that the CLI's table
  (:func:`checks_text`), the app's table (:func:`checks_frame`) and the model card
  (:func:`checks_markdown`) all render;
* :func:`verdict` — the plain verdict (usable / degraded / damaged) from a check's numbers, with the
  thresholds it used (:data:`USABLE_MAX_PERPLEXITY_RATIO` and the other constants below);
* :class:`CheckRecord` and :func:`history_frame` / :func:`side_by_side_frame` — a session's checks kept
  one after another, and two of them compared measure by measure;
* :func:`load_windows` and :func:`iter_checks` — read the held-out windows, then compare quality,
  time both models and generate side by side, streaming :class:`~entrodrop.progress.ProgressEvent`
  whose ``partial`` is always the :class:`ChecksResult` so far.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .data import load_corpus, make_windows
from .evaluate import QualityReport, SpeedReport, iter_compare, iter_measure_speed, iter_side_by_side
from .plan import DropPlan
from .progress import ProgressEvent
from .split import resolve_part

COLUMNS = ("measure", "dense", "pruned", "change")

# -- verdict thresholds ----------------------------------------------------------------------------
# Held-out perplexity ratio (pruned / dense) and top-1 agreement with the dense model. "usable" asks
# for both a small perplexity rise and most next-token choices kept; "damaged" is either a doubled
# perplexity or fewer than half of the choices kept (the old default plan on SmolLM2: x12.7, 35%).
USABLE_MAX_PERPLEXITY_RATIO = 1.15  # at most +15% perplexity
USABLE_MIN_TOP1 = 0.80  # and at least 80% of next-token choices the same as dense
DAMAGED_MIN_PERPLEXITY_RATIO = 2.0  # perplexity doubled or worse
DAMAGED_MAX_TOP1 = 0.50  # or fewer than half of next-token choices the same
VERDICT_LEVELS = ("usable", "degraded", "damaged")
THRESHOLDS_TEXT = (f"usable: perplexity at most +{100 * (USABLE_MAX_PERPLEXITY_RATIO - 1):.0f}% and top-1 "
                   f"agreement at least {100 * USABLE_MIN_TOP1:.0f}%; damaged: perplexity "
                   f"×{DAMAGED_MIN_PERPLEXITY_RATIO:g} or more, or top-1 agreement below "
                   f"{100 * DAMAGED_MAX_TOP1:.0f}%; degraded: in between")


@dataclass
class Generation:
    """One prompt's greedy continuation by the dense and the pruned model."""

    prompt: str
    dense: str
    pruned: str
    same: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _from_fields(cls, value):
    """``value`` as ``cls``: kept if it is one, built from the dataclass fields of a dict otherwise."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})
    raise TypeError(f"Expected a {cls.__name__} or its dict, got {type(value).__name__}.")


@dataclass
class ChecksResult:
    """Dense vs pruned: what was measured (each part None or empty when it was not run)."""

    quality: QualityReport | None = None
    speed: SpeedReport | None = None
    generations: list[Generation] = field(default_factory=list)
    eval_data: dict | None = None  # where the held-out windows came from: data, part, samples, seq_len, seed

    def __bool__(self) -> bool:
        return self.quality is not None or self.speed is not None or bool(self.generations)

    def to_dict(self) -> dict:
        """The parts that were run, as plain data (the shape ``entrodrop.json`` stores)."""
        out: dict = {}
        if self.quality is not None:
            out["quality"] = self.quality.to_dict()
        if self.eval_data is not None:
            out["eval_data"] = dict(self.eval_data)
        if self.speed is not None:
            out["speed"] = self.speed.to_dict()
        if self.generations:
            out["generations"] = [g.to_dict() for g in self.generations]
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None) -> ChecksResult:
        """Read ``{"quality", "speed", "generations", "eval_data"}`` whose values are reports or their
        dicts (what :meth:`to_dict` writes, or what the front ends used to keep)."""
        data = data or {}
        return cls(quality=_from_fields(QualityReport, data.get("quality")),
                   speed=_from_fields(SpeedReport, data.get("speed")),
                   generations=[_from_fields(Generation, g) for g in data.get("generations") or []],
                   eval_data=data.get("eval_data"))


# -- verdict ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """A check's plain verdict: ``level`` (one of :data:`VERDICT_LEVELS`), the one-line ``text`` quoting
    the numbers it rests on, and the ``thresholds`` it applied."""

    level: str
    text: str
    thresholds: str = THRESHOLDS_TEXT

    @property
    def damaged(self) -> bool:
        return self.level == "damaged"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Verdict:
        level = data.get("level")
        if level not in VERDICT_LEVELS:
            raise ValueError(f"Unknown verdict level {level!r}; expected one of {', '.join(VERDICT_LEVELS)}.")
        return cls(level=level, text=str(data.get("text", "")), thresholds=str(data.get("thresholds", THRESHOLDS_TEXT)))


def _change(ratio: float) -> str:
    """+8% below x2, x12.7 from there on (how people say a small and a large change)."""
    if not math.isfinite(ratio):
        return "perplexity not finite"
    if ratio < DAMAGED_MIN_PERPLEXITY_RATIO:
        return f"perplexity {100 * (ratio - 1):+.0f}%"
    return f"perplexity ×{ratio:.1f}"


def verdict(result: ChecksResult) -> Verdict | None:
    """The verdict on ``result``'s quality numbers (None when the quality part was not run).

    usable: perplexity ratio <= :data:`USABLE_MAX_PERPLEXITY_RATIO` and top-1 >= :data:`USABLE_MIN_TOP1`;
    damaged: ratio >= :data:`DAMAGED_MIN_PERPLEXITY_RATIO` (or not finite) or top-1 < :data:`DAMAGED_MAX_TOP1`;
    degraded otherwise."""
    q = result.quality
    if q is None:
        return None
    ratio, top1 = q.perplexity_ratio, q.top1_agreement
    numbers = f"{_change(ratio)}, top-1 {100 * top1:.0f}%"
    if not math.isfinite(ratio) or ratio >= DAMAGED_MIN_PERPLEXITY_RATIO or top1 < DAMAGED_MAX_TOP1:
        return Verdict("damaged", f"damaged: {numbers}")
    if ratio <= USABLE_MAX_PERPLEXITY_RATIO and top1 >= USABLE_MIN_TOP1:
        return Verdict("usable", f"usable: {numbers}")
    return Verdict("degraded", f"degraded: {numbers}")


# -- rows ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckRow:
    """One line of every checks table."""

    measure: str
    dense: str
    pruned: str
    change: str = ""


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _times(value: float, digits: int) -> str:
    return f"×{value:.{digits}f}" if math.isfinite(value) else "—"


def text_caption(eval_data: Mapping | None) -> str:
    """Which text a check read, e.g. "report part of gsm8k" ("held-out text" when unknown)."""
    if not eval_data or not eval_data.get("part"):
        return "held-out text"
    return f"{resolve_part(eval_data['part'])} part of {eval_data.get('data', 'the text')}"


def quality_rows(q: QualityReport, eval_data: Mapping | None = None) -> list[CheckRow]:
    """Perplexity, KL, top-1 agreement, parameters and how much text was read (``eval_data``: which part)."""
    share = q.params_removed / q.dense_params if q.dense_params else 0.0
    where = text_caption(eval_data)
    part = f"{resolve_part(eval_data['part'])} part" if eval_data and eval_data.get("part") else "held-out"
    return [
        CheckRow(f"perplexity ({part})", _fmt(q.dense_perplexity), _fmt(q.pruned_perplexity),
                 _times(q.perplexity_ratio, 3)),
        CheckRow("mean KL(dense ‖ pruned), nats/token", "0", _fmt(q.kl_mean, 3)),
        CheckRow("top-1 agreement with dense", "100%", f"{100 * q.top1_agreement:.1f}%"),
        CheckRow("parameters", f"{q.dense_params:,}", f"{q.pruned_params:,}", f"−{100 * share:.1f}%"),
        CheckRow(where, f"{q.num_windows} windows", f"{q.num_tokens:,} predicted tokens"),
    ]


def speed_rows(s: SpeedReport) -> list[CheckRow]:
    """Prefill latency, decode speed and the FLOPs-bound ideal speed-up."""
    return [
        CheckRow(f"prefill latency, {s.prefill_tokens} tokens", f"{s.dense_prefill_s * 1000:.1f} ms",
                 f"{s.pruned_prefill_s * 1000:.1f} ms", f"{_times(s.prefill_speedup, 2)} faster"),
        CheckRow(f"decode speed, {s.decode_tokens} tokens", f"{s.dense_decode_tps:.1f} tok/s",
                 f"{s.pruned_decode_tps:.1f} tok/s", _times(s.decode_speedup, 2)),
        CheckRow("ideal speed-up from FLOPs", "", "", _times(s.ideal_speedup, 2)),
    ]


def generation_rows(generations: Sequence[Generation]) -> list[CheckRow]:
    """One row per prompt: the two continuations, and whether they are the same."""
    return [CheckRow(f"generation: {g.prompt}", g.dense, g.pruned, "same" if g.same else "differs")
            for g in generations]


def check_rows(result: ChecksResult, *, generations: bool = True) -> list[CheckRow]:
    """Every row of ``result``: quality, then speed, then (unless ``generations=False``) generations."""
    rows: list[CheckRow] = []
    if result.quality is not None:
        rows += quality_rows(result.quality, result.eval_data)
    if result.speed is not None:
        rows += speed_rows(result.speed)
    if generations:
        rows += generation_rows(result.generations)
    return rows


def checks_frame(result: ChecksResult, *, generations: bool = False) -> pd.DataFrame:
    """The rows as a table (the app shows generations in their own boxes, hence none by default)."""
    rows = [dataclasses.asdict(r) for r in check_rows(result, generations=generations)]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def checks_text(result: ChecksResult) -> str:
    """The rows as a plain-text table with aligned columns (for a terminal)."""
    rows = [COLUMNS, *(dataclasses.astuple(r) for r in check_rows(result))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) if len(rows) > 1 else ""


def checks_markdown(result: ChecksResult) -> str:
    """The rows as a Markdown table (for the model card), cells escaped for one line each."""
    rows = check_rows(result)
    if not rows:
        return ""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(cell(c) for c in dataclasses.astuple(r)) + " |" for r in rows]
    s = result.speed
    if s is not None:
        lines += ["", f"Speed measured on {s.device} ({s.dtype}), dense and pruned alternately in the same run, "
                      f"median of {s.repeats} round(s)."]
    return "\n".join(lines)


# -- running them ----------------------------------------------------------------------------------
def load_windows(tokenizer, data: Mapping, *, num_samples: int, seq_len: int, seed: int = 0,
                 part: str = "report", config=None) -> tuple[torch.Tensor, dict]:
    """(windows, description) of ``part`` (default ``report``, see :mod:`entrodrop.split`) of the text ``data``
    names (``load_corpus`` keyword arguments: ``source``, and ``column`` / ``text`` where they apply). The
    description is what reports quote: data, part, samples, seq_len, seed.
    ``config`` (the model's) refuses windows longer than the model's positions before any tokenising."""
    if "source" not in data:
        raise ValueError("data needs a 'source' (a bundled set, a file, a hub set or 'text'), as for load_corpus.")
    corpus = load_corpus(**data)
    windows = make_windows(tokenizer, corpus, num_samples=num_samples, seq_len=seq_len, seed=seed, part=part,
                           config=config)
    return windows, {"data": data["source"], "part": resolve_part(part), "samples": int(windows.shape[0]),
                     "seq_len": int(windows.shape[1]), "seed": seed}


def iter_checks(
    model: nn.Module,
    plan: DropPlan,
    tokenizer,
    *,
    data: Mapping | None = None,
    windows: torch.Tensor | None = None,
    eval_samples: int = 16,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 1,
    speed: bool = False,
    prefill_tokens: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 32,
    pruned_model: nn.Module | None = None,
) -> Iterator[ProgressEvent]:
    """Run the checks of ``plan`` against the dense ``model``, streaming progress. The pruned model is
    ``model`` under a preview of ``plan``, or ``pruned_model`` (physically pruned, e.g. healed) when given.

    Quality runs on ``windows``, or on ``eval_samples`` held-out windows of ``seq_len`` tokens read
    from ``data`` (``load_corpus`` keyword arguments; stage ``read`` comes first); neither, or
    ``eval_samples=0``, skips it. ``speed`` adds the timing, ``prompts`` the greedy generations.
    Stages in order: ``read``, ``compare``, ``speed``, ``generate``; every event's ``partial`` is the
    :class:`ChecksResult` so far, so :func:`~entrodrop.progress.run_to_end` returns the final one."""
    result = ChecksResult()
    if windows is None and data is not None and eval_samples > 0:
        yield ProgressEvent("read", 0, 1, dataclasses.replace(result))
        windows, result.eval_data = load_windows(tokenizer, data, num_samples=eval_samples, seq_len=seq_len,
                                                 seed=seed, config=getattr(model, "config", None))
        yield ProgressEvent("read", 1, 1, dataclasses.replace(result))
    ran = False
    if windows is not None:
        for event in iter_compare(model, plan, windows, batch_size=batch_size, pruned_model=pruned_model):
            result.quality = event.partial
            yield ProgressEvent(event.stage, event.done, event.total, dataclasses.replace(result))
        ran = True
    if speed:
        for event in iter_measure_speed(model, plan, tokenizer, prefill_tokens=prefill_tokens,
                                        decode_tokens=decode_tokens, repeats=repeats, warmup=warmup,
                                        pruned_model=pruned_model):
            if event.partial is not None:
                result.speed = event.partial
            yield ProgressEvent(event.stage, event.done, event.total, dataclasses.replace(result))
        ran = True
    prompts = list(prompts)
    if prompts and max_new_tokens > 0:
        for event in iter_side_by_side(model, plan, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       pruned_model=pruned_model):
            result.generations = [_from_fields(Generation, row) for row in event.partial]
            yield ProgressEvent(event.stage, event.done, event.total, dataclasses.replace(result))
        ran = True
    if not ran:  # nothing asked for: one event, so run_to_end still has an (empty) answer
        yield ProgressEvent("checks", 0, 0, result)


# -- history ---------------------------------------------------------------------------------------
HISTORY_COLUMNS = ("#", "plan", "criterion", "count", "healed", "perplexity", "KL", "top-1", "speed-up", "verdict")


def plan_key(plan: DropPlan) -> str:
    """A stable key naming the blocks of ``plan`` ("attn@3,attn@7"): two plans dropping the same blocks
    share it, whatever criterion chose them."""
    return ",".join(f"{b.kind}@{b.layer}" for b in plan.blocks)


@dataclass
class CheckRecord:
    """One finished check of a session: which plan, chosen how, what was measured and the verdict."""

    number: int  # 1, 2, ... in the order the session ran them
    plan: DropPlan
    result: ChecksResult
    criterion_label: str = ""
    healed: str = ""  # "" for the plan as dropped; else how it was healed ("lora, 40 steps"), checked apart

    @property
    def verdict(self) -> Verdict | None:
        return verdict(self.result)

    @property
    def key(self) -> str:
        """The plan's blocks, and for a healed model how it was healed: checks of one key compare alike."""
        return plan_key(self.plan) + (f"|healed: {self.healed}" if self.healed else "")

    def title(self) -> str:
        healed = f", healed ({self.healed})" if self.healed else ""
        return f"#{self.number} {self.plan.criterion}, {len(self.plan.blocks)} blocks{healed}"

    def to_dict(self) -> dict:
        return {"number": self.number, "plan": self.plan.to_dict(), "result": self.result.to_dict(),
                "criterion_label": self.criterion_label, "healed": self.healed}

    @classmethod
    def from_dict(cls, data: Mapping) -> CheckRecord:
        return cls(number=int(data["number"]), plan=DropPlan.from_dict(data["plan"]),
                   result=ChecksResult.from_dict(data.get("result")),
                   criterion_label=str(data.get("criterion_label", "")), healed=str(data.get("healed", "")))


def _short_plan(plan: DropPlan, limit: int = 60) -> str:
    text = ", ".join(f"{b.kind}@{b.layer}" for b in plan.blocks)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def history_frame(records: Sequence[CheckRecord]) -> pd.DataFrame:
    """One row per check, oldest first: plan, criterion, count, perplexity, KL, top-1, speed-up, verdict."""
    rows = []
    for r in records:
        q, s, v = r.result.quality, r.result.speed, r.verdict
        rows.append({
            "#": r.number, "plan": _short_plan(r.plan), "criterion": r.plan.criterion, "count": len(r.plan.blocks),
            "healed": r.healed or "—",
            "perplexity": f"{_fmt(q.pruned_perplexity)} ({_times(q.perplexity_ratio, 2)})" if q else "—",
            "KL": _fmt(q.kl_mean, 3) if q else "—",
            "top-1": f"{100 * q.top1_agreement:.1f}%" if q else "—",
            "speed-up": _times(s.prefill_speedup, 2) if s else "—",
            "verdict": v.text if v else "—",
        })
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def side_by_side_frame(a: CheckRecord, b: CheckRecord) -> pd.DataFrame:
    """Two checks measure by measure (quality, speed and generations), with the verdicts on top."""
    def cells(record: CheckRecord) -> dict[str, str]:
        out = {"verdict": record.verdict.text if record.verdict else "—",
               "plan": f"{record.plan.criterion}: {_short_plan(record.plan, 200)}", "healed": record.healed or "no"}
        out.update({row.measure: f"{row.pruned} {row.change}".strip() for row in check_rows(record.result)})
        return out

    left, right = cells(a), cells(b)
    measures = list(dict.fromkeys([*left, *right]))
    return pd.DataFrame({"measure": measures, a.title(): [left.get(m, "—") for m in measures],
                         b.title(): [right.get(m, "—") for m in measures]})
