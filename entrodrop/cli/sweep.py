"""``entrodrop sweep``: held-out quality of each criterion at each drop count, from one calibration."""

from __future__ import annotations

from ..criteria import get_criterion, model_criteria, ranked_criteria
from ..distributed import is_main
from ..scores import Scores
from ..select import PROTECTIONS
from ..verify import check_sweep
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
from .select import check_scores_fit


def check_counts(scores: Scores, criteria: list[str], counts: list[int], args) -> None:
    """Every (criterion, count) must be reachable under its protection: an unreachable one is an error,
    never a row silently left out (checked before the model loads when the scores are given)."""
    check_sweep(scores, criteria, args.kind, counts, estimator=args.estimator, protect=args.protect)


def cmd_sweep(args) -> int:
    """Print the sweep table; optionally write rows, data and calibration as JSON."""
    from ..verify import format_gaps, format_sweep_table, iter_sweep

    criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
    for name in criteria:
        get_criterion(name)  # an unknown name fails before the model loads
    if not criteria:
        raise ValueError(f"--criteria takes comma-separated criterion names; got {args.criteria!r}.")
    measured = any(get_criterion(name).needs_model for name in criteria)
    try:
        counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    except ValueError as exc:
        raise ValueError(f"--counts takes comma-separated whole numbers, e.g. 0,2,4,6,8; got {args.counts!r}.") from exc
    if not counts or counts[0] < 0:
        raise ValueError(f"--counts takes whole numbers of 0 or more, e.g. 0,2,4,6,8; got {args.counts!r}.")
    scores = Scores.load(args.scores) if args.scores else None
    if scores is not None:
        check_counts(scores, criteria, counts, args)  # before the model loads
    loaded = load_from_args(args)
    if scores is None:
        scores = calibrate_from_args(args, loaded)
        check_counts(scores, criteria, counts, args)
    check_scores_fit(scores, loaded)
    selection_windows = windows_from_args(args, loaded) if measured else None
    windows, eval_data = load_windows_from_args(args, loaded, num_samples=args.eval_samples, part=args.part)
    rows = progress_bar(iter_sweep(loaded.model, scores, windows, criteria=criteria, kind=args.kind, counts=counts,
                                   estimator=args.estimator, protect=args.protect,
                                   selection_windows=selection_windows, batch_size=args.batch_size),
                        "sweep").partial
    print(f"scored on the {eval_data['part']} part of {eval_data['data']}: {windows.shape[0]} windows x "
          f"{windows.shape[1]} tokens (seed {eval_data['seed']})")
    print(format_sweep_table(rows))
    gaps = format_gaps(rows, criteria[0]) if len(criteria) > 1 else ""
    if gaps:
        print(f"\n{criteria[0]}'s loss minus the lowest other criterion's, paired over the {windows.shape[0]} "
              f"{eval_data['part']} windows (within 2 errors is noise):")
        print(gaps)
    if args.json and is_main():
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
    sweep.add_argument("--criteria", default="recommended,entrodrop,cosine,angular",
                       help=f"comma-separated from {', '.join((*model_criteria(), *ranked_criteria()))} "
                            "(default recommended,entrodrop,cosine,angular)")
    add_kind_arg(sweep)
    sweep.add_argument("--counts", default="0,2,4,6,8", help="comma-separated drop counts (default 0,2,4,6,8)")
    sweep.add_argument("--estimator", default=None,
                       help="entropy estimator that ranks blocks (default: each criterion's own, knn for entrodrop)")
    sweep.add_argument("--protect", default=None, choices=PROTECTIONS,
                       help="protection for every criterion (default: each criterion's own)")
    sweep.add_argument("--eval-samples", type=int, default=16, help="windows per plan (default 16)")
    sweep.add_argument("--part", default="development", choices=("development", "report"),
                       help="which part of the text scores the plans: development (default; choose a criterion or "
                            "count on it) or report (quote a result chosen elsewhere; never choose on it)")
    sweep.add_argument("--json", default=None, help="write the sweep JSON here")
    sweep.set_defaults(func=cmd_sweep)
