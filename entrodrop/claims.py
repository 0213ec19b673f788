"""The paper's five claims, scored on the user's own model from measurements the user has run.

Each claim gets one of four verdicts: ``holds``, ``does not hold``, ``not measured yet`` (nothing to
score: with what is missing and how to measure it), or ``not enough data`` (something was measured, but
it cannot carry a verdict: a stopped calibration, a data name that is missing or shares text with the
other, fewer than :data:`~entrodrop.evidence.MIN_COUNTS` drop counts, sweeps without per-window losses,
or differences all within the noise of the paired errors). Every verdict carries the numbers it rests
on. The thresholds below are the whole decision rule; they are constants so a reader can see (and a
test can pin) exactly where "holds" starts. Verdicts that compare perplexities count a difference only
beyond :data:`~entrodrop.evidence.NOISE_Z` standard errors of the per-window paired difference.

Inputs (all optional but the first):

* ``scores``: a :class:`~entrodrop.scores.Scores` (claims 1, 3 and 5);
* ``second_scores``: a calibration of the same model on *other* text (claim 3);
* ``sweeps``: rows of ``entrodrop sweep --json`` files (:func:`sweep_rows_from_json`; claims 2 and 5);
* ``speed``: measured speed-ups by drop count (:func:`speed_rows_from_json`, from ``entrodrop eval
  --json`` files; claim 4).

The library never imports gradio: :func:`score_claims` returns a :class:`ClaimsReport` the app
renders (``to_dict`` / ``to_markdown``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .compare import trend_curve
from .criteria import get_criterion
from .evidence import (  # noqa: F401  (spearman, linear_fit and the readers are part of this module's API)
    MIN_COUNTS,
    NOISE_Z,
    CountGap,
    counts_of,
    has_window_losses,
    linear_fit,
    paired_by_count,
    shared_text,
    spearman,
    speed_rows_from_json,
    sweep_rows_from_json,
)
from .scores import Scores

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NOT_MEASURED = "not measured yet"
NOT_ENOUGH = "not enough data"
VERDICTS = (HOLDS, DOES_NOT_HOLD, NOT_MEASURED, NOT_ENOUGH)

# Claim 1: after the initial decline ends, at least this share of the later layer-to-layer steps
# must rise (the expansion stage rises "over most of the later blocks").
RISE_SHARE_MIN = 0.7
# Claim 2: entrodrop must be worse than cosine beyond the noise margin at no compared count, and better
# beyond it at one at least (all within noise: not enough data); per-count numbers are always shown.
# Claim 3: two calibrations on different text agree when the block scores' Spearman correlation and
# the overlap of their k lowest-scoring blocks (share of k) both reach these.
ROBUST_SPEARMAN_MIN = 0.8
ROBUST_OVERLAP_MIN = 0.75
# Claim 4: speed-up vs dropped blocks is near-linear when a straight-line fit through (0, 1) and the
# measured points (at least MIN_COUNTS drop counts besides 0) explains this share of the variance (R^2) and
# the slope is positive.
LINEAR_R2_MIN = 0.9
# Claim 5: bucket and KNN agree when their block scores' Spearman correlation reaches this.
ESTIMATOR_SPEARMAN_MIN = 0.8

# Which part of the measurement is missing, as a key the app can word for its user, and the CLI text.
HOW_TO_MEASURE = {
    "scores": "calibrate: `entrodrop scan MODEL --json scores.json`",
    "sweep": "run a sweep with both criteria at three or more counts: `entrodrop sweep MODEL --criteria "
             "entrodrop,cosine --counts 0,2,4,8 --json sweep.json`",
    "window_losses": "sweep again with this version: its rows keep each window's loss, which the noise margin needs",
    "more_windows": "sweep on more windows (`--eval-samples 32` or more): every difference is within the noise",
    "complete_scores": "let the calibration run to its end (a stopped one scored only some batches)",
    "data_names": "calibrate with this version, which records the data name in the scores",
    "second_scores": "calibrate on other text, e.g. `entrodrop claims MODEL --data gsm8k --second-data gpqa`",
    "speed": "time plans of at least three drop counts: `entrodrop eval MODEL --count N --json speedN.json` for "
             "N in 2,4,8, then pass each with `--speed`",
    "estimators": "calibrate with both estimators: `--estimators bucket,knn,renyi`",
    "renyi_sweep": "sweep with each estimator on the same held-out text: `entrodrop sweep MODEL --criteria "
                   "entrodrop --estimator renyi --json sweep_renyi.json` (and bucket, knn), then pass each with `--sweep`",
}


@dataclass
class ClaimResult:
    """One claim's verdict, the numbers behind it, and (when not measured) what is missing."""

    number: int
    claim: str  # the paper's claim, in one sentence
    verdict: str  # one of VERDICTS
    summary: str  # what was measured, in numbers
    numbers: dict = field(default_factory=dict)
    source: str = ""  # which measurement it rests on
    missing: list[str] = field(default_factory=list)  # keys of HOW_TO_MEASURE

    def __post_init__(self) -> None:
        assert self.verdict in VERDICTS, self.verdict

    @property
    def how_to_measure(self) -> list[str]:
        return [HOW_TO_MEASURE[m] for m in self.missing]

    def to_dict(self) -> dict:
        return {**asdict(self), "how_to_measure": self.how_to_measure}


