"""``entrodrop scan``: calibrate and print per-block entropy and cosine statistics."""

from __future__ import annotations

from ..arch import BLOCK_KINDS
from ..criteria import resolve_estimator
from ..distributed import is_main
from ..scores import Scores
from .common import add_data_args, add_model_args, calibrate_from_args, load_from_args


def format_scores_table(scores: Scores, estimator: str | None = None) -> str:
    """Readable per-layer table: entropy of X_l, then per sub-block entropy increase and cosine importance."""
    est = resolve_estimator(scores, estimator)
    boundary = scores.stage_boundary.get(est)
    head = (f"{'layer':>5} {'H(X_l)':>10} | {'attn dH':>9} {'attn cos':>9} | {'mlp dH':>9} {'mlp cos':>9} | "
            f"{'layer dH':>9} {'layer cos':>9}  stage")
    lines = [f"model {scores.model}: {scores.num_layers} layers, estimator {est}, "
             f"{scores.calibration.get('tokens', '?')} tokens in {scores.batches_done} batch(es)",
             f"stage boundary at X_{boundary}: layers < {boundary} compress, the rest expand", head, "-" * len(head)]
    for layer in range(scores.num_layers):
        a, m, w = (scores.block(layer, k) for k in BLOCK_KINDS)
        stage = "compress" if boundary is not None and layer < boundary else "expand"
        lines.append(
            f"{layer:>5} {scores.entropy_curve[est][layer]:>10.2f} | {a.delta_entropy[est]:>9.3f} {a.cosine_importance:>9.4f} | "
            f"{m.delta_entropy[est]:>9.3f} {m.cosine_importance:>9.4f} | {w.delta_entropy[est]:>9.3f} {w.cosine_importance:>9.4f}  {stage}"
        )
    lines.append(f"{'out':>5} {scores.entropy_curve[est][scores.num_layers]:>10.2f}")
    return "\n".join(lines)


def cmd_scan(args) -> int:
    """Calibrate, print one table per estimator, optionally write the scores JSON."""
    loaded = load_from_args(args)
    scores = calibrate_from_args(args, loaded)
    for est in scores.estimators:
        print(format_scores_table(scores, est))
        print()
    if args.json and is_main():
        scores.save(args.json)
        print(f"scores written to {args.json}")
    return 0


def register(subparsers) -> None:
    """Add ``scan`` to the ``entrodrop`` command's subparsers."""
    scan = subparsers.add_parser("scan", help="calibrate and print per-block entropy and cosine statistics")
    add_model_args(scan)
    add_data_args(scan)
    scan.add_argument("--json", default=None, help="write the scores JSON here")
    scan.set_defaults(func=cmd_scan)
