"""``entrodrop select``, and the drop plan every other command takes: from ``--plan``, from a scores
file, or selected after a fresh calibration."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..criteria import get_criterion
from ..distributed import is_main
from ..plan import DropPlan
from ..race import race_lines
from ..scores import Scores
from ..select import select_blocks
from .common import add_selection_args, calibrate_from_args, progress_bar, windows_from_args

logger = logging.getLogger("entrodrop")


def format_plan(plan) -> str:
    """The plan as printed: criterion, protection facts, one line per dropped block."""
    lines = [f"criterion {plan.criterion}: {plan.describe()}"]
    for key in ("protect", "protected", "stage_boundary"):
        if key in plan.meta:
            lines.append(f"  {key}: {plan.meta[key]}")
    lines += [f"  drop {b.kind:<5} layer {b.layer:>3}  ({b.reason})" for b in plan.blocks]
    race = race_lines(plan.meta)
    if race:
        lines += ["  " + race[0].replace("**", ""), *(f"    {line}" for line in race[1:])]
    return "\n".join(lines)


def select_checked(scores: Scores, args, **kwargs):
    """``select_blocks`` with the selection options, refusing a plan with fewer blocks than asked for
    (never an empty or short plan with exit 0)."""
    plan = select_blocks(scores, args.criterion, args.kind, count=args.count, fraction=args.fraction,
                         estimator=args.estimator, protect=args.protect, stage_boundary=args.stage_boundary, **kwargs)
    asked = plan.meta.get("count")
    if args.fraction is not None and asked == 0:
        raise ValueError(f"--fraction {args.fraction} of {scores.num_layers} {args.kind} blocks rounds to 0 blocks; "
                         "give a larger fraction or --count.")
    if isinstance(asked, int) and len(plan.blocks) != asked:
        protected = plan.meta.get("protected", [])
        raise ValueError(f"Only {len(plan.blocks)} of the {asked} {args.kind} blocks asked for could be chosen with "
                         f"--criterion {args.criterion} (protected layers: {protected or 'none'}). Ask for fewer, or "
                         "change --protect.")
    return plan


def check_scores_fit(scores: Scores, loaded) -> None:
    """Scores must be of this model's shape; a different model name is worth a warning (a renamed copy is fine)."""
    if scores.num_layers != loaded.num_layers:
        raise ValueError(f"The scores are for a model with {scores.num_layers} layers ({scores.model}); "
                         f"{loaded.name} has {loaded.num_layers}. Use scores from `entrodrop scan` of this model.")
    if scores.model != loaded.name:
        logger.warning("The scores were measured on '%s', not on '%s': the plan may not fit this model.",
                       scores.model, loaded.name)


def cmd_select(args) -> int:
    """Choose blocks from a scores JSON; print the plan, optionally write it."""
    scores = Scores.load(args.scores)
    if args.criterion == "manual" and not args.layers:
        raise ValueError("--criterion manual needs --layers, e.g. --layers 3,7.")
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
    except ValueError as exc:
        raise ValueError(f"--layers takes comma-separated layer numbers, e.g. 3,7; got {args.layers!r}.") from exc
    plan = select_checked(scores, args, layers=layers)
    print(format_plan(plan))
    if args.out and is_main():
        plan.save(args.out)
        print(f"plan written to {args.out}")
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """``--plan`` / ``--scores`` and the selection options, for commands that apply a plan."""
    p.add_argument("--plan", default=None, help="plan JSON (from `entrodrop select --out`) or blocks such as 'attn:3,attn:5'")
    p.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate first)")
    add_selection_args(p, measured=True)


def plan_from_args(args, loaded, *, required: bool):
    """(plan, scores): from --plan (file or 'attn:3,mlp:5'), else selected from --scores or a fresh
    calibration with --criterion/--kind/--count; an empty plan when nothing asks for blocks."""
    L = loaded.num_layers
    if args.plan:
        plan = DropPlan.load(args.plan) if Path(args.plan).suffix == ".json" or Path(args.plan).is_file() \
            else DropPlan.parse(args.plan, L)
        if plan.num_layers != L:
            raise ValueError(f"The plan is for a model with {plan.num_layers} layers; {loaded.name} has {L}.")
        scores = Scores.load(args.scores) if args.scores else None
        if scores is not None:
            check_scores_fit(scores, loaded)
        return plan, scores
    if args.count is None and args.fraction is None:
        if required:
            raise ValueError("Say what to drop: --plan PLAN.json|'attn:3,attn:5', or --count N (with --scores "
                             "S.json, or calibrating with --data first).")
        return DropPlan(L, []), None
    if args.criterion == "manual":
        raise ValueError("To drop blocks by hand, give them with --plan, e.g. --plan attn:3,attn:7.")
    scores = Scores.load(args.scores) if args.scores else calibrate_from_args(args, loaded)
    check_scores_fit(scores, loaded)
    if get_criterion(args.criterion).needs_model:
        from ..search import iter_select

        if args.count is None:
            raise ValueError(f"The {args.criterion} criterion needs --count.")
        windows = windows_from_args(args, loaded)  # calibration windows: never the held-out part
        event = progress_bar(iter_select(
            loaded.model, scores, windows, criterion=args.criterion, kind=args.kind, count=args.count,
            estimator=args.estimator, protect=args.protect, batch_size=args.batch_size),
            f"{args.criterion} selection")
        return event.partial, scores
    return select_checked(scores, args), scores


def register(subparsers) -> None:
    """Add ``select`` to the ``entrodrop`` command's subparsers."""
    select = subparsers.add_parser("select", help="choose blocks to drop from a scores JSON")
    select.add_argument("scores", help="scores JSON written by `entrodrop scan --json`")
    add_selection_args(select)
    select.add_argument("--layers", default=None, help="with --criterion manual: comma-separated layers")
    select.add_argument("--out", default=None, help="write the plan JSON here")
    select.set_defaults(func=cmd_select)
