"""Numbers and words for people: tables, plan summaries, criteria comparisons and explainers.

Everything here is computed from :class:`~entrodrop.scores.Scores`, a :class:`~entrodrop.plan.DropPlan`
and a model's per-block costs; no gradio. The web app (``entrodrop.ui``) only lays these out, so
what it shows is unit-tested here.

* :func:`scores_frame` / :func:`scores_csv` — one row per block, every statistic;
* :func:`block_table` — the blocks of one kind with their scores, ranks per criterion, protection
  and whether they are ticked;
* :func:`plan_summary_markdown` — what a plan removes (from :mod:`entrodrop.costs`), in words;
* :func:`criteria_disagreement` — which blocks entropy, cosine and angular would drop, and where they differ;
* :func:`explain_scores` — the teaching text beside the curves, with this model's numbers;
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd

from . import costs
from .arch import BLOCK_KINDS, kind_label
from .criteria import get_criterion, ranked_criteria, resolve_estimator
from .devices import format_bytes
from .evidence import spearman
from .plan import DropPlan
from .race import COMPARE_WINDOWS, race_lines
from .scores import Scores
from .select import block_ranks, protected_layers, rank_blocks, select_blocks

logger = logging.getLogger(__name__)

# streams each block reads and writes: ("x", i) is X_i, ("y", i) is Y_i
_BLOCK_STREAMS = {"attn": (("x", 0), ("y", 0)), "mlp": (("y", 0), ("x", 1)), "layer": (("x", 0), ("x", 1))}


def _stream_entropy(scores: Scores, estimator: str, stream: tuple[str, int], layer: int) -> float:
    which, offset = stream
    values = scores.entropy_curve[estimator] if which == "x" else scores.mid_entropy.get(estimator, [])
    idx = layer + offset
    return float(values[idx]) if idx < len(values) else float("nan")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _layer_list(layers: Iterable[int]) -> str:
    items = sorted(layers)
    return ", ".join(str(i) for i in items) if items else "none"


# -- tables --------------------------------------------------------------------------------------
def scores_frame(scores: Scores) -> pd.DataFrame:
    """Every block of every kind: entropy in/out and increase per estimator, cosine and angular."""
    rows = []
    for kind in BLOCK_KINDS:
        for b in scores.blocks_of(kind):
            row = {"layer": b.layer, "kind": kind}
            for est in scores.estimators:
                stream_in, stream_out = _BLOCK_STREAMS[kind]
                row[f"entropy_in_{est}"] = _stream_entropy(scores, est, stream_in, b.layer)
                row[f"entropy_out_{est}"] = _stream_entropy(scores, est, stream_out, b.layer)
                row[f"delta_entropy_{est}"] = b.delta_entropy.get(est, float("nan"))
            row["cosine_importance"] = b.cosine_importance
            row["angular_distance"] = b.angular_distance
            rows.append(row)
    return pd.DataFrame(rows)


def scores_csv(scores: Scores) -> str:
    """:func:`scores_frame` as CSV text (one row per block), with a header line."""
    buffer = io.StringIO()
    scores_frame(scores).to_csv(buffer, index=False)
    return buffer.getvalue()


def criterion_ranks(scores: Scores, kind: str, estimator: str) -> dict[str, dict[int, int]]:
    """{criterion: {layer: rank}}; rank 1 is the first block that criterion would drop (no protection)."""
    return {criterion: block_ranks(scores, criterion, kind, estimator=estimator) for criterion in ranked_criteria(kind)}


def block_table(
    scores: Scores,
    kind: str,
    estimator: str,
    *,
    ticked: Iterable[int] = (),
    protected: Mapping[int, str] | None = None,
) -> pd.DataFrame:
    """The blocks of ``kind``: scores, rank per criterion (1 = dropped first), protection, ticked."""
    ticked = set(ticked)
    protected = protected or {}
    ranks = criterion_ranks(scores, kind, estimator)
    rows = []
    for b in scores.blocks_of(kind):
        row = {"layer": b.layer, "drop": "✓" if b.layer in ticked else ""}
        for est in scores.estimators:
            row[f"ΔH {est}"] = round(b.delta_entropy.get(est, float("nan")), 4)
        row["cosine importance"] = round(b.cosine_importance, 5)
        row["angular distance"] = round(b.angular_distance, 5)
        for criterion, rank in ranks.items():
            row[f"rank {criterion}"] = rank[b.layer]
        row["protected"] = protected.get(b.layer, "")
        rows.append(row)
    return pd.DataFrame(rows)


# -- costs and plan summaries --------------------------------------------------------------------
def describe_protection(protected: Mapping[int, str]) -> str:
    """``{0: r, 1: r, 2: r, 9: q}`` -> ``"layers 0–2: r; layer 9: q"`` (runs of one reason grouped)."""
    parts: list[str] = []
    layers = sorted(protected)
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1 and protected[layers[j + 1]] == protected[layers[i]]:
            j += 1
        span = f"layer {layers[i]}" if i == j else f"layers {layers[i]}–{layers[j]}"
        parts.append(f"{span}: {protected[layers[i]]}")
        i = j + 1
    return "; ".join(parts) if parts else "none"


def plan_summary_markdown(plan: DropPlan, summary: costs.PlanSummary, protected: Mapping[int, str] | None = None) -> str:
    """Plain-words summary of a plan: what goes, what it saves, and warnings about protected blocks."""
    if not plan.blocks:
        return "**Nothing ticked.** Take the automatic selection or tick the blocks to drop."
    protected = protected or {}
    kinds = ", ".join(f"{n} {kind_label(k, attributive=True)}" for k, n in summary.kinds.items())
    by_kind: dict[str, list[int]] = {}
    for b in plan.blocks:
        by_kind.setdefault(b.kind, []).append(b.layer)
    where = "; ".join(f"{kind_label(k, attributive=True)} blocks of layers {_layer_list(v)}" for k, v in by_kind.items())
    origin = (f"the automatic choice of **{plan.criterion}**, {get_criterion(plan.criterion).label}"
              if plan.criterion != "manual" else
              "a hand-edited choice" + (f" (started from {plan.meta['edited_from']})" if plan.meta.get("edited_from") else ""))
    lines = [
        f"**Plan: drop {_plural(summary.num_blocks, 'block')}** ({kinds}) — {origin}.",
        "",
        f"- Dropping: {where}.",
        f"- Parameters removed: **{summary.params_removed:,}** of {summary.dense_params:,} "
        f"({100 * summary.params_share:.1f}%).",
        f"- Forward compute removed: {100 * summary.flops_share:.1f}% of the FLOPs at {summary.seq_len} tokens, "
        f"so an **ideal speed-up of ×{summary.ideal_speedup:.2f}**; measure the real one in step 4.",
    ]
    if summary.kv_per_token_removed:
        at = ", ".join(f"{c // 1024}k: {format_bytes(d)} → **{format_bytes(p)}**" for c, (d, p) in summary.kv_at.items())
        lines.append(f"- KV cache: −{format_bytes(summary.kv_per_token_removed)} per token "
                     f"({100 * summary.kv_per_token_removed / summary.kv_per_token_dense:.0f}% of "
                     f"{format_bytes(summary.kv_per_token_dense)}); per sequence at {at} (in the model's dtype).")
    risky = sorted({b.layer for b in plan.blocks if b.layer in protected})
    if risky:
        reasons = "; ".join(f"layer {i}: {protected[i]}" for i in risky)
        lines.append(f"- ⚠ Ticked although protected — {reasons}.")
    race = race_lines(plan.meta) if plan.criterion == "recommended" else []
    if race:
        lines += ["", race[0]]
        if len(race) > 1:
            lines += ["", "| plan | loss on the race windows |", "|---|---|"]
            lines += ["| " + " | ".join(line.split(": ", 1)) + " |" for line in race[1:]]
    return "\n".join(lines)


# -- where the criteria disagree ---------------------------------------------------------------
def _spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when a side is constant or too short."""
    return spearman(a, b) if len(a) >= 2 else float("nan")


