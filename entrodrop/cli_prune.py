"""``entrodrop prune``, ``entrodrop eval`` and ``entrodrop sweep``: apply, check and export plans.

Registered on the main parser by :func:`register`; each command is a thin shell over
:mod:`entrodrop.evaluate`, :mod:`entrodrop.export` and :mod:`entrodrop.verify`, with tqdm bars fed
by the library's progress events.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli import (
    add_data_args,
    add_model_args,
    add_selection_args,
    calibrate_from_args,
    format_plan,
    load_from_args,
    windows_from_args,
)
from .plan import DropPlan
from .scores import Scores
from .select import PROTECTIONS

logger = logging.getLogger("entrodrop")

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Explain in two sentences why the sky is blue.",
)


# -- helpers -------------------------------------------------------------------------------------
def _progress(events, desc: str, unit: str = "batch"):
    """Drive an event generator with a tqdm bar (restarted at each new stage); returns the last event."""
    from tqdm.auto import tqdm

    last = None
    stage = None
    with tqdm(desc=desc, unit=unit, file=sys.stderr) as bar:
        for last in events:
            if last.stage != stage:
                stage = last.stage
                bar.reset(total=last.total)
                bar.set_description(f"{desc} ({stage})" if stage not in desc else desc)
            bar.total = last.total
            bar.n = last.done
            bar.refresh()
    return last


def _heldout_windows(args, tokenizer):
    eval_args = argparse.Namespace(**{**vars(args), "samples": args.eval_samples})
    return windows_from_args(eval_args, tokenizer, part="heldout")


def _plan_from_args(args, loaded, *, required: bool):
    """(plan, scores): from --plan (file or 'attn:3,mlp:5'), else selected from --scores or a fresh
    calibration with --criterion/--kind/--count; an empty plan when nothing asks for blocks."""
    from .select import select_blocks

    L = loaded.num_layers
    if args.plan:
        plan = DropPlan.load(args.plan) if Path(args.plan).suffix == ".json" or Path(args.plan).is_file() \
            else DropPlan.parse(args.plan, L)
        scores = Scores.load(args.scores) if args.scores else None
        return plan, scores
    if args.count is None and args.fraction is None:
        if required:
            raise ValueError("Say what to drop: --plan PLAN.json|'attn:3,attn:5', or --count N (with --scores "
                             "S.json, or calibrating with --data first).")
        return DropPlan(L, []), None
    scores = Scores.load(args.scores) if args.scores else calibrate_from_args(args, loaded)
    if scores.num_layers != L:
        raise ValueError(f"The scores are for a model with {scores.num_layers} layers; this one has {L}.")
    if args.criterion == "loss":
        from .verify import iter_select_loss_verified

        if args.count is None:
            raise ValueError("The loss criterion needs --count.")
        windows = windows_from_args(args, loaded.tokenizer)
        event = _progress(iter_select_loss_verified(
            loaded.model, scores, windows, kind=args.kind, count=args.count, estimator=args.estimator,
            protect=args.protect, batch_size=args.batch_size), "loss-verified selection", unit="eval")
        return event.partial, scores
    plan = select_blocks(scores, args.criterion, args.kind, count=args.count, fraction=args.fraction,
                         estimator=args.estimator, protect=args.protect, stage_boundary=args.stage_boundary)
    return plan, scores


def _run_checks(args, loaded, plan) -> dict:
    """Quality on held-out windows, optional speed, greedy generations; what the card shows."""
    from .evaluate import iter_compare, iter_measure_speed, iter_side_by_side

    checks: dict = {}
    if args.eval_samples > 0:
        windows = _heldout_windows(args, loaded.tokenizer)
        checks["quality"] = _progress(iter_compare(loaded.model, plan, windows, batch_size=args.batch_size),
                                      "checking quality").partial
        checks["eval_data"] = {"data": args.data, "part": "heldout", "samples": int(windows.shape[0]),
                               "seq_len": int(windows.shape[1]), "seed": args.seed}
    if args.speed:
        checks["speed"] = _progress(iter_measure_speed(
            loaded.model, plan, loaded.tokenizer, prefill_tokens=args.prefill_tokens,
            decode_tokens=args.decode_tokens, repeats=args.repeats), "timing", unit="round").partial
    prompts = args.prompt if args.prompt else list(DEFAULT_PROMPTS)
    if args.max_new_tokens > 0 and prompts:
        checks["generations"] = _progress(iter_side_by_side(
            loaded.model, plan, loaded.tokenizer, prompts, max_new_tokens=args.max_new_tokens),
            "generating", unit="prompt").partial
    return checks


def format_checks(checks: dict) -> str:
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


def _write_json(path: str, data) -> None:
    from .export import jsonable

    Path(path).write_text(json.dumps(jsonable(data), indent=1))
    print(f"written to {path}")


# -- commands ------------------------------------------------------------------------------------
def cmd_prune(args) -> int:
    from .export import ModelSource, TargetNotEmptyError, check_target, export_pruned

    try:
        check_target(args.out, args.overwrite)  # a busy or unwritable --out fails before any heavy work
    except TargetNotEmptyError as exc:
        raise ValueError(f"{exc.path} is not empty. Pass --overwrite to replace it, or choose an empty folder.") \
            from exc
    loaded = load_from_args(args)
    plan, scores = _plan_from_args(args, loaded, required=True)
    print(format_plan(plan))
    checks = _run_checks(args, loaded, plan)
    if checks:
        print(format_checks(checks))
    try:
        # export_pruned takes the criterion from the plan and the calibration settings from the scores
        result = export_pruned(loaded.model, loaded.tokenizer, plan, args.out, scores=scores, checks=checks,
                               source=ModelSource.of(loaded), overwrite=args.overwrite,
                               write_remote_code=args.remote_code)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.verdict)
    print(f"written to {result.path}; reload with:\n{result.reload_hint}")
    return 0 if result.ok else 1


def cmd_eval(args) -> int:
    loaded = load_from_args(args)
    plan, _ = _plan_from_args(args, loaded, required=False)
    print(format_plan(plan))
    checks = _run_checks(args, loaded, plan)
    print(format_checks(checks))
    if args.json:
        _write_json(args.json, {"model": loaded.name, "plan": plan, **checks})
    return 0


def cmd_sweep(args) -> int:
    from .verify import LOSS_CRITERION, format_sweep_table, iter_sweep

    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    try:
        counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    except ValueError as exc:
        raise ValueError(f"--counts takes comma-separated integers, e.g. 0,2,4,6,8 ({exc}).") from exc
    loaded = load_from_args(args)
    scores = Scores.load(args.scores) if args.scores else calibrate_from_args(args, loaded)
    selection_windows = windows_from_args(args, loaded.tokenizer) if LOSS_CRITERION in criteria else None
    windows = _heldout_windows(args, loaded.tokenizer)
    rows = _progress(iter_sweep(loaded.model, scores, windows, criteria=criteria, kind=args.kind, counts=counts,
                                estimator=args.estimator, protect=args.protect,
                                selection_windows=selection_windows, batch_size=args.batch_size),
                     "sweep", unit="step").partial
    print(format_sweep_table(rows))
    if args.json:
        _write_json(args.json, {"model": loaded.name, "kind": args.kind, "estimator": args.estimator,
                                "eval_data": {"data": args.data, "part": "heldout", "samples": int(windows.shape[0]),
                                              "seq_len": int(windows.shape[1])},
                                "calibration": scores.calibration, "rows": rows})
    return 0


# -- registration --------------------------------------------------------------------------------
def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default=None, help="plan JSON (from `entrodrop select --out`) or blocks such as 'attn:3,attn:5'")
    p.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate first)")
    add_selection_args(p, extra_criteria=("loss",))


def _add_check_args(p: argparse.ArgumentParser, *, speed_default: bool) -> None:
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


def register(subparsers) -> None:
    """Add ``prune``, ``eval`` and ``sweep`` to the ``entrodrop`` command's subparsers."""
    prune = subparsers.add_parser("prune", help="drop blocks, check the result and export a reloadable model")
    add_model_args(prune)
    add_data_args(prune)
    _add_plan_args(prune)
    _add_check_args(prune, speed_default=False)
    prune.add_argument("--out", required=True, help="folder to write (must be empty unless --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    prune.add_argument("--remote-code", action="store_true",
                       help="sub-block plans: also write modeling_entrodrop.py so from_pretrained(DIR, "
                            "trust_remote_code=True) reloads without EntroDrop")
    prune.set_defaults(func=cmd_prune)

    evaluate = subparsers.add_parser("eval", help="perplexity, KL, top-1, speed and generations: dense vs a plan")
    add_model_args(evaluate)
    add_data_args(evaluate)
    _add_plan_args(evaluate)
    _add_check_args(evaluate, speed_default=True)
    evaluate.add_argument("--json", default=None, help="write the checks JSON here")
    evaluate.set_defaults(func=cmd_eval)

    sweep = subparsers.add_parser("sweep", help="quality of each criterion at each drop count, from one calibration")
    add_model_args(sweep)
    add_data_args(sweep)
    sweep.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate)")
    sweep.add_argument("--criteria", default="entrodrop,cosine,angular",
                       help="comma-separated from entrodrop, cosine, angular, loss (default entrodrop,cosine,angular)")
    sweep.add_argument("--kind", default="attn", choices=("attn", "mlp", "layer"), help="granularity (default attn)")
    sweep.add_argument("--counts", default="0,2,4,6,8", help="comma-separated drop counts (default 0,2,4,6,8)")
    sweep.add_argument("--estimator", default="bucket", help="entropy estimator that ranks blocks (default bucket)")
    sweep.add_argument("--protect", default=None, choices=PROTECTIONS,
                       help="protection for every criterion (default: each criterion's own)")
    sweep.add_argument("--eval-samples", type=int, default=16, help="held-out windows per plan (default 16)")
    sweep.add_argument("--json", default=None, help="write the sweep JSON here")
    sweep.set_defaults(func=cmd_sweep)
