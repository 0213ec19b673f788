"""``entrodrop select``, and the drop plan every other command takes: from ``--plan``, from a scores
file, or selected after a fresh calibration."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..criteria import get_criterion
from ..plan import DropPlan
from ..scores import Scores
from ..select import select_blocks
from .common import add_selection_args, calibrate_from_args, progress_bar, windows_from_args


def format_plan(plan) -> str:
    """The plan as printed: criterion, protection facts, one line per dropped block."""
    lines = [f"criterion {plan.criterion}: {plan.describe()}"]
    for key in ("protect", "protected", "stage_boundary"):
        if key in plan.meta:
            lines.append(f"  {key}: {plan.meta[key]}")
    lines += [f"  drop {b.kind:<5} layer {b.layer:>3}  ({b.reason})" for b in plan.blocks]
    return "\n".join(lines)


def cmd_select(args) -> int:
    """Choose blocks from a scores JSON; print the plan, optionally write it."""
    scores = Scores.load(args.scores)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    plan = select_blocks(
        scores, args.criterion, args.kind, count=args.count, fraction=args.fraction,
        estimator=args.estimator, protect=args.protect, stage_boundary=args.stage_boundary, layers=layers,
    )
    print(format_plan(plan))
    if args.out:
        plan.save(args.out)
        print(f"plan written to {args.out}")
    return 0


def add_plan_args(p: argparse.ArgumentParser) -> None:
    """``--plan`` / ``--scores`` and the selection options, for commands that apply a plan."""
    p.add_argument("--plan", default=None, help="plan JSON (from `entrodrop select --out`) or blocks such as 'attn:3,attn:5'")
    p.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate first)")
    add_selection_args(p, model_criteria_too=True)


def plan_from_args(args, loaded, *, required: bool):
    """(plan, scores): from --plan (file or 'attn:3,mlp:5'), else selected from --scores or a fresh
    calibration with --criterion/--kind/--count; an empty plan when nothing asks for blocks."""
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
    if get_criterion(args.criterion).needs_model:
        from ..verify import iter_select_loss_verified

        if args.count is None:
            raise ValueError(f"The {args.criterion} criterion needs --count.")
        windows = windows_from_args(args, loaded.tokenizer)
        event = progress_bar(iter_select_loss_verified(
            loaded.model, scores, windows, kind=args.kind, count=args.count, estimator=args.estimator,
            protect=args.protect, batch_size=args.batch_size), "loss-verified selection")
        return event.partial, scores
    plan = select_blocks(scores, args.criterion, args.kind, count=args.count, fraction=args.fraction,
                         estimator=args.estimator, protect=args.protect, stage_boundary=args.stage_boundary)
    return plan, scores


def register(subparsers) -> None:
    """Add ``select`` to the ``entrodrop`` command's subparsers."""
    select = subparsers.add_parser("select", help="choose blocks to drop from a scores JSON")
    select.add_argument("scores", help="scores JSON written by `entrodrop scan --json`")
    add_selection_args(select)
    select.add_argument("--layers", default=None, help="with --criterion manual: comma-separated layers")
    select.add_argument("--out", default=None, help="write the plan JSON here")
    select.set_defaults(func=cmd_select)
