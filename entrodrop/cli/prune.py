"""``entrodrop prune``: drop blocks, check the result and export a reloadable, verified folder (safetensors,
or GGUF for llama.cpp / Ollama)."""

from __future__ import annotations

from ..checks import checks_text
from .checks import add_check_args, run_checks
from .common import add_data_args, add_model_args, load_from_args
from .select import add_plan_args, format_plan, plan_from_args


def cmd_prune(args) -> int:
    """Check ``--out`` first, then plan, check, export; exit 1 when writing or verification fails."""
    from ..export import ModelSource, TargetNotEmptyError, check_target, export_pruned

    try:
        check_target(args.out, args.overwrite)  # a busy or unwritable --out fails before any heavy work
    except TargetNotEmptyError as exc:  # the library speaks of overwrite=True; here it is a flag
        raise ValueError(f"{exc.path} is not empty. Pass --overwrite to replace it, or choose an empty folder.") \
            from exc
    loaded = load_from_args(args)
    plan, scores = plan_from_args(args, loaded, required=True)
    if not plan.blocks:
        raise ValueError("The plan drops no block, so the export would be the dense model. Give blocks to drop "
                         "with --plan or --count.")
    if args.format == "gguf":  # refused before the checks run
        check_gguf_args(args, loaded, plan, heal=None)
    print(format_plan(plan))
    checks = run_checks(args, loaded, plan)
    if checks:
        print(checks_text(checks))
    # export_pruned takes the criterion from the plan and the calibration settings from the scores;
    # an OSError (disk full, permission) reaches main(), which says it in one line with exit 1
    if args.format == "gguf":
        from ..export.gguf_export import export_gguf

        result = export_gguf(loaded.model, loaded.tokenizer, plan, args.out, scores=scores, checks=checks,
                             source=ModelSource.of(loaded), overwrite=args.overwrite, gguf_type=args.gguf_type)
        print_gguf_result(result)
        return 0 if result.ok else 1
    result = export_pruned(loaded.model, loaded.tokenizer, plan, args.out, scores=scores, checks=checks,
                           source=ModelSource.of(loaded), overwrite=args.overwrite,
                           write_remote_code=args.remote_code)
    print(result.verdict)
    print(f"written to {result.path}; reload with:\n{result.reload_hint}")
    return 0 if result.ok else 1


def check_gguf_args(args, loaded, plan, *, heal: str | None) -> None:
    """Refuse, before heavy work, a ``--format gguf`` export GGUF cannot write faithfully (the library's
    message, speaking of the CLI's flag)."""
    from ..export import ModelSource, check_gguf_export

    try:
        check_gguf_export(loaded.model, plan, ModelSource.of(loaded), heal=heal, gguf_type=args.gguf_type,
                          tokenizer=loaded.tokenizer)
    except ValueError as exc:
        raise ValueError(str(exc).replace("format='safetensors'", "--format safetensors")) from exc


def print_gguf_result(result) -> None:
    print(result.verdict)
    print(f"written to {result.path} ({result.weights_bytes / 2**20:.1f} MiB, x{result.weights_bytes / result.source_bytes:.3f} "
          f"the source); run it with:\n{result.reload_hint}")


def add_format_args(parser) -> None:
    """``--format`` and ``--gguf-type`` (the export's file format and, for GGUF, what its tensors hold)."""
    from ..export import GGUF_TYPES

    parser.add_argument("--format", default="safetensors", choices=("safetensors", "gguf"),
                        help="gguf: a file for llama.cpp / Ollama (whole layers, or attention blocks of Llama-family "
                             "models), from a .gguf source, whose tokenizer and settings it keeps, or a Llama or "
                             "Gemma 3 safetensors one, converted")
    parser.add_argument("--gguf-type", default="auto", choices=tuple(GGUF_TYPES),
                        help="with --format gguf: 'stored' copies a .gguf source's quantised tensors byte for byte; "
                             "the others write the model's own weights (Llama, Gemma 3): 'source' in the source "
                             "file's types, re-quantising only what a heal changed, or one block or float type; "
                             "'adapter', after a LoRA heal: the stored tensors and the heal as a llama.cpp LoRA "
                             "adapter file beside them (run with --lora); auto (default): f16 for Gemma 3 (llama.cpp's "
                             "quantised arithmetic moves a pruned one far from itself); otherwise stored without a "
                             "heal, source after a linear heal, q8_0 after a LoRA heal or from safetensors")


def register(subparsers) -> None:
    """Add ``prune`` to the ``entrodrop`` command's subparsers."""
    prune = subparsers.add_parser("prune", help="drop blocks, check the result and export a reloadable model")
    add_model_args(prune)
    add_data_args(prune)
    add_plan_args(prune)
    add_check_args(prune, speed_default=False)
    prune.add_argument("--out", required=True, help="folder to write (must be empty unless --overwrite)")
    prune.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    add_format_args(prune)
    prune.add_argument("--remote-code", action="store_true",
                       help="sub-block plans: also write modeling_entrodrop.py so from_pretrained(DIR, "
                            "trust_remote_code=True) reloads without EntroDrop")
    prune.set_defaults(func=cmd_prune)
