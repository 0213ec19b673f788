"""Architecture adapters: the one place that knows where things live inside a decoder LM.

Every family is described by data (an :class:`ArchSpec`), never by ``if model_type == ...``
chains elsewhere. A spec says, relative to the ``*ForCausalLM`` model:

* ``layers``: dotted path of the ``nn.ModuleList`` of decoder layers;
* ``attn`` / ``mlp``: the modules (relative to one layer) whose compute makes up the
  attention and MLP sub-blocks, norms included. Dropping a sub-block replaces each of them
  with a weightless stand-in (see :mod:`entrodrop.prune`); the first name of ``attn`` is the
  attention module itself, which keeps the KV cache consistent when skipped;
* ``attn_residual``: the module whose output is *added to the residual stream* by the
  attention sub-block. The capture hooks use it to reconstruct
  ``Y_l = X_l + attn_residual(...)`` exactly, for sequential and parallel residuals alike;
* ``num_layers_key`` and ``per_layer_keys``: the config fields that must change when
  whole layers are removed;
* ``attn_out`` / ``mlp_out``: the linear layer whose output *is* the sub-block's residual term (nothing
  between it and the residual add), where a linear map can be folded into its weights (the linear
  heal, :mod:`entrodrop.heal`); ``None`` where a norm stands between (Gemma 2/3).

Block definitions (see docs/method.md): for a sequential pre-norm layer the attention block
maps X_l -> Y_l and the MLP block Y_l -> X_{l+1}. For a *parallel* residual
(GPT-NeoX with ``use_parallel_residual``) X_{l+1} = X_l + Attn(LN1(X_l)) + MLP(LN2(X_l));
we define Y_l = X_l + Attn(...) so the attention block is X_l -> Y_l and the MLP block
Y_l -> X_{l+1} still adds exactly the MLP's contribution. Gemma 2/3 normalise the attention
output before adding it, so their ``attn_residual`` is ``post_attention_layernorm``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

logger = logging.getLogger(__name__)

BLOCK_KINDS = ("attn", "mlp", "layer")
SUB_BLOCK_KINDS = ("attn", "mlp")  # the two sub-blocks a whole layer is made of
# what people call each kind; the one label table (plots, reports, the app's radios)
BLOCK_KIND_LABELS = {"attn": "attention", "mlp": "MLP", "layer": "whole layer"}


def kind_label(kind: str, *, attributive: bool = False) -> str:
    """The label of a block kind; ``attributive`` hyphenates it before a noun ("whole-layer blocks")."""
    if kind not in BLOCK_KIND_LABELS:
        raise ValueError(f"Unknown block kind {kind!r}; use one of {', '.join(BLOCK_KINDS)}.")
    label = BLOCK_KIND_LABELS[kind]
    return label.replace(" ", "-") if attributive else label


@dataclass(frozen=True)
class ArchSpec:
    """Where the pieces of one architecture family live (paths are dotted attribute names)."""

    family: str
    layers: str  # ModuleList of decoder layers, from the *ForCausalLM root
    attn: tuple[str, ...]  # attention sub-block modules inside a layer; [0] is the attention
    mlp: tuple[str, ...]  # MLP sub-block modules inside a layer; [-1] produces the residual add
    attn_residual: str  # module whose output the attention sub-block adds to the residual
    num_layers_key: str = "num_hidden_layers"
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    # config ints that count layers from the bottom (Qwen2's max_window_layers: layers below it use full
    # attention); after whole layers are removed they become the number of kept layers below the old value
    layer_threshold_keys: tuple[str, ...] = ()
    # the decoder layer returns a tuple (hidden_states, ...) instead of a tensor (transformers < 5 style)
    layer_output_tuple: bool = False
    parallel_residual_key: str | None = None  # config flag that switches on a parallel residual
    attn_out: str | None = None  # Linear (or GPT-2 Conv1D) whose output is the attention's residual term
    mlp_out: str | None = None  # the same for the MLP
    model_types: tuple[str, ...] = field(default=())
    note: str = ""

    def parallel_residual(self, config) -> bool:
        return bool(self.parallel_residual_key and getattr(config, self.parallel_residual_key, False))


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn=("self_attn", "input_layernorm"),
    mlp=("post_attention_layernorm", "mlp"),
    attn_residual="self_attn",
    attn_out="self_attn.o_proj",
    mlp_out="mlp.down_proj",
)
_GEMMA2_LIKE = dict(
    layers="model.layers",
    attn=("self_attn", "input_layernorm", "post_attention_layernorm"),
    mlp=("pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp"),
    attn_residual="post_attention_layernorm",
    note="attention and MLP outputs are normalised again before the residual add",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec("mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec("qwen2", model_types=("qwen2",), layer_threshold_keys=("max_window_layers",), **_LLAMA_LIKE),
    ArchSpec("qwen3", model_types=("qwen3",), layer_threshold_keys=("max_window_layers",), **_LLAMA_LIKE),
    ArchSpec("gemma", model_types=("gemma",), **_LLAMA_LIKE),
    ArchSpec("gemma2", model_types=("gemma2",), **_GEMMA2_LIKE),
    ArchSpec("gemma3", model_types=("gemma3_text",), **_GEMMA2_LIKE),
    ArchSpec("phi3", model_types=("phi3",), **_LLAMA_LIKE),
    ArchSpec(
        "gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        attn=("attn", "ln_1"),
        mlp=("ln_2", "mlp"),
        attn_residual="attn",
        num_layers_key="n_layer",
        attn_out="attn.c_proj",
        mlp_out="mlp.c_proj",
    ),
    ArchSpec(
        "gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        attn=("attention", "input_layernorm"),
        mlp=("post_attention_layernorm", "mlp"),
        attn_residual="attention",
        parallel_residual_key="use_parallel_residual",
        attn_out="attention.dense",
        mlp_out="mlp.dense_4h_to_h",
        note="parallel residual: Y_l is defined as X_l + Attn(LN1(X_l))",
    ),
    ArchSpec(
        "opt",
        model_types=("opt",),
        layers="model.decoder.layers",
        # OPT has no MLP module: fc1 -> activation -> fc2 are inline in the layer.
        attn=("self_attn", "self_attn_layer_norm"),
        mlp=("final_layer_norm", "fc1", "fc2"),
        attn_residual="self_attn",
        attn_out="self_attn.out_proj",
        mlp_out="fc2",
        note="pre-norm OPT only (do_layer_norm_before=True); OPT-350m's post-norm is refused",
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}

# Encoder-only families that transformers can nevertheless wrap in a *ForCausalLM head.
ENCODER_ONLY_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "bert-generation",
     "roberta-prelayernorm", "data2vec-text", "xmod", "megatron-bert", "rembert", "deberta",
     "deberta-v2", "distilbert", "albert", "mpnet", "modernbert"}
)


def supported_families() -> list[str]:
    """Names of the families with a declared adapter (the generic fallback covers more)."""
    return [spec.family for spec in ARCHITECTURES]


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at ``dotted`` and return the old one."""
    parent_path, _, name = dotted.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def _has_path(root: nn.Module, dotted: str) -> bool:
    try:
        get_module(root, dotted)
    except AttributeError:
        return False
    return True


