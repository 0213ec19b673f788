"""Apply a :class:`~entrodrop.plan.DropPlan`: reversibly (preview) or physically (export).

Both views replace the dropped modules with weightless stand-ins, so a skipped block really
costs no compute and its output is exactly zero: the layer then computes ``residual + 0``.

* attention module (``spec.attn[0]``) -> :class:`SkippedAttention`: zeros, and a placeholder
  entry in the KV cache so ``cache.get_seq_length()`` (read from cache layer 0, it sets the
  position ids) and the mask sizes stay right even when layer 0's attention is gone;
* the module that feeds the MLP's residual add (``spec.mlp[-1]``) -> :class:`ZeroBlock`;
* every other module of the sub-block (norms, OPT's ``fc1``) -> ``nn.Identity``; what they see
  is discarded or is zero already (Gemma 2/3 normalise the zero output: Identity keeps it zero).

A whole layer is replaced by :class:`SkippedLayer` in the preview and removed from the layer
list in the physical model (``layer_idx`` and per-layer config fields renumbered/sliced).

The stand-ins and :func:`install_standins` only use ``torch``: export copies their source into a
self-contained ``modeling_entrodrop.py`` so ``from_pretrained(..., trust_remote_code=True)``
can rebuild a sub-block-pruned model without EntroDrop installed. Keep them that way.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .arch import ArchSpec, get_arch, get_layers, get_module, set_module
from .plan import DropPlan

logger = logging.getLogger(__name__)

# config fields written on a physically pruned model (read back by load_pruned / remote code)
DROPPED_KEY = "entrodrop_dropped"
LAYERS_PATH_KEY = "entrodrop_layers_path"

# config list fields that may have one entry per layer by coincidence but are not per-layer data
_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                            "forced_decoder_ids", DROPPED_KEY})


# -- self-contained stand-ins (copied verbatim into exported modeling_entrodrop.py) ------------
def _find_cache(args, kwargs):
    """The KV cache passed to a layer/attention call, whatever its keyword (cache, past_key_values,
    layer_past) or position; duck-typed so this code needs no transformers import."""
    for key in ("cache", "past_key_values", "layer_past"):
        value = kwargs.get(key)
        if value is not None and hasattr(value, "get_seq_length"):
            return value
    for value in args:
        if hasattr(value, "get_seq_length") and hasattr(value, "update"):
            return value
    return None


def _hidden_states_of(args, kwargs):
    hidden = kwargs.get("hidden_states")
    return hidden if hidden is not None else args[0]


def _record_placeholder(cache, layer_idx, hidden_states):
    """Append (B, 1, T, 1) zeros as this layer's keys/values so the cache's length stays right."""
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache (GPT-2 cross-attn)
    batch, length = hidden_states.shape[0], hidden_states.shape[1]
    placeholder = hidden_states.new_zeros((batch, 1, length, 1))  # (B, heads=1, T, head_dim=1)
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers):
        existing = getattr(layers[layer_idx], "keys", None)
        # a pre-allocated (static) cache layer only accepts its own head count and head size
        if getattr(layers[layer_idx], "max_cache_len", None) is not None and isinstance(existing, torch.Tensor) \
                and existing.dim() == 4 and existing.numel() > 0:
            placeholder = placeholder.expand(batch, existing.shape[1], length, existing.shape[-1])
    try:
        cache.update(placeholder, placeholder, layer_idx)
    except NotImplementedError:  # a cache layer that stores nothing (KV sharing): nothing to keep right
        pass


class SkippedAttention(nn.Module):
    """Weightless stand-in for a dropped attention module: outputs zeros, keeps the KV cache length."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden_states = _hidden_states_of(args, kwargs)  # (B, T, C)
        cache = _find_cache(args, kwargs)
        if cache is not None:
            _record_placeholder(cache, self.layer_idx, hidden_states)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class ZeroBlock(nn.Module):
    """Weightless stand-in for the module that feeds a dropped MLP's residual add: outputs zeros."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class SkippedLayer(nn.Module):
    """Stand-in for a whole dropped layer: returns its input, keeps the KV cache length."""

    def __init__(self, layer_idx: int, returns_tuple: bool = False):
        super().__init__()
        self.layer_idx = layer_idx
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        hidden_states = _hidden_states_of(args, kwargs)
        cache = _find_cache(args, kwargs)
        if cache is not None:
            _record_placeholder(cache, self.layer_idx, hidden_states)
        return (hidden_states,) if self.returns_tuple else hidden_states

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def make_standin(what: str, layer_idx: int) -> nn.Module:
    """A stand-in by name: ``skipped_attention``, ``zero`` or ``identity``."""
    if what == "skipped_attention":
        return SkippedAttention(layer_idx)
    if what == "zero":
        return ZeroBlock()
    if what == "identity":
        return nn.Identity()
    raise ValueError(f"Unknown stand-in {what!r}")


def install_standins(model, dropped=None, layers_path=None):
    """Replace the modules listed in ``config.entrodrop_dropped`` by their stand-ins (in place).

    Each entry is ``{"layer": i, "kind": "attn"|"mlp", "modules": {dotted_name: stand-in}}`` with
    ``i`` the layer index in this (pruned) model; ``layers_path`` is the dotted path of the layers.
    """
    config = model.config
    dropped = getattr(config, "entrodrop_dropped", None) if dropped is None else dropped
    layers_path = getattr(config, "entrodrop_layers_path", None) if layers_path is None else layers_path
    if not dropped:
        return model
    layers = model
    for part in layers_path.split("."):
        layers = getattr(layers, part)
    for entry in dropped:
        layer = layers[int(entry["layer"])]
        for dotted, what in entry["modules"].items():
            parent_path, _, name = dotted.rpartition(".")
            parent = layer
            for part in filter(None, parent_path.split(".")):
                parent = getattr(parent, part)
            setattr(parent, name, make_standin(what, int(entry["layer"])))
    return model


# -- plan -> stand-ins ---------------------------------------------------------------------------
def standin_modules(spec: ArchSpec, kind: str) -> dict[str, str]:
    """Which stand-in replaces each module of an ``attn`` or ``mlp`` sub-block of this family."""
    if kind == "attn":
        names = spec.attn
        return {name: "skipped_attention" if i == 0 else "identity" for i, name in enumerate(names)}
    if kind == "mlp":
        names = spec.mlp
        return {name: "zero" if i == len(names) - 1 else "identity" for i, name in enumerate(names)}
    raise ValueError(f"Sub-block kind must be 'attn' or 'mlp', got {kind!r}.")


def check_plan(model: nn.Module, plan: DropPlan, spec: ArchSpec | None = None) -> nn.ModuleList:
    """Raise a clear TypeError/ValueError unless ``plan`` fits ``model``; returns its layer list."""
    spec = spec or get_arch(model)
    if not isinstance(plan, DropPlan):
        raise TypeError(f"Expected a DropPlan, got {type(plan).__name__}; build one with DropPlan.parse or select_blocks.")
    layers = get_layers(model, spec)
    if plan.num_layers != len(layers):
        raise ValueError(
            f"The plan was made for a model with {plan.num_layers} layers but this model has {len(layers)}; "
            "make the plan for this model."
        )
    for b in plan.blocks:
        if b.kind != "layer":
            for name in standin_modules(spec, b.kind):
                current = get_module(layers[b.layer], name)
                if isinstance(current, (SkippedAttention, ZeroBlock)):
                    raise ValueError(f"The {b.kind} block of layer {b.layer} is already dropped in this model.")
    return layers


def _attention_layer_idx(layer: nn.Module, spec: ArchSpec, position: int) -> int:
    """The cache slot the layer's attention writes to (its ``layer_idx``; the position if it has none)."""
    try:
        idx = getattr(get_module(layer, spec.attn[0]), "layer_idx", None)
    except AttributeError:
        idx = None
    return idx if isinstance(idx, int) else position