@dataclass
class Disagreement:
    """The blocks each criterion would drop at the same count, and how their rankings relate."""

    kind: str
    count: int
    chosen: dict[str, list[int] | None]  # criterion -> layers (None: that criterion cannot drop `count`)
    errors: dict[str, str]  # criterion -> why it could not choose
    spearman: dict[str, float]  # "entrodrop~cosine", ... rank correlations over all blocks of kind
    table: pd.DataFrame

    def markdown(self) -> str:
        kind = kind_label(self.kind, attributive=True)
        if self.count == 0:
            return "Set a count above 0 to compare what the criteria would drop."
        lines = [f"**At {_plural(self.count, kind + ' block')}, with each criterion's published protection:**", ""]
        for criterion in self.chosen:
            layers = self.chosen[criterion]
            text = _layer_list(layers) if layers is not None else f"cannot choose ({self.errors.get(criterion, '')})"
            lines.append(f"- {get_criterion(criterion).label}: {text}")
        e, c = self.chosen.get("entrodrop"), self.chosen.get("cosine")
        if e is not None and c is not None:
            common = sorted(set(e) & set(c))
            only_e, only_c = sorted(set(e) - set(c)), sorted(set(c) - set(e))
            lines += ["", f"Entropy and cosine agree on {len(common)} of {self.count} "
                          f"({_layer_list(common)}); only entropy drops {_layer_list(only_e)}, "
                          f"only cosine drops {_layer_list(only_c)}."]
        rho = self.spearman.get("entrodrop~cosine", float("nan"))
        if math.isfinite(rho):
            strength = "strongly" if abs(rho) >= 0.7 else "moderately" if abs(rho) >= 0.4 else "weakly"
            lines.append(f"Over all {kind} blocks the two rankings are {strength} correlated "
                         f"(Spearman ρ = {rho:.2f}). Which one loses less quality is an empirical question: "
                         "check both in step 4.")
        return "\n".join(lines)


