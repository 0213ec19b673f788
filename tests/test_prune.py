"""Preview vs physical removal, KV-cache consistency and config surgery, for every family."""

import pytest
import torch
from tiny_models import FAMILIES, LAYERS, VOCAB, tiny_model

import entrodrop.prune as prune
from entrodrop.arch import get_arch, get_layers
from entrodrop.costs import block_parameter_count, count_parameters
from entrodrop.plan import DropPlan
from entrodrop.prune import SkippedAttention, ZeroBlock, preview_plan, prune_model

# plans over the tiny models' 4 layers: attention of layer 0 (the cache slot that sets positions),
# MLPs, whole layers, and mixes of the three
PLANS = ("attn:0", "attn:0,mlp:3", "mlp:1,mlp:2", "layer:1,layer:2", "layer:0,attn:2,mlp:3", "attn:0,layer:1,mlp:2")


def sharp_model(family: str, seed: int = 0):
    """A tiny model with weights large enough that every block moves the logits and the argmax."""
    model = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


@pytest.fixture(scope="module")
def models():
    return {family: sharp_model(family) for family in FAMILIES}


def ids(batch=2, length=12, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_preview_equals_physical_and_restores(models, family):
    model = models[family]
    x = ids()
    before = state(model)
    with torch.no_grad():
        dense = model(x).logits
        for text in PLANS:
            plan = DropPlan.parse(text, LAYERS)
            with preview_plan(model, plan):
                preview = model(x).logits
            physical = prune_model(model, plan)(x).logits
            assert not torch.allclose(preview, dense, atol=1e-3), f"{text} changed nothing"
            torch.testing.assert_close(physical, preview, rtol=0, atol=1e-5, msg=f"{family} {text}")
    assert_same_state(before, model)
    torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)


def _step_vs_full(model, x):
    """Last-position logits from prefill + one cached step, and from one uncached forward."""
    full = model(x, use_cache=False).logits[:, -1]
    out = model(x[:, :-1], use_cache=True)
    step = model(x[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    return step, full


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached(models, family):
    model = models[family]
    prompt = ids(batch=1, length=6, seed=2)
    with torch.no_grad():
        for text in PLANS:
            plan = DropPlan.parse(text, LAYERS)
            physical = prune_model(model, plan)
            with preview_plan(model, plan):
                step, full = _step_vs_full(model, ids(batch=1, length=20, seed=3))
                torch.testing.assert_close(step, full, rtol=0, atol=1e-4, msg=f"preview {family} {text}")
                cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
                uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
            assert torch.equal(cached, uncached), f"preview {family} {text}"
            step, full = _step_vs_full(physical, ids(batch=1, length=20, seed=3))
            torch.testing.assert_close(step, full, rtol=0, atol=1e-4, msg=f"physical {family} {text}")
            assert torch.equal(physical.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True), cached)
            assert torch.equal(physical.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False), cached)


def test_cache_check_catches_a_missing_placeholder(models, monkeypatch):
    """Without the placeholder cache entry, dropping layer 0's attention breaks cached decoding."""
    monkeypatch.setattr(prune, "_record_placeholder", lambda *args: None)
    model = models["llama"]
    with torch.no_grad(), preview_plan(model, DropPlan.parse("attn:0", LAYERS)):
        step, full = _step_vs_full(model, ids(batch=1, length=20, seed=3))
    assert (step - full).abs().max() > 1e-3


def test_preview_restores_after_an_exception(models):
    model = models["gpt2"]
    before = state(model)
    layers_before = list(get_layers(model))
    with pytest.raises(RuntimeError, match="boom"), preview_plan(model, DropPlan.parse("attn:0,layer:2", LAYERS)):
        assert isinstance(get_layers(model)[0].attn, SkippedAttention)
        raise RuntimeError("boom")
    assert list(get_layers(model)) == layers_before
    assert not any(isinstance(m, (SkippedAttention, ZeroBlock)) for m in model.modules())
    assert_same_state(before, model)


