"""The paper's five claims, scored on the user's own model from measurements the user has run.

Each claim gets one of three verdicts: ``holds``, ``does not hold``, or ``not measured yet`` (with
what is missing and how to measure it). Nothing is scored without data, and every verdict carries
the numbers it rests on. The thresholds below are the whole decision rule; they are constants so a
reader can see (and a test can pin) exactly where "holds" starts.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .compare import trend_curve
from .criteria import get_criterion
from .scores import Scores

HOLDS = "holds"
DOES_NOT_HOLD = "does not hold"
NOT_MEASURED = "not measured yet"
VERDICTS = (HOLDS, DOES_NOT_HOLD, NOT_MEASURED)

# Claim 1: after the initial decline ends, at least this share of the later layer-to-layer steps
# must rise (the expansion stage rises "over most of the later blocks").
RISE_SHARE_MIN = 0.7
# Claim 2: entrodrop must lose no more perplexity than cosine at this share of the compared counts
# (1.0: at every count, as the paper reports it; per-count numbers are always shown).
SELECTION_WIN_SHARE = 1.0
# Claim 3: two calibrations on different text agree when the block scores' Spearman correlation and
# the overlap of their k lowest-scoring blocks (share of k) both reach these.
ROBUST_SPEARMAN_MIN = 0.8
ROBUST_OVERLAP_MIN = 0.75
# Claim 4: speed-up vs dropped blocks is near-linear when a straight-line fit through (0, 1) and the
# measured points explains this share of the variance (R^2) and the slope is positive.
LINEAR_R2_MIN = 0.9
SPEED_MIN_COUNTS = 2  # distinct non-zero drop counts needed before a line means anything
# Claim 5: bucket and KNN agree when their block scores' Spearman correlation reaches this.
ESTIMATOR_SPEARMAN_MIN = 0.8

# Which part of the measurement is missing, as a key the app can word for its user, and the CLI text.
HOW_TO_MEASURE = {
    "scores": "calibrate: `entrodrop scan MODEL --json scores.json`",
    "sweep": "run a sweep with both criteria: `entrodrop sweep MODEL --criteria entrodrop,cosine --json sweep.json`",
    "second_scores": "calibrate on other text, e.g. `entrodrop claims MODEL --data gsm8k --second-data gpqa`",
    "speed": "time plans of at least two drop counts: `entrodrop eval MODEL --count N --json speedN.json` for "
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
        thresholds = {"rise_share_min": RISE_SHARE_MIN, "selection_win_share": SELECTION_WIN_SHARE,
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


# -- small statistics --------------------------------------------------------------------------
def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (nan if either is constant)."""
    if len(a) != len(b):
        raise ValueError(f"Rank correlation needs sequences of one length, got {len(a)} and {len(b)}.")
    if len(a) < 2:
        raise ValueError("Rank correlation needs at least two values.")
    return _pearson(_ranks(a), _ranks(b))


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line y = intercept + slope * x; returns (slope, intercept, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("A line needs at least two distinct x values.")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, intercept, (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def _lowest(values: Mapping[int, float], k: int) -> set[int]:
    """The k layers with the smallest value, ties by layer index (as selection breaks them)."""
    return set(sorted(values, key=lambda layer: (values[layer], layer))[:k])


def _delta(scores: Scores, kind: str, estimator: str) -> dict[int, float]:
    if estimator not in scores.estimators:
        raise ValueError(f"The scores have no {estimator!r} estimator (they have {', '.join(scores.estimators)}).")
    return {b.layer: b.delta_entropy[estimator] for b in scores.blocks_of(kind)}


# -- inputs from the CLI's JSON files ----------------------------------------------------------
def sweep_rows_from_json(data, source: str = "") -> list[dict]:
    """Sweep rows, each ``{criterion, count, pruned_perplexity, dense_perplexity, estimator, kind, source}``.

    ``data`` is what ``entrodrop sweep --json`` writes (``{"estimator", "kind", "rows": [...]}``),
    a list of such, or a plain list of :class:`~entrodrop.verify.SweepRow`-like dicts. Rows of one
    file share held-out text; ``source`` tells files apart (claim 2 compares within one file)."""
    if isinstance(data, list) and data and isinstance(data[0], dict) and "rows" in data[0]:
        return [row for i, d in enumerate(data) for row in sweep_rows_from_json(d, f"{source}#{i}")]
    if isinstance(data, dict):
        if "rows" not in data:
            raise ValueError("This is not a sweep file: it has no 'rows'. Write one with `entrodrop sweep --json`.")
        top = data
        rows = data["rows"]
    elif isinstance(data, list):
        top, rows = {}, data
    else:
        raise TypeError(f"Sweep data must be a dict or a list of rows, got {type(data).__name__}.")
    out = []
    for r in rows:
        r = r.to_dict() if hasattr(r, "to_dict") else dict(r)
        missing = [k for k in ("criterion", "count", "pruned_perplexity") if k not in r]
        if missing:
            raise ValueError(f"A sweep row lacks {', '.join(missing)}; write sweeps with `entrodrop sweep --json`.")
        meta = (r.get("plan") or {}).get("meta") or {}
        out.append({
            "criterion": str(r["criterion"]), "count": int(r["count"]),
            "pruned_perplexity": float(r["pruned_perplexity"]),
            "dense_perplexity": float(r.get("dense_perplexity", float("nan"))),
            "estimator": r.get("estimator") or meta.get("estimator") or top.get("estimator"),
            "kind": r.get("kind") or meta.get("kind") or top.get("kind"),
            "source": r.get("source") or source,
        })
    return out


def speed_rows_from_json(data) -> list[dict]:
    """Measured speed-ups, each ``{count, speedup, ideal_speedup, decode_speedup}`` (prefill speed-up).

    ``data`` is one ``entrodrop eval --json`` result (``{"plan": ..., "speed": ...}``), a list of
    them, or a list of ``{"count", "speedup"}`` rows."""
    items = data if isinstance(data, list) else [data]
    rows = []
    for item in items:
        if not isinstance(item, Mapping):
            raise TypeError(f"A speed entry must be a dict, got {type(item).__name__}.")
        if "speed" in item:
            speed, plan = item["speed"] or {}, item.get("plan") or {}
            if "prefill_speedup" not in speed:
                raise ValueError("This eval result has no speed measurement; run `entrodrop eval` without --no-speed.")
            rows.append({"count": len(plan.get("blocks", [])), "speedup": float(speed["prefill_speedup"]),
                         "ideal_speedup": float(speed.get("ideal_speedup", float("nan"))),
                         "decode_speedup": float(speed.get("decode_speedup", float("nan")))})
        elif "count" in item and "speedup" in item:
            rows.append({"count": int(item["count"]), "speedup": float(item["speedup"]),
                         "ideal_speedup": float(item.get("ideal_speedup", float("nan"))),
                         "decode_speedup": float(item.get("decode_speedup", float("nan")))})
        else:
            raise ValueError("A speed entry needs 'plan' and 'speed' (from `entrodrop eval --json`) or "
                             "'count' and 'speedup'.")
    return rows


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


def score_trend(scores: Scores | None, estimator: str = "bucket") -> ClaimResult:
    """Claim 1: where the initial decline ends (the stage boundary rule of :mod:`.scores`), and the
    share of later layer-to-layer steps that rise."""
    if scores is None:
        return _not_measured(1, "No calibration yet.", ["scores"])
    if estimator not in scores.entropy_curve:
        return _not_measured(1, f"The calibration has no {estimator} curve.", ["estimators"])
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


def _paired(rows: Iterable[dict], a: str, b: str, key) -> list[tuple[int, dict, dict]]:
    """(count, row a, row b) for every non-zero count where both criteria (or estimators) have a row
    with the same ``key`` (so they were measured on the same held-out text)."""
    index: dict[tuple, dict] = {}
    for r in rows:
        index[(key(r), r["count"], r["_side"])] = r
    pairs = []
    for (k, count, side), ra in sorted(index.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if side == a and count > 0 and (k, count, b) in index:
            pairs.append((count, ra, index[(k, count, b)]))
    return pairs


def score_selection(sweeps: Sequence[dict] | None, estimator: str | None = None) -> ClaimResult:
    """Claim 2: at each count both criteria reached in one sweep, does entrodrop's held-out perplexity
    stay at or below cosine's?"""
    sweeps = list(sweeps or [])
    # entrodrop rows of ``estimator`` when the sweep has them, else of entrodrop's own default (knn, as
    # released: what `entrodrop sweep` runs unless told otherwise), else whatever estimator was swept
    swept = {r["estimator"] for r in sweeps if r["criterion"] == "entrodrop" and r["count"] > 0}
    chosen = next((e for e in (estimator, get_criterion("entrodrop").default_estimator) if e in swept), None)
    rows = [dict(r, _side=r["criterion"]) for r in sweeps
            if r["criterion"] == "cosine" or (r["criterion"] == "entrodrop"
                                              and (chosen is None or r["estimator"] in (chosen, None)))]
    pairs = _paired(rows, "entrodrop", "cosine", key=lambda r: (r["source"], r["kind"]))
    if not pairs:
        return _not_measured(2, "No sweep with both the entrodrop and cosine criteria at a non-zero count.", ["sweep"])
    wins = [(n, e, c) for n, e, c in pairs if e["pruned_perplexity"] <= c["pruned_perplexity"]]
    share = len(wins) / len(pairs)
    per_count = "; ".join(f"{n}: {e['pruned_perplexity']:.3f} vs {c['pruned_perplexity']:.3f}" for n, e, c in pairs)
    est = sorted({str(e["estimator"]) for _, e, _ in pairs})
    text = (f"Entrodrop's held-out perplexity is at or below cosine's at {len(wins)} of {len(pairs)} drop counts "
            f"(count: entrodrop vs cosine perplexity — {per_count}).")
    numbers = {"compared_counts": len(pairs), "entrodrop_not_worse": len(wins), "share": share,
               "estimator": est, "rows": [{"count": n, "entrodrop": e["pruned_perplexity"],
                                           "cosine": c["pruned_perplexity"]} for n, e, c in pairs]}
    kinds = sorted({str(e["kind"]) for _, e, _ in pairs})
    return ClaimResult(2, CLAIM_TEXT[2], HOLDS if share >= SELECTION_WIN_SHARE else DOES_NOT_HOLD, text, numbers,
                       source=f"sweep rows ({', '.join(kinds)} blocks, estimator {', '.join(est)})")


def default_top_k(num_layers: int) -> int:
    """A quarter of the blocks (the paper drops 8 of 32), at least one."""
    return max(1, num_layers // 4)


def score_robustness(scores: Scores | None, second: Scores | None, *, estimator: str = "bucket",
                     kind: str = "attn", top_k: int | None = None) -> ClaimResult:
    """Claim 3: Spearman correlation of the two calibrations' block scores, and the overlap of their k
    lowest-scoring blocks (before any protection)."""
    if scores is None or second is None:
        return _not_measured(3, "Needs two calibrations of the model on different text.", ["second_scores"])
    if scores.num_layers != second.num_layers:
        raise ValueError(f"The two calibrations have {scores.num_layers} and {second.num_layers} layers: they are "
                         "not of the same model. Calibrate the same model on two data sets.")
    data = [(s.calibration or {}).get("data") for s in (scores, second)]
    if data[0] is not None and data[0] == data[1]:
        return _not_measured(3, f"Both calibrations used the same text ({data[0]}); this claim needs different text.",
                             ["second_scores"])
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
    return ClaimResult(3, CLAIM_TEXT[3], HOLDS if holds else DOES_NOT_HOLD, text, numbers,
                       source=f"{_calibration_text(scores)}; {_calibration_text(second)}")


def score_speed(speed: Sequence[dict] | None) -> ClaimResult:
    """Claim 4: a line through (0, 1) and the measured prefill speed-ups; R^2, slope, ratio to ideal."""
    rows = [r for r in speed or [] if r["count"] > 0 and math.isfinite(r["speedup"])]
    counts = sorted({r["count"] for r in rows})
    if len(counts) < SPEED_MIN_COUNTS:
        have = f" (have {len(counts)}: {counts})" if counts else ""
        return _not_measured(4, f"Needs measured speed-ups at {SPEED_MIN_COUNTS} or more drop counts{have}.",
                             ["speed"], {"counts": counts})
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
    numbers = {"slope": slope, "intercept": intercept, "r2": r2, "points": [[x, y] for x, y in zip(xs, ys, strict=True)],
               "ratio_to_ideal": (sum(ratios) / len(ratios)) if ratios else None}
    return ClaimResult(4, CLAIM_TEXT[4], HOLDS if holds else DOES_NOT_HOLD, text, numbers,
                       source=f"{len(rows)} timed plan(s)")


def score_estimators(scores: Scores | None, sweeps: Sequence[dict] | None, *, kind: str = "attn") -> ClaimResult:
    """Claim 5, two parts: bucket and KNN rank blocks alike (Spearman of their entropy increases), and
    entrodrop ranked by Renyi loses more held-out perplexity than by bucket and by KNN (sweep rows on the
    same held-out text). Holds when both parts hold; does not hold when a measured part fails."""
    parts: list[str] = []
    numbers: dict = {}
    missing: list[str] = []
    agree = None
    if scores is not None and {"bucket", "knn"} <= set(scores.estimators):
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
                r = spearman([renyi[i] for i in layers], [values[i] for i in layers])
                numbers[f"spearman_renyi_{other}"] = r
            parts.append(f"Renyi's correlation with bucket is {numbers['spearman_renyi_bucket']:.3f}, with KNN "
                         f"{numbers['spearman_renyi_knn']:.3f}.")
    else:
        missing.append("estimators" if scores is not None else "scores")

    weaker = None
    rows = [dict(r, _side=r["estimator"]) for r in sweeps or [] if r["criterion"] == "entrodrop" and r["estimator"]]
    def same_text(row: dict) -> tuple:  # sweeps on one held-out text share their dense perplexity
        return row["kind"], round(row["dense_perplexity"], 6)

    comparisons = {other: _paired(rows, "renyi", other, key=same_text) for other in ("bucket", "knn")}
    if all(comparisons.values()):
        worse = {other: sum(r["pruned_perplexity"] > o["pruned_perplexity"] for _, r, o in pairs)
                 for other, pairs in comparisons.items()}
        total = {other: len(pairs) for other, pairs in comparisons.items()}
        weaker = all(worse[o] == total[o] for o in worse)
        numbers["renyi_worse"] = {o: [worse[o], total[o]] for o in worse}
        parts.append("Entrodrop ranked by Renyi loses more held-out perplexity than by bucket at "
                     f"{worse['bucket']} of {total['bucket']} counts and than by KNN at {worse['knn']} of "
                     f"{total['knn']}.")
    else:
        missing.append("renyi_sweep")
        parts.append("Renyi's selection has not been swept against bucket and KNN on the same held-out text.")

    if agree is None and weaker is None:
        return _not_measured(5, " ".join(parts), missing, numbers)
    if agree is False or weaker is False:
        verdict = DOES_NOT_HOLD
    elif agree and weaker:
        verdict = HOLDS
    else:
        verdict = NOT_MEASURED  # one part holds, the other is unmeasured: not enough to say the claim holds
    return ClaimResult(5, CLAIM_TEXT[5], verdict, " ".join(parts), numbers,
                       source=_calibration_text(scores) if scores is not None else "sweep rows", missing=missing)


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