def criteria_disagreement(scores: Scores, kind: str, count: int, estimator: str,
                          measured: Mapping[str, list[int]] | None = None) -> Disagreement:
    """What each criterion that ranks from the scores would drop at ``count`` blocks (default
    protections), beside the plans of measured criteria given in ``measured`` (criterion -> layers,
    e.g. the recommended plan the session found), which have no ranking of their own."""
    chosen: dict[str, list[int] | None] = {name: sorted(layers) for name, layers in (measured or {}).items()}
    errors: dict[str, str] = {}
    ranked = ranked_criteria(kind)
    for criterion in ranked:
        try:
            plan = select_blocks(scores, criterion, kind, count=count, estimator=estimator)
            chosen[criterion] = [b.layer for b in plan.blocks]
        except ValueError as exc:
            chosen[criterion] = None
            errors[criterion] = str(exc)
    ranks = criterion_ranks(scores, kind, estimator)
    values = {c: [v for _, v in sorted(rank_blocks(scores, c, kind, estimator=estimator))] for c in ranked}
    spearman = {f"{a}~{b}": _spearman(values[a], values[b]) for a, b in itertools.combinations(ranked, 2)}
    picked = sorted({layer for layers in chosen.values() if layers for layer in layers})
    rows = []
    for layer in picked:
        row = {"layer": layer}
        for criterion in chosen:
            row[criterion] = "✓" if layer in (chosen[criterion] or []) else ""
        for criterion in ranked:
            row[f"rank {criterion}"] = ranks[criterion][layer]
        rows.append(row)
    columns = ["layer", *chosen, *(f"rank {c}" for c in ranked)]
    return Disagreement(kind=kind, count=count, chosen=chosen, errors=errors, spearman=spearman,
                        table=pd.DataFrame(rows, columns=columns))


# -- the explainer -------------------------------------------------------------------------------
def _estimator_words(estimator: str, scores: Scores) -> str:
    calib = scores.calibration or {}
    if estimator == "bucket":
        return (f"*bucket*: for each hidden dimension, the token values are sorted into {calib.get('bins', 20)} "
                "equal-width bins between that dimension's min and max; the Shannon entropy of the bin counts "
                "(nats) is summed over all dimensions. High means the tokens' vectors are spread out and varied.")
    if estimator == "knn":
        return (f"*knn*: the Kozachenko–Leonenko estimate from each token's distance to its {calib.get('k', 25)}-th "
                "nearest neighbour. It grows with the size (norm) of the vectors too, so read its shape, not its level.")
    if estimator == "renyi":
        return (f"*renyi*: a Rényi entropy of order {calib.get('alpha', 4)} from a Gaussian kernel over the "
                "standardised token vectors; the paper reports it weaker than bucket and knn.")
    return f"*{estimator}*"


def _top_key(counts: Mapping) -> tuple[str, int] | None:
    named = {k: v for k, v in (counts or {}).items() if k != "other"}
    return max(named.items(), key=lambda kv: (kv[1], -_as_int(kv[0]))) if named else None


