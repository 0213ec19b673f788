"""What every ``entrodrop`` command shares: model, data and selection options, loading, windows,
calibration, and the one tqdm adapter that shows the library's progress events."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..arch import BLOCK_KINDS
from ..calibrate import EstimatorSettings
from ..criteria import DEFAULT_CRITERION, model_criteria, score_criteria
from ..distributed import is_main
from ..estimators import ENTROPY_ESTIMATORS
from ..scores import Scores
from ..select import PROTECTIONS

logger = logging.getLogger("entrodrop")


# -- shared option groups ---------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model positional and how to load it (dtype, device, device map, remote code)."""
    p.add_argument("model", nargs="?", default="smollm2",
                   help="bundled alias (smollm2, gemma3-270m), local HF folder, .gguf file or hub id (default: smollm2)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models larger than one device, e.g. 'auto' (with CPU/disk offload)")
    p.add_argument("--offload-folder", default=None, help="folder for disk offload with --device-map")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Calibration text, windows and estimator settings."""
    p.add_argument("--data", default="gsm8k",
                   help="gsm8k | gpqa | a .txt/.jsonl/.csv/.parquet file | a datasets name such as wikitext:wikitext-2-raw-v1")
    p.add_argument("--column", default=None, help="text column for .jsonl/.csv/.parquet/datasets sources")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed that picks the windows (default 0)")
    p.add_argument("--estimators", default="bucket,knn",
                   help=f"comma-separated entropy estimators from {','.join(ENTROPY_ESTIMATORS)} (default bucket,knn)")
    p.add_argument("--bins", type=int, default=20, help="bucket estimator: histogram bins per dimension")
    p.add_argument("--knn-k", type=int, default=25, help="knn estimator: neighbour rank k")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="statistics on a second thread while the next batch's forward runs (same scores); auto: on "
                        "where torch leaves CPU cores idle, off where the two would compete for them (default auto)")
    p.add_argument("--skip-first", type=int, default=0,
                   help="leave the first N tokens of every window out of the statistics (attention sink); default 0")


def add_selection_args(p: argparse.ArgumentParser, *, count_required: bool = False, measured: bool = False) -> None:
    """Criterion, granularity, how many blocks, estimator and protection.

    ``measured``: the command has the model at hand, so criteria that measure it are offered and
    ``recommended`` is the default; otherwise (``select`` reads a scores file only) entrodrop is."""
    choices = (*model_criteria(), *score_criteria()) if measured else score_criteria()
    default = DEFAULT_CRITERION if measured else "entrodrop"
    help_text = f"how blocks are chosen (default {default})"
    if measured:
        help_text += ("; recommended and ablation are ours and measure the loss on calibration windows; "
                      "entrodrop is the paper's as released (knn, layers 0, 1, L-1 protected)")
    p.add_argument("--criterion", default=default, choices=choices, help=help_text)
    add_kind_arg(p)
    group = p.add_mutually_exclusive_group(required=count_required)
    group.add_argument("--count", type=int, default=None, help="number of blocks to drop")
    group.add_argument("--fraction", type=float, default=None, help="share of the L blocks of that kind to drop")
    p.add_argument("--estimator", default=None,
                   help="entropy estimator that ranks blocks (default: the criterion's own, knn for entrodrop)")
    p.add_argument("--protect", default=None, choices=PROTECTIONS,
                   help="released: layers 0,1,L-1 (entrodrop default); stage: compression stage + last layer; "
                        "none (default of every other criterion)")
    p.add_argument("--stage-boundary", type=int, default=None, help="override the detected stage boundary")


# -- checks before any work ----------------------------------------------------------------------
# option -> smallest value it takes (argparse checks types; these are the ranges)
_MINIMUM = {"samples": 1, "seq_len": 2, "batch_size": 1, "bins": 2, "knn_k": 1, "skip_first": 0, "seed": 0,
            "eval_samples": 0, "max_new_tokens": 0, "prefill_tokens": 1, "decode_tokens": 1, "repeats": 1,
            "count": 0, "steps": 1, "rank": 1, "train_windows": 1, "val_windows": 1, "batch_windows": 1,
            "validate_every": 1}


def check_args(args) -> None:
    """Refuse option values out of range (``--batch-size 0``, ``--samples -1``...) before anything loads."""
    for name, minimum in _MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")
    fraction = getattr(args, "fraction", None)
    if fraction is not None and not 0 < fraction < 1:
        raise ValueError(f"--fraction must be between 0 and 1 (exclusive), got {fraction}.")
    estimators = getattr(args, "estimators", None)
    if estimators is not None:
        names = [e.strip() for e in estimators.split(",") if e.strip()]
        unknown = [e for e in names if e not in ENTROPY_ESTIMATORS]
        if not names or unknown:
            raise ValueError(f"--estimators takes names from {','.join(ENTROPY_ESTIMATORS)}, got {estimators!r}.")


def add_kind_arg(p: argparse.ArgumentParser) -> None:
    """``--kind``: which blocks (attention, MLP or whole layers)."""
    p.add_argument("--kind", default="attn", choices=BLOCK_KINDS, help="granularity (default attn)")


# -- model, text, calibration -----------------------------------------------------------------
def load_from_args(args):
    """The :class:`~entrodrop.loading.LoadedModel` the model options name; loader messages go to the log.

    Where reading the config is cheap (not a GGUF file, whose header alone takes seconds to parse), it
    is read first, so a ``--seq-len`` beyond the model's positions fails before any weight loads; the
    windows are checked against the loaded model's config in any case."""
    from ..loading import check_seq_len, load_config, load_model, resolve_model_spec

    if getattr(args, "seq_len", None) is not None and not resolve_model_spec(args.model).gguf_file:
        try:
            check_seq_len(load_config(args.model, trust_remote_code=args.trust_remote_code), args.seq_len)
        except ValueError as exc:
            raise ValueError(str(exc).replace("seq_len=", "--seq-len ")) from exc
    return load_model(
        args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
        offload_folder=args.offload_folder, trust_remote_code=args.trust_remote_code,
        progress=lambda msg: logger.info(msg),
    )


