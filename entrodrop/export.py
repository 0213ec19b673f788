"""Write a pruned model to a folder that really reloads, and prove it did.

The folder holds safetensors weights without the dropped blocks, ``config.json``, the tokenizer,
``entrodrop.json`` (plan, criterion, per-block scores, calibration settings, checks, package
versions) and a model card ``README.md``. How it reloads:

* only whole layers dropped: plain ``AutoModelForCausalLM.from_pretrained(DIR)`` — the config's
  layer count and per-layer fields describe the smaller model, no remote code;
* attention/MLP sub-blocks dropped: :func:`load_pruned` (``config.entrodrop_dropped`` says which
  modules become weightless stand-ins), or, opt-in, ``from_pretrained(DIR, trust_remote_code=True)``
  through a self-contained ``modeling_entrodrop.py`` written next to the weights.

Every export is verified after writing: reloaded from disk, its logits on a fixed input compared
with the in-memory pruned model, a few tokens generated. The verdict goes into the card and
:attr:`ExportResult.ok`. Writing is atomic: everything goes into a hidden temp folder next to the
target (same filesystem) and is renamed into place at the end; any failure removes it.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import platform
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .arch import get_arch, get_layers
from .evaluate import greedy_generate
from .loading import quant_method
from .plan import DropPlan
from .prune import (
    DROPPED_KEY,
    SkippedAttention,
    ZeroBlock,
    _find_cache,
    _hidden_states_of,
    _record_placeholder,
    check_plan,
    count_parameters,
    install_standins,
    make_standin,
    prune_model,
)

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
REMOTE_CODE_FILE = "modeling_entrodrop.py"
METADATA_FILE = "entrodrop.json"
_FIXED_TEXT = "The quick brown fox jumps over the lazy dog. What is 12 + 30? The answer is 42."
_VERIFY_NEW_TOKENS = 8


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# -- reload ----------------------------------------------------------------------------------------
_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    """A subclass of ``base`` that installs the stand-ins named in its config right after building,
    so ``from_pretrained`` neither expects the dropped weights nor initialises them."""
    if base not in _PRUNED_CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install_standins(self)

        _PRUNED_CLASSES[base] = type(f"EntroDrop{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
    return _PRUNED_CLASSES[base]


def _causal_lm_class(config) -> type:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise ValueError(f"transformers has no *ForCausalLM class for model type {config.model_type!r}.") from exc


def load_pruned(path: str | os.PathLike, *, output_loading_info: bool = False, **kwargs):
    """Load an EntroDrop export (any plan) without remote code.

    Whole-layer exports are ordinary checkpoints; for sub-block exports the dropped modules listed in
    ``config.entrodrop_dropped`` are rebuilt as weightless stand-ins before the weights load.
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json). Point at the folder `entrodrop prune` wrote.")
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, DROPPED_KEY, None):
        return AutoModelForCausalLM.from_pretrained(path, output_loading_info=output_loading_info, **kwargs)
    cls = _pruned_class(_causal_lm_class(config))
    return cls.from_pretrained(path, config=config, output_loading_info=output_loading_info, **kwargs)


# -- remote code -----------------------------------------------------------------------------------
# what the generated file needs: whole layers are removed physically, so no SkippedLayer
_STANDIN_SOURCES = (_find_cache, _hidden_states_of, _record_placeholder, SkippedAttention, ZeroBlock,
                    make_standin, install_standins)