def _as_int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def sink_paragraph(scores: Scores, estimator: str) -> list[str]:
    """Markdown lines on massive-activation tokens (attention sinks) with this calibration's numbers:
    what they are, where they appeared, how many tokens the teaching curve leaves out, and why they
    break the bucket estimator. Empty when the calibration recorded no token norms."""
    found = getattr(scores, "massive_tokens", None) or {}
    streams = found.get("streams") or []
    if not streams:
        return []
    threshold = found.get("threshold") or 0
    lines = ["", "### Massive activations (attention sinks)", ""]
    first = found.get("first_stream")
    if first is None:
        lines.append(f"No token's norm went over {threshold:g}× its stream's median in any layer, so no token was left "
                     "out: the curve without massive-activation tokens is the all-token curve.")
        return lines
    worst = max(streams, key=lambda st: st.get("max_ratio", 0))
    first_entry = next(st for st in streams if st["stream"] == first)
    position = _top_key(first_entry.get("positions"))
    token = _top_key(first_entry.get("token_ids"))
    where = (f"position {position[0]} of the window" + (" (its first token)" if position[0] == "0" else "")
             if position else "some position")
    layers_hit = len({st["stream"].split("_")[1] for st in streams if st.get("count")})
    excluded = found.get("excluded_tokens", 0)
    lines.append(
        "Many language models turn one or a few tokens, often the first of a window, into an **attention sink**: "
        "other tokens' attention parks on it, and its hidden vector grows a **massive activation**, a norm "
        "hundreds of times the others' in a few dimensions (Sun et al. 2024; Xiao et al. 2023).")
    lines.append("")
    lines.append(
        f"- Here it appears at **{first}** (layer {found.get('first_layer')}), mostly at {where}"
        + (f", token id {token[0]}" if token else "") + f"; it stays in {layers_hit} layer(s). "
        f"The largest is at {worst['stream']}: norm {worst['max_norm']:,.0f} against a median token's "
        f"{worst['median_norm']:,.0f} (**×{worst['max_ratio']:,.0f}**; the threshold is ×{threshold:g}).")
    lines.append(f"- The teaching curve (drawn by default) leaves these tokens out: **{excluded:,} token(s)** over all "
                 "batches, in every layer, so every layer is measured on the same tokens. The all-token curve, which "
                 "the method's block scores use as released, is one toggle away.")
    if estimator == "bucket":
        lines.append(
            "- Why it breaks *bucket*: each dimension's histogram spans that dimension's min to max. One token far "
            "out stretches the range of its dimensions, so every other token lands in the same bin and the "
            "entropy of those dimensions collapses — the all-token curve drops at the sink's layer for a reason that "
            "has nothing to do with information.")
    elif estimator == "knn":
        lines.append("- *knn* grows with the vectors' norms; one huge token inflates its own neighbour distances, "
                     "so leaving it out keeps the curve about the other tokens.")
    return lines


