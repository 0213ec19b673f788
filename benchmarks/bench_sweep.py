"""Held-out quality of every criterion at every drop count on the bundled model, from one calibration.

    .venv/bin/python benchmarks/bench_sweep.py --kind attn --counts 0-12 [--calib-data gsm8k] \
        [--eval-data gsm8k] [--eval-part report] [--calib-samples 32] [--eval-samples 16] [--seq-len 256] \
        [--threads 1] [--json out.json]
    .venv/bin/python benchmarks/bench_sweep.py --table out.json   # the by-count table of a saved run

One calibration (bucket and knn entropy, the app's and CLI's defaults: 32 windows of 256 tokens) on the
calibration part of ``--calib-data``; the measured criteria (recommended, ablation) pick on the first
windows of that same calibration part. Every plan is then scored on ``--eval-part`` of ``--eval-data``
(default the **report** part, which no default-choosing run reads: the headline tables; ``development``
for a run that tunes something): perplexity, KL(dense || pruned), top-1 agreement, and each window's loss
for the paired errors.

Criteria, each with its own default protection unless named:
  recommended (ours), ablation (ours), entrodrop as released (knn; layers 0, 1, L-1 protected),
  entrodrop released with bucket entropy, entrodrop with the paper's stage rule (bucket, boundary on the
  sink-free curve), cosine importance, angular (whole layers: Gromov et al.'s span on all tokens; sub-blocks:
  ours) and, for whole layers, angular-last (Gromov et al. as published, last token).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from entrodrop.calibrate import iter_calibration
from entrodrop.data import load_corpus, make_windows
from entrodrop.loading import load_model
from entrodrop.progress import run_to_end
from entrodrop.verify import SweepRow, Variant, describe_gap, format_sweep_table, gap_to_best_other, sweep


def parse_counts(text: str) -> list[int]:
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",") if x]


def variants(kind: str) -> list[Variant]:
    out = [
        Variant("recommended"),
        Variant("ablation"),
        Variant("entrodrop", label="entrodrop (released, knn)"),
        Variant("entrodrop", estimator="bucket", label="entrodrop (released, bucket)"),
        Variant("entrodrop", estimator="bucket", protect="stage", label="entrodrop (stage, bucket)"),
        Variant("cosine"),
        Variant("angular"),
    ]
    if kind == "layer":
        out.append(Variant("angular-last"))
    return out


def by_count_table(rows: list[dict]) -> str:
    """Markdown: pruned perplexity per count (rows) and criterion (columns), the best of each row in bold,
    the winner of recommended's final comparison where it ran and, for runs that saved per-window losses,
    recommended's held-out loss minus the best other criterion's with its paired standard error."""
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    by = {(r["criterion"], r["count"]): r for r in rows}
    ppl = {key: r["pruned_perplexity"] for key, r in by.items()}
    counts = sorted({r["count"] for r in rows if r["count"] > 0})
    paired = all(r.get("window_nll") for r in rows)
    swept = [SweepRow(**r) for r in rows] if paired else []
    extra = " recommended - best other (nats) |" if paired else ""
    lines = ["| count | " + " | ".join(names) + " | recommended's plan |" + extra,
             "|---" * (len(names) + 2 + paired) + "|"]
    for n in counts:
        best = min(ppl[(c, n)] for c in names if (c, n) in ppl)
        cells = [("**{:.4g}**" if abs(ppl[(c, n)] - best) < 5e-4 else "{:.4g}").format(ppl[(c, n)])
                 if (c, n) in ppl else "" for c in names]
        rec = by.get(("recommended", n))
        chosen = rec["plan"]["meta"].get("chosen_plan", "greedy search") if rec else ""
        line = f"| {n} | " + " | ".join(cells) + f" | {chosen} |"
        if paired:
            gap = gap_to_best_other(swept, "recommended", n)
            line += f" {describe_gap(gap) if gap else ''} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="attn")
    parser.add_argument("--counts", type=parse_counts, default=list(range(13)))
    parser.add_argument("--calib-data", default="gsm8k")
    parser.add_argument("--eval-data", default="gsm8k")
    parser.add_argument("--eval-part", default="report", choices=("report", "development"))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", default=None, metavar="JSON", help="print the by-count table of a saved run")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as fh:
            print(by_count_table(json.load(fh)["rows"]))
        return
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    calib = make_windows(loaded.tokenizer, load_corpus(args.calib_data), num_samples=args.calib_samples,
                         seq_len=args.seq_len, seed=0)
    heldout = make_windows(loaded.tokenizer, load_corpus(args.eval_data), num_samples=args.eval_samples,
                           seq_len=args.seq_len, seed=0, part=args.eval_part)
    start = time.perf_counter()
    scores = run_to_end(iter_calibration(loaded.model, calib, spec=loaded.arch))
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    rows = sweep(loaded.model, scores, heldout, criteria=variants(args.kind), kind=args.kind, counts=args.counts,
                 selection_windows=calib)
    sweep_s = time.perf_counter() - start
    print(f"{loaded.name}, {args.kind} blocks; calibration {args.calib_data} {calib.shape[0]} x {args.seq_len} "
          f"({calib_s:.0f} s); scored on the {args.eval_part} part of {args.eval_data}, {heldout.shape[0]} x {args.seq_len} "
          f"({heldout.numel() - heldout.shape[0]} predicted tokens); sweep {sweep_s:.0f} s")
    print(f"stage boundary (sink-free): {scores.stage_boundary}")
    print(format_sweep_table(rows))
    print()
    print(by_count_table([r.to_dict() for r in rows]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": loaded.name, "kind": args.kind, "calib_data": args.calib_data,
                       "eval_data": args.eval_data, "eval_part": args.eval_part, "calib_windows": list(calib.shape),
                       "heldout_windows": list(heldout.shape), "calibration_seconds": calib_s,
                       "sweep_seconds": sweep_s, "stage_boundary": scores.stage_boundary,
                       "rows": [r.to_dict() for r in rows]}, fh, indent=1)


if __name__ == "__main__":
    main()