def windows_from_args(args, loaded, part: str = "calibration"):
    """Token windows of one part (:mod:`entrodrop.split`) of the text the data options name, for ``loaded``
    (a :class:`~entrodrop.loading.LoadedModel`: its config bounds the window length)."""
    return load_windows_from_args(args, loaded, part=part)[0]


def load_windows_from_args(args, loaded, *, num_samples: int | None = None, part: str = "calibration"):
    """(windows, description) as :func:`entrodrop.checks.load_windows` gives them, from the data options."""
    from ..checks import load_windows

    return load_windows(loaded.tokenizer, data_from_args(args),
                        num_samples=args.samples if num_samples is None else num_samples,
                        seq_len=args.seq_len, seed=args.seed, part=part, config=loaded.model.config)


def data_from_args(args) -> dict:
    """The ``load_corpus`` keyword arguments the data options name."""
    return {"source": args.data, "column": args.column}


def calibrate_from_args(args, loaded) -> Scores:
    """Calibrate with a progress bar; Ctrl-C between batches keeps the partial scores."""
    from ..workflow import start_calibration

    settings = EstimatorSettings(
        estimators=tuple(e.strip() for e in args.estimators.split(",") if e.strip()), bins=args.bins, k=args.knn_k
    )
    run = start_calibration(loaded, data_from_args(args), samples=args.samples, seq_len=args.seq_len,
                            seed=args.seed, settings=settings, batch_size=args.batch_size,
                            skip_first=args.skip_first, calibration={"data": args.data},
                            overlap={"auto": None, "on": True, "off": False}[args.overlap])
    last = progress_bar(run.events, "calibrating", keep_partial=True,
                        postfix=lambda event: {"tokens": event.tokens_seen})
    if last is None:
        raise ValueError("Calibration stopped before the first batch finished; nothing to report.")
    if not last.finished:
        logger.warning("Interrupted: keeping the statistics of %d batch(es).", last.done)
    return last.scores


# -- output -----------------------------------------------------------------------------------
def progress_bar(events, desc: str, *, keep_partial: bool = False, postfix=None):
    """Drive a generator of :class:`~entrodrop.progress.ProgressEvent` with a tqdm bar (restarted at
    each new stage) and return the last event (None when there was none).

    Ctrl-C closes the generator (its hooks and previews are undone); with ``keep_partial`` the work
    done so far is kept and returned, otherwise the interrupt goes on. ``postfix(event)`` gives extra
    numbers to show beside the bar."""
    from tqdm.auto import tqdm

    last = None
    stage = None
    # a bar on a terminal, quiet in scripts and in every process of a multi-process run but the main one
    with tqdm(desc=desc, file=sys.stderr, disable=None if is_main() else True) as bar:
        try:
            for last in events:
                if last.stage != stage:
                    stage = last.stage
                    bar.reset(total=last.total)
                    bar.set_description(f"{desc} ({stage})" if stage not in desc else desc)
                bar.total = last.total
                bar.n = last.done
                if postfix is not None:
                    bar.set_postfix(postfix(last), refresh=False)
                bar.refresh()
        except KeyboardInterrupt:
            events.close()
            if not keep_partial:
                raise
    return last


def write_json(path: str, data) -> None:
    """Write ``data`` (reports, plans, tensors...) as JSON and say where."""
    from ..export import jsonable

    Path(path).write_text(json.dumps(jsonable(data), indent=1))
    print(f"written to {path}")
