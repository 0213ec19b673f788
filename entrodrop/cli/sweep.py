"""``entrodrop sweep``: held-out quality of each criterion at each drop count, from one calibration."""

from __future__ import annotations

from ..criteria import get_criterion, model_criteria, ranked_criteria
from ..scores import Scores
from ..select import PROTECTIONS
from .common import (
    add_data_args,
    add_kind_arg,
    add_model_args,
    calibrate_from_args,
    load_from_args,
    load_windows_from_args,
    progress_bar,
    windows_from_args,
    write_json,
)


def cmd_sweep(args) -> int:
    """Print the sweep table; optionally write rows, data and calibration as JSON."""
    from ..verify import format_sweep_table, iter_sweep

    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    try:
        counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    except ValueError as exc:
        raise ValueError(f"--counts takes comma-separated integers, e.g. 0,2,4,6,8 ({exc}).") from exc
    needs_model = any(get_criterion(c).needs_model for c in criteria)  # an unknown name fails before loading
    loaded = load_from_args(args)
    scores = Scores.load(args.scores) if args.scores else calibrate_from_args(args, loaded)
    selection_windows = windows_from_args(args, loaded.tokenizer) if needs_model else None
    windows, eval_data = load_windows_from_args(args, loaded.tokenizer, num_samples=args.eval_samples, part="heldout")
    rows = progress_bar(iter_sweep(loaded.model, scores, windows, criteria=criteria, kind=args.kind, counts=counts,
                                   estimator=args.estimator, protect=args.protect,
                                   selection_windows=selection_windows, batch_size=args.batch_size),
                        "sweep").partial
    print(format_sweep_table(rows))
    if args.json:
        write_json(args.json, {"model": loaded.name, "kind": args.kind, "estimator": args.estimator,
                               "eval_data": eval_data,
                               "calibration": scores.calibration, "rows": rows})
    return 0


def register(subparsers) -> None:
    """Add ``sweep`` to the ``entrodrop`` command's subparsers."""
    sweep = subparsers.add_parser("sweep", help="quality of each criterion at each drop count, from one calibration")
    add_model_args(sweep)
    add_data_args(sweep)
    sweep.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate)")
    sweep.add_argument("--criteria", default="entrodrop,cosine,angular",
                       help=f"comma-separated from {', '.join((*ranked_criteria(), *model_criteria()))} "
                            "(default entrodrop,cosine,angular)")
    add_kind_arg(sweep)
    sweep.add_argument("--counts", default="0,2,4,6,8", help="comma-separated drop counts (default 0,2,4,6,8)")
    sweep.add_argument("--estimator", default="bucket", help="entropy estimator that ranks blocks (default bucket)")
    sweep.add_argument("--protect", default=None, choices=PROTECTIONS,
                       help="protection for every criterion (default: each criterion's own)")
    sweep.add_argument("--eval-samples", type=int, default=16, help="held-out windows per plan (default 16)")
    sweep.add_argument("--json", default=None, help="write the sweep JSON here")
    sweep.set_defaults(func=cmd_sweep)
