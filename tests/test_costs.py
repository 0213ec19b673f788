"""Costs: parameters, bytes and FLOPs per block and per plan, and the ideal speed-up, one path each."""

import pytest
from test_prune import sharp_model
from tiny_models import FAMILIES, LAYERS, tiny_model

from entrodrop.arch import get_arch, get_layers
from entrodrop.costs import (
    block_parameter_count,
    count_parameters,
    expected_speedup,
    flops_share_removed,
    forward_flops,
    measure_block_costs,
    plan_parameter_counts,
    speedup_from_share,
    summarize_plan,
)
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.prune import prune_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model():
    return sharp_model("llama")


def test_block_costs_add_up_to_what_pruning_removes(tiny):
    costs = measure_block_costs(tiny, seq_len=32)
    n = costs.num_layers
    for i in range(n):
        assert costs.params[(i, "layer")] == costs.params[(i, "attn")] + costs.params[(i, "mlp")]
        assert costs.flops[(i, "attn")] > 0 and costs.flops[(i, "mlp")] > 0
    plan = DropPlan(n, [DroppedBlock(1, "attn"), DroppedBlock(2, "mlp"), DroppedBlock(3, "layer")])
    summary = summarize_plan(plan, costs)
    dense_params, _, pruned_params, _ = plan_parameter_counts(tiny, plan)
    assert summary.params_removed == dense_params - pruned_params
    assert summary.dense_params == dense_params
    assert summary.flops_share == pytest.approx(flops_share_removed(tiny, plan, 32), rel=1e-9)
    assert summary.ideal_speedup == pytest.approx(1 / (1 - summary.flops_share))
    assert summary.kinds == {"attn": 1, "mlp": 1, "layer": 1}
    with pytest.raises(ValueError, match="layers"):
        summarize_plan(DropPlan(n + 1, []), costs)


def test_flops_share_removed_counts_flops(model):
    assert flops_share_removed(model, DropPlan(LAYERS), 64) == 0.0
    one_layer = flops_share_removed(model, DropPlan.parse("layer:1", LAYERS), 64)
    attn = flops_share_removed(model, DropPlan.parse("attn:1", LAYERS), 64)
    mlp = flops_share_removed(model, DropPlan.parse("mlp:1", LAYERS), 64)
    assert one_layer == pytest.approx(attn + mlp)
    assert 0 < one_layer < 1 / LAYERS  # the LM head is never removed
    # attention scores grow with the square of the length, its weights linearly
    assert flops_share_removed(model, DropPlan.parse("attn:1", LAYERS), 256) > attn
    flops = forward_flops(model, 64, DropPlan.parse("layer:1,layer:2", LAYERS))
    assert flops["pruned"] == pytest.approx(flops["dense"] - flops["removed"])


def _brute_force_count(model) -> tuple[int, int]:
    """Parameters and bytes from the state dict, each storage once: independent of parameters()."""
    seen: dict[int, tuple[int, int]] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        if isinstance(tensor, __import__("torch").nn.Parameter):
            seen[id(tensor)] = (tensor.numel(), tensor.numel() * tensor.element_size())
    return sum(n for n, _ in seen.values()), sum(b for _, b in seen.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_counts_agree_with_a_brute_force_count_of_the_pruned_model(family):
    model = tiny_model(family)
    assert count_parameters(model) == _brute_force_count(model)
    plan = DropPlan.parse("layer:0,attn:2,mlp:3", LAYERS)
    dense_params, dense_bytes, pruned_params, pruned_bytes = plan_parameter_counts(model, plan)
    assert (pruned_params, pruned_bytes) == _brute_force_count(prune_model(model, plan))
    assert (dense_params, dense_bytes) == _brute_force_count(model)
    spec = get_arch(model)
    # the per-block count is the same path the plan counts take
    removed = sum(block_parameter_count(model, b.layer, b.kind, spec) for b in plan.blocks)
    assert removed == dense_params - pruned_params
    assert block_parameter_count(model, 1, "layer", spec) == sum(p.numel() for p in get_layers(model)[1].parameters())


def test_speedup_follows_the_share_of_flops_removed(model):
    plan = DropPlan.parse("layer:1,layer:2", LAYERS)
    share = flops_share_removed(model, plan, 64)
    assert expected_speedup(model, plan, 64) == pytest.approx(1 / (1 - share))
    assert expected_speedup(model, DropPlan(LAYERS), 64) == 1.0
    assert speedup_from_share(0.5) == 2.0 and speedup_from_share(1.0) == float("inf")


def test_costs_of_a_pruned_model_count_no_attention_for_a_dropped_attention(tiny):
    pruned = prune_model(tiny, DropPlan.parse("attn:1", LAYERS))
    costs = measure_block_costs(pruned, seq_len=16)
    assert costs.params[(1, "attn")] == 0 and costs.flops[(1, "attn")] == 0
    assert costs.flops[(0, "attn")] > 0
    assert summarize_plan(DropPlan(LAYERS, [DroppedBlock(1, "mlp")]), costs).bytes_removed > 0


def test_kv_cache_per_token_and_at_long_context():
    """What an attention drop saves at long context: the layer's K and V cache, per token and at 2k/4k/8k;
    sliding-window layers (Gemma 3) cache at most their window."""
    from entrodrop.costs import measure_block_costs, summarize_plan
    from entrodrop.report import plan_summary_markdown

    model = sharp_model("llama")
    config = model.config
    per_layer = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4  # float32
    costs = measure_block_costs(model, seq_len=16)
    summary = summarize_plan(DropPlan.parse("attn:1,layer:2,mlp:3", LAYERS), costs)
    assert summary.kv_per_token_dense == LAYERS * per_layer and summary.kv_per_token_removed == 2 * per_layer
    assert summary.kv_at[8192] == (8192 * LAYERS * per_layer, 8192 * (LAYERS - 2) * per_layer)
    text = plan_summary_markdown(DropPlan.parse("attn:1,layer:2,mlp:3", LAYERS), summary)
    assert "KV cache: −" in text and "(50% of" in text and "8k:" in text
    assert "KV cache" not in plan_summary_markdown(DropPlan.parse("mlp:1", LAYERS),
                                                   summarize_plan(DropPlan.parse("mlp:1", LAYERS), costs))
    gemma = sharp_model("gemma3")
    g = measure_block_costs(gemma, seq_len=16)
    windows = {i: w for i, w in g.kv_window.items() if w}
    assert windows and len(windows) < len(g.kv_window)  # some layers slide, some attend to everything
    full = [i for i, w in g.kv_window.items() if not w]
    assert g.kv_cache_bytes(8192) == sum(g.kv_per_token[i] * 8192 for i in full) + sum(
        g.kv_per_token[i] * min(8192, w) for i, w in windows.items())