def _generic_spec(model: nn.Module) -> ArchSpec | None:
    """Fallback for families with the common ``model.layers[i].{self_attn,mlp,...}`` layout."""
    template = dict(_LLAMA_LIKE)
    if not _has_path(model, template["layers"]):
        return None
    layers = get_module(model, template["layers"])
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    layer = layers[0]
    if all(_has_path(layer, p) for p in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
        template = dict(_GEMMA2_LIKE)
    if not all(_has_path(layer, p) for p in (*template["attn"], *template["mlp"])):
        return None
    model_type = getattr(model.config, "model_type", "unknown")
    return ArchSpec(family=f"generic:{model_type}", model_types=(model_type,), **template)


def config_model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def check_config_supported(config) -> None:
    """Raise a ValueError before any weights load if ``config`` is not a decoder-only LM."""
    model_type = config_model_type(config)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"'{model_type}' is an encoder-decoder model; EntroDrop scores the blocks of decoder-only "
            f"causal LMs. Pick a decoder LM (supported families: {', '.join(supported_families())})."
        )
    if model_type in ENCODER_ONLY_MODEL_TYPES:
        raise ValueError(
            f"'{model_type}' is an encoder-only model, not a causal decoder LM. Pick a decoder LM "
            f"(supported families: {', '.join(supported_families())})."
        )
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise ValueError(
            "This OPT checkpoint is post-norm (do_layer_norm_before=False, e.g. OPT-350m); its residual "
            "stream is renormalised after every sub-block, so block entropies are not comparable. "
            "Use another OPT size."
        )


def get_arch(model: nn.Module) -> ArchSpec:
    """The adapter for a loaded ``*ForCausalLM`` model, or a ValueError naming what is supported."""
    config = model.config
    check_config_supported(config)
    spec = _BY_MODEL_TYPE.get(config_model_type(config))
    if spec is not None and _has_path(model, spec.layers):
        return spec
    generic = _generic_spec(model)
    if generic is not None:
        logger.info("No adapter for model_type %r; using the generic llama-like layout.", generic.model_types)
        return generic
    raise ValueError(
        f"Unsupported architecture '{config_model_type(config)}' ({type(model).__name__}): its decoder "
        f"layers are not where EntroDrop looks. Supported families: {', '.join(supported_families())}, "
        "plus any model with the common model.layers[i].self_attn/mlp/input_layernorm/"
        "post_attention_layernorm layout."
    )


def get_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    spec = spec or get_arch(model)
    return get_module(model, spec.layers)


def num_layers(model: nn.Module, spec: ArchSpec | None = None) -> int:
    return len(get_layers(model, spec))


def block_modules(layer: nn.Module, spec: ArchSpec, kind: str) -> dict[str, nn.Module]:
    """The modules of ``layer`` that make up one block, by dotted name inside the layer.

    ``attn`` and ``mlp`` are the sub-block modules the spec lists (norms included); ``layer`` is the
    whole layer, under the empty name. A ValueError names a module the spec expects but ``layer`` lacks."""
    if kind == "layer":
        return {"": layer}
    if kind not in SUB_BLOCK_KINDS:
        raise ValueError(f"Unknown block kind {kind!r}; use one of {', '.join(BLOCK_KINDS)}.")
    names = spec.attn if kind == "attn" else spec.mlp
    modules = {}
    for name in names:
        try:
            modules[name] = get_module(layer, name)
        except AttributeError as exc:
            raise ValueError(f"The {spec.family} adapter expects a module {name!r} in every layer, but this "
                             f"layer ({type(layer).__name__}) has none; the architecture adapter is wrong.") from exc
    return modules