@contextmanager
def preview_plan(model: nn.Module, plan: DropPlan) -> Iterator[nn.Module]:
    """Skip the planned blocks of ``model`` inside the ``with`` block, then put everything back.

    The dropped modules are swapped for weightless stand-ins (so the compute is really skipped) and
    restored in ``finally``, so the shared dense model is intact afterwards, even after an error.
    Not thread-safe: callers that share one model must serialise previews (the UI's concurrency group).
    """
    spec = get_arch(model)
    layers = check_plan(model, plan, spec)
    swapped: list[tuple[str, nn.Module]] = []  # (dotted path from the model root, original module)
    try:
        for b in plan.blocks:
            layer = layers[b.layer]
            if b.kind == "layer":
                standin = SkippedLayer(_attention_layer_idx(layer, spec, b.layer),
                                       returns_tuple=spec.layer_output_tuple)
                path = f"{spec.layers}.{b.layer}"
                swapped.append((path, set_module(model, path, standin)))
            else:
                cache_idx = _attention_layer_idx(layer, spec, b.layer)
                for name, what in standin_modules(spec, b.kind).items():
                    path = f"{spec.layers}.{b.layer}.{name}"
                    swapped.append((path, set_module(model, path, make_standin(what, cache_idx))))
        yield model
    finally:
        for path, original in reversed(swapped):
            set_module(model, path, original)


