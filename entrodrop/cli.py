"""The ``entrodrop`` command line: scan, select (here) and prune, eval, sweep (:mod:`.cli_prune`).

Every command is a thin shell over the library API; long work shows a tqdm progress bar fed by
the same events the web app streams.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .calibrate import EstimatorSettings, iter_calibration
from .estimators import ENTROPY_ESTIMATORS
from .scores import Scores
from .select import CRITERIA, PROTECTIONS, select_blocks

logger = logging.getLogger("entrodrop")


# -- shared option groups ---------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="smollm2",
                   help="bundled alias (smollm2), local HF folder, .gguf file or hub id (default: smollm2)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models larger than one device, e.g. 'auto' (with CPU/disk offload)")
    p.add_argument("--offload-folder", default=None, help="folder for disk offload with --device-map")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint (off by default)")


def add_data_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--skip-first", type=int, default=0,
                   help="leave the first N tokens of every window out of the statistics (attention sink); default 0")


def load_from_args(args):
    from .loading import load_model

    return load_model(
        args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
        offload_folder=args.offload_folder, trust_remote_code=args.trust_remote_code,
        progress=lambda msg: logger.info(msg),
    )


def windows_from_args(args, tokenizer, part: str = "calibration"):
    from .data import load_corpus, make_windows

    corpus = load_corpus(args.data, column=args.column)
    return make_windows(tokenizer, corpus, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed, part=part)


def calibrate_from_args(args, loaded) -> Scores:
    """Calibrate with a progress bar; Ctrl-C between batches keeps the partial scores."""
    from tqdm.auto import tqdm

    windows = windows_from_args(args, loaded.tokenizer)
    settings = EstimatorSettings(
        estimators=tuple(e.strip() for e in args.estimators.split(",") if e.strip()), bins=args.bins, k=args.knn_k
    )
    calibration = {"data": args.data, "seed": args.seed}
    events = iter_calibration(
        loaded.model, windows, settings=settings, batch_size=args.batch_size,
        model_name=loaded.name, calibration=calibration, spec=loaded.arch, skip_first=args.skip_first,
    )
    last = None
    with tqdm(total=(len(windows) + args.batch_size - 1) // args.batch_size, unit="batch", desc="calibrating",
              file=sys.stderr) as bar:
        try:
            for last in events:
                bar.update(1)
                bar.set_postfix(tokens=last.tokens_seen)
        except KeyboardInterrupt:
            events.close()
            logger.warning("Interrupted: keeping the statistics of %d batch(es).", last.batch_index if last else 0)
    if last is None:
        raise ValueError("Calibration stopped before the first batch finished; nothing to report.")
    return last.scores


# -- output -------------------------------------------------------------------------------------
def format_scores_table(scores: Scores, estimator: str | None = None) -> str:
    """Readable per-layer table: entropy of X_l, then per sub-block entropy increase and cosine importance."""
    est = estimator or scores.estimators[0]
    boundary = scores.stage_boundary.get(est)
    head = (f"{'layer':>5} {'H(X_l)':>10} | {'attn dH':>9} {'attn cos':>9} | {'mlp dH':>9} {'mlp cos':>9} | "
            f"{'layer dH':>9} {'layer cos':>9}  stage")
    lines = [f"model {scores.model}: {scores.num_layers} layers, estimator {est}, "
             f"{scores.calibration.get('tokens', '?')} tokens in {scores.batches_done} batch(es)",
             f"stage boundary at X_{boundary}: layers < {boundary} compress, the rest expand", head, "-" * len(head)]
    for layer in range(scores.num_layers):
        a, m, w = (scores.block(layer, k) for k in ("attn", "mlp", "layer"))
        stage = "compress" if boundary is not None and layer < boundary else "expand"
        lines.append(
            f"{layer:>5} {scores.entropy_curve[est][layer]:>10.2f} | {a.delta_entropy[est]:>9.3f} {a.cosine_importance:>9.4f} | "
            f"{m.delta_entropy[est]:>9.3f} {m.cosine_importance:>9.4f} | {w.delta_entropy[est]:>9.3f} {w.cosine_importance:>9.4f}  {stage}"
        )
    lines.append(f"{'out':>5} {scores.entropy_curve[est][scores.num_layers]:>10.2f}")
    return "\n".join(lines)


def format_plan(plan) -> str:
    lines = [f"criterion {plan.criterion}: {plan.describe()}"]
    for key in ("protect", "protected", "stage_boundary"):
        if key in plan.meta:
            lines.append(f"  {key}: {plan.meta[key]}")
    lines += [f"  drop {b.kind:<5} layer {b.layer:>3}  ({b.reason})" for b in plan.blocks]
    return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------------
def cmd_scan(args) -> int:
    loaded = load_from_args(args)
    scores = calibrate_from_args(args, loaded)
    for est in scores.estimators:
        print(format_scores_table(scores, est))
        print()
    if args.json:
        scores.save(args.json)
        print(f"scores written to {args.json}")
    return 0


def cmd_select(args) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entrodrop",
        description="Score the blocks of a decoder LM by entropy increase and cosine similarity, "
        "choose blocks to drop, check and export the pruned model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="calibrate and print per-block entropy and cosine statistics")
    add_model_args(scan)
    add_data_args(scan)
    scan.add_argument("--json", default=None, help="write the scores JSON here")
    scan.set_defaults(func=cmd_scan)

    select = sub.add_parser("select", help="choose blocks to drop from a scores JSON")
    select.add_argument("scores", help="scores JSON written by `entrodrop scan --json`")
    add_selection_args(select)
    select.add_argument("--layers", default=None, help="with --criterion manual: comma-separated layers")
    select.add_argument("--out", default=None, help="write the plan JSON here")
    select.set_defaults(func=cmd_select)

    try:
        from .cli_prune import register
    except ImportError:  # pragma: no cover - prune commands ship with the same package
        register = None
    if register is not None:
        register(sub)
    return parser


def add_selection_args(p: argparse.ArgumentParser, *, count_required: bool = False,
                       extra_criteria: tuple[str, ...] = ()) -> None:
    help_text = "how blocks are ranked (default entrodrop)"
    if "loss" in extra_criteria:
        help_text += "; loss re-scores the best entrodrop candidates by the held-out loss of skipping them"
    p.add_argument("--criterion", default="entrodrop", choices=(*CRITERIA, *extra_criteria), help=help_text)
    p.add_argument("--kind", default="attn", choices=("attn", "mlp", "layer"), help="granularity (default attn)")
    group = p.add_mutually_exclusive_group(required=count_required)
    group.add_argument("--count", type=int, default=None, help="number of blocks to drop")
    group.add_argument("--fraction", type=float, default=None, help="share of the L blocks of that kind to drop")
    p.add_argument("--estimator", default="bucket", help="entropy estimator that ranks blocks (default bucket)")
    p.add_argument("--protect", default=None, choices=PROTECTIONS,
                   help="stage: compression stage + last layer (entrodrop default); released: layers 0,1,L-1; none")
    p.add_argument("--stage-boundary", type=int, default=None, help="override the detected stage boundary")


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


if __name__ == "__main__":
    sys.exit(main())

