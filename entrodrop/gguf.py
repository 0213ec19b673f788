"""GGUF checkpoints: a cheap check that a file can be one, each file parsed once, forgetting the
quantisation bookkeeping of a model de-quantised from one (so ``save_pretrained`` accepts it), and RoPE scaling
as llama.cpp stores it.

One reader per file: ``gguf.GGUFReader`` parses every metadata array into Python objects when it opens a file,
which for Gemma 3's 262,144-piece vocabulary takes 10-20 s here (SmolLM2's 49,152: about 5 s), and loading a
model opened the file four times (transformers' config, tokenizer and weights, and the RoPE check below); an
export opened its source up to six times more. Inside :func:`gguf_parse_once` every reader of one unchanged
file on that thread is one parsed reader, transformers' included (and its tensor-name maps, one per
architecture instead of one per module).

RoPE scaling: llama.cpp's converter writes Llama 3.1+ scaling (``rope_type`` ``llama3``) as a tensor,
``rope_freqs.weight``, of one divisor per rotary frequency, and linear scaling as the keys
``<arch>.rope.scaling.type`` and ``.factor``. transformers' GGUF loader reads neither (5.x), so a model loaded
from such a file would run with unscaled positions: another model than llama.cpp runs. :func:`gguf_rope_parameters`
reads them back as a config's ``rope_parameters`` (the Llama 3 parameters fitted to the divisors and checked
to give them again), or refuses a scaling it cannot express.

Gemma 3's attention scale: llama.cpp scales queries by 1/sqrt(head size) (the 62-layer 27B by 1/sqrt(hidden
size / heads); read in its ``llama-model.cpp``), while transformers' GGUF loader leaves the config's
``query_pre_attn_scalar`` at its default, 256, right only where the head size is 256 (270M to 12B).
:func:`gemma3_query_scalar` is llama.cpp's value, which loading a Gemma 3 file sets and converting one checks.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import gguf as gguf_package
import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GGUF_MAGIC = b"GGUF"
_scope = threading.local()  # .readers {file identity: reader}, .name_maps: while in gguf_parse_once
_patch_lock = threading.Lock()
_patched_scopes = 0  # threads inside gguf_parse_once; the package's two names are ours while above 0
_replaced: tuple | None = None  # what those two names were when the first of those scopes began
_GGUF_HEADER_BYTES = 24  # magic, version (uint32), tensor count and metadata count (uint64 each)


def check_gguf_file(path: str | os.PathLike) -> None:
    """Refuse a file that cannot be a GGUF checkpoint (empty, too short, wrong magic bytes), cheaply.

    Reads 4 bytes; a file cut short later on (a partial download) is caught where the GGUF reader
    fails, see :func:`load_config`. Raises ValueError naming the file and saying what to do."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ValueError(f"Could not read the GGUF file '{path}': {err.strerror or err}. Check the path and its permissions.") from err
    again = "Download it again, or give another .gguf file or a model folder."
    if size == 0:
        raise ValueError(f"The GGUF file '{path}' is empty (0 bytes), e.g. after an interrupted download or copy. "
                         "Download it again, or give another .gguf file or a model folder.")
    if size < _GGUF_HEADER_BYTES:
        raise ValueError(f"'{path}' is not a GGUF file: {size} bytes cannot hold a GGUF header. {again}")
    if magic != GGUF_MAGIC:
        raise ValueError(f"'{path}' is not a GGUF file: it does not start with the GGUF magic bytes. {again}")


def quant_method(config) -> str | None:
    """The ``quant_method`` a config's ``quantization_config`` names (dict or object), or None."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def strip_gguf_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that a de-quantised model came from a GGUF file, so ``save_pretrained`` accepts it.

    The weights are plain floats already; only transformers' bookkeeping (``hf_quantizer`` and
    ``config.quantization_config`` with ``quant_method: gguf``) says otherwise. :func:`~entrodrop.loading.load_model`
    asks transformers to de-quantise, which drops that bookkeeping itself; this function is for
    models loaded some other way, and a no-op on models without it.
    """
    method = quant_method(model.config)
    if getattr(model.config, "quantization_config", None) is not None and method != "gguf":
        raise ValueError(f"The model is quantised with {method}, not de-quantised GGUF; cannot strip it.")
    # Same steps as transformers' HfQuantizer.remove_quantization_config.
    for name in ("hf_quantizer", "quantization_method"):
        model.__dict__.pop(name, None)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency divisors (Llama 3.1+ RoPE scaling)
