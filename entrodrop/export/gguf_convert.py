"""A transformers checkpoint (a local folder, a hub id) as a GGUF source: the metadata and tokenizer llama.cpp
reads, written from the model's config and its tokenizer, so such a model exports to GGUF as one loaded from a
``.gguf`` file does (:func:`~.gguf_export.export_gguf` writes the dense file first, into a temporary folder,
then prunes it with the model's own weights).

What is converted, and what is refused with the reason (a file that loads and computes or tokenizes
something else is worse than none):

* the Llama family (``model_type`` ``llama``) with no biases, and a byte-level BPE tokenizer whose
  pre-tokenizer llama.cpp knows by name (:mod:`.gguf_vocab`): the layout of :mod:`.gguf_tensors`, checked
  against the bundled SmolLM2 file. RoPE unscaled, scaled as Llama 3.1+ does (written as llama.cpp's
  converter does, a ``rope_freqs`` tensor of per-frequency divisors) or linearly (two keys); the reload check
  reads these back (:func:`entrodrop.gguf.gguf_rope_parameters`); YaRN, dynamic and LongRoPE are refused.
* Gemma 3 text models (``model_type`` ``gemma3_text``) with a SentencePiece BPE tokenizer (:mod:`.gguf_vocab`),
  written as the bundled Gemma 3 file is, key for key. llama.cpp hard-codes parts of Gemma 3 that a config
  can set otherwise (read in its ``llama-model.cpp``), so a checkpoint is refused where it differs from them:
  every sixth layer global (``layer_types`` by index), sliding layers' RoPE base 10000 and global layers'
  unscaled, the attention scaled by the head size (``query_pre_attn_scalar``; the 62-layer 27B by the
  hidden size over the heads), no logit soft-capping, tanh GELU, tied embeddings.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..gguf import ROPE_FREQS, gemma3_query_scalar, rope_freq_factors
from .gguf_tensors import ModelTensors, file_type
from .gguf_vocab import WAY_ON, bpe_pre_tokenizer_name, check_sentencepiece, write_vocabulary
from .gguf_write import GEMMA3_SWA_PATTERN

# model_type -> the GGUF architecture it is written as, and the kind of vocabulary it carries (gguf_vocab)
CONVERTIBLE = {"llama": ("llama", "bpe"), "gemma3_text": ("gemma3", "sentencepiece")}
# RoPE scalings written as llama.cpp reads them and read back into a config on load (entrodrop.gguf)
_WRITTEN_SCALING = ("default", "llama3", "linear")
GEMMA3_SWA_BASE = 10000.0  # llama.cpp's RoPE base for Gemma 3's sliding-window layers (not read from the file)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _rope_scaling(params) -> str:
    return str(params.get("rope_type", params.get("type")) or "default") if isinstance(params, dict) else "default"


def _check_llama(config) -> None:
    scaling = _rope_scaling(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None))
    if scaling not in _WRITTEN_SCALING:
        raise ValueError(f"The model scales RoPE as '{scaling}', which this converter does not write (it writes "
                         f"Llama 3's scaling, as llama.cpp's rope_freqs tensor, and linear scaling). {WAY_ON}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"The model's attention or MLP layers have biases, which this converter does not write. {WAY_ON}")


def _check_gemma3(config) -> None:
    """Refuse what llama.cpp's Gemma 3 would compute otherwise than transformers does (module docstring)."""
    kinds = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if i % GEMMA3_SWA_PATTERN == GEMMA3_SWA_PATTERN - 1 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
    scalar = gemma3_query_scalar(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                 config.head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    why = None
    if len(kinds) != len(expected):
        why = f"its config gives {len(kinds)} layer kinds for {len(expected)} layers"
    elif kinds != expected:
        moved = next(i for i, (kind, wanted) in enumerate(zip(kinds, expected, strict=True)) if kind != wanted)
        why = (f"llama.cpp gives Gemma 3 layers their attention kind by index (every {GEMMA3_SWA_PATTERN}th is "
               f"global), and this model's layer {moved} is {kinds[moved]}")
    elif _rope_scaling(full) != "default" or _rope_scaling(sliding) != "default":
        why = (f"the model scales RoPE ({_rope_scaling(full)} for global layers, {_rope_scaling(sliding)} for "
               "sliding ones), which EntroDrop does not write or read back for Gemma 3")
    elif float(sliding.get("rope_theta", GEMMA3_SWA_BASE)) != GEMMA3_SWA_BASE:
        why = (f"its sliding-window layers rotate with RoPE base {sliding.get('rope_theta')}, and llama.cpp uses "
               f"{GEMMA3_SWA_BASE:g} for them whatever the file says")
    elif getattr(config, "query_pre_attn_scalar", scalar) != scalar:
        why = (f"it scales attention by 1/sqrt({config.query_pre_attn_scalar}), and llama.cpp by 1/sqrt({scalar}) "
               f"for a {config.num_hidden_layers}-layer Gemma 3")
    elif getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        why = "it soft-caps logits, which llama.cpp's Gemma 3 does not do"
    elif getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        why = f"its MLP runs {config.hidden_activation}, and llama.cpp's Gemma 3 the tanh GELU"
    elif getattr(config, "attention_bias", False) or getattr(config, "use_bidirectional_attention", False):
        why = "it has attention biases or bidirectional attention, which llama.cpp's Gemma 3 does not run"
    elif not getattr(config, "tie_word_embeddings", True):
        why = "its output matrix is not the token embedding, as every Gemma 3 has it and the bundled file holds it"
    if why:
        raise ValueError(f"This Gemma 3 cannot be written as a GGUF llama.cpp runs the same: {why}. {WAY_ON}")


def check_convertible(model: nn.Module, tokenizer=None) -> dict:
    """Refuse what cannot be converted faithfully (ValueError naming why; the tokenizer too when given); else
    the metadata values the planner reads (architecture, block count, and the sizes Gemma 3's attention scale
    follows in llama.cpp)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in CONVERTIBLE:
        raise ValueError(f"A GGUF export of a '{model_type}' model loaded from safetensors is not supported "
                         f"(supported: {', '.join(CONVERTIBLE)}; any model loaded from a .gguf file). {WAY_ON}")
    arch, vocabulary = CONVERTIBLE[model_type]
    (_check_llama if arch == "llama" else _check_gemma3)(config)
    if tokenizer is not None:
        (bpe_pre_tokenizer_name if vocabulary == "bpe" else check_sentencepiece)(tokenizer)
    heads = config.num_attention_heads
    return {"general.architecture": arch, f"{arch}.block_count": config.num_hidden_layers,
            f"{arch}.embedding_length": config.hidden_size, f"{arch}.attention.head_count": heads,
            f"{arch}.attention.key_length": getattr(config, "head_dim", None) or config.hidden_size // heads}


def _write_llama_keys(writer, config, head_dim: int) -> None:
    from gguf import RopeScalingType

    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    params = getattr(config, "rope_parameters", None) or {}
    if _rope_scaling(params) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write_gemma3_keys(writer, config, head_dim: int) -> None:
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["full_attention"]["rope_theta"]))
    writer.add_sliding_window(config.sliding_window)


def write_dense_gguf(model: nn.Module, tokenizer, out_file: str | Path, gguf_type: str) -> None:
    """Write ``model`` (all its layers) with ``tokenizer`` as a GGUF file, weights in ``gguf_type``."""
    from gguf import GGMLQuantizationType, GGUFWriter

    if tokenizer is None:
        raise ValueError("A GGUF file carries the tokenizer: pass tokenizer=.")
    arch = check_convertible(model, tokenizer)["general.architecture"]
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = GGUFWriter(str(out_file), arch, use_temp_file=False)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").rsplit("/", 1)[-1])
    writer.add_file_type(int(file_type(gguf_type)))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    (_write_llama_keys if arch == "llama" else _write_gemma3_keys)(writer, config, head_dim)
    writer.add_vocab_size(config.vocab_size)
    write_vocabulary(writer, tokenizer, config.vocab_size, CONVERTIBLE[config.model_type][1])
    tensors = ModelTensors(model, arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in tensors.names():
        if tied and name == "output.weight":
            continue  # llama.cpp uses the token embedding when the file has no output matrix
        data, qtype = tensors.encoded(name, gguf_type)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    factors = rope_freq_factors(config) if arch == "llama" else None
    if factors is not None:  # Llama 3's scaling: one divisor per frequency, float32 as llama.cpp's converter has it
        writer.add_tensor(ROPE_FREQS, factors, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
