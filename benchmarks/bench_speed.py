"""Speed of physically pruned models against the dense one on the bundled model, measured in one run.

    .venv/bin/python benchmarks/bench_speed.py [--repeats 5] [--threads 1] [--json out.json]

Blocks: the entrodrop selection (bucket entropy, protection "stage"; "released" only where "stage"
leaves too few eligible blocks) from ONE calibration on gsm8k (16 windows x 256 tokens by default).
Drops: 4, 8, 12 attention sub-blocks and 4, 8 whole layers, each physically removed with
``prune_model`` (a copy); a control row "none" times an unpruned copy of the dense model. The
reversible preview (the dense model under ``preview_plan``) is timed too.

Timing: prefill of a 512-token prompt and greedy decoding of 32 tokens with the KV cache, through
the library's own timer (the one ``measure_speed`` uses). Every round times the dense model, then
one pruned variant and its preview, then the dense model again, and so on, so each pruned run sits
between two dense runs; its speed-up is the mean of those two dense times over its own. Reported:
the median over rounds (one warm-up round discarded) and the min..max over rounds. The ideal
speed-up is 1 / (1 - share of forward FLOPs removed) from ``costs.forward_flops``: the prefill
at 512 tokens, and for decoding the FLOPs of tokens 513..544 (F(544) - F(512)).

Threads: 1 by default. On a small machine shared with other jobs, a 2-thread forward stalls whenever
another process takes one of the cores (measured 3.6-10 s per 512-token forward with 2 threads
against 1.9-2.2 s with 1 thread, while browser tests ran); one thread keeps the ratios stable.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.costs import forward_flops
from entrodrop.data import load_corpus, make_windows
from entrodrop.evaluate import time_prefill_and_decode
from entrodrop.loading import load_model
from entrodrop.plan import DropPlan
from entrodrop.prune import preview_plan, prune_model
from entrodrop.select import select_blocks

CONFIGS = (("none", 0), ("attn", 4), ("attn", 8), ("attn", 12), ("layer", 4), ("layer", 8))


def choose(scores, kind: str, count: int) -> tuple[DropPlan, str]:
    """The entrodrop plan under protection "stage", or "released" where stage allows too few blocks."""
    if count == 0:
        return DropPlan(scores.num_layers, []), "-"
    try:
        return select_blocks(scores, "entrodrop", kind, count=count, protect="stage"), "stage"
    except ValueError:
        return select_blocks(scores, "entrodrop", kind, count=count, protect="released"), "released"


def ideal(model, plan: DropPlan, prefill: int, decode: int) -> tuple[float, float]:
    """Ideal speed-ups (prefill, decode) from the FLOPs the plan removes."""
    short, long = forward_flops(model, prefill, plan), forward_flops(model, prefill + decode, plan)
    prefill_share = short["share_removed"]
    decode_share = (long["removed"] - short["removed"]) / (long["dense"] - short["dense"])
    return 1 / (1 - prefill_share), 1 / (1 - decode_share)


def summary(ratios: list[float], ideal_speedup: float) -> dict:
    median = statistics.median(ratios)
    return {"speedup": median, "min": min(ratios), "max": max(ratios), "ideal": ideal_speedup,
            "of_ideal": median / ideal_speedup,
            "gain_of_ideal": (median - 1) / (ideal_speedup - 1) if ideal_speedup > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one warm-up round more)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the docstring)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    model = loaded.model
    windows = make_windows(loaded.tokenizer, load_corpus("gsm8k"), num_samples=args.samples,
                           seq_len=args.seq_len, seed=0)
    scores = run_calibration(model, windows, spec=loaded.arch, settings=EstimatorSettings(estimators=("bucket",)))

    variants = []
    for kind, count in CONFIGS:
        plan, protect = choose(scores, kind, count)
        variants.append({"name": f"{kind} {count}" if count else "none (copy)", "kind": kind, "count": count,
                         "layers": sorted(b.layer for b in plan.blocks), "protect": protect, "plan": plan,
                         "model": prune_model(model, plan),
                         "ideal": ideal(model, plan, args.prefill_tokens, args.decode_tokens),
                         "runs": {"physical": [], "preview": []}, "dense": []})

    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill_tokens),
                        generator=torch.Generator().manual_seed(0))
    dense_runs = []
    with torch.inference_mode():
        for r in range(1 + args.repeats):
            before = time_prefill_and_decode(model, ids, args.decode_tokens)
            for v in variants:
                physical = time_prefill_and_decode(v["model"], ids, args.decode_tokens)
                preview = None
                if v["count"]:
                    with preview_plan(model, v["plan"]):
                        preview = time_prefill_and_decode(model, ids, args.decode_tokens)
                after = time_prefill_and_decode(model, ids, args.decode_tokens)
                if r > 0:  # round 0 is the warm-up
                    v["dense"].append(((before[0] + after[0]) / 2, (before[1] + after[1]) / 2))
                    v["runs"]["physical"].append(physical)
                    if preview is not None:
                        v["runs"]["preview"].append(preview)
                    dense_runs.append(after)
                before = after

    rows = []
    for v in variants:
        for view, runs in v["runs"].items():
            if not runs:
                continue
            prefill = [d[0] / p[0] for d, p in zip(v["dense"], runs, strict=True)]
            decode = [p[1] / d[1] for d, p in zip(v["dense"], runs, strict=True)]
            rows.append({"drop": v["name"], "view": view, "layers": v["layers"], "protect": v["protect"],
                         "pruned_prefill_s": statistics.median(p for p, _ in runs),
                         "pruned_decode_tps": statistics.median(t for _, t in runs),
                         "prefill": summary(prefill, v["ideal"][0]), "decode": summary(decode, v["ideal"][1])})

    dense_prefill = statistics.median(p for p, _ in dense_runs)
    dense_tps = statistics.median(t for _, t in dense_runs)
    print(f"{loaded.name}, {model.dtype}, {torch.get_num_threads()} threads; calibration gsm8k "
          f"{args.samples} x {args.seq_len}, bucket entropy, stage boundary {scores.stage_boundary['bucket']}")
    print(f"dense: prefill {args.prefill_tokens} tokens {dense_prefill:.3f} s, decode {args.decode_tokens} tokens "
          f"{dense_tps:.1f} tok/s (medians of {len(dense_runs)} runs); rounds: {args.repeats} + 1 warm-up")
    for v in variants[1:]:
        print(f"  entrodrop {v['name']:<8} (protection {v['protect']}): layers {v['layers']}")
    for phase, unit in (("prefill", f"{args.prefill_tokens}-token prefill"), ("decode", f"decode {args.decode_tokens} tokens")):
        head = (f"{'drop':<12} {'view':<9} {'speed-up':>8} {'min..max':>12} {'ideal':>6} {'of ideal':>8} "
                f"{'gain of ideal':>13}")
        print(f"\n{unit}: speed-up over dense (same run)\n{head}\n{'-' * len(head)}")
        for row in rows:
            s = row[phase]
            gain = f"{s['gain_of_ideal']:.0%}" if s["gain_of_ideal"] is not None else "-"
            print(f"{row['drop']:<12} {row['view']:<9} {s['speedup']:>7.3f}x {s['min']:>5.2f}..{s['max']:<5.2f} "
                  f"{s['ideal']:>5.3f}x {s['of_ideal']:>8.1%} {gain:>13}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": loaded.name, "dtype": str(model.dtype), "threads": torch.get_num_threads(),
                       "prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
                       "repeats": args.repeats, "calibration": {"data": "gsm8k", "samples": args.samples,
                                                                "seq_len": args.seq_len, "estimator": "bucket",
                                                                "stage_boundary": scores.stage_boundary["bucket"]},
                       "dense_prefill_s": dense_prefill, "dense_decode_tps": dense_tps, "rows": rows},
                      fh, indent=2)


if __name__ == "__main__":
    main()