def explain_scores(
    scores: Scores | None,
    kind: str = "attn",
    estimator: str | None = None,
    *,
    protect: str | None = None,
    stage_boundary: int | None = None,
    count: int | None = None,
) -> str:
    """Short, accurate teaching text for the curves, with this calibration's numbers."""
    if scores is None:
        return ("### How to read the curves\n\nLoad a model and start a calibration: the curves fill in "
                "batch by batch, and this panel explains them with your model's numbers.")
    est = resolve_estimator(scores, estimator)
    L = scores.num_layers
    curve = scores.sinkfree_curve(est)  # the stage boundary is found on this curve (sinks cannot collapse it)
    boundary = stage_boundary if stage_boundary is not None else scores.stage_boundary.get(est, 0)
    boundary = min(max(int(boundary), 0), L)
    kind_name = kind_label(kind, attributive=True)
    tokens = (scores.calibration or {}).get("tokens", "?")
    progress = (f"after {scores.batches_done} of {scores.batches_total} batches — numbers will still move"
                if not scores.complete else f"{scores.batches_done} batches, {tokens} tokens")

    lines = ["### What the curves measure", "",
             "**Entropy** of the residual stream X_l (the vectors every token carries between layers), "
             f"estimator {_estimator_words(est, scores)}", "",
             "**Entropy increase** of a block = entropy after it − entropy before it: how much new information it "
             "adds. EntroDrop drops the blocks that add least.", "",
             "**Cosine importance** = 1 − mean cosine(input, output) over tokens: how far a block turns the vectors. "
             "It sees geometry only — a block can turn vectors a lot yet add little information, or the reverse.", "",
             f"### This model ({scores.model}, {progress})", ""]

    start, low, end = curve[0], curve[boundary], curve[-1]
    if boundary == 0:
        lines.append(f"- With {est}, entropy never falls below its start ({start:.1f} at X_0 → {end:.1f} at X_{L}): "
                     "no compression stage was detected, every layer is in the expansion stage.")
    elif boundary >= L:
        lines.append(f"- With {est}, entropy falls all the way ({start:.1f} at X_0 → {end:.1f} at X_{L}): "
                     "no expansion stage was detected.")
    else:
        lines.append(
            f"- **Compression stage**, {'layer 0' if boundary == 1 else f'layers 0–{boundary - 1}'}: entropy goes from {start:.1f} (X_0) to "
            f"{low:.1f} at X_{boundary}, the stage boundary. **Expansion stage**, layers {boundary}–{L - 1}: it rises "
            f"again to {end:.1f} at X_{L}.")
        if stage_boundary is not None:
            lines.append(f"- The boundary was set by hand at X_{boundary}.")
        else:
            lines.append(f"- The boundary is where the *initial* decline of the {est} curve ends: its first "
                         "minimum that the next layers stay above (a later, deeper dip does not move it).")

    if (getattr(scores, "massive_tokens", None) or {}).get("first_stream") and 0 < boundary < L:
        lines.append("- Stages are read on the curve **without massive-activation tokens** (below); the all-token "
                     "curve can collapse where a sink appears, which is not the end of a stage.")
    blocks = scores.blocks_of(kind)
    n_show = min(3, len(blocks))
    least = ", ".join(f"{layer} ({v:+.3g})" for layer, v in rank_blocks(scores, "entrodrop", kind, estimator=est)[:n_show])
    flattest = ", ".join(f"{layer} ({v:.3g})" for layer, v in rank_blocks(scores, "cosine", kind)[:n_show])
    lines.append(f"- {kind_name.capitalize()} blocks adding least entropy: layers {least}.")
    lines.append(f"- Lowest cosine importance: layers {flattest}.")
    negative = [b.layer for b in blocks if b.delta_entropy[est] < 0]
    if len(negative) == 1:
        lines.append(f"- One {kind_name} block *lowers* the entropy (layer {negative[0]}): it compresses rather "
                     "than adds.")
    elif negative:
        lines.append(f"- {len(negative)} {kind_name} blocks *lower* the entropy (layers {_layer_list(negative)}): "
                     "they compress rather than add.")

    lines += sink_paragraph(scores, est)
    lines += ["", "### How the automatic choice works", ""]
    protect = protect or get_criterion("entrodrop").default_protection
    try:
        protected = protected_layers(scores, protect, estimator=est, stage_boundary=boundary)
    except ValueError:
        protected = {}
    eligible = L - len(protected)
    how_many = f"the {count}" if count is not None else "the chosen number of"
    if protect == "stage":
        guard = (f"blocks in the compression stage (layers 0–{boundary - 1}) and the last layer ({L - 1}) are "
                 "never dropped" if boundary > 0 else f"only the last layer ({L - 1}) is protected (no compression stage)")
    elif protect == "released":
        guard = f"layers 0, 1 and {L - 1} are protected, as in the authors' released code"
    else:
        guard = "no layer is protected"
    lines.append("The default, **recommended** (ours, not the paper's), measures the model: it drops each block "
                 "alone on a calibration window (that alone is **ablation**, also ours), pools the best candidates of "
                 "every criterion, and adds the block whose removal costs the least measured loss, one at a time; "
                 f"then it races that plan against every other criterion's own on up to {COMPARE_WINDOWS} more "
                 "calibration windows, ones the search did not read, and keeps the lowest (step 3 names the winner "
                 "and its margin). It reads only the calibration part of the text: step 4 checks on the report part, "
                 "which no choice was made on.")
    lines.append("")
    lines.append(f"With **entrodrop** (the paper's, as its released code runs it), {guard}; among the other "
                 f"{eligible} {kind_name} blocks, {how_many} with the smallest {est} entropy increase are ticked "
                 "(ties go to the lower layer). **cosine** ticks the smallest cosine importance and **angular** the "
                 "smallest angle between input and output (for whole layers: Gromov et al.'s most similar "
                 "contiguous span), unprotected as published. You can untick or tick any block by hand.")
    return "\n".join(lines)
