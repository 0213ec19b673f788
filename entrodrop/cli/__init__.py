"""The ``entrodrop`` command line: one module per command over the library API.

:mod:`.scan`, :mod:`.select`, :mod:`.prune`, :mod:`.heal`, :mod:`.evaluate` (``eval``), :mod:`.sweep` and
:mod:`.claims` each register their subcommand; :mod:`.common` holds the shared options, loading, calibration and the
tqdm adapter fed by the same events the web app streams; :mod:`.checks` the checks ``prune`` and
``eval`` run. Imports only go from a command to ``common``/``checks``/``select``, never back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from ..distributed import leave, world
from . import claims, evaluate, heal, prune, scan, select, sweep
from .common import check_args

logger = logging.getLogger("entrodrop")

_COMMANDS = (scan, select, prune, heal, evaluate, sweep, claims)  # the order `entrodrop --help` lists them in


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


def error_line(exc: BaseException) -> str:
    """``exc`` as one line for a person: an OSError's reason and file, else the library's message."""
    if isinstance(exc, OSError) and exc.strerror and not str(exc).startswith(exc.strerror):
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    elif isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


# the commands that split their windows across the processes of `accelerate launch` (entrodrop.distributed)
DATA_PARALLEL = ("scan", "select", "sweep")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `entrodrop` console script; returns the exit code.

    Every failure is one line ``entrodrop: error: ...`` on stderr: exit 2 for what the user must change
    (ValueError, TypeError), 1 for the system (OSError: a path, a permission, a full disk) and for
    anything unexpected (``-v`` shows its traceback), 130 for Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "select" and args.count is None and args.fraction is None and args.criterion != "manual":
        parser.error("select needs --count or --fraction")
    code = _run(args)
    if code == 0:
        leave()  # under accelerate launch: every process done before any leaves the group
    return code


def _run(args) -> int:
    """Run the parsed command in this process; returns the exit code (see :func:`main`)."""
    processes = world()
    if processes.size > 1 and args.command not in DATA_PARALLEL:
        if processes.is_main:
            print(f"entrodrop: error: {args.command} runs in one process; start it without accelerate launch "
                  f"(the commands that split their windows across processes are {', '.join(DATA_PARALLEL)}).",
                  file=sys.stderr)
        return 2
    try:
        check_args(args)
        if processes.is_main:
            return args.func(args)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # only the main process prints
            return args.func(args)
    except (ValueError, TypeError, KeyError) as exc:
        code, exc_ = 2, exc
    except OSError as exc:
        code, exc_ = 1, exc
    except KeyboardInterrupt:
        print("entrodrop: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or a library failure: still one line; -v shows where
        if args.verbose:
            logger.exception("Unexpected error")
        print(f"entrodrop: error: unexpected {type(exc).__name__}: {error_line(exc)} (run with -v for details)",
              file=sys.stderr)
        return 1
    if args.verbose:
        logger.info("Error details", exc_info=exc_)
    print(f"entrodrop: error: {error_line(exc_)}", file=sys.stderr)
    return code
