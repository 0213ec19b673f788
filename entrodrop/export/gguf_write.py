"""GGUF export: the pruned model where llama.cpp, Ollama and LM Studio run it.

From a GGUF source (a bundled model, or any ``.gguf`` the model was loaded from), the kept tensors are
copied **as stored** (same quantisation, byte for byte), so the file is a fraction of the source's size:

* **whole layers** dropped: ``blk.N`` renumbered over the kept layers, ``<arch>.block_count`` set, and every
  per-layer metadata array (an array of ``block_count`` values under ``<arch>.``) cut to the kept layers;
* **attention sub-blocks** dropped (Llama family only): written as llama.cpp's ``deci`` architecture
  (Nemotron-51B's), whose per-layer ``deci.attention.head_count`` / ``head_count_kv`` arrays say which
  layers have no attention (0 heads: the layer's input passes to its FFN, no attention tensors, a KV cache
  of width 0); the dropped blocks' tensors, their norm included, are left out. Two limits of llama.cpp's
  deci loader (read in its source) are refused with the reason: the head size is taken from layer 0, so
  the first kept layer must keep its attention; and a layer with FFN width 0 skips the **whole** layer,
  attention included, so an MLP dropped alone cannot be expressed;
* Gemma 3: llama.cpp sets sliding-window vs global attention from the layer's **index** (global where
  ``index % pattern == pattern - 1``, pattern 6 unless the file says otherwise), so a whole-layer plan is
  written only when every kept layer keeps its kind at its new index; other plans are refused with the
  reason, never written to compute something else.

A model whose weights are not the source's (a healed one) is written from its own tensors instead, in a float
or block type, or each in the source's own type (:mod:`.gguf_tensors`), with the source's metadata and tokenizer. Provenance goes into
``entrodrop.*`` keys (dropped blocks, criterion, data, source, heal). A safetensors or hub source has no GGUF
metadata or tokenizer to start from and is refused with a message that offers the safetensors export. :func:`plan_gguf` decides (and refuses) before any byte is written; :func:`write_gguf` writes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..gguf import gemma3_query_scalar, gguf_reader
from ..plan import DropPlan
from .gguf_tensors import ModelTensors, file_type

logger = logging.getLogger(__name__)

FULL_LAYER_ARCHS = ("llama", "gemma3", "qwen2", "qwen3", "mistral", "phi3")  # whole-layer plans: renumbering only
SUBBLOCK_ARCHS = ("llama",)  # sub-block plans become ``deci``: its loader is Llama's with per-layer widths
GEMMA3_SWA_PATTERN = 6  # llama.cpp: every 6th layer (index % 6 == 5) is global, the others sliding-window
ATTN_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                "attn_rot_embd")
FFN_TENSORS = ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
PROVENANCE_PREFIX = "entrodrop."
_HEADER_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # the writer writes these itself


@dataclass
class GGUFPlan:
    """What a GGUF export writes: the architecture, kept layers (old index -> new), sub-blocks left out."""

    arch: str  # the written ``general.architecture``
    source_arch: str
    kept_layers: list[int]  # old indexes, in order; new index = position here
    no_attn: set[int] = field(default_factory=set)  # new indexes whose attention is dropped
    no_ffn: set[int] = field(default_factory=set)  # new indexes whose MLP is dropped


def _field_value(reader, key: str):
    if isinstance(reader, Mapping):  # the values a converted checkpoint will have (see .gguf_convert)
        return reader.get(key)
    field_ = reader.fields.get(key)
    return None if field_ is None else field_.contents()


def plan_gguf(reader, plan: DropPlan) -> GGUFPlan:
    """Refuse what GGUF cannot express (ValueError saying why and what to do instead), else the layout.

    ``reader`` is the source's ``GGUFReader``, or a mapping of the metadata values a converted checkpoint
    will have."""
    arch = str(_field_value(reader, "general.architecture") or "")
    blocks = _field_value(reader, f"{arch}.block_count")
    if blocks is None:
        raise ValueError(f"The GGUF source has no '{arch}.block_count'; it is not a model file EntroDrop can prune "
                         "into GGUF. Export safetensors instead (format='safetensors').")
    if int(blocks) != plan.num_layers:
        raise ValueError(f"The plan is for a model with {plan.num_layers} layers but the GGUF source has {blocks}.")
    whole = {b.layer for b in plan.blocks if b.kind == "layer"}
    attn = {b.layer for b in plan.blocks if b.kind == "attn"}
    mlp = {b.layer for b in plan.blocks if b.kind == "mlp"}
    whole |= attn & mlp  # both sub-blocks of a layer: the whole layer
    attn, mlp = attn - whole, mlp - whole
    kept = [i for i in range(plan.num_layers) if i not in whole]
    if not kept:
        raise ValueError("The plan drops every layer; nothing would remain to write.")
    if mlp:
        raise ValueError(
            "GGUF cannot express an MLP dropped alone: llama.cpp's per-layer 'deci' architecture skips the whole "
            "layer, attention included, where the FFN width is 0. Drop whole layers or attention blocks for a GGUF "
            "export, or export safetensors (sub-block plans reload with entrodrop.load_pruned).")
    if (attn or mlp) and arch not in SUBBLOCK_ARCHS:
        raise ValueError(
            f"GGUF has no way to express dropped attention or MLP sub-blocks for '{arch}' models: llama.cpp skips "
            f"sub-blocks per layer only in its 'deci' architecture, which takes Llama-family weights. Drop whole "
            "layers for a GGUF export, or export safetensors (sub-block plans reload with entrodrop.load_pruned).")
    if arch not in FULL_LAYER_ARCHS:
        raise ValueError(f"GGUF export of '{arch}' models is not supported yet (supported: "
                         f"{', '.join(FULL_LAYER_ARCHS)}). Export safetensors instead.")
    if attn and kept[0] in attn:
        raise ValueError(
            f"llama.cpp's 'deci' loader takes the attention head size from the first layer, so the first kept layer "
            f"(layer {kept[0]}) must keep its attention. Keep it, or export safetensors.")
    if arch == "gemma3":
        pattern = int(_field_value(reader, "gemma3.attention.sliding_window_pattern") or GEMMA3_SWA_PATTERN)
        is_global = lambda i: pattern > 0 and i % pattern == pattern - 1  # noqa: E731
        moved = [(old, new) for new, old in enumerate(kept) if is_global(old) != is_global(new)]
        if moved:
            old, new = moved[0]
            kinds = ("sliding-window", "global")
            raise ValueError(
                f"llama.cpp gives Gemma 3 layers their attention kind by index (every {pattern}th is global), so "
                f"after this plan layer {old} ({kinds[is_global(old)]}) would sit at index {new} and run as "
                f"{kinds[is_global(new)]} attention: the file would load and compute something else ({len(moved)} "
                f"kept layer(s) change kind). Choose layers whose removal keeps every kept layer's kind (e.g. "
                f"{pattern} consecutive layers), or export safetensors.")
        sizes = [_field_value(reader, f"gemma3.{key}") for key in
                 ("embedding_length", "attention.head_count", "attention.key_length")]
        scalars = [gemma3_query_scalar(n, *sizes) for n in (blocks, len(kept))]
        if None not in sizes and scalars[0] != scalars[1]:
            raise ValueError(
                f"llama.cpp scales a Gemma 3's attention by the layer count (1/sqrt({scalars[0]}) for its "
                f"{blocks} layers, 1/sqrt({scalars[1]}) for {len(kept)}), so a file of {len(kept)} layers would load "
                "and compute something else. Export safetensors.")
    new_index = {old: new for new, old in enumerate(kept)}
    return GGUFPlan(arch="deci" if (attn or mlp) else arch, source_arch=arch, kept_layers=kept,
                    no_attn={new_index[i] for i in attn}, no_ffn={new_index[i] for i in mlp})


def _layer_of(name: str) -> tuple[int, str] | None:
    """(layer, rest) for ``blk.N.rest``, else None."""
    if not name.startswith("blk."):
        return None
    index, _, rest = name[4:].partition(".")
    return int(index), rest


def _copy_field(writer, key: str, field_, value=None) -> None:
    """Write ``field_`` (a reader field) under ``key``, with ``value`` in place of its contents when given."""
    from gguf import GGUFValueType

    vtype = field_.types[0]
    contents = field_.contents() if value is None else value
    if vtype == GGUFValueType.ARRAY:
        writer.add_key_value(key, list(contents), vtype, sub_type=field_.types[-1])
    else:
        writer.add_key_value(key, contents, vtype)


def write_gguf(source: str | Path, plan: DropPlan, out_file: str | Path, provenance: Mapping | None = None, *,
               weights: ModelTensors | None = None, gguf_type: str = "stored") -> GGUFPlan:
    """Write ``plan`` applied to the GGUF file ``source`` as ``out_file`` (see the module docstring).

    Kept tensors keep their stored type and bytes, unless ``weights`` (the model's own tensors, e.g. a healed
    model's) are given: then each kept tensor is that weight written in ``gguf_type`` (see
    :mod:`.gguf_tensors`), and the metadata, tokenizer included, still comes from ``source``. ValueError
    (before writing) for a plan GGUF cannot express; the caller writes into a temporary folder and removes it
    on any failure."""
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    reader = gguf_reader(source)
    layout = plan_gguf(reader, plan)
    src, dst = layout.source_arch, layout.arch
    n_src, n_new = plan.num_layers, len(layout.kept_layers)
    writer = GGUFWriter(str(out_file), dst, use_temp_file=False)
    heads = _field_value(reader, f"{src}.attention.head_count")
    heads_kv = _field_value(reader, f"{src}.attention.head_count_kv")
    ffn = _field_value(reader, f"{src}.feed_forward_length")
    per_layer = {}  # key (source arch) -> new per-layer values
    for key, field_ in reader.fields.items():
        if key in _HEADER_KEYS or key == "general.architecture" or key.startswith(PROVENANCE_PREFIX):
            continue
        out_key = dst + key[len(src):] if key.startswith(f"{src}.") else key
        if key == f"{src}.block_count":
            writer.add_key_value(out_key, n_new, GGUFValueType.UINT32)
            continue
        if key == "general.file_type" and weights is not None and gguf_type != "source":
            writer.add_key_value(key, int(file_type(gguf_type)), GGUFValueType.UINT32)
            continue
        if key.startswith(f"{src}.") and field_.types[0] == GGUFValueType.ARRAY and len(field_.data) == n_src:
            values = list(field_.contents())
            per_layer[key] = [values[i] for i in layout.kept_layers]
            if dst == src:  # cut to the kept layers
                _copy_field(writer, out_key, field_, per_layer[key])
            continue
        if dst != src and key in (f"{src}.attention.head_count", f"{src}.attention.head_count_kv",
                                  f"{src}.feed_forward_length"):
            continue  # written below as per-layer arrays
        _copy_field(writer, out_key, field_)
    if dst != src:  # deci: per-layer widths, 0 where the sub-block is dropped
        def widths(key: str, scalar, zero: set[int]) -> list[int]:
            values = per_layer.get(key) or [int(scalar)] * n_new
            return [0 if i in zero else int(v) for i, v in enumerate(values)]

        uint32 = dict(vtype=GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)  # as llama.cpp's converter writes
        writer.add_key_value(f"{dst}.attention.head_count",
                             widths(f"{src}.attention.head_count", heads, layout.no_attn), **uint32)
        writer.add_key_value(f"{dst}.attention.head_count_kv",
                             widths(f"{src}.attention.head_count_kv", heads_kv if heads_kv is not None else heads,
                                    layout.no_attn), **uint32)
        writer.add_key_value(f"{dst}.feed_forward_length", widths(f"{src}.feed_forward_length", ffn, layout.no_ffn),
                             **uint32)
    if weights is not None and gguf_type != "source" and "general.file_type" not in reader.fields:
        writer.add_key_value("general.file_type", int(file_type(gguf_type)), GGUFValueType.UINT32)
    for key, value in (provenance or {}).items():
        _add_provenance(writer, PROVENANCE_PREFIX + key, value)
    writer.add_array(PROVENANCE_PREFIX + "source_layers", [int(i) for i in layout.kept_layers])
    new_index = {old: new for new, old in enumerate(layout.kept_layers)}
    for tensor in reader.tensors:
        located = _layer_of(tensor.name)
        name = tensor.name
        if located is not None:
            old, rest = located
            if old not in new_index:
                continue
            new = new_index[old]
            if new in layout.no_attn and rest.split(".")[0] in ATTN_TENSORS:
                continue
            if new in layout.no_ffn and rest.split(".")[0] in FFN_TENSORS:
                continue
            name = f"blk.{new}.{rest}"
        if weights is not None and tensor.name in weights:
            data, qtype = weights.encoded(tensor.name, gguf_type)  # the source's name: the model's own index
        else:  # copied as stored, and so is what the model has no weight for (rope_freqs)
            data, qtype = np.asarray(tensor.data), tensor.tensor_type
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return layout


def _add_provenance(writer, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_key_value(key, value, GGUFValueType.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, GGUFValueType.INT64)
    elif isinstance(value, float):
        writer.add_key_value(key, value, GGUFValueType.FLOAT64)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        writer.add_array(key, list(value))
    elif value is not None:
        writer.add_key_value(key, str(value), GGUFValueType.STRING)
