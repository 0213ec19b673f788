"""``entrodrop claims``: the paper's five claims scored on this model, as markdown and JSON.

Runs only what is cheap (one calibration, a second on ``--second-data``); sweeps and timings are read
from files the user wrote with ``entrodrop sweep --json`` and ``entrodrop eval --json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..scores import Scores
from .common import add_data_args, add_model_args, calibrate_from_args, load_from_args, write_json


def _read_json(path: str, what: str, command: str):
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"The {what} file {p} does not exist. Write one with `{command}`.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"The {what} file {p} is not valid JSON: {exc}") from exc


def cmd_claims(args) -> int:
    """Calibrate (or read scores), read sweeps and timings, print and write the claims report."""
    from ..claims import score_claims, speed_rows_from_json, sweep_rows_from_json

    sweeps = [row for path in args.sweep or []
              for row in sweep_rows_from_json(_read_json(path, "sweep", "entrodrop sweep MODEL --json FILE"), path)]
    speed = [row for path in args.speed or []
             for row in speed_rows_from_json(_read_json(path, "speed", "entrodrop eval MODEL --count N --json FILE"))]
    loaded = None
    if args.scores:
        scores = Scores.load(args.scores)
    else:
        loaded = load_from_args(args)
        scores = calibrate_from_args(args, loaded)
    second = None
    if args.second_scores:
        second = Scores.load(args.second_scores)
    elif args.second_data:
        loaded = loaded or load_from_args(args)
        second = calibrate_from_args(argparse.Namespace(**{**vars(args), "data": args.second_data}), loaded)
    report = score_claims(scores, second_scores=second, sweeps=sweeps, speed=speed,
                          estimator=args.estimator, kind=args.kind, top_k=args.top_k)
    markdown = report.to_markdown()
    print(markdown)
    if args.md:
        Path(args.md).write_text(markdown)
        print(f"written to {args.md}")
    if args.json:
        write_json(args.json, report.to_dict())
    return 0


def register(subparsers) -> None:
    """Add ``claims`` to the ``entrodrop`` command's subparsers."""
    claims = subparsers.add_parser("claims", help="score the paper's five claims on this model from your measurements")
    add_model_args(claims)
    add_data_args(claims)
    claims.add_argument("--scores", default=None, help="scores JSON from `entrodrop scan --json` (else calibrate)")
    claims.add_argument("--second-data", default=None,
                        help="calibrate again on this text (e.g. gpqa) to test robustness to the calibration data")
    claims.add_argument("--second-scores", default=None, help="scores JSON of a calibration on other text")
    claims.add_argument("--sweep", action="append", default=None,
                        help="sweep JSON from `entrodrop sweep --json` (repeatable: one per estimator)")
    claims.add_argument("--speed", action="append", default=None,
                        help="eval JSON with a speed measurement from `entrodrop eval --json` (repeatable: one per count)")
    claims.add_argument("--estimator", default="bucket", help="estimator for claims 1-3 (default bucket)")
    claims.add_argument("--kind", default="attn", choices=("attn", "mlp", "layer"),
                        help="block granularity for the rank comparisons (default attn)")
    claims.add_argument("--top-k", type=int, default=None, help="size of the top sets compared in claim 3 (default L/4)")
    claims.add_argument("--md", default=None, help="write the markdown report here")
    claims.add_argument("--json", default=None, help="write the JSON report here")
    claims.set_defaults(func=cmd_claims)
