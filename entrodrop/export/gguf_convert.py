"""A transformers checkpoint (a local folder, a hub id) as a GGUF source: the metadata and tokenizer llama.cpp
reads, written from the model's config and its tokenizer, so such a model exports to GGUF as one loaded from a
``.gguf`` file does (:func:`~.gguf_export.export_gguf` writes the dense file first, into a temporary folder,
then prunes it with the model's own weights).

What is converted, and what is refused with the reason (a file that loads and computes or tokenizes
something else is worse than none):

* the Llama family (``model_type`` ``llama``) with no biases: the layout of :mod:`.gguf_tensors`, checked
  against the bundled SmolLM2 file. RoPE unscaled, scaled as Llama 3.1+ does (written as llama.cpp's
  converter does, a ``rope_freqs`` tensor of per-frequency divisors) or linearly (two keys); the reload check
  reads these back (:func:`entrodrop.gguf.gguf_rope_parameters`); YaRN, dynamic and LongRoPE are refused.
  Gemma 3 from safetensors is refused: its SentencePiece vocabulary needs the token scores of
  ``tokenizer.model``, which this writer does not read;
* a byte-level BPE tokenizer with no normaliser, whose pre-tokenizer llama.cpp knows by name. llama.cpp picks
  the regular expressions that split text before BPE from ``tokenizer.ggml.pre`` alone (read in its
  ``llama-vocab.cpp``), so the name must be the one whose expressions the tokenizer's own pre-tokenizer runs.
  Three are recognised from the structure of ``tokenizer.json``'s ``pre_tokenizer``: GPT-2's byte-level
  expression alone is ``gpt-2``; digits split one by one and then that expression is ``smollm`` (SmolLM,
  StarCoder); Llama 3's expression as a ``Split`` step and then byte-level without its own expression is
  ``llama-bpe``, which llama.cpp runs with whole-piece lookup before merging (the BPE model's
  ``ignore_merges``, required to match). Any other is refused, with llama.cpp's ``convert_hf_to_gguf.py``
  (which names many more by hashing a test text) as the way on.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..gguf import ROPE_FREQS, rope_freq_factors
from .gguf_tensors import ModelTensors, file_type

CONVERTIBLE = ("llama",)  # model_type -> written as GGUF architecture "llama"
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# Llama 3's split (tokenizer.json writes it as a Split step before a ByteLevel step without its own regex);
# llama.cpp's pre-tokenizer "llama-bpe" runs the same expression and looks a whole piece up before merging it
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# RoPE scalings written as llama.cpp reads them and read back into a config on load (entrodrop.gguf)
_WRITTEN_SCALING = ("default", "llama3", "linear")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5  # gguf.TokenType values
_WAY_ON = ("Convert the safetensors export with llama.cpp's convert_hf_to_gguf.py, or export safetensors "
           "(format='safetensors').")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _rope_scaling(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type")) or "default") if isinstance(params, dict) else "default"


def _pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for ``tokenizer``'s pre-tokenizer (module docstring); ValueError when there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"The tokenizer ({type(tokenizer).__name__}) has no tokenizer.json to convert: GGUF needs "
                         f"its vocabulary and merges. {_WAY_ON}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"The tokenizer is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''}; "
                         f"EntroDrop converts byte-level BPE tokenizers only. {_WAY_ON}")
    if spec.get("normalizer") is not None:
        raise ValueError(f"The tokenizer normalises text ({spec['normalizer'].get('type')}) before BPE, which "
                         f"llama.cpp's BPE tokenizer does not do. {_WAY_ON}")

    def byte_level(p: dict, regex: bool = True) -> bool:
        return all(p.get(k) == v for k, v in {**_BYTE_LEVEL, "use_regex": regex}.items())

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    name = None
    if len(steps) == 1 and byte_level(steps[0]):
        name = "gpt-2"
    elif len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1]):
        name = "smollm"
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": _LLAMA3_SPLIT}
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        name = "llama-bpe"
    if name is None:
        raise ValueError(f"llama.cpp splits text before BPE by a named set of expressions, and this tokenizer's "
                         f"pre-tokenizer ({json.dumps(pre)[:200]}) is not one EntroDrop can name (it knows GPT-2's, "
                         f"SmolLM's and Llama 3's); a wrong name would load and tokenize differently. {_WAY_ON}")
    # llama.cpp takes a piece found whole in the vocabulary as one token under llama-bpe only (ignore_merges)
    lookup = bool(model.get("ignore_merges"))
    if lookup != (name == "llama-bpe"):
        does = "looks whole pieces up before merging" if lookup else "merges every piece"
        raise ValueError(f"The tokenizer splits text as llama.cpp's '{name}' does, but it {does} (ignore_merges="
                         f"{lookup}), which llama.cpp does not do under that name: some words would tokenize "
                         f"differently. {_WAY_ON}")
    return name


def check_convertible(model: nn.Module, tokenizer=None) -> dict:
    """Refuse what cannot be converted faithfully (ValueError naming why; the tokenizer too when given); else
    the metadata values the planner reads (architecture and block count)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in CONVERTIBLE:
        why = (" (its SentencePiece vocabulary needs the token scores of tokenizer.model, which this writer does "
               "not read; the bundled Gemma 3 is a GGUF file and exports to GGUF)" if str(model_type).startswith("gemma")
               else "")
        raise ValueError(f"A GGUF export of a '{model_type}' model loaded from safetensors is not supported "
                         f"(supported: {', '.join(CONVERTIBLE)}; any model loaded from a .gguf file){why}. {_WAY_ON}")
    scaling = _rope_scaling(config)
    if scaling not in _WRITTEN_SCALING:
        raise ValueError(f"The model scales RoPE as '{scaling}', which this converter does not write (it writes "
                         f"Llama 3's scaling, as llama.cpp's rope_freqs tensor, and linear scaling). {_WAY_ON}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"The model's attention or MLP layers have biases, which this converter does not write. {_WAY_ON}")
    if tokenizer is not None:
        _pre_tokenizer_name(tokenizer)
    return {"general.architecture": "llama", "llama.block_count": config.num_hidden_layers}


def _vocabulary(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Token strings by id (``size`` of them, as the embedding has rows) and their GGUF token types."""
    vocab = tokenizer.get_vocab()
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [f"[PAD{i}]" for i in range(size)], [_TOKEN_UNUSED] * size
    for text, i in vocab.items():
        if i >= size:
            raise ValueError(f"The tokenizer has token id {i}, but the model's embedding has {size} rows.")
        tokens[i] = text
        types[i] = (_TOKEN_CONTROL if added[text].special else _TOKEN_USER_DEFINED) if text in added else _TOKEN_NORMAL
    return tokens, types


def _merges(tokenizer) -> list[str]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_dense_gguf(model: nn.Module, tokenizer, out_file: str | Path, gguf_type: str) -> None:
    """Write ``model`` (all its layers) with ``tokenizer`` as a Llama GGUF file, weights in ``gguf_type``."""
    from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType

    if tokenizer is None:
        raise ValueError("A GGUF file carries the tokenizer: pass tokenizer=.")
    check_convertible(model, tokenizer)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = GGUFWriter(str(out_file), "llama", use_temp_file=False)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model").rstrip("/").rsplit("/", 1)[-1])
    writer.add_file_type(int(file_type(gguf_type)))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if _rope_scaling(config) == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_parameters["factor"]))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    tokens, types = _vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if isinstance(token_id, int):
            add(token_id)
    ids = tokenizer("a")["input_ids"]  # what encoding adds around a text, as the tokenizer does it
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    tensors = ModelTensors(model, "llama", config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name in tensors.names():
        if tied and name == "output.weight":
            continue  # llama.cpp uses the token embedding when the file has no output matrix
        data, qtype = tensors.encoded(name, gguf_type)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    factors = rope_freq_factors(config)
    if factors is not None:  # Llama 3's scaling: one divisor per frequency, float32 as llama.cpp's converter has it
        writer.add_tensor(ROPE_FREQS, factors, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
