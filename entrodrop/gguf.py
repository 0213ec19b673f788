"""GGUF checkpoints: a cheap check that a file can be one, and forgetting the quantisation bookkeeping
of a model de-quantised from one (so ``save_pretrained`` accepts it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GGUF_MAGIC = b"GGUF"
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