@pytest.mark.parametrize("family", FAMILIES)
def test_physical_removal_fixes_indexes_config_and_parameters(models, family):
    model = models[family]
    spec = get_arch(model)
    plan = DropPlan.parse("layer:0,attn:2,mlp:3", LAYERS)
    dense_count = count_parameters(model)[0]
    removed = sum(block_parameter_count(model, b.layer, b.kind, spec) for b in plan.blocks)
    pruned = prune_model(model, plan)
    assert pruned is not model and len(get_layers(model)) == LAYERS
    layers = get_layers(pruned)
    assert len(layers) == LAYERS - 1
    assert getattr(pruned.config, spec.num_layers_key) == LAYERS - 1
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == position, (family, type(module).__name__)
    dense_types = getattr(model.config, "layer_types", None)
    if dense_types is not None:
        assert list(pruned.config.layer_types) == list(dense_types[1:])
    # original attn:2 and mlp:3 are layers 1 and 2 of the pruned model
    assert [(e["layer"], e["kind"]) for e in pruned.config.entrodrop_dropped] == [(1, "attn"), (2, "mlp")]
    assert isinstance(layers[1].get_submodule(spec.attn[0]), SkippedAttention)
    assert count_parameters(pruned)[0] == dense_count - removed
    gone = (f"{spec.layers}.1.{spec.attn[0]}.", f"{spec.layers}.2.{spec.mlp[-1]}.")
    assert not [k for k in pruned.state_dict() if k.startswith(gone)]


def test_qwen2_layer_threshold_is_renumbered(models):
    model = models["qwen2"]  # max_window_layers=2: layers 0 and 1 use full attention
    assert model.config.max_window_layers == 2
    pruned = prune_model(model, DropPlan.parse("layer:0", LAYERS))
    assert pruned.config.max_window_layers == 1
    assert list(pruned.config.layer_types) == list(model.config.layer_types[1:])


def test_inplace_and_pruning_a_pruned_model(models):
    model = sharp_model("llama")
    pruned = prune_model(model, DropPlan.parse("attn:3", LAYERS), inplace=True)
    assert pruned is model
    again = prune_model(pruned, DropPlan.parse("layer:0", LAYERS))
    assert [(e["layer"], e["kind"]) for e in again.config.entrodrop_dropped] == [(2, "attn")]
    with pytest.raises(ValueError, match="already dropped"):
        prune_model(pruned, DropPlan.parse("attn:3", LAYERS))


def test_bad_plans_have_clear_messages(models):
    with pytest.raises(ValueError, match="out of range"):
        DropPlan.parse("attn:4", LAYERS)
    with pytest.raises(ValueError, match="listed twice"):
        DropPlan.parse("attn:1,attn:1", LAYERS)
    with pytest.raises(ValueError, match="nothing would remain"):
        DropPlan.parse(",".join(f"layer:{i}" for i in range(LAYERS)), LAYERS)
    with pytest.raises(ValueError, match="nothing would remain"):  # attn and mlp of every layer is everything too
        DropPlan.parse(",".join(f"{k}:{i}" for i in range(LAYERS) for k in ("attn", "mlp")), LAYERS)
    # a plan file may claim any number of layers: checking it reads its blocks, not every layer it claims
    huge = DropPlan.from_dict({"num_layers": 10**15, "blocks": [{"layer": 0, "kind": "attn"}]})
    assert huge.num_layers == 10**15 and len(huge) == 1
    with pytest.raises(ValueError, match="KIND:LAYER"):
        DropPlan.parse("attn:x", LAYERS)
    with pytest.raises(ValueError, match="made for a model with 6 layers"):
        with preview_plan(models["llama"], DropPlan.parse("attn:5", 6)):
            pass
    with pytest.raises(ValueError, match="made for a model with 6 layers"):
        prune_model(models["llama"], DropPlan.parse("attn:5", 6))
    with pytest.raises(TypeError, match="DropPlan"):
        prune_model(models["llama"], "attn:1")


def test_empty_plan_is_the_dense_model(models):
    model = models["opt"]
    x = ids()
    with torch.no_grad():
        dense = model(x).logits
        with preview_plan(model, DropPlan(LAYERS)):
            torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)
        torch.testing.assert_close(prune_model(model, DropPlan(LAYERS))(x).logits, dense, rtol=0, atol=0)