@dataclass
class ClaimsReport:
    """The five claims on one model, with what they were measured on."""

    model: str
    claims: list[ClaimResult]
    inputs: dict = field(default_factory=dict)

    def claim(self, number: int) -> ClaimResult:
        return next(c for c in self.claims if c.number == number)

    def to_dict(self) -> dict:
        thresholds = {"rise_share_min": RISE_SHARE_MIN, "min_counts": MIN_COUNTS, "noise_z": NOISE_Z,
                      "robust_spearman_min": ROBUST_SPEARMAN_MIN, "robust_overlap_min": ROBUST_OVERLAP_MIN,
                      "linear_r2_min": LINEAR_R2_MIN, "estimator_spearman_min": ESTIMATOR_SPEARMAN_MIN}
        return {"model": self.model, "inputs": self.inputs, "thresholds": thresholds,
                "claims": [c.to_dict() for c in self.claims]}

    def to_markdown(self) -> str:
        lines = [f"# The paper's claims on {self.model}", ""]
        for key, value in self.inputs.items():
            lines.append(f"- {key}: {value}")
        lines += ["", "| # | claim | verdict |", "| --- | --- | --- |"]
        lines += [f"| {c.number} | {c.claim} | **{c.verdict}** |" for c in self.claims]
        for c in self.claims:
            lines += ["", f"## {c.number}. {c.claim}", "", f"**{c.verdict}.** {c.summary}"]
            if c.source:
                lines += ["", f"Measured on: {c.source}."]
            for hint in c.how_to_measure:
                lines += ["", f"To measure: {hint}."]
        return "\n".join(lines) + "\n"


def _lowest(values: Mapping[int, float], k: int) -> set[int]:
    """The k layers with the smallest value, ties by layer index (as selection breaks them)."""
    return set(sorted(values, key=lambda layer: (values[layer], layer))[:k])


def _delta(scores: Scores, kind: str, estimator: str) -> dict[int, float]:
    if estimator not in scores.estimators:
        raise ValueError(f"The scores have no {estimator!r} estimator (they have {', '.join(scores.estimators)}).")
    return {b.layer: b.delta_entropy[estimator] for b in scores.blocks_of(kind)}


# -- the five claims ---------------------------------------------------------------------------
CLAIM_TEXT = {
    1: "Entropy falls over the first blocks, then rises",
    2: "Entropy-based selection loses less quality than cosine at the same number of dropped blocks",
    3: "The choice of blocks is robust to the calibration data",
    4: "Speed-up grows near-linearly with the number of dropped blocks",
    5: "Bucket and KNN entropy agree; Renyi entropy is weaker",
}