def remote_code_source(base: type, version: str) -> tuple[str, str]:
    """(class name, source of ``modeling_entrodrop.py``) for a pruned model whose base class is ``base``.

    The file needs only torch and transformers: the stand-ins' own source is copied in."""
    cls_name = f"EntroDrop{base.__name__}"
    parts = [
        f'"""Weightless stand-ins for the blocks EntroDrop {version} dropped from this model.\n\n'
        f"Generated file: ``{cls_name}`` is transformers' ``{base.__name__}`` with the attention/MLP modules\n"
        "listed in ``config.entrodrop_dropped`` replaced by stand-ins that output zeros (their weights are not\n"
        'in the checkpoint). Needs only torch and transformers; load with trust_remote_code=True."""\n',
        "import torch\nfrom torch import nn\n",
        f"from transformers import {base.__name__}\n",
    ]
    parts += [inspect.getsource(obj) for obj in _STANDIN_SOURCES]
    parts.append(
        f"class {cls_name}({base.__name__}):\n"
        f'    """{base.__name__} with its dropped sub-blocks replaced by weightless stand-ins."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        install_standins(self)\n"
    )
    return cls_name, "\n\n".join(parts)


def _remote_code_base(model: nn.Module) -> type | None:
    """The model's class if a generated file can import it from ``transformers``, else None."""
    import transformers

    base = type(model)
    return base if getattr(transformers, base.__name__, None) is base else None


# -- helpers ---------------------------------------------------------------------------------------
def package_versions() -> dict:
    import transformers

    try:
        from importlib.metadata import version

        entrodrop_version = version("entrodrop")
    except Exception:  # not installed as a distribution (running from a checkout)
        entrodrop_version = "unknown"
    versions = {"entrodrop": entrodrop_version, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return versions


def jsonable(obj):
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_gguf(loaded, model: nn.Module) -> bool:
    if getattr(loaded, "source", None) == "gguf" or getattr(loaded, "gguf_file", None):
        return True
    return quant_method(model.config) == "gguf"


def check_target(out_dir, overwrite: bool = False, needed_bytes: int = 0) -> Path:
    """Check the target before any heavy work: refuse a non-empty folder without ``overwrite``, an
    unwritable location and (roughly) too little free space."""
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is a file; choose a folder path for the export.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"{target} is not empty. Pass overwrite=True (--overwrite on the command line) to replace it, "
            "or choose an empty folder."
        )
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(
            f"Cannot create {parent} ({exc.strerror or exc}); choose a folder you can write to."
        ) from exc
    if not os.access(parent, os.W_OK | os.X_OK) or (target.is_dir() and not os.access(target, os.W_OK | os.X_OK)):
        raise PermissionError(f"Cannot write to {parent}: permission denied. Choose a folder you can write to.")
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"Not enough disk space for the export in {parent}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free. Free some space or choose another folder.",
        )
    return target