_ROPE_WAY_ON = "Load the model's safetensors folder instead, whose config says how its positions are scaled."


def _unscaled_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Rotary inverse frequencies without scaling, as transformers and llama.cpp's converter compute them."""
    import torch

    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).numpy()


def rope_freq_factors(config) -> np.ndarray | None:
    """``rope_freqs.weight`` for a config with Llama 3 RoPE scaling (float32, head_dim / 2 divisors, 1 where a
    frequency is kept): transformers' own scaled frequencies divided into the unscaled ones. None for a config
    without that scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict) or params.get("rope_type") != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (_unscaled_inv_freq(float(params["rope_theta"]), 2 * scaled.numel()) / scaled.numpy()).astype(np.float32)


def _short(value: float) -> float:
    return float(f"{value:.6g}")  # a fitted 8.0000005 is the config's 8.0


def llama3_rope_parameters(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """The Llama 3 ``rope_parameters`` whose divisors are ``factors`` (ValueError where none are).

    Between the kept high frequencies (divisor 1) and the low ones divided by ``factor``, transformers blends
    with ``s = (L / wavelength - low) / (high - low)``, L the original context: ``s`` is linear in 1 /
    wavelength, so two blended frequencies fix ``L / (high - low)`` and ``low / (high - low)``. Only those
    ratios act, so ``low_freq_factor`` is taken as 1 (every Llama 3 release's). The fit is checked by
    computing the divisors again with transformers."""
    from transformers import LlamaConfig

    ff = np.asarray(factors, dtype=np.float64)
    wavelength = 2 * math.pi / _unscaled_inv_freq(theta, 2 * ff.size).astype(np.float64)
    factor = float(ff.max())
    blended = (ff > 1 + 1e-4) & (ff < factor * (1 - 1e-4))
    params = None
    if factor > 1 + 1e-4 and blended.sum() >= 2 and np.all(ff >= 1 - 1e-6):
        s = (1 / ff[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelength[blended], s, 1)
        if intercept < 0 < slope:
            params = {"rope_type": "llama3", "rope_theta": float(theta), "factor": _short(factor),
                      "low_freq_factor": 1.0, "high_freq_factor": _short(1 - 1 / intercept),
                      "original_max_position_embeddings": int(round(-slope / intercept))}
    if params is not None:
        config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim, rope_parameters=params,
                             max_position_embeddings=1 << 30)
        if np.allclose(rope_freq_factors(config), ff, rtol=1e-5, atol=0):
            return params
    raise ValueError(f"The file's {ROPE_FREQS} ({ff.size} divisors from {ff.min():.4g} to {ff.max():.4g}) is not "
                     f"Llama 3's RoPE scaling, the only form EntroDrop reads back. {_ROPE_WAY_ON}")


def gemma3_query_scalar(num_layers: int, hidden_size: int, heads: int, head_dim: int) -> int:
    """``query_pre_attn_scalar`` as llama.cpp computes it for a Gemma 3 of these sizes (module docstring)."""
    return hidden_size // heads if num_layers == 62 else head_dim


def _package_own() -> tuple:
    """The package's ``GGUFReader`` and ``get_tensor_name_map`` as they were before any scope replaced them."""
    replaced = _replaced  # read once: another thread's last scope may give them back meanwhile
    return replaced if replaced is not None else (gguf_package.GGUFReader, gguf_package.get_tensor_name_map)


def _package_reader(path, mode: str = "r"):
    """A fresh parse by the package's own ``GGUFReader``."""
    return _package_own()[0](str(path), mode)


def gguf_reader(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` of ``path``: inside :func:`gguf_parse_once`, the one this thread already parsed for
    the file unless it changed or was replaced since (its inode, size and change times)."""
    readers = getattr(_scope, "readers", None)
    if readers is None:
        return _package_reader(path)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in readers:
        readers[key] = _package_reader(path)
    return readers[key]


def _shared_reader(path, mode: str = "r"):
    """``gguf.GGUFReader`` inside a scope (transformers imports it at each call): the shared reader for read-only
    use, a fresh one otherwise; another thread, outside any scope, gets a fresh one as before."""
    return gguf_reader(path) if mode == "r" else _package_reader(path, mode)


def _shared_name_map(arch, n_blocks: int):
    """``gguf.get_tensor_name_map`` inside a scope: one map per architecture and depth (transformers builds one
    for each of a model's ~400 modules, 2-3 s a load here); the maps are only read."""
    build = _package_own()[1]
    maps = getattr(_scope, "name_maps", None)
    if maps is None:
        return build(arch, n_blocks)
    if (arch, n_blocks) not in maps:
        maps[arch, n_blocks] = build(arch, n_blocks)
    return maps[arch, n_blocks]


@contextmanager
def gguf_parse_once() -> Iterator[None]:
    """Within this block, on this thread, each GGUF file is parsed once and each tensor-name map built once, ours
    (:func:`gguf_reader`) and transformers' (``gguf.GGUFReader``, ``gguf.get_tensor_name_map``) alike; they are
    let go at its end, and the package's two names are given back what they were before. Nests."""
    global _patched_scopes, _replaced
    if getattr(_scope, "readers", None) is not None:  # nested: the outer scope's serve
        yield
        return
    with _patch_lock:
        if not _patched_scopes:
            _replaced = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
            gguf_package.GGUFReader, gguf_package.get_tensor_name_map = _shared_reader, _shared_name_map
        _patched_scopes += 1
    try:
        _scope.readers, _scope.name_maps = {}, {}
        yield
    finally:
        _scope.readers = _scope.name_maps = None
        with _patch_lock:
            _patched_scopes -= 1
            if not _patched_scopes:
                gguf_package.GGUFReader, gguf_package.get_tensor_name_map = _replaced
                _replaced = None


def gguf_rope_parameters(path: str | os.PathLike) -> dict | None:
    """The ``rope_parameters`` a GGUF file's RoPE scaling stands for (module docstring); None for none.
    ValueError (saying why) for a scaling that cannot be read back faithfully."""
    reader = gguf_reader(path)

    def value(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = value("general.architecture")
    kind = value(f"{arch}.rope.scaling.type", "none")
    has_freqs = any(t.name == ROPE_FREQS for t in reader.tensors)
    if kind == "none" and not has_freqs:
        return None
    what = f"RoPE scaling ({kind if kind != 'none' else ROPE_FREQS})"
    if arch != "llama":
        raise ValueError(f"The GGUF file's {arch} model has {what}, which transformers does not read from GGUF and "
                         f"EntroDrop reads back for Llama-family files only: the model would run with other "
                         f"positions than llama.cpp runs. {_ROPE_WAY_ON}")
    theta = float(value("llama.rope.freq_base", 10000.0))
    if has_freqs and kind == "none":
        freqs = next(t for t in reader.tensors if t.name == ROPE_FREQS)
        heads = value("llama.attention.head_count")
        head_dim = value("llama.rope.dimension_count") or value("llama.embedding_length") // heads
        return llama3_rope_parameters(np.asarray(freqs.data, dtype=np.float32).reshape(-1), theta, int(head_dim))
    if kind == "linear" and not has_freqs and value("llama.rope.scaling.factor"):
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(value("llama.rope.scaling.factor"))}
    raise ValueError(f"The GGUF file scales RoPE as '{kind}'{' with ' + ROPE_FREQS if has_freqs else ''}, which "
                     f"EntroDrop cannot read back (it reads Llama 3's {ROPE_FREQS}, and linear scaling). "
                     f"{_ROPE_WAY_ON}")
