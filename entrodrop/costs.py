"""What blocks cost: parameters, bytes and forward FLOPs, per block and per plan, and the speed-up
that removing them allows in the ideal (FLOPs-bound) case.

One path each:

* :func:`count_parameters` — parameters and bytes of a whole model (each shared tensor once);
* :func:`measure_block_costs` — parameters, bytes and FLOPs of every block, read once from the model;
* :func:`summarize_plan` — what a plan removes, from those block costs (no model needed, so the app
  can redraw it on every tick);
* :func:`plan_parameter_counts`, :func:`forward_flops`, :func:`flops_share_removed` and
  :func:`expected_speedup` — the same numbers for a model and a plan, through the two above;
* :func:`speedup_from_share` — the one formula from "share of FLOPs removed" to "ideal speed-up".

FLOPs count matmuls only: each weight does one multiply-add per token (2 FLOPs x parameters x
tokens); attention adds the score and value products, 2 x 2 x heads x head_dim x (keys seen,
summed over queries), causal and sliding-window aware.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .arch import BLOCK_KINDS, SUB_BLOCK_KINDS, ArchSpec, block_modules, get_arch, get_layers
from .plan import DropPlan
from .prune import SkippedAttention, check_plan


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters, bytes they take), each shared tensor counted once.

    ``parameters()`` already yields a tied tensor (e.g. embeddings shared with the LM head) once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _block_parameters(layer: nn.Module, spec: ArchSpec, kind: str) -> list[nn.Parameter]:
    """The parameters one block holds (what dropping it removes), each tensor once."""
    seen: dict[int, nn.Parameter] = {}
    for module in block_modules(layer, spec, kind).values():
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def block_parameter_count(model: nn.Module, layer_idx: int, kind: str, spec: ArchSpec | None = None) -> int:
    """Number of parameters the ``kind`` block of layer ``layer_idx`` holds (what dropping it removes)."""
    spec = spec or get_arch(model)
    return sum(p.numel() for p in _block_parameters(get_layers(model, spec)[layer_idx], spec, kind))


def speedup_from_share(share: float) -> float:
    """Ideal speed-up when a ``share`` (0..1) of the work is removed: ``1 / (1 - share)``."""
    return 1.0 / (1.0 - share) if share < 1 else float("inf")


# -- per block -----------------------------------------------------------------------------------
def _sliding_window(config, layer_idx: int) -> int | None:
    """The layer's attention window in tokens, or None where it attends to every earlier token."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    sliding = isinstance(window, int) and window > 0 and (
        layer_types[layer_idx] == "sliding_attention" if layer_types else bool(getattr(config, "use_sliding_window", True))
    )
    return window if sliding else None


def _attention_context(config, layer_idx: int, seq_len: int) -> int:
    """Sum over the T query positions of how many keys each attends to (causal, sliding if any)."""
    window = _sliding_window(config, layer_idx)
    if window:
        return sum(min(t, window) for t in range(1, seq_len + 1))
    return seq_len * (seq_len + 1) // 2


KV_CONTEXTS = (2048, 4096, 8192)  # contexts the plan summary gives the KV cache at


@dataclass
class BlockCosts:
    """What each block costs in one model: parameters, bytes and forward FLOPs at ``seq_len`` tokens."""

    num_layers: int
    seq_len: int
    dense_params: int
    dense_flops: float
    dense_bytes: int = 0
    params: dict[tuple[int, str], int] = field(default_factory=dict)  # (layer, kind) -> parameters
    flops: dict[tuple[int, str], float] = field(default_factory=dict)  # (layer, kind) -> FLOPs
    bytes: dict[tuple[int, str], int] = field(default_factory=dict)  # (layer, kind) -> bytes of its weights
    # layer -> bytes its K and V cache take per token (2 x kv heads x head dim x the weights' element size),
    # and the layer's sliding window (None: full attention, the cache grows with the context)
    kv_per_token: dict[int, int] = field(default_factory=dict)
    kv_window: dict[int, int | None] = field(default_factory=dict)

    def kv_cache_bytes(self, context: int, without: set[int] = frozenset()) -> int:
        """Bytes of the KV cache at ``context`` tokens, the layers in ``without`` having no attention."""
        return sum(per * min(context, self.kv_window.get(i) or context)
                   for i, per in self.kv_per_token.items() if i not in without)