def _not_measured(number: int, summary: str, missing: list[str], numbers: dict | None = None) -> ClaimResult:
    return ClaimResult(number, CLAIM_TEXT[number], NOT_MEASURED, summary, numbers or {}, missing=missing)


def _not_enough(number: int, summary: str, missing: list[str], numbers: dict | None = None,
                source: str = "") -> ClaimResult:
    return ClaimResult(number, CLAIM_TEXT[number], NOT_ENOUGH, summary, numbers or {}, source=source, missing=missing)


def _incomplete(scores: Scores) -> str | None:
    """Why ``scores`` cannot carry a verdict (a stopped calibration), or None."""
    if scores.complete:
        return None
    return (f"The calibration stopped after {scores.batches_done} of {scores.batches_total} batches, so its scores "
            "describe only part of the text.")


def score_trend(scores: Scores | None, estimator: str = "bucket") -> ClaimResult:
    """Claim 1: where the initial decline ends (the stage boundary rule of :mod:`.scores`), and the
    share of later layer-to-layer steps that rise."""
    if scores is None:
        return _not_measured(1, "No calibration yet.", ["scores"])
    if estimator not in scores.entropy_curve:
        return _not_measured(1, f"The calibration has no {estimator} curve.", ["estimators"])
    if (why := _incomplete(scores)) is not None:
        return _not_enough(1, why, ["complete_scores"], source=_calibration_text(scores))
    curve, which, boundary = trend_curve(scores, estimator)
    L = len(curve) - 1
    later = [curve[i + 1] - curve[i] for i in range(boundary, L)]
    rising = sum(d > 0 for d in later)
    share = rising / len(later) if later else 0.0
    fell = boundary > 0 and curve[boundary] < curve[0]
    numbers = {"estimator": estimator, "curve": which, "boundary": boundary, "num_layers": L,
               "start": curve[0], "minimum": curve[boundary], "end": curve[L],
               "rising_steps": rising, "later_steps": len(later), "rising_share": share}
    excluded = (getattr(scores, "massive_tokens", None) or {}).get("excluded_tokens")
    if which == "all-token":
        caveat = (" This is the all-token curve: these scores carry no sink-free curve, so massive-activation "
                  "tokens may shape it.")
    elif excluded is not None:
        numbers["excluded_tokens"] = excluded
        caveat = f" {excluded} massive-activation token(s) were left out of this curve."
    else:
        caveat = ""
    if fell:
        text = (f"The {which} {estimator} curve falls from {curve[0]:.4g} at X_0 to {curve[boundary]:.4g} at "
                f"X_{boundary}, where its initial decline ends, and ends at {curve[L]:.4g} at X_{L}.")
    else:
        text = (f"The {which} {estimator} curve does not fall at first: it starts at {curve[0]:.4g} at X_0, its "
                f"stage boundary is X_{boundary} ({curve[boundary]:.4g}), and it ends at {curve[L]:.4g} at X_{L}.")
    text += (f" {rising} of the {len(later)} layer-to-layer steps after X_{boundary} rise ({share:.0%}; "
             f"threshold {RISE_SHARE_MIN:.0%}).")
    holds = fell and bool(later) and share >= RISE_SHARE_MIN
    return ClaimResult(1, CLAIM_TEXT[1], HOLDS if holds else DOES_NOT_HOLD, text + caveat, numbers,
                       source=_calibration_text(scores))


def _calibration_text(scores: Scores) -> str:
    c = scores.calibration or {}
    parts = [f"{scores.model}", f"data {c.get('data', '?')}"]
    if c.get("samples") and c.get("seq_len"):
        parts.append(f"{c['samples']} windows x {c['seq_len']} tokens")
    elif c.get("tokens"):
        parts.append(f"{c['tokens']} tokens in {c.get('batches', scores.batches_done)} batch(es)")
    return ", ".join(parts)


