"""``entrodrop eval``: perplexity, KL, top-1, speed and generations of a plan against the dense model."""

from __future__ import annotations

from ..checks import checks_text
from .checks import add_check_args, run_checks
from .common import add_data_args, add_model_args, load_from_args, write_json
from .select import add_plan_args, format_plan, plan_from_args


def cmd_eval(args) -> int:
    """Check a plan (an empty one measures the dense model alone); optionally write the checks JSON."""
    loaded = load_from_args(args)
    plan, _ = plan_from_args(args, loaded, required=False)
    print(format_plan(plan))
    checks = run_checks(args, loaded, plan)
    print(checks_text(checks))
    if args.json:
        write_json(args.json, {"model": loaded.name, "plan": plan, **checks.to_dict()})
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``entrodrop`` command's subparsers."""
    evaluate = subparsers.add_parser("eval", help="perplexity, KL, top-1, speed and generations: dense vs a plan")
    add_model_args(evaluate)
    add_data_args(evaluate)
    add_plan_args(evaluate)
    add_check_args(evaluate, speed_default=True)
    evaluate.add_argument("--json", default=None, help="write the checks JSON here")
    evaluate.set_defaults(func=cmd_eval)
