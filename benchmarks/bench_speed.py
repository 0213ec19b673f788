"""Speed of physically pruned models against the dense one on the bundled model, measured in one run.

    .venv/bin/python benchmarks/bench_speed.py [--repeats 5] [--threads 1] [--json out.json]
    .venv/bin/python benchmarks/bench_speed.py --contexts 2048,4096,8192 [--repeats 3] [--json out.json]

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

Long context (``--contexts 2048,4096,8192``): dense, 4 whole layers and 8 attention blocks (the same
selection). Each model reads one random prompt of each length in 1024-token chunks into its KV cache,
(only the last position's logits are computed), then greedy-decodes ``--decode-tokens`` tokens; the cache is cropped back to the prompt and the decode
repeated, the three models in turn each round. Reported per context: decode tokens per second and its
speed-up over dense (median over rounds) against the ideal from the decode FLOPs at that context, the
KV cache's bytes (read from the cache tensors, leaving out the one-number placeholder per token a dropped
attention keeps so the cache length stays right) against the bytes ``costs.BlockCosts`` predicts, and the peak
resident memory reading the prompt and decoding add over the process before (the KV cache and one
1024-token chunk's activations).

Threads: 1 by default. On a small machine shared with other jobs, a 2-thread forward stalls whenever
another process takes one of the cores (measured 3.6-10 s per 512-token forward with 2 threads
against 1.9-2.2 s with 1 thread, while browser tests ran); one thread keeps the ratios stable.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.costs import forward_flops, measure_block_costs
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


LONG_CONFIGS = (("none", 0), ("layer", 4), ("attn", 8))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Reset the kernel's resident high-water mark; return the resident bytes now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss_kib("VmRSS") * 1024


def read_prompt(model, ids: torch.Tensor, chunk: int = 1024):
    """The prompt into a fresh KV cache, ``chunk`` tokens per forward; (cache, first decoded token)."""
    cache, out = None, None
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
    return cache, out.logits[:, -1:].argmax(-1)


def cache_bytes(cache) -> int:
    """Bytes of the real keys and values: a dropped attention's one-number placeholders (head size 1,
    entrodrop.prune) only keep the cache's length right and are left out."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor) and t.shape[-1] > 1)


def timed_decode(model, cache, token: torch.Tensor, context: int, steps: int) -> float:
    """Tokens per second of ``steps`` greedy steps after ``context`` cached tokens (the cache is cropped back)."""
    if cache.get_seq_length() > context:
        cache.crop(context - cache.get_seq_length())  # a negative count: remove that many of the newest tokens
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


def long_context(args, loaded, scores) -> dict:
    """Decode speed, KV cache and peak memory at each context for dense, 4 layers and 8 attention blocks."""
    model = loaded.model
    costs = measure_block_costs(model, 1)
    contexts = [int(c) for c in args.contexts.split(",")]
    variants = []
    for kind, count in LONG_CONFIGS:
        plan, protect = choose(scores, kind, count)
        without = {b.layer for b in plan.blocks}  # attention gone: an attention block or a whole layer
        variants.append({"name": f"{kind} {count}" if count else "dense", "plan": plan, "protect": protect,
                         "layers": sorted(without), "model": prune_model(model, plan) if count else model,
                         "without": without})
    rows = []
    with torch.inference_mode():
        for context in contexts:
            ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
            state = {}
            for v in variants:
                base = _reset_peak()
                cache, token = read_prompt(v["model"], ids)
                timed_decode(v["model"], cache, token, context, 2)  # warm-up
                state[v["name"]] = {"cache": cache, "token": token, "tps": [],
                                    "peak_added": _rss_kib("VmHWM") * 1024 - base,
                                    "cache_bytes": cache_bytes(cache)}
            for _ in range(args.repeats):
                for v in variants:
                    st = state[v["name"]]
                    st["tps"].append(timed_decode(v["model"], st["cache"], st["token"], context, args.decode_tokens))
            dense = state["dense"]
            for v in variants:
                st = state[v["name"]]
                speedups = [p / d for p, d in zip(st["tps"], dense["tps"], strict=True)]
                flops = ideal(model, v["plan"], context, args.decode_tokens)[1]
                predicted = costs.kv_cache_bytes(context, v["without"])
                rows.append({"context": context, "drop": v["name"], "layers": v["layers"], "protect": v["protect"],
                             "decode_tps": statistics.median(st["tps"]),
                             "decode": summary(speedups, flops) if v["name"] != "dense" else None,
                             "kv_cache_bytes": st["cache_bytes"], "kv_cache_predicted_bytes": predicted,
                             "kv_saved": 1 - st["cache_bytes"] / dense["cache_bytes"],
                             "kv_saved_ideal": 1 - predicted / costs.kv_cache_bytes(context),
                             "peak_added_bytes": st["peak_added"]})
                del st["cache"]
    return {"contexts": contexts, "rows": rows}


def print_long_context(result: dict, name: str, threads: int, decode_tokens: int, repeats: int) -> None:
    print(f"{name}, {threads} thread(s): greedy decode of {decode_tokens} tokens after a prompt of each length, "
          f"median of {repeats} rounds")
    head = (f"{'context':>7} {'drop':<8} {'tok/s':>7} {'speed-up':>8} {'ideal':>6} {'of ideal':>8} "
            f"{'KV cache':>9} {'KV saved':>8} {'ideal':>6} {'peak added':>10}")
    print(head + "\n" + "-" * len(head))
    for row in result["rows"]:
        d = row["decode"]
        speed = f"{d['speedup']:>7.3f}x {d['ideal']:>5.3f}x {d['of_ideal']:>8.1%}" if d else f"{'-':>8} {'-':>6} {'-':>8}"
        print(f"{row['context']:>7} {row['drop']:<8} {row['decode_tps']:>7.1f} {speed} "
              f"{row['kv_cache_bytes'] / 2**20:>5.1f} MiB {row['kv_saved']:>8.1%} {row['kv_saved_ideal']:>6.1%} "
              f"{row['peak_added_bytes'] / 2**20:>6.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one warm-up round more)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see the docstring)")
    parser.add_argument("--contexts", default=None, help="e.g. 2048,4096,8192: the long-context decode instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2")
    model = loaded.model
    windows = make_windows(loaded.tokenizer, load_corpus("gsm8k"), num_samples=args.samples,
                           seq_len=args.seq_len, seed=0)
    scores = run_calibration(model, windows, spec=loaded.arch, settings=EstimatorSettings(estimators=("bucket",)))
    if args.contexts:
        result = long_context(args, loaded, scores)
        print_long_context(result, loaded.name, torch.get_num_threads(), args.decode_tokens, args.repeats)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"model": loaded.name, "threads": torch.get_num_threads(), "decode_tokens": args.decode_tokens,
                           "repeats": args.repeats, **result}, fh, indent=2)
        return

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
