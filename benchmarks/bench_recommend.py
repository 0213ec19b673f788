"""What the ``recommended`` criterion costs and what it buys, to place its defaults at a measured knee.

    .venv/bin/python benchmarks/bench_recommend.py [--kind attn] [--counts 4,8] [--windows 1,2,4,8] \
        [--pool-extras 0,4] [--compare-windows 0,8] [--calib-samples 32] [--eval-samples 16] [--seq-len 256] [--threads 2] [--json out.json]

One calibration of the bundled SmolLM2 on the calibration part of gsm8k with the defaults of the app
and CLI (timed: that is the unit every cost below is reported in). Then, for every count:

* ``recommended`` with every (windows, pool per criterion, search, race windows) setting:
  seconds, the ratio to the calibration's seconds, windows read, and perplexity on the **development**
  part of gsm8k: this benchmark places defaults, so it never reads the report part the headline tables
  quote (docs/results.md);
* the full-pool greedy reference (every eligible block a candidate at every step, 4 windows):
  the quality ceiling the pooled search is measured against.

Selection only ever reads calibration windows: the search the first N, the race the next ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from entrodrop.calibrate import run_calibration
from entrodrop.data import load_corpus, make_windows
from entrodrop.evaluate import compare
from entrodrop.loading import load_model
from entrodrop.plan import DropPlan
from entrodrop.progress import run_to_end
from entrodrop.race import COMPARE_WINDOWS
from entrodrop.search import iter_ablation, iter_recommend


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


ABLATIONS: dict[int, tuple] = {}  # windows -> (Ablation, seconds): measured once, charged to every run


def run_recommend(model, scores, windows, **kwargs):
    """(plan, seconds, loss evaluations) of one recommended run, the single-block ablation included.

    Evaluations are counted in windows read (an evaluation of the search reads its windows, one of the
    final comparison reads ``compare_on``)."""
    n = int(windows.shape[0])
    if n not in ABLATIONS:
        start = time.perf_counter()
        ABLATIONS[n] = (run_to_end(iter_ablation(model, scores.num_layers, windows, kind=kwargs["kind"])),
                        time.perf_counter() - start)
    ablation, ablation_s = ABLATIONS[n]
    start = time.perf_counter()
    plan = None
    done: dict[str, int] = {}
    for event in iter_recommend(model, scores, windows, ablation=ablation, **kwargs):
        if event.partial is not None:
            plan = event.partial
        done[event.stage] = event.done
    seconds = time.perf_counter() - start + ablation_s
    compared = sum(v["windows"] for v in plan.meta.get("compared", {}).values())  # the race reads unevenly
    return plan, seconds, (done.get("recommend", 0) + len(ablation.losses) + 1) * n + compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="attn")
    parser.add_argument("--counts", type=ints, default=[4, 8])
    parser.add_argument("--windows", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--pool-extras", type=ints, default=[0, 4],
                        help="each criterion's best count + EXTRA candidates join the pool")
    parser.add_argument("--searches", default="lazy,greedy")
    parser.add_argument("--compare-windows", type=ints, default=[0, COMPARE_WINDOWS],
                        help="windows of the race of whole plans, after the search's (0: greedy plan only)")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reference-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    # the search reads the first n calibration windows and the race the next c (as the app reads them: the
    # same seed gives the same first windows whatever the count)
    needed = max(args.calib_samples, max(args.windows) + max(args.compare_windows), args.reference_windows)
    calib = make_windows(loaded.tokenizer, corpus, num_samples=needed, seq_len=args.seq_len, seed=0)
    heldout = make_windows(loaded.tokenizer, corpus, num_samples=args.eval_samples, seq_len=args.seq_len, seed=0,
                           part="development")
    start = time.perf_counter()
    scores = run_calibration(loaded.model, calib[:args.calib_samples], spec=loaded.arch)
    calib_s = time.perf_counter() - start
    print(f"{loaded.name}: calibration {args.calib_samples} x {args.seq_len} took {calib_s:.1f} s "
          f"(estimators {', '.join(scores.estimators)}); scored on the development part of gsm8k, "
          f"{heldout.shape[0]} x {args.seq_len}")

    rows = []

    def record(label, count, windows, pool, search, plan, seconds, evaluations):
        ppl = compare(loaded.model, plan, heldout).pruned_perplexity
        row = {"setting": label, "count": count, "windows": windows, "pool_per_criterion": pool, "search": search,
               "seconds": round(seconds, 1), "x_calibration": round(seconds / calib_s, 2),
               "windows_read": evaluations, "layers": plan.layers_of(args.kind), "development_ppl": round(ppl, 3),
               "chosen_plan": plan.meta.get("chosen_plan", "greedy search")}
        rows.append(row)
        print(f"{label:<28} count {count:>2}  {seconds:7.1f} s  {row['x_calibration']:5.2f}x calib  "
              f"{evaluations:>5} windows read  ppl {ppl:8.3f}  {row['layers']}  ({row['chosen_plan']})", flush=True)

    dense = compare(loaded.model, DropPlan(scores.num_layers, []), heldout).dense_perplexity
    print(f"dense development perplexity {dense:.3f}")
    for count in args.counts:
        if args.reference:
            n = args.reference_windows
            plan, seconds, evals = run_recommend(loaded.model, scores, calib[:n], kind=args.kind, count=count,
                                                 pool_per_criterion=scores.num_layers, search="greedy")
            record(f"full-pool greedy, {n} win", count, n, scores.num_layers, "greedy", plan, seconds, evals)
        for n in args.windows:
            for extra in args.pool_extras:
                for search, c in itertools.product(args.searches.split(","), args.compare_windows):
                    pool = count + extra
                    plan, seconds, evals = run_recommend(loaded.model, scores, calib[:n], kind=args.kind, count=count,
                                                         pool_per_criterion=pool, search=search,
                                                         compare_on=calib[n:n + c] if c else None, race_from=n)
                    record(f"{search}, {n} win, pool +{extra}, compare {c}", count, n, pool, search, plan,
                           seconds, evals)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"calibration_seconds": calib_s, "dense_ppl": dense, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