def _gap_text(g: CountGap, a: str, b: str) -> str:
    if math.isnan(g.gap):
        return f"{g.count}: {a} {g.a_perplexity:.3f} vs {b} {g.b_perplexity:.3f}"
    word = {"lower": f"{a} lower", "higher": f"{a} higher", "noise": "within noise"}[g.verdict]
    return (f"{g.count}: {g.a_perplexity:.3f} vs {g.b_perplexity:.3f}, {g.gap:+.4f} ± {g.error:.4f} nats ({word})")


def _comparison_evidence(number: int, gaps: Sequence[CountGap], source: str) -> ClaimResult | None:
    """``not enough data`` when a paired comparison has too few counts or no per-window losses, else None."""
    counts = counts_of(gaps)
    numbers = {"counts": counts, "rows": [g.to_dict() for g in gaps]}
    if len(counts) < MIN_COUNTS:
        return _not_enough(number, f"Compared at {len(counts)} drop count(s) ({counts}); a verdict needs "
                                   f"{MIN_COUNTS} or more.", ["sweep"], numbers, source)
    if not has_window_losses(gaps):
        return _not_enough(number, "The sweep rows carry no per-window losses, so no difference can be told "
                                   "from noise.", ["window_losses"], numbers, source)
    return None


def score_selection(sweeps: Sequence[dict] | None, estimator: str | None = None) -> ClaimResult:
    """Claim 2: at each count both criteria reached in one sweep, is entrodrop's held-out loss below cosine's
    beyond the noise of the paired per-window difference, within it, or above it?"""
    sweeps = list(sweeps or [])
    # entrodrop rows of ``estimator`` when the sweep has them, else of entrodrop's own default (knn, as
    # released: what `entrodrop sweep` runs unless told otherwise), else whatever estimator was swept
    swept = {r["estimator"] for r in sweeps if r["criterion"] == "entrodrop" and r["count"] > 0}
    chosen = next((e for e in (estimator, get_criterion("entrodrop").default_estimator) if e in swept), None)
    rows = [dict(r, _side=r["criterion"]) for r in sweeps
            if r["criterion"] == "cosine" or (r["criterion"] == "entrodrop"
                                              and (chosen is None or r["estimator"] in (chosen, None)))]
    gaps = paired_by_count(rows, "entrodrop", "cosine", key=lambda r: (r["source"], r["kind"]))
    if not gaps:
        return _not_measured(2, "No sweep with both the entrodrop and cosine criteria at a non-zero count.", ["sweep"])
    est = sorted({str(r["estimator"]) for r in rows if r["_side"] == "entrodrop" and r["count"] > 0})
    kinds = sorted({str(r["kind"]) for r in rows})
    source = f"sweep rows ({', '.join(kinds)} blocks, estimator {', '.join(est)})"
    if (short := _comparison_evidence(2, gaps, source)) is not None:
        short.numbers["estimator"] = est
        return short
    better = [g.count for g in gaps if g.verdict == "lower"]
    worse = [g.count for g in gaps if g.verdict == "higher"]
    text = (f"Entrodrop's loss is below cosine's beyond the noise margin ({NOISE_Z:g} paired errors) at "
            f"{len(better)} of {len(gaps)} drop counts and above it at {len(worse)} (count: entrodrop vs cosine "
            f"perplexity, paired loss gap — " + "; ".join(_gap_text(g, "entrodrop", "cosine") for g in gaps) + ").")
    numbers = {"compared_counts": len(gaps), "entrodrop_lower": better, "entrodrop_higher": worse,
               "estimator": est, "rows": [g.to_dict() for g in gaps]}
    if worse:
        verdict = DOES_NOT_HOLD
    elif better:
        verdict = HOLDS
    else:
        return _not_enough(2, text + " Every difference is within noise.", ["more_windows"], numbers, source)
    return ClaimResult(2, CLAIM_TEXT[2], verdict, text, numbers, source=source)