def _commit(tmp: Path, target: Path) -> None:
    """Move the finished temp folder to ``target``; an old target is swapped out, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fixed_input(tokenizer, vocab_size: int) -> torch.Tensor:
    ids = tokenizer(_FIXED_TEXT, return_tensors="pt")["input_ids"] if tokenizer is not None else None
    if ids is None or ids.numel() < 2:
        ids = torch.arange(1, 17).unsqueeze(0)
    return ids[:, :32] % vocab_size  # (1, T)


def _greedy(model: nn.Module, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    return greedy_generate(model, None, ids, _VERIFY_NEW_TOKENS, pad_token_id=pad_id, min_new_tokens=_VERIFY_NEW_TOKENS)


def _default_atol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def verify_export(path: Path, pruned: nn.Module, tokenizer, *, remote_code: bool, atol: float | None = None) -> dict:
    """Reload ``path`` with every loader that applies and compare it with the in-memory ``pruned`` model.

    Returns ``{"ok", "atol", "input_tokens", "loaders": {name: {...}}}``; a loader passes when no weight
    is missing or unexpected, the logits on a fixed input agree within ``atol`` and greedy generation
    gives the same tokens."""
    from transformers import AutoModelForCausalLM

    dtype = next(pruned.parameters()).dtype
    atol = _default_atol(dtype) if atol is None else atol
    device = _device_of(pruned)
    vocab = pruned.config.vocab_size
    ids = _fixed_input(tokenizer, vocab).to(device)
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                               getattr(pruned.config, "eos_token_id", None)) if isinstance(t, int)), 0)
    was_training = pruned.training
    pruned.eval()
    with torch.inference_mode():
        reference = pruned(input_ids=ids).logits.float()
    reference_tokens = _greedy(pruned, ids, pad_id)
    pruned.train(was_training)

    subblocks = bool(getattr(pruned.config, DROPPED_KEY, None))
    loaders = {}
    if subblocks:
        loaders["entrodrop.load_pruned"] = lambda: load_pruned(path, dtype=dtype, output_loading_info=True)
        if remote_code:
            loaders["from_pretrained(trust_remote_code=True)"] = lambda: AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=True, output_loading_info=True)
    else:
        loaders["AutoModelForCausalLM.from_pretrained"] = lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True)

    results = {}
    for name, load in loaders.items():
        entry: dict = {}
        try:
            model, info = load()
            model.to(device).eval()
            entry["missing_keys"] = list(info.get("missing_keys", []))
            entry["unexpected_keys"] = list(info.get("unexpected_keys", []))
            entry["num_layers"] = len(get_layers(model))
            with torch.inference_mode():
                logits = model(input_ids=ids).logits.float()
            entry["max_abs_diff"] = float((logits - reference).abs().max()) if logits.shape == reference.shape \
                else float("inf")
            tokens = _greedy(model, ids, pad_id)
            entry["generated"] = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None \
                else tokens.tolist()
            entry["generation_matches"] = bool(torch.equal(tokens, reference_tokens))
            entry["ok"] = (not entry["missing_keys"] and not entry["unexpected_keys"]
                           and entry["max_abs_diff"] <= atol and entry["generation_matches"])
            del model
        except Exception as exc:  # a failed reload is a verdict, not a crash
            logger.warning("Reloading %s with %s failed: %s", path, name, exc)
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        results[name] = entry
    return {"ok": bool(results) and all(r["ok"] for r in results.values()), "atol": atol,
            "input_tokens": int(ids.shape[1]), "new_tokens": _VERIFY_NEW_TOKENS, "loaders": results}


def _verdict_line(verification: dict) -> str:
    parts = []
    for name, r in verification["loaders"].items():
        if "error" in r:
            parts.append(f"{name}: FAILED to reload ({r['error']})")
            continue
        detail = f"max |logit diff| {r['max_abs_diff']:.2e} (tolerance {verification['atol']:.0e}), " \
                 f"generation {'identical' if r['generation_matches'] else 'DIFFERENT'}"
        if r["missing_keys"] or r["unexpected_keys"]:
            detail += f", {len(r['missing_keys'])} missing / {len(r['unexpected_keys'])} unexpected weights"
        parts.append(f"{name}: {'ok' if r['ok'] else 'FAILED'} ({detail})")
    head = "PASSED" if verification["ok"] else "FAILED"
    return f"Verification {head}: " + "; ".join(parts)


def _reload_hint(subblocks: bool, remote_code: bool) -> str:
    if not subblocks:
        return ('from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
                'tokenizer = AutoTokenizer.from_pretrained("PATH")')
    hint = ('from entrodrop.export import load_pruned\n'
            'model = load_pruned("PATH")')
    if remote_code:
        hint += ('\n# or, without EntroDrop installed (runs the modeling_entrodrop.py in this folder):\n'
                 'from transformers import AutoModelForCausalLM\n'
                 'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)')
    return hint


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _model_card(meta: dict, verdict: str, hint: str) -> str:
    plan = meta["plan"]
    scores = meta.get("scores") or {}
    by_key = {(b["layer"], b["kind"]): b for b in scores.get("blocks", [])}
    source = meta["source"]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- entrodrop",
        "- pruned",
        "- block-pruning",
    ]
    if source.get("name") and source.get("source") == "hub":
        lines.append(f"base_model: {source['name']}")
    lines += ["---", "", f"# {source.get('name') or 'model'} — {len(plan['blocks'])} block(s) dropped with EntroDrop", ""]
    lines.append(
        f"Pruned from **{source.get('name') or 'an unnamed model'}** ({source.get('family')}, "
        f"{plan['num_layers']} layers) by dropping {len(plan['blocks'])} block(s) chosen with the "
        f"**{meta['criterion']}** criterion. Parameters: {meta['parameters']['dense']:,} -> "
        f"{meta['parameters']['pruned']:,} ({meta['parameters']['removed']:,} removed)."
    )
    if meta.get("gguf"):
        lines += ["", "The source was a quantised GGUF file: these are **de-quantised float safetensors from GGUF**, "
                      "not the original quantisation."]
    lines += ["", "## What was dropped and why", "",
              "Layer indexes are those of the original (dense) model.", "",
              "| layer | block | reason | entropy increase | cosine importance |",
              "|---:|---|---|---|---|"]
    for b in plan["blocks"]:
        s = by_key.get((b["layer"], b["kind"]), {})
        delta = ", ".join(f"{k} {_fmt(v)}" for k, v in s.get("delta_entropy", {}).items()) or "—"
        cosine = _fmt(s["cosine_importance"]) if "cosine_importance" in s else "—"
        lines.append(f"| {b['layer']} | {b['kind']} | {b.get('reason') or '—'} | {delta} | {cosine} |")
    calibration = meta.get("calibration") or {}
    if calibration:
        lines += ["", "## Calibration", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in calibration.items() if not isinstance(v, (dict, list))]
    checks = meta.get("checks") or {}
    if checks:
        lines += ["", "## Measured checks", ""]
        lines += _checks_markdown(checks)
    lines += ["", "## Verification", "", verdict, "",
              "The folder was reloaded from disk after writing; its logits on a fixed input were compared with "
              "the in-memory pruned model and a few tokens were generated greedily.", "",
              "## How to reload", "", "```python", hint, "```", "",
              "Written by EntroDrop Studio (entropy-based block pruning; Yang et al., arXiv 2504.03794). "
              "Full plan, scores and settings: `entrodrop.json`.", ""]
    return "\n".join(lines)


def _checks_markdown(checks: dict) -> list[str]:
    lines: list[str] = []
    quality = checks.get("quality")
    if isinstance(quality, dict):
        lines += ["| check | dense | pruned |", "|---|---:|---:|",
                  f"| perplexity | {_fmt(quality.get('dense_perplexity'))} | {_fmt(quality.get('pruned_perplexity'))} |",
                  f"| parameters | {quality.get('dense_params', 0):,} | {quality.get('pruned_params', 0):,} |",
                  "",
                  f"Mean KL(dense || pruned): {_fmt(quality.get('kl_mean'))} nats/token; top-1 agreement: "
                  f"{_fmt(quality.get('top1_agreement'))}; {quality.get('num_windows')} held-out windows, "
                  f"{quality.get('num_tokens')} predicted tokens.", ""]
    speed = checks.get("speed")
    if isinstance(speed, dict):
        lines += [f"Speed on {speed.get('device')} ({speed.get('dtype')}), dense and pruned in the same run: prefill of "
                  f"{speed.get('prefill_tokens')} tokens {_fmt(speed.get('dense_prefill_s'))} s -> "
                  f"{_fmt(speed.get('pruned_prefill_s'))} s (x{_fmt(speed.get('prefill_speedup'))}); decode "
                  f"{_fmt(speed.get('dense_decode_tps'))} -> {_fmt(speed.get('pruned_decode_tps'))} tokens/s "
                  f"(x{_fmt(speed.get('decode_speedup'))}); ideal from FLOPs x{_fmt(speed.get('ideal_speedup'))}.", ""]
    generations = checks.get("generations")
    if isinstance(generations, list) and generations:
        lines += ["| prompt | dense | pruned |", "|---|---|---|"]
        for row in generations:
            cells = [str(row.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ("prompt", "dense", "pruned")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for key, value in checks.items():
        if key not in ("quality", "speed", "generations"):
            lines.append(f"- {key}: {json.dumps(value) if isinstance(value, (dict, list)) else _fmt(value)}")
    return lines


# -- export ----------------------------------------------------------------------------------------
def export_pruned(
    loaded_or_model,
    tokenizer,
    plan: DropPlan,
    out_dir: str | os.PathLike,
    *,
    scores=None,
    criterion: str | None = None,
    calibration: dict | None = None,
    checks: dict | None = None,
    overwrite: bool = False,
    write_remote_code: bool = True,
    verify: bool = True,
    atol: float | None = None,
) -> ExportResult:
    """Prune ``plan`` out of a copy of the model, write it to ``out_dir`` atomically and verify it.

    ``loaded_or_model`` is a :class:`~entrodrop.loading.LoadedModel` (its tokenizer is used when
    ``tokenizer`` is None) or a ``*ForCausalLM``; the dense model is not modified. ``scores``
    (:class:`~entrodrop.scores.Scores` or its dict), ``calibration`` and ``checks`` (e.g.
    ``{"quality": QualityReport, "speed": SpeedReport, "generations": rows}``) go into
    ``entrodrop.json`` and the card. ``write_remote_code`` adds ``modeling_entrodrop.py`` for
    sub-block plans. Raises ValueError/PermissionError before heavy work for a bad target, and
    OSError (errno ENOSPC for a full disk) if writing fails, leaving nothing at ``out_dir``.
    """
    # a *ForCausalLM has a .model attribute too (its base model): test for a module first
    model = loaded_or_model if isinstance(loaded_or_model, nn.Module) else getattr(loaded_or_model, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a LoadedModel or a *ForCausalLM model, got {type(loaded_or_model).__name__}.")
    if tokenizer is None and not isinstance(loaded_or_model, nn.Module):
        tokenizer = getattr(loaded_or_model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("An export needs the tokenizer next to the weights; pass tokenizer=.")
    spec = get_arch(model)
    check_plan(model, plan, spec)
    dense_params, dense_bytes = count_parameters(model)
    target = check_target(out_dir, overwrite, needed_bytes=dense_bytes)

    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        result = _write_export(loaded_or_model, model, tokenizer, plan, spec, tmp, target, scores=scores,
                               criterion=criterion, calibration=calibration, checks=checks,
                               write_remote_code=write_remote_code, verify=verify, atol=atol,
                               dense_params=dense_params)
        _commit(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"Disk full while writing the pruned model to {target}; the partial files "
                                        "were removed. Free some space or choose another folder.") from exc
        raise OSError(exc.errno, f"Could not write the pruned model to {target} ({exc}); the partial files were "
                                 "removed.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = target
    result.files = sorted(p.name for p in target.iterdir())
    logger.info("Exported %s to %s: %s", plan.describe(), target, result.verdict)
    return result


def _write_export(loaded, model, tokenizer, plan: DropPlan, spec, tmp: Path, target: Path, *, scores, criterion,
                  calibration, checks, write_remote_code: bool, verify: bool, atol, dense_params: int) -> ExportResult:
    pruned = prune_model(model, plan)
    pruned.eval()
    if isinstance(loaded, nn.Module):
        loaded = None  # no LoadedModel: name and source come from the config
    gguf = _is_gguf(loaded, pruned)
    if gguf or getattr(pruned, "hf_quantizer", None) is not None:
        from .loading import strip_gguf_quantization

        strip_gguf_quantization(pruned)
    subblocks = bool(getattr(pruned.config, DROPPED_KEY, None))
    versions = package_versions()
    remote_code = False
    if subblocks and write_remote_code:
        base = _remote_code_base(pruned)
        if base is None:
            logger.warning("%s is not a transformers class: no modeling_entrodrop.py; reload with load_pruned.",
                           type(pruned).__name__)
        else:
            cls_name, source = remote_code_source(base, versions["entrodrop"])
            (tmp / REMOTE_CODE_FILE).write_text(source)
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
        verdict = _verdict_line(verification)
    else:
        verification = {"ok": False, "skipped": True, "loaders": {}}
        verdict = "Verification SKIPPED: the folder was not reloaded after writing."
    pruned_params = count_parameters(pruned)[0]
    hint = _reload_hint(subblocks, remote_code)

    if scores is not None and not isinstance(scores, dict):
        scores = scores.to_dict()
    if calibration is None and scores:
        calibration = scores.get("calibration")
    meta = {
        "format_version": EXPORT_FORMAT_VERSION,
        "source": {"name": getattr(loaded, "name", None) or getattr(model.config, "_name_or_path", "") or None,
                   "source": getattr(loaded, "source", None), "gguf_file": getattr(loaded, "gguf_file", None),
                   "family": spec.family, "model_type": getattr(model.config, "model_type", None)},
        "gguf": gguf,
        "plan": plan.to_dict(),
        "criterion": criterion or plan.criterion,
        "dropped_in_pruned_model": getattr(pruned.config, DROPPED_KEY, None) or [],
        "num_layers": {"dense": plan.num_layers, "pruned": plan.num_layers - len(plan.layers_of("layer"))},
        "parameters": {"dense": dense_params, "pruned": pruned_params, "removed": dense_params - pruned_params},
        "scores": scores,
        "calibration": calibration,
        "checks": jsonable(checks),
        "verification": {**verification, "verdict": verdict},
        "reload": hint,
        "remote_code": remote_code,
        "versions": versions,
    }
    meta = jsonable(meta)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    (tmp / "README.md").write_text(_model_card(meta, verdict, hint.replace("PATH", str(target))))
    # some writers create private (0600) files; give every file the mode our own writes got (umask)
    mode = (tmp / METADATA_FILE).stat().st_mode & 0o777
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(mode)
    return ExportResult(path=target, ok=bool(verification["ok"]), verdict=verdict, verification=verification,
                        plan=plan.to_dict(), remote_code=remote_code, reload_hint=hint.replace("PATH", str(target)),
                        dense_params=dense_params, pruned_params=pruned_params)


def zip_export(out_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Zip an export folder (for download); returns the ``.zip`` path, next to the folder by default."""
    folder = Path(out_dir).expanduser().absolute()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an export folder (no config.json).")
    dest = Path(dest).expanduser().absolute() if dest is not None else folder.parent / f"{folder.name}.zip"
    partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        written = shutil.make_archive(str(partial), "zip", root_dir=folder.parent, base_dir=folder.name)
        os.replace(written, dest)
    except BaseException:
        for leftover in (Path(f"{partial}.zip"), partial):
            if leftover.exists():
                leftover.unlink()
        raise
    return dest


