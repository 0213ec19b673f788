"""The checks ``prune`` and ``eval`` run on a plan (held-out quality, speed, generations) and their text."""

from __future__ import annotations

import argparse

from .common import heldout_windows, progress

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Explain in two sentences why the sky is blue.",
)


def add_check_args(p: argparse.ArgumentParser, *, speed_default: bool) -> None:
    """Held-out windows, prompts and timing options; ``speed_default`` says whether timing is opt-out."""
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows for the quality checks (0: skip)")
    p.add_argument("--prompt", action="append", default=None, help="prompt for side-by-side generation (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per prompt (0: skip generation)")
    if speed_default:
        p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the speed measurement")
    else:
        p.add_argument("--speed", action="store_true", help="also measure prefill latency and decode tokens/s")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for the prefill timing")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded for the tokens/s timing")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds (median reported)")


def run_checks(args, loaded, plan) -> dict:
    """Quality on held-out windows, optional speed, greedy generations; what the card shows."""
    from ..evaluate import iter_compare, iter_measure_speed, iter_side_by_side

    checks: dict = {}
    if args.eval_samples > 0:
        windows = heldout_windows(args, loaded)
        checks["quality"] = progress(iter_compare(loaded.model, plan, windows, batch_size=args.batch_size),
                                     "checking quality").partial
        checks["eval_data"] = {"data": args.data, "part": "heldout", "samples": int(windows.shape[0]),
                               "seq_len": int(windows.shape[1]), "seed": args.seed}
    if args.speed:
        checks["speed"] = progress(iter_measure_speed(
            loaded.model, plan, loaded.tokenizer, prefill_tokens=args.prefill_tokens,
            decode_tokens=args.decode_tokens, repeats=args.repeats), "timing", unit="round").partial
    prompts = args.prompt if args.prompt else list(DEFAULT_PROMPTS)
    if args.max_new_tokens > 0 and prompts:
        checks["generations"] = progress(iter_side_by_side(
            loaded.model, plan, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens),
            "generating", unit="prompt").partial
    return checks


def format_checks(checks: dict) -> str:
    """The checks as printed: perplexity, KL, top-1, parameters, timings, generations."""
    lines = []
    q = checks.get("quality")
    if q is not None:
        lines += [
            f"perplexity   dense {q.dense_perplexity:.3f}   pruned {q.pruned_perplexity:.3f}   "
            f"(x{q.perplexity_ratio:.3f})",
            f"KL(dense||pruned) {q.kl_mean:.4f} nats/token   top-1 agreement {q.top1_agreement:.3f}   "
            f"({q.num_windows} windows, {q.num_tokens} tokens)",
            f"parameters   dense {q.dense_params:,}   pruned {q.pruned_params:,}   "
            f"({q.dense_bytes / 2**20:.1f} -> {q.pruned_bytes / 2**20:.1f} MiB)",
        ]
    s = checks.get("speed")
    if s is not None:
        lines += [
            f"prefill {s.prefill_tokens} tokens   dense {s.dense_prefill_s * 1e3:.1f} ms   pruned "
            f"{s.pruned_prefill_s * 1e3:.1f} ms   (x{s.prefill_speedup:.2f}; ideal x{s.ideal_speedup:.2f})",
            f"decode       dense {s.dense_decode_tps:.1f} tok/s   pruned {s.pruned_decode_tps:.1f} tok/s   "
            f"(x{s.decode_speedup:.2f})",
        ]
    for row in checks.get("generations") or []:
        lines += [f"prompt: {row['prompt']}", f"  dense : {row['dense']!r}", f"  pruned: {row['pruned']!r}"]
    return "\n".join(lines)
