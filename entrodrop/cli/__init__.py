"""The ``entrodrop`` command line: one module per command over the library API.

:mod:`.scan`, :mod:`.select`, :mod:`.prune`, :mod:`.evaluate` (``eval``), :mod:`.sweep` and
:mod:`.claims` each register their subcommand; :mod:`.common` holds the shared options, loading, calibration and the
tqdm adapter fed by the same events the web app streams; :mod:`.checks` the checks ``prune`` and
``eval`` run. Imports only go from a command to ``common``/``checks``/``select``, never back.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import claims, evaluate, prune, scan, select, sweep

logger = logging.getLogger("entrodrop")

_COMMANDS = (scan, select, prune, evaluate, sweep, claims)  # the order `entrodrop --help` lists them in


def build_parser() -> argparse.ArgumentParser:
    """The ``entrodrop`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="entrodrop",
        description="Score the blocks of a decoder LM by entropy increase and cosine similarity, "
        "choose blocks to drop, check and export the pruned model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `entrodrop` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "select" and args.count is None and args.fraction is None and args.criterion != "manual":
        parser.error("select needs --count or --fraction")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
