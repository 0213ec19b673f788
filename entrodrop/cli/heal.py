"""``entrodrop heal``: drop blocks, win back what the drop cost (linear or LoRA), check dense vs dropped vs
healed on the report part, and export the healed model as a verified folder."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ..checks import checks_text
from .checks import add_check_args, run_checks
from .common import (
    add_data_args,
    add_model_args,
    load_from_args,
    load_windows_from_args,
    progress_bar,
    write_json,
)
from .prune import add_format_args, check_gguf_args, print_gguf_result
from .select import add_plan_args, format_plan, plan_from_args


@contextmanager
def stop_on_interrupt(flag: threading.Event):
    """Ctrl-C sets ``flag`` (the heal ends after its current step, keeping the best state) instead of
    killing it; a second Ctrl-C interrupts as usual."""
    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, the flag is never set
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def settings_from_args(args):
    from ..heal import HealSettings

    settings = HealSettings(method=args.method, train_windows=args.train_windows, val_windows=args.val_windows,
                            rank=args.rank, alpha=args.alpha, targets=args.targets, lr=args.lr, steps=args.steps,
                            max_seconds=args.minutes * 60 if args.minutes else None, batch_windows=args.batch_windows,
                            loss=args.loss, teacher=args.teacher, validate_every=args.validate_every, ridge=args.ridge)
    settings.check()
    return settings


def cmd_heal(args) -> int:
    """Check ``--out`` first, then plan, heal, check both models, export the healed one; exit 1 when
    writing or verification fails."""
    from ..export import ModelSource, TargetNotEmptyError, check_target, export_pruned
    from ..heal import heal_record, iter_heal

    settings = settings_from_args(args)  # a bad setting fails before the model loads
    gguf = args.format == "gguf"
    try:
        check_target(args.out, args.overwrite)
    except TargetNotEmptyError as exc:
        raise ValueError(f"{exc.path} is not empty. Pass --overwrite to replace it, or choose an empty folder.") \
            from exc
    loaded = load_from_args(args)
    plan, scores = plan_from_args(args, loaded, required=True)
    if gguf:  # refused before the heal runs
        check_gguf_args(args, loaded, plan, heal=settings.method)
    print(format_plan(plan))
    windows, described = load_windows_from_args(args, loaded, num_samples=settings.train_windows + settings.val_windows,
                                                part="calibration")  # healing reads calibration text only
    with stop_on_interrupt(threading.Event()) as stop:
        last = progress_bar(iter_heal(loaded.model, plan, windows, settings, should_stop=stop.is_set, data=described),
                            f"{settings.method} heal", postfix=_postfix)
    result = last.partial
    print(result.summary())
    for note in result.notes:
        print(f"  note: {note}")
    before = run_checks(args, loaded, plan)
    after = run_checks(args, loaded, plan, pruned_model=result.pruned())
    print("\nthe plan as dropped:\n" + checks_text(before))
    print(f"\nhealed ({settings.method}):\n" + checks_text(after))
    record = heal_record(result, before.quality, after.quality, checked_on=_where(after.eval_data))
    if record.get("recovered") is not None:
        print(f"\nshare of the lost nats won back: {100 * record['recovered']:.0f}% "
              f"± {100 * record['recovered_error']:.0f}% (paired over the {after.quality.num_windows} windows)")
    if gguf:
        from ..export.gguf_export import export_gguf

        export = export_gguf(result.model, loaded.tokenizer, plan, args.out, scores=scores, checks=after,
                             source=ModelSource.of(loaded), overwrite=args.overwrite, gguf_type=args.gguf_type,
                             heal=record)
        print_gguf_result(export)
    else:
        export = export_pruned(result.model, loaded.tokenizer, plan, args.out, scores=scores, checks=after,
                               source=ModelSource.of(loaded), overwrite=args.overwrite,
                               write_remote_code=args.remote_code, heal=record)
        print(export.verdict)
        print(f"written to {export.path}; reload with:\n{export.reload_hint}")
    if args.json:
        write_json(args.json, {"model": loaded.name, "heal": record, "export": export.to_dict()})
    return 0 if export.ok else 1


def _postfix(event) -> dict:
    progress = event.partial
    if progress is None or getattr(progress, "train_loss", None) is None:
        return {}
    return {"loss": f"{progress.train_loss:.4f}", "val KL": f"{progress.val_kl:.4f}"}


def _where(eval_data) -> str:
    if not eval_data:
        return "held-out text"
    return (f"{eval_data['samples']} windows x {eval_data['seq_len']} tokens of the {eval_data['part']} part of "
            f"{eval_data['data']}")


def register(subparsers) -> None:
    """Add ``heal`` to the ``entrodrop`` command's subparsers."""
    from ..heal import HealSettings

    heal = subparsers.add_parser("heal", help="drop blocks, win back what they cost (linear or LoRA), check, export")
    add_model_args(heal)
    add_data_args(heal)
    add_plan_args(heal)
    add_check_args(heal, speed_default=False)
    heal.add_argument("--method", default="lora", choices=("lora", "linear"),
                      help="lora: distil the dense model into adapters on the kept blocks (minutes); linear: a "
                           "least-squares map per removed span folded into the kept weights (no training; it can "
                           "hurt text unlike the calibration text)")
    defaults = HealSettings()  # one owner for the defaults (placed by benchmarks/bench_heal.py)
    heal.add_argument("--steps", type=int, default=defaults.steps, help=f"lora: training steps (default {defaults.steps})")
    heal.add_argument("--minutes", type=float, default=defaults.max_seconds / 60,
                      help=f"lora: stop after this many minutes, the best state kept (default {defaults.max_seconds / 60:g}; "
                           "0: only --steps bounds it)")
    heal.add_argument("--rank", type=int, default=defaults.rank, help=f"lora: adapter rank (default {defaults.rank})")
    heal.add_argument("--alpha", type=float, default=None, help="lora: adapter scale numerator (default 2 x rank)")
    heal.add_argument("--lr", type=float, default=defaults.lr, help=f"lora: learning rate (default {defaults.lr:g})")
    heal.add_argument("--targets", default="all", choices=("all", "attn", "mlp"),
                      help="lora: which linear layers of the kept blocks get adapters (default all)")
    heal.add_argument("--loss", default="kl", choices=("kl", "kl+ce"),
                      help="lora: KL to the dense model's next-token distribution, or that plus the next-token loss")
    heal.add_argument("--teacher", default="recompute", choices=("recompute", "cache"),
                      help="lora: recompute the dense logits every step, or cache them once in bfloat16")
    heal.add_argument("--batch-windows", type=int, default=defaults.batch_windows,
                      help=f"lora: windows per step (default {defaults.batch_windows})")
    heal.add_argument("--validate-every", type=int, default=defaults.validate_every,
                      help=f"lora: steps between validations (default {defaults.validate_every})")
    heal.add_argument("--train-windows", type=int, default=defaults.train_windows,
                      help=f"calibration windows taught on (default {defaults.train_windows})")
    heal.add_argument("--val-windows", type=int, default=defaults.val_windows,
                      help="calibration windows after them, validated on and never taught on (default 4)")
    heal.add_argument("--ridge", type=float, default=defaults.ridge,
                      help="linear: ridge term (towards no change), relative to the Gram diagonal")
    heal.add_argument("--out", required=True, help="folder to write the healed model to (empty unless --overwrite)")
    heal.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_format_args(heal)
    heal.add_argument("--remote-code", action="store_true",
                      help="sub-block plans: also write modeling_entrodrop.py (reload without EntroDrop)")
    heal.add_argument("--json", default=None, help="write what the heal measured, with the export's verdict")
    heal.set_defaults(func=cmd_heal)

