"""What the paper's claims rest on (:mod:`entrodrop.claims`): the measurements read from the CLI's JSON files,
the small statistics the verdicts use, and the rules for when there is enough evidence to give one.

* :func:`sweep_rows_from_json` / :func:`speed_rows_from_json` read ``entrodrop sweep --json`` and
  ``entrodrop eval --json`` files;
* :func:`spearman` and :func:`linear_fit` are the statistics;
* :func:`paired_by_count` compares two sides of a sweep (entrodrop and cosine, or two estimators) count by
  count on the windows both read, each with its paired standard error and a verdict against the noise
  margin (:data:`NOISE_Z` errors, :func:`entrodrop.evaluate.gap_verdict`);
* :func:`shared_text` says when two calibrations read the same text (the same data name, or bundled
  sets that share a source, such as ``gsm8k`` and ``gsm8k+gpqa``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .bundled import BUNDLED_MIXES
from .evaluate import gap_verdict, paired_difference

MIN_COUNTS = 3  # distinct non-zero drop counts a comparison or a line needs before it means anything
NOISE_Z = 2.0  # paired standard errors a gap must exceed to count (the margin of evaluate.gap_verdict)


# -- statistics ----------------------------------------------------------------------------------
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


# -- paired comparisons ------------------------------------------------------------------------
@dataclass(frozen=True)
class CountGap:
    """Side a minus side b at one drop count, paired over the windows both read."""

    count: int
    a_perplexity: float
    b_perplexity: float
    gap: float  # mean per-window loss difference a - b, nats (nan without per-window losses)
    error: float  # its standard error
    verdict: str  # "lower" (a loses less), "higher" or "noise" (within NOISE_Z errors, or unmeasurable)

    def to_dict(self) -> dict:
        return {"count": self.count, "a": self.a_perplexity, "b": self.b_perplexity, "gap": self.gap,
                "error": self.error, "verdict": self.verdict}


def paired_by_count(rows: Iterable[dict], a: str, b: str, key) -> list[CountGap]:
    """For every non-zero count where side ``a`` and side ``b`` (``row["_side"]``) both have a row with the same
    ``key(row)`` (measured on the same text), their paired gap. Rows without per-window losses (``window_nll``,
    written by sweeps since version 0.1) give a gap of nan and the verdict "noise"."""
    index: dict[tuple, dict] = {}
    for r in rows:
        index[(key(r), r["count"], r["_side"])] = r
    gaps = []
    for (k, count, side), ra in sorted(index.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if side != a or count <= 0 or (k, count, b) not in index:
            continue
        rb = index[(k, count, b)]
        wa, wb = ra.get("window_nll") or [], rb.get("window_nll") or []
        if wa and len(wa) == len(wb):
            gap, error = paired_difference(wa, wb)
        else:
            gap, error = float("nan"), float("nan")
        gaps.append(CountGap(count, ra["pruned_perplexity"], rb["pruned_perplexity"], gap, error,
                             "noise" if math.isnan(gap) else gap_verdict(gap, error)))
    return gaps


def has_window_losses(gaps: Sequence[CountGap]) -> bool:
    return bool(gaps) and all(not math.isnan(g.gap) for g in gaps)


def counts_of(gaps: Sequence[CountGap]) -> list[int]:
    return sorted({g.count for g in gaps})


# -- calibration text --------------------------------------------------------------------------
def text_sources(name: str) -> set[str]:
    """The texts a data name reads: a bundled mix's sets, else the name itself."""
    key = name.strip().lower()
    return set(BUNDLED_MIXES.get(key, (key,)))


def shared_text(first: str | None, second: str | None) -> bool:
    """Whether two calibrations' data names read some of the same text (``gsm8k`` and ``gsm8k+gpqa`` do)."""
    return first is not None and second is not None and bool(text_sources(first) & text_sources(second))


# -- inputs from the CLI's JSON files ----------------------------------------------------------
def sweep_rows_from_json(data, source: str = "") -> list[dict]:
    """Sweep rows, each ``{criterion, count, pruned_perplexity, dense_perplexity, estimator, kind, source,
    window_nll}``.

    ``data`` is what ``entrodrop sweep --json`` writes (``{"estimator", "kind", "rows": [...]}``),
    a list of such, or a plain list of :class:`~entrodrop.verify.SweepRow`-like dicts. Rows of one
    file share their windows; ``source`` tells files apart (claim 2 compares within one file)."""
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
            "window_nll": [float(x) for x in r.get("window_nll") or []],
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
