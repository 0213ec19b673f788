"""Write a pruned model to a folder: :func:`export_pruned`, the one entry point, and its :class:`ExportResult`.

The order is the point: check the target (cheap), prune a copy, write weights, tokenizer, optional
remote code, reload-verify, then metadata and card, all in a temp folder that replaces the target
only at the end (:mod:`.target`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch import get_arch
from ..checks import ChecksResult
from ..checks import verdict as check_verdict_of
from ..costs import count_parameters, plan_parameter_counts
from ..criteria import get_criterion
from ..plan import DropPlan
from ..prune import DROPPED_KEY, check_plan, prune_model
from .card import model_card, reload_hint, verdict_line
from .metadata import EXPORT_FORMAT_VERSION, METADATA_FILE, ModelSource, jsonable, package_versions
from .reload import REMOTE_CODE_FILE, remote_code_base, remote_code_source
from .target import atomic_folder, check_target
from .verification import verify_export

logger = logging.getLogger(__name__)


EXPORT_DTYPES = ("bfloat16", "float16", "float32")


def _torch_dtype(name: str) -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ValueError(f"Unknown export dtype {name!r}; choose one of {', '.join(EXPORT_DTYPES)}.")
    return getattr(torch, name)


def export_dtype_for(compute_dtype: str, gguf: bool) -> str:
    """The default export dtype of a model computing in ``compute_dtype`` ("float32", "torch.bfloat16"...):
    that dtype, but bfloat16 for a de-quantised GGUF source (its float32 copy is ~5x the quantised file,
    and bfloat16 keeps more than the 4-bit source ever had)."""
    if gguf:
        return "bfloat16"
    name = str(compute_dtype).removeprefix("torch.")
    return name if name in EXPORT_DTYPES else "float32"


def default_export_dtype(model: nn.Module, source: ModelSource | None = None) -> str:
    """:func:`export_dtype_for` the model's parameters and source."""
    return export_dtype_for(str(next(model.parameters()).dtype), (source or ModelSource()).is_gguf(model))


def weights_bytes_in(num_params: int, dtype: str) -> int:
    """Bytes ``num_params`` weights take in ``dtype`` (one of :data:`EXPORT_DTYPES`)."""
    return num_params * _torch_dtype(dtype).itemsize


def export_size_bytes(model: nn.Module, plan: DropPlan, dtype: str | None = None, source: ModelSource | None = None) -> int:
    """Bytes the weights of ``plan``'s export take in ``dtype`` (default :func:`default_export_dtype`),
    computed without copying the model: the kept parameters times the dtype's size (each tied tensor once)."""
    dtype = dtype or default_export_dtype(model, source)
    return weights_bytes_in(plan_parameter_counts(model, plan)[2], dtype)


def source_size_bytes(model: nn.Module, source: ModelSource | None = None) -> tuple[int, str]:
    """(bytes, what they are) of the dense source: its GGUF file when there is one, else its weights in memory."""
    gguf = (source or ModelSource()).gguf_file
    if gguf and Path(gguf).is_file():
        return Path(gguf).stat().st_size, f"GGUF file {Path(gguf).name}"
    dense_bytes = count_parameters(model)[1]
    return dense_bytes, f"dense weights in {str(next(model.parameters()).dtype).removeprefix('torch.')}"