def default_top_k(num_layers: int) -> int:
    """A quarter of the blocks (the paper drops 8 of 32), at least one."""
    return max(1, num_layers // 4)


def score_robustness(scores: Scores | None, second: Scores | None, *, estimator: str = "bucket",
                     kind: str = "attn", top_k: int | None = None) -> ClaimResult:
    """Claim 3: Spearman correlation of the two calibrations' block scores, and the overlap of their k
    lowest-scoring blocks (before any protection). Not enough data when either calibration stopped early,
    lacks its data name, or reads text the other reads too."""
    if scores is None or second is None:
        return _not_measured(3, "Needs two calibrations of the model on different text.", ["second_scores"])
    if scores.num_layers != second.num_layers:
        raise ValueError(f"The two calibrations have {scores.num_layers} and {second.num_layers} layers: they are "
                         "not of the same model. Calibrate the same model on two data sets.")
    source = f"{_calibration_text(scores)}; {_calibration_text(second)}"
    data = [(s.calibration or {}).get("data") for s in (scores, second)]
    for s in (scores, second):
        if (why := _incomplete(s)) is not None:
            return _not_enough(3, why, ["complete_scores"], {"data": data}, source)
    if None in data:
        return _not_enough(3, "A calibration does not say which text it read, so the two cannot be known to differ.",
                           ["data_names"], {"data": data}, source)
    if shared_text(*data):
        return _not_enough(3, f"The calibrations read the same text ({data[0]} and {data[1]} share documents); this "
                              "claim needs different text.", ["second_scores"], {"data": data}, source)
    if estimator not in scores.estimators or estimator not in second.estimators:
        return _not_measured(3, f"Both calibrations need the {estimator} estimator.", ["estimators"])
    a, b = _delta(scores, kind, estimator), _delta(second, kind, estimator)
    layers = sorted(a)
    rho = spearman([a[i] for i in layers], [b[i] for i in layers])
    k = top_k or default_top_k(scores.num_layers)
    top_a, top_b = _lowest(a, k), _lowest(b, k)
    overlap = len(top_a & top_b)
    holds = rho >= ROBUST_SPEARMAN_MIN and overlap / k >= ROBUST_OVERLAP_MIN
    text = (f"The {kind} blocks' {estimator} entropy increases on {data[0]} and {data[1]} have Spearman correlation "
            f"{rho:.3f} (threshold {ROBUST_SPEARMAN_MIN}); the {k} lowest-scoring blocks share {overlap} of {k} "
            f"(threshold {ROBUST_OVERLAP_MIN:.0%}): {sorted(top_a)} vs {sorted(top_b)}.")
    numbers = {"estimator": estimator, "kind": kind, "data": data, "spearman": rho, "top_k": k,
               "overlap": overlap, "top_first": sorted(top_a), "top_second": sorted(top_b)}
    return ClaimResult(3, CLAIM_TEXT[3], HOLDS if holds else DOES_NOT_HOLD, text, numbers, source=source)


def score_speed(speed: Sequence[dict] | None) -> ClaimResult:
    """Claim 4: a line through (0, 1) and the prefill speed-ups measured at :data:`MIN_COUNTS` or more drop
    counts; R^2, slope, ratio to ideal."""
    rows = [r for r in speed or [] if r["count"] > 0 and math.isfinite(r["speedup"])]
    counts = sorted({r["count"] for r in rows})
    if not counts:
        return _not_measured(4, f"Needs measured speed-ups at {MIN_COUNTS} or more drop counts.", ["speed"],
                             {"counts": counts})
    if len(counts) < MIN_COUNTS:
        return _not_enough(4, f"Speed-ups measured at {len(counts)} drop count(s) ({counts}); a line through them "
                              f"and the dense model's x1 needs {MIN_COUNTS} or more measured counts to mean anything.",
                           ["speed"], {"counts": counts}, f"{len(rows)} timed plan(s)")
    xs = [0.0] + [float(r["count"]) for r in rows]  # dropping nothing is a speed-up of exactly 1
    ys = [1.0] + [r["speedup"] for r in rows]
    slope, intercept, r2 = linear_fit(xs, ys)
    ratios = [(r["speedup"] - 1) / (r["ideal_speedup"] - 1) for r in rows
              if math.isfinite(r.get("ideal_speedup", float("nan"))) and r["ideal_speedup"] > 1]
    holds = r2 >= LINEAR_R2_MIN and slope > 0
    points = "; ".join(f"{r['count']}: x{r['speedup']:.3f}" for r in sorted(rows, key=lambda r: r["count"]))
    text = (f"Measured prefill speed-up by dropped blocks — {points}. A line through them and (0, x1) has slope "
            f"{slope:+.4f} per block and R^2 {r2:.3f} (threshold {LINEAR_R2_MIN}).")
    if ratios:
        text += f" The measured gain is {sum(ratios) / len(ratios):.0%} of the FLOP-count ideal on average."
    numbers = {"slope": slope, "intercept": intercept, "r2": r2, "counts": counts,
               "points": [[x, y] for x, y in zip(xs, ys, strict=True)],
               "ratio_to_ideal": (sum(ratios) / len(ratios)) if ratios else None}
    return ClaimResult(4, CLAIM_TEXT[4], HOLDS if holds else DOES_NOT_HOLD, text, numbers,
                       source=f"{len(rows)} timed plan(s)")


def _renyi_part(sweeps: Sequence[dict] | None, parts: list[str], numbers: dict) -> tuple[bool | None, list[str]]:
    """Whether entrodrop ranked by Renyi loses more than by bucket and by KNN, beyond the noise margin:
    (True/False, or None when it cannot be said; what is missing)."""
    rows = [dict(r, _side=r["estimator"]) for r in sweeps or [] if r["criterion"] == "entrodrop" and r["estimator"]]

    def same_text(row: dict) -> tuple:  # sweeps on one text share their dense perplexity
        return row["kind"], round(row["dense_perplexity"], 6)

    comparisons = {other: paired_by_count(rows, "renyi", other, key=same_text) for other in ("bucket", "knn")}
    if not all(comparisons.values()):
        parts.append("Renyi's selection has not been swept against bucket and KNN on the same held-out text.")
        return None, ["renyi_sweep"]
    numbers["renyi_rows"] = {o: [g.to_dict() for g in gaps] for o, gaps in comparisons.items()}
    for other, gaps in comparisons.items():
        if len(counts_of(gaps)) < MIN_COUNTS or not has_window_losses(gaps):
            parts.append(f"Renyi against {other}: {len(counts_of(gaps))} count(s)"
                         + ("" if has_window_losses(gaps) else ", without per-window losses")
                         + f"; a verdict needs {MIN_COUNTS} or more counts with per-window losses.")
            return None, ["sweep" if len(counts_of(gaps)) < MIN_COUNTS else "window_losses"]
    worse = {o: [g.count for g in gaps if g.verdict == "higher"] for o, gaps in comparisons.items()}
    better = {o: [g.count for g in gaps if g.verdict == "lower"] for o, gaps in comparisons.items()}
    numbers["renyi_worse"] = {o: [len(worse[o]), len(comparisons[o])] for o in comparisons}
    parts.append("Entrodrop ranked by Renyi loses more beyond the noise margin than by bucket at "
                 f"{len(worse['bucket'])} of {len(comparisons['bucket'])} counts and than by KNN at "
                 f"{len(worse['knn'])} of {len(comparisons['knn'])}; it loses less beyond it at "
                 f"{len(better['bucket'])} and {len(better['knn'])}.")
    if any(better.values()):
        return False, []
    if all(worse.values()):
        return True, []
    parts.append("Against at least one of them every difference is within noise.")
    return None, ["more_windows"]


def score_estimators(scores: Scores | None, sweeps: Sequence[dict] | None, *, kind: str = "attn") -> ClaimResult:
    """Claim 5, two parts: bucket and KNN rank blocks alike (Spearman of their entropy increases), and
    entrodrop ranked by Renyi loses more held-out loss than by bucket and by KNN beyond the noise margin
    (sweep rows on the same text). Holds when both parts hold; does not hold when a measured part fails."""
    parts: list[str] = []
    numbers: dict = {}
    missing: list[str] = []
    agree = None
    incomplete = _incomplete(scores) if scores is not None else None
    if scores is not None and incomplete is None and {"bucket", "knn"} <= set(scores.estimators):
        bucket, knn = _delta(scores, kind, "bucket"), _delta(scores, kind, "knn")
        layers = sorted(bucket)
        rho = spearman([bucket[i] for i in layers], [knn[i] for i in layers])
        agree = rho >= ESTIMATOR_SPEARMAN_MIN
        numbers["spearman_bucket_knn"] = rho
        parts.append(f"Bucket and KNN {kind} entropy increases have Spearman correlation {rho:.3f} "
                     f"(threshold {ESTIMATOR_SPEARMAN_MIN}).")
        if "renyi" in scores.estimators:
            renyi = _delta(scores, kind, "renyi")
            for other, values in (("bucket", bucket), ("knn", knn)):
                numbers[f"spearman_renyi_{other}"] = spearman([renyi[i] for i in layers], [values[i] for i in layers])
            parts.append(f"Renyi's correlation with bucket is {numbers['spearman_renyi_bucket']:.3f}, with KNN "
                         f"{numbers['spearman_renyi_knn']:.3f}.")
    elif incomplete is not None:
        parts.append(incomplete)
        missing.append("complete_scores")
    else:
        missing.append("estimators" if scores is not None else "scores")
    weaker, renyi_missing = _renyi_part(sweeps, parts, numbers)
    missing += renyi_missing
    source = _calibration_text(scores) if scores is not None else "sweep rows"
    if agree is False or weaker is False:
        verdict = DOES_NOT_HOLD
    elif agree and weaker:
        verdict = HOLDS
    elif agree is None and weaker is None and not (incomplete or set(renyi_missing) - {"renyi_sweep"}):
        return _not_measured(5, " ".join(parts), missing, numbers)
    else:  # a part holds or was measured without enough evidence, the rest is open: not enough to say
        verdict = NOT_ENOUGH
    return ClaimResult(5, CLAIM_TEXT[5], verdict, " ".join(parts), numbers, source=source, missing=missing)


def score_claims(
    scores: Scores | None,
    *,
    second_scores: Scores | None = None,
    sweeps: Sequence[dict] | None = None,
    speed: Sequence[dict] | None = None,
    estimator: str = "bucket",
    kind: str = "attn",
    top_k: int | None = None,
) -> ClaimsReport:
    """Score the paper's five claims from whatever has been measured; see the module docstring.

    ``sweeps`` and ``speed`` are row lists from :func:`sweep_rows_from_json` / :func:`speed_rows_from_json`;
    ``estimator`` is the one claims 1-3 use (claim 5 compares estimators); ``kind`` the block granularity
    for the rank comparisons; ``top_k`` the size of the top sets in claim 3 (default a quarter of L)."""
    if scores is not None and not isinstance(scores, Scores):
        raise TypeError(f"scores must be a Scores (from calibration or Scores.load), got {type(scores).__name__}.")
    sweeps = [dict(r) for r in sweeps or []]
    for r in sweeps:
        if not {"criterion", "count", "pruned_perplexity"} <= set(r):
            raise ValueError("Sweep rows need criterion, count and pruned_perplexity; read files with "
                             "sweep_rows_from_json.")
        r.setdefault("estimator", None)
        r.setdefault("kind", kind)
        r.setdefault("source", "")
        r.setdefault("dense_perplexity", float("nan"))
    claims = [
        score_trend(scores, estimator),
        score_selection(sweeps, estimator),
        score_robustness(scores, second_scores, estimator=estimator, kind=kind, top_k=top_k),
        score_speed(speed),
        score_estimators(scores, sweeps, kind=kind),
    ]
    inputs = {"calibration": _calibration_text(scores) if scores is not None else "none",
              "second calibration": _calibration_text(second_scores) if second_scores is not None else "none",
              "sweep rows": len(sweeps), "timed plans": len(speed or []), "estimator": estimator, "blocks": kind}
    return ClaimsReport(scores.model if scores is not None else "(no model)", claims, inputs)
