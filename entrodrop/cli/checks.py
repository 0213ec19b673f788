"""The checks ``prune`` and ``eval`` run on a plan (held-out quality, speed, generations); the text is
:func:`entrodrop.checks.checks_text`."""

from __future__ import annotations

import argparse

from .common import data_from_args, progress_bar

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


def run_checks(args, loaded, plan, pruned_model=None):
    """Quality on the report part, optional speed, greedy generations: the
    :class:`~entrodrop.checks.ChecksResult` the table and the card show (of ``pruned_model``, a physically
    pruned copy such as a healed one, when given; else of the plan's preview)."""
    from ..checks import iter_checks

    events = iter_checks(
        loaded.model, plan, loaded.tokenizer, data=data_from_args(args), eval_samples=args.eval_samples,
        seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size, speed=args.speed,
        prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
        prompts=args.prompt or DEFAULT_PROMPTS, max_new_tokens=args.max_new_tokens, pruned_model=pruned_model)
    return progress_bar(events, "checks").partial