@dataclass
class ExportResult:
    """What :func:`export_pruned` wrote and whether the written folder passed verification."""

    path: Path
    ok: bool
    verdict: str  # one line, also in the model card
    verification: dict  # per loader: max_abs_diff, generation_matches, missing/unexpected keys, error
    plan: dict
    remote_code: bool  # modeling_entrodrop.py written (sub-block plans, opt-in)
    reload_hint: str  # the Python lines that reload this folder
    files: list[str] = field(default_factory=list)
    dense_params: int = 0
    pruned_params: int = 0
    dtype: str = ""  # the dtype the weights were written in
    weights_bytes: int = 0  # the safetensors files on disk
    source_bytes: int = 0  # the dense source (its GGUF file, or its weights in memory)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def export_pruned(
    model: nn.Module,
    tokenizer,
    plan: DropPlan,
    out_dir: str | os.PathLike,
    *,
    scores=None,
    checks: ChecksResult | dict | None = None,
    source: ModelSource | None = None,
    overwrite: bool = False,
    write_remote_code: bool = True,
    verify: bool = True,
    atol: float | None = None,
    dtype: str | None = None,
    heal: dict | None = None,
) -> ExportResult:
    """Prune ``plan`` out of a copy of ``model``, write it to ``out_dir`` atomically and verify it.

    ``model`` is a ``*ForCausalLM`` (not modified) and ``tokenizer`` is saved next to the weights.
    The criterion comes from ``plan``; the calibration settings from ``scores``
    (:class:`~entrodrop.scores.Scores` or its dict). ``checks`` (a :class:`~entrodrop.checks.ChecksResult`,
    or its dict) go into ``entrodrop.json`` and the card; ``source``
    (``ModelSource.of(loaded)`` for a :class:`~entrodrop.loading.LoadedModel`) names the dense model.
    ``write_remote_code`` adds ``modeling_entrodrop.py`` for sub-block plans. ``dtype`` (one of
    :data:`EXPORT_DTYPES`) is what the weights are written in; None means :func:`default_export_dtype`.
    For a healed model pass ``model=result.model`` (the healed copy, dense layout) and ``heal`` (what the heal
    measured, :func:`entrodrop.heal.heal_record`): it goes into ``entrodrop.json`` and the card.

    Raises before heavy work: TypeError/ValueError for bad arguments, :class:`.TargetNotEmptyError`
    (a ValueError) for a non-empty ``out_dir`` without ``overwrite=True``, PermissionError for an
    unwritable one; OSError (errno ENOSPC for a full disk) if writing fails, leaving nothing at ``out_dir``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a *ForCausalLM model, got {type(model).__name__}; for a LoadedModel pass "
                        "loaded.model, loaded.tokenizer and source=ModelSource.of(loaded).")
    if tokenizer is None:
        raise ValueError("An export needs the tokenizer next to the weights; pass tokenizer=.")
    source = source or ModelSource()
    dtype = dtype or default_export_dtype(model, source)
    _torch_dtype(dtype)  # an unknown dtype fails before any work
    if checks is not None and not isinstance(checks, ChecksResult):
        checks = ChecksResult.from_dict(checks)
    spec = get_arch(model)
    check_plan(model, plan, spec)
    dense_params, dense_bytes = count_parameters(model)
    target = check_target(out_dir, overwrite, needed_bytes=dense_bytes)
    with atomic_folder(target) as tmp:
        result = _write_export(model, tokenizer, plan, spec, tmp, target, scores=scores, checks=checks,
                               source=source, write_remote_code=write_remote_code, verify=verify, atol=atol,
                               dense_params=dense_params, dtype=dtype, heal=heal)
    result.files = sorted(p.name for p in target.iterdir())
    logger.info("Exported %s to %s: %s", plan.describe(), target, result.verdict)
    return result


def _write_export(model, tokenizer, plan: DropPlan, spec, tmp: Path, target: Path, *, scores, checks,
                  source: ModelSource, write_remote_code: bool, verify: bool, atol, dense_params: int,
                  dtype: str, heal: dict | None = None) -> ExportResult:
    pruned = prune_model(model, plan)
    pruned.eval()
    gguf = source.is_gguf(pruned)
    if gguf or getattr(pruned, "hf_quantizer", None) is not None:
        from ..gguf import strip_gguf_quantization

        strip_gguf_quantization(pruned)
    torch_dtype = _torch_dtype(dtype)
    if next(pruned.parameters()).dtype != torch_dtype:
        # weights only: buffers such as rotary inv_freq stay float32, as from_pretrained(dtype=...) builds them
        for param in pruned.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch_dtype)
    pruned.config.dtype = torch_dtype  # what config.json says the weights are
    subblocks = bool(getattr(pruned.config, DROPPED_KEY, None))
    versions = package_versions()
    remote_code = False
    if subblocks and write_remote_code:
        base = remote_code_base(pruned)
        if base is None:
            logger.warning("%s is not a transformers class: no modeling_entrodrop.py; reload with load_pruned.",
                           type(pruned).__name__)
        else:
            cls_name, code = remote_code_source(base, versions["entrodrop"])
            (tmp / REMOTE_CODE_FILE).write_text(code)
            pruned.config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.{cls_name}"}
            remote_code = True
    save_kwargs = {}
    if subblocks and "save_original_format" in inspect.signature(pruned.save_pretrained).parameters:
        # sub-block exports load into a custom class, which transformers never applies checkpoint key
        # renames to (GPT-NeoX's embed_out <-> lm_head): keep the in-memory key names
        save_kwargs["save_original_format"] = False
    pruned.save_pretrained(tmp, **save_kwargs)
    tokenizer.save_pretrained(tmp)

    if verify:
        verification = verify_export(tmp, pruned, tokenizer, remote_code=remote_code, atol=atol)
        verdict = verdict_line(verification)
    else:
        verification = {"ok": False, "skipped": True, "loaders": {}}
        verdict = "Verification SKIPPED: the folder was not reloaded after writing."
    pruned_params = count_parameters(pruned)[0]
    hint = reload_hint(subblocks, remote_code)

    if scores is not None and not isinstance(scores, dict):
        scores = scores.to_dict()
    weights_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    source_bytes, source_what = source_size_bytes(model, source)
    label = get_criterion(plan.criterion)
    check_verdict = check_verdict_of(checks) if checks else None
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "source": {"name": source.name or getattr(model.config, "_name_or_path", "") or None,
                   "source": source.source, "gguf_file": source.gguf_file,
                   "family": spec.family, "model_type": getattr(model.config, "model_type", None)},
        "gguf": gguf,
        "plan": plan.to_dict(),
        "criterion": plan.criterion,
        "criterion_label": label.label_for(plan.blocks[0].kind) if plan.blocks else label.label,
        "dtype": dtype,
        "size": {"weights_bytes": weights_bytes, "source_bytes": source_bytes, "source": source_what},
        "check_verdict": check_verdict.to_dict() if check_verdict else None,
        "dropped_in_pruned_model": getattr(pruned.config, DROPPED_KEY, None) or [],
        "num_layers": {"dense": plan.num_layers, "pruned": plan.num_layers - len(plan.layers_of("layer"))},
        "parameters": {"dense": dense_params, "pruned": pruned_params, "removed": dense_params - pruned_params},
        "scores": scores,
        "calibration": scores.get("calibration") if scores else None,
        "checks": checks.to_dict() if checks else None,
        "heal": heal,
        "verification": {**verification, "verdict": verdict},
        "reload": hint,
        "remote_code": remote_code,
        "versions": versions,
    }
    meta = jsonable(meta)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    (tmp / "README.md").write_text(model_card(meta, verdict, hint.replace("PATH", str(target))))
    # some writers create private (0600) files; give every file the mode our own writes got (umask)
    mode = (tmp / METADATA_FILE).stat().st_mode & 0o777
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(mode)
    return ExportResult(path=target, ok=bool(verification["ok"]), verdict=verdict, verification=verification,
                        plan=plan.to_dict(), remote_code=remote_code, reload_hint=hint.replace("PATH", str(target)),
                        dense_params=dense_params, pruned_params=pruned_params, dtype=dtype,
                        weights_bytes=weights_bytes, source_bytes=source_bytes)