def measure_block_costs(model: nn.Module, seq_len: int) -> BlockCosts:
    """Parameters, bytes and forward FLOPs of every block (attn, mlp, layer) of ``model``.

    A whole layer's FLOPs are its two sub-blocks'; its parameters are everything the layer holds.
    Reads the model only; call it while no preview is active on the same model (a previewed block
    would count as already gone)."""
    spec = get_arch(model)
    config = model.config
    layers = get_layers(model, spec)
    heads = getattr(config, "num_attention_heads", None) or 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    head_flops = 2.0 * head.weight.numel() * seq_len if head is not None else 0.0
    dense_params, dense_bytes = count_parameters(model)
    costs = BlockCosts(num_layers=len(layers), seq_len=seq_len, dense_params=dense_params, dense_flops=head_flops,
                       dense_bytes=dense_bytes)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = next(model.parameters()).element_size()
    for i, layer in enumerate(layers):
        if not isinstance(block_modules(layer, spec, "attn")[spec.attn[0]], SkippedAttention):
            costs.kv_per_token[i] = 2 * kv_heads * head_dim * element
            costs.kv_window[i] = _sliding_window(config, i)
        for kind in BLOCK_KINDS:
            params = _block_parameters(layer, spec, kind)
            costs.params[(i, kind)] = sum(p.numel() for p in params)
            costs.bytes[(i, kind)] = sum(p.numel() * p.element_size() for p in params)
        for kind in SUB_BLOCK_KINDS:
            flops = 2.0 * costs.params[(i, kind)] * seq_len
            # an attention already dropped (a pruned model's stand-in) computes no scores either
            if kind == "attn" and not isinstance(block_modules(layer, spec, "attn")[spec.attn[0]], SkippedAttention):
                flops += 4.0 * heads * head_dim * _attention_context(config, i, seq_len)
            costs.flops[(i, kind)] = flops
            costs.dense_flops += flops
        costs.flops[(i, "layer")] = costs.flops[(i, "attn")] + costs.flops[(i, "mlp")]
    return costs


# -- per plan ------------------------------------------------------------------------------------
@dataclass
class PlanSummary:
    """What a plan removes, from :class:`BlockCosts`."""

    num_blocks: int
    kinds: dict[str, int]  # kind -> blocks dropped
    params_removed: int
    dense_params: int
    flops_share: float  # share of forward FLOPs removed at seq_len
    seq_len: int
    dense_flops: float = 0.0
    flops_removed: float = 0.0
    dense_bytes: int = 0
    bytes_removed: int = 0
    kv_per_token_dense: int = 0  # bytes of K and V cache per token (full-attention layers; sliding ones cap)
    kv_per_token_removed: int = 0
    kv_at: dict[int, tuple[int, int]] = field(default_factory=dict)  # context -> (dense, pruned) KV cache bytes

    @property
    def params_share(self) -> float:
        return self.params_removed / self.dense_params if self.dense_params else 0.0

    @property
    def ideal_speedup(self) -> float:
        """The speed-up the removed FLOPs allow, if time followed FLOPs."""
        return speedup_from_share(self.flops_share)


def summarize_plan(plan: DropPlan, costs: BlockCosts) -> PlanSummary:
    """Blocks, parameters, bytes and FLOPs ``plan`` removes, and the ideal (FLOPs-bound) speed-up."""
    if plan.num_layers != costs.num_layers:
        raise ValueError(f"The plan is for {plan.num_layers} layers but the model has {costs.num_layers}.")
    kinds: dict[str, int] = {}
    params = size = 0
    flops = 0.0
    for b in plan.blocks:
        kinds[b.kind] = kinds.get(b.kind, 0) + 1
        params += costs.params[b.key]
        size += costs.bytes.get(b.key, 0)
        flops += costs.flops[b.key]
    no_attn = {b.layer for b in plan.blocks if b.kind in ("attn", "layer")}
    return PlanSummary(num_blocks=len(plan.blocks), kinds=kinds, params_removed=params, dense_params=costs.dense_params,
                       flops_share=flops / costs.dense_flops if costs.dense_flops else 0.0, seq_len=costs.seq_len,
                       dense_flops=costs.dense_flops, flops_removed=flops, dense_bytes=costs.dense_bytes,
                       bytes_removed=size, kv_per_token_dense=sum(costs.kv_per_token.values()),
                       kv_per_token_removed=sum(v for i, v in costs.kv_per_token.items() if i in no_attn),
                       kv_at={c: (costs.kv_cache_bytes(c), costs.kv_cache_bytes(c, no_attn)) for c in KV_CONTEXTS})


def plan_parameter_counts(model: nn.Module, plan: DropPlan) -> tuple[int, int, int, int]:
    """(dense params, dense bytes, pruned params, pruned bytes) of ``model`` under ``plan``, without
    copying or touching it."""
    check_plan(model, plan)  # the same refusals as a preview or a physical removal of the plan
    summary = summarize_plan(plan, measure_block_costs(model, seq_len=1))
    return (summary.dense_params, summary.dense_bytes, summary.dense_params - summary.params_removed,
            summary.dense_bytes - summary.bytes_removed)


def forward_flops(model: nn.Module, seq_len: int, plan: DropPlan | None = None) -> dict:
    """FLOPs of one forward pass over ``seq_len`` tokens, dense and without ``plan``'s blocks."""
    costs = measure_block_costs(model, seq_len)
    summary = summarize_plan(plan if plan is not None else DropPlan(costs.num_layers), costs)
    return {"seq_len": seq_len, "dense": summary.dense_flops, "removed": summary.flops_removed,
            "pruned": summary.dense_flops - summary.flops_removed, "share_removed": summary.flops_share}


def flops_share_removed(model: nn.Module, plan: DropPlan, seq_len: int) -> float:
    """Share (0..1) of the forward pass's FLOPs that ``plan`` removes at ``seq_len`` tokens."""
    return forward_flops(model, seq_len, plan)["share_removed"]


def expected_speedup(model: nn.Module, plan: DropPlan, seq_len: int) -> float:
    """The ideal (FLOPs-bound) speed-up of ``plan`` at ``seq_len`` tokens; compare it with the measured
    ratios of :func:`~entrodrop.evaluate.measure_speed`."""
    return speedup_from_share(flops_share_removed(model, plan, seq_len))
