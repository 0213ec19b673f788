"""Quality after dropping 0..12 attention sub-blocks of the bundled model: entrodrop vs cosine vs angular.

    .venv/bin/python benchmarks/bench_sweep.py [--calib-samples 32] [--eval-samples 16] [--seq-len 256] \
        [--no-variant] [--threads 1] [--json out.json]

One calibration on the calibration part of gsm8k (bucket entropy, 20 bins), then ``verify.sweep``:
every criterion at every count, perplexity / KL(dense || pruned) / top-1 agreement on windows of the
held-out part of gsm8k (a different set of problems). Each criterion uses its own default protection
(entrodrop: "stage"; cosine and angular: none, as published).

Unless ``--no-variant``, the same sweep runs again from a calibration with ``skip_first=1`` (the first
token of every window, an attention sink on this model, left out of the statistics). That is a
variant shown for comparison, not the method.

Threads: 1 by default (on a 2-core machine shared with other jobs one thread runs faster and steadier).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.data import load_corpus, make_windows
from entrodrop.loading import load_model
from entrodrop.select import rank_blocks
from entrodrop.verify import sweep

CRITERIA = ("entrodrop", "cosine", "angular")


def format_table(rows) -> str:
    """One line per count: perplexity, KL and top-1 agreement of each criterion side by side."""
    by = {(r.criterion, r.count): r for r in rows}
    counts = sorted({r.count for r in rows})
    head = f"{'count':>5} |" + "|".join(f" {c:<9} {'ppl':>9} {'KL':>6} {'top-1':>6} " for c in CRITERIA)
    lines = [head, "-" * len(head)]
    for n in counts:
        cells = []
        for c in CRITERIA:
            r = by.get((c, n))
            cells.append(f" {'':<9} {r.pruned_perplexity:>9.3f} {r.kl_mean:>6.3f} {r.top1_agreement:>6.3f} "
                         if r else f" {'':<9} {'n/a':>9} {'':>6} {'':>6} ")
        lines.append(f"{n:>5} |" + "|".join(cells))
    return "\n".join(lines)


def run(loaded, calib, heldout, counts, skip_first: int) -> tuple[dict, list]:
    start = time.perf_counter()
    scores = run_calibration(loaded.model, calib, spec=loaded.arch, settings=EstimatorSettings(estimators=("bucket",)),
                             skip_first=skip_first)
    rows = sweep(loaded.model, scores, heldout, criteria=CRITERIA, kind="attn", counts=counts, estimator="bucket")
    order = {c: [layer for layer, _ in rank_blocks(scores, c, "attn", estimator="bucket")] for c in CRITERIA}
    info = {"skip_first": skip_first, "stage_boundary": scores.stage_boundary["bucket"], "ranking": order,
            "seconds": round(time.perf_counter() - start, 1)}
    return info, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-count", type=int, default=12)
    parser.add_argument("--no-variant", dest="variant", action="store_false", help="skip the skip_first=1 sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    calib = make_windows(loaded.tokenizer, corpus, num_samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    heldout = make_windows(loaded.tokenizer, corpus, num_samples=args.eval_samples, seq_len=args.seq_len, seed=0,
                           part="heldout")
    counts = list(range(args.max_count + 1))
    print(f"{loaded.name}, attention sub-blocks, calibration gsm8k {calib.shape[0]} x {args.seq_len} "
          f"(bucket entropy), held-out gsm8k {heldout.shape[0]} x {args.seq_len}")

    results = []
    for skip_first in (0, 1) if args.variant else (0,):
        info, rows = run(loaded, calib, heldout, counts, skip_first)
        title = "METHOD (skip_first=0)" if skip_first == 0 else "VARIANT, not the method: skip_first=1 calibration"
        print(f"\n{title}; entrodrop stage boundary {info['stage_boundary']} ({info['seconds']} s)")
        print(f"dense perplexity {rows[0].dense_perplexity:.3f}; columns: pruned perplexity, KL nats/token, top-1")
        print(format_table(rows))
        last = {r.criterion: {b["layer"] for b in r.plan["blocks"]} for r in rows if r.count == args.max_count}
        for c, order in info["ranking"].items():
            chosen = [layer for layer in order if layer in last.get(c, ())]
            print(f"  {c:<9} drops at count {args.max_count}, in ranking order: {chosen}")
        results.append({**info, "rows": [r.to_dict() for r in rows]})

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": loaded.name, "kind": "attn", "estimator": "bucket",
                       "calibration": {"data": "gsm8k", "part": "calibration", "samples": int(calib.shape[0]),
                                       "seq_len": args.seq_len, "seed": 0},
                       "heldout": {"data": "gsm8k", "part": "heldout", "samples": int(heldout.shape[0]),
                                   "seq_len": args.seq_len, "seed": 0},
                       "sweeps": results}, fh, indent=2)


if __name__ == "__main__":
    main()