# -- physical removal ----------------------------------------------------------------------------
def _fix_config_after_layer_removal(config, spec: ArchSpec, keep: list[int], old_count: int) -> dict:
    """Set the layer count and slice every per-layer config field to the kept layers.

    Returns ``{key: (old, new)}`` of what changed (also logged)."""
    changed: dict = {}
    new_count = len(keep)
    old_value = getattr(config, spec.num_layers_key)
    setattr(config, spec.num_layers_key, new_count)
    changed[spec.num_layers_key] = (old_value, new_count)
    candidates = set(spec.per_layer_keys)
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == old_count and old_count > 1 \
                and key not in _NOT_PER_LAYER and not key.endswith("token_id") and not key.endswith("token_ids"):
            candidates.add(key)
    for key in sorted(candidates):
        value = getattr(config, key, None)
        if not isinstance(value, (list, tuple)) or len(value) != old_count:
            continue
        new_value = type(value)(value[i] for i in keep)
        setattr(config, key, new_value)
        changed[key] = (list(value), list(new_value))
    for key in spec.layer_threshold_keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            new_value = sum(1 for i in keep if i < value)
            setattr(config, key, new_value)
            changed[key] = (value, new_value)
    if getattr(config, "is_heterogeneous", False):
        overrides = config._heterogeneity_spec.per_layer_overrides
        remapped = {new: copy.deepcopy(overrides[old]) for new, old in enumerate(keep) if old in overrides}
        config.per_layer_config = remapped
        changed["per_layer_config"] = ("remapped", sorted(remapped))
    for key, (old, new) in changed.items():
        logger.info("Config %s: %s -> %s", key, old, new)
    return changed


def prune_model(model: nn.Module, plan: DropPlan, inplace: bool = False) -> nn.Module:
    """A model with the planned blocks physically removed (a deep copy unless ``inplace``).

    Whole layers leave the layer list; remaining layers' ``layer_idx`` attributes, the config's layer
    count and its per-layer fields are renumbered/sliced. Dropped attention/MLP sub-blocks are replaced
    by weightless stand-ins and recorded in ``config.entrodrop_dropped`` (indexes in the pruned model)
    together with ``config.entrodrop_layers_path``, which is what :func:`install_standins` reads back.
    """
    spec = get_arch(model)
    check_plan(model, plan, spec)
    if not inplace:
        model = copy.deepcopy(model)
    layers = get_layers(model, spec)
    old_count = len(layers)
    whole = set(plan.layers_of("layer"))
    keep = [i for i in range(old_count) if i not in whole]
    new_index = {old: new for new, old in enumerate(keep)}

    # sub-blocks already dropped in this model (pruning a pruned model) keep their entries, renumbered
    entries = [dict(e) for e in (getattr(model.config, DROPPED_KEY, None) or []) if int(e["layer"]) in new_index]
    for e in entries:
        e["layer"] = new_index[int(e["layer"])]
    for b in plan.blocks:
        if b.kind == "layer":
            continue
        modules = standin_modules(spec, b.kind)
        entries.append({"layer": new_index[b.layer], "kind": b.kind, "modules": modules})
        for name, what in modules.items():
            set_module(layers[b.layer], name, make_standin(what, b.layer))

    if whole:
        set_module(model, spec.layers, nn.ModuleList([layers[i] for i in keep]))
        for new, layer in enumerate(get_layers(model, spec)):
            for module in layer.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new
        changed = _fix_config_after_layer_removal(model.config, spec, keep, old_count)
        logger.info("Removed layers %s; config fields updated: %s", sorted(whole), ", ".join(changed))

    if entries:
        entries.sort(key=lambda e: (e["layer"], e["kind"]))
        setattr(model.config, DROPPED_KEY, entries)
        setattr(model.config, LAYERS_PATH_KEY, spec.layers)
    return model