def push_folder_to_hub(folder: str | Path, repo_id: str, token: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo URL.

    Raises ValueError with what to do for a missing token or repo id, an unreachable hub
    (offline) or a refused token."""
    folder = Path(folder)
    repo_id = (repo_id or "").strip()
    token = (token or "").strip()
    if not (folder / "config.json").is_file():
        raise ValueError("Export the pruned model first (step 5), then push it.")
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError("Give a repository id such as your-name/smollm2-pruned.")
    if not token:
        raise ValueError("Give a Hugging Face access token with write permission (huggingface.co/settings/tokens).")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise ValueError("Pushing needs the huggingface_hub package: pip install huggingface_hub.") from exc
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload EntroDrop pruned model")
    except Exception as exc:  # offline mode, connection errors, HTTP 401/403...
        text = f"{type(exc).__name__}: {exc}"
        lowered = text.lower()
        if any(w in lowered for w in ("offline", "connect", "resolve", "timed out", "timeout", "network", "unreachable")):
            raise ValueError(f"Could not reach the Hugging Face Hub ({text}). Check the network, or download the zip "
                             "and upload it yourself.") from exc
        if any(w in lowered for w in ("401", "403", "unauthorized", "forbidden", "token")):
            raise ValueError(f"The Hub refused the token ({text}). Use a token with write permission.") from exc
        raise ValueError(f"Pushing to the Hub failed ({text}).") from exc
    return str(getattr(url, "url", url))
