"""Proof that an export reloads: every loader that applies, compared with the in-memory pruned model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..arch import get_layers
from ..evaluate import greedy_generate
from ..prune import DROPPED_KEY
from .reload import load_pruned

logger = logging.getLogger(__name__)

_FIXED_TEXT = "The quick brown fox jumps over the lazy dog. What is 12 + 30? The answer is 42."
_VERIFY_NEW_TOKENS = 8


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
