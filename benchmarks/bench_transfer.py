"""Does a choice made on one text hold on another? Re-measure the plans of saved sweeps, paired per window.

    .venv/bin/python benchmarks/bench_sweep.py ... --json sweep.json          # first, one or more sweeps
    .venv/bin/python benchmarks/bench_transfer.py sweep.json [more.json] [--counts 4,8,12] \
        [--eval-data gsm8k,gpqa] [--criteria recommended,ablation,cosine,angular,angular-last | all] [--json out.json]

For each sweep (its model is the bundled one; its calibration data set is read from the JSON) and each
count, every distinct plan of the named criteria is measured against the dense model on

* the calibration windows ``recommended``'s race reads (windows 2-17 of the sweep's calibration part, after
  the search's): mean loss and mean KL(dense || pruned), the two signals a choice made on that text
  could use;
* ``--eval-part`` (default the report part) of every ``--eval-data`` set: perplexity, and recommended's
  loss minus every other plan's with the paired standard error over windows, so a gap within noise
  reads as such.

A plan that wins on held-out text of another data set while it loses on both calibration signals cannot
be found from the calibration text: that is a limit of the text, not of the search.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from entrodrop.data import load_corpus, make_windows
from entrodrop.evaluate import gap_verdict, iter_compare_many, paired_difference
from entrodrop.loading import load_model
from entrodrop.plan import DropPlan
from entrodrop.progress import run_to_end
from entrodrop.search import MEASURE_WINDOWS, SELECTION_WINDOWS

DEFAULT_CRITERIA = "recommended,ablation,cosine,angular,angular-last"


def distinct_plans(rows: list[dict], count: int, criteria: list[str]) -> dict[str, DropPlan]:
    """Label ("a = b" where criteria chose the same blocks) -> plan, recommended's first."""
    chosen: dict[tuple, tuple[list[str], DropPlan]] = {}
    for r in sorted(rows, key=lambda r: r["criterion"] != "recommended"):
        if r["count"] != count or (criteria != ["all"] and r["criterion"] not in criteria):
            continue
        plan = DropPlan.from_dict(r["plan"])
        chosen.setdefault(tuple(sorted(plan.keys())), ([], plan))[0].append(r["criterion"])
    return {" = ".join(names): plan for names, plan in chosen.values()}


def measure(model, plans: dict[str, DropPlan], windows: torch.Tensor, batch_size: int) -> dict[str, dict]:
    reports = run_to_end(iter_compare_many(model, plans, windows, batch_size=batch_size))
    return {label: {"loss": r.pruned_nll, "kl": r.kl_mean, "perplexity": r.pruned_perplexity,
                    "window_nll": r.window_nll} for label, r in reports.items()}


def versus(results: dict[str, dict], label: str, others: list[str]) -> list[str]:
    """Lines: the first plan's held-out loss minus each other's, +- paired standard error, and a verdict."""
    lines = []
    for other in others:
        mean, error = paired_difference(results[label]["window_nll"], results[other]["window_nll"])
        lines.append(f"{mean:+.4f} +- {error:.4f} nats vs {other} ({gap_verdict(mean, error)})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", help="JSON files written by bench_sweep.py --json")
    parser.add_argument("--counts", default=None, help="comma-separated counts (default: every count > 0)")
    parser.add_argument("--eval-data", default="gsm8k,gpqa", help="data sets to score on")
    parser.add_argument("--eval-part", default="report", choices=("report", "development"))
    parser.add_argument("--criteria", default=DEFAULT_CRITERIA, help="comma-separated sweep labels, or all")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    eval_sets = [d.strip() for d in args.eval_data.split(",") if d.strip()]

    loaded = load_model("smollm2")
    start = time.perf_counter()
    out = []
    for path in args.sweeps:
        with open(path) as fh:
            saved = json.load(fh)
        seq_len = saved["calib_windows"][1]
        calib = make_windows(loaded.tokenizer, load_corpus(saved["calib_data"]), num_samples=saved["calib_windows"][0],
                             seq_len=seq_len, seed=0)[MEASURE_WINDOWS:SELECTION_WINDOWS]
        heldout = {d: make_windows(loaded.tokenizer, load_corpus(d), num_samples=args.eval_samples, seq_len=seq_len,
                                   seed=0, part=args.eval_part) for d in eval_sets}
        counts = ([int(c) for c in args.counts.split(",")] if args.counts
                  else sorted({r["count"] for r in saved["rows"] if r["count"] > 0}))
        for count in counts:
            plans = distinct_plans(saved["rows"], count, criteria)
            if len(plans) < 2:
                continue
            result = {"sweep": path, "kind": saved["kind"], "calib_data": saved["calib_data"], "count": count,
                      "plans": {label: plan.compact() for label, plan in plans.items()},
                      "calibration": measure(loaded.model, plans, calib, args.batch_size),
                      "heldout": {d: measure(loaded.model, plans, w, args.batch_size) for d, w in heldout.items()}}
            out.append(result)
            print(f"\n{saved['kind']} x {count}, chosen on {saved['calib_data']} "
                  f"(calibration: the race's {calib.shape[0]} windows; {args.eval_part} part: {args.eval_samples} x "
                  f"{seq_len})")
            width = max(len(label) for label in plans)
            head = "  ".join(f"{d + ' ppl':>10}" for d in eval_sets)  # on the eval part
            print(f"  {'plan':{width}}  {'calib loss':>10}  {'calib KL':>8}  {head}  blocks")
            for label, plan in plans.items():
                c = result["calibration"][label]
                cells = "  ".join(f"{result['heldout'][d][label]['perplexity']:10.3f}" for d in eval_sets)
                print(f"  {label:{width}}  {c['loss']:10.4f}  {c['kl']:8.4f}  {cells}  {plan.compact() or '-'}")
            first, others = next(iter(plans)), list(plans)[1:]
            for d in eval_sets:
                for line in versus(result["heldout"][d], first, others):
                    print(f"  {args.eval_part} {d}: {first} {line}")
    print(f"\n{time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)


if __name__ == "__main__":
    main()
