"""Tiny random-init models of every supported family, built offline from config classes.

``tiny_model("llama")`` returns an eval-mode ``*ForCausalLM`` with 4 layers and hidden size 64,
small enough that a forward takes milliseconds. Families with sliding-window layers get a
``layer_types`` mix so per-layer config fields are exercised.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 384  # matches the tiny tokenizer in conftest.py
LAYERS = 4
HIDDEN = 64

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=0,
    bos_token_id=0,
)


def tiny_config(family: str):
    """Config of a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    if family == "llama":
        return LlamaConfig(**_COMMON)
    if family == "mistral":
        return MistralConfig(**_COMMON, sliding_window=16)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    if family == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=16)
    if family == "gemma":
        return GemmaConfig(**_COMMON, head_dim=16)
    if family == "gemma2":
        return Gemma2Config(**_COMMON, head_dim=16, sliding_window=16)
    if family == "gemma3":
        return Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2))
    if family == "phi3":
        return Phi3Config(**_COMMON)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt_neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=256, use_parallel_residual=True,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                         do_layer_norm_before=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt")


def tiny_model(family: str, seed: int = 0):
    """Random-init eval-mode model of ``family``; weights scaled up so blocks change the stream."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


def random_windows(num: int = 4, seq_len: int = 48, seed: int = 0) -> torch.Tensor:
    """(num, seq_len) token ids drawn uniformly from the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (num, seq_len), generator=g)
