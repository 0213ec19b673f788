"""Capture hooks and streaming calibration on tiny random models of every family."""

import copy
import math

import pytest
import torch
from tiny_models import FAMILIES, random_windows, tiny_model

from entrodrop.arch import get_arch, get_layers, get_module
from entrodrop.calibrate import EstimatorSettings, RunningStats, iter_calibration, run_calibration
from entrodrop.capture import capture_residuals, count_hooks

# Module whose *input* is Y_l (the stream between the attention and MLP sub-blocks) in each
# sequential family — an independent check of the adapter's attn_residual reconstruction.
MLP_NORM = {
    "gemma2": "pre_feedforward_layernorm",
    "gemma3": "pre_feedforward_layernorm",
    "gpt2": "ln_2",
    "opt": "final_layer_norm",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_of_every_family_gives_finite_statistics_for_all_blocks(family):
    model = tiny_model(family)
    scores = run_calibration(model, random_windows(2, 48), estimators=("bucket", "knn", "renyi"))
    L = len(get_layers(model))
    assert scores.num_layers == L
    assert sorted((b.layer, b.kind) for b in scores.blocks) == sorted(
        (layer, kind) for layer in range(L) for kind in ("attn", "mlp", "layer")
    )
    for b in scores.blocks:
        values = [*b.delta_entropy.values(), b.cosine_importance, b.angular_distance]
        assert all(math.isfinite(v) for v in values), (b, values)
    for curve in scores.entropy_curve.values():
        assert len(curve) == L + 1 and all(math.isfinite(v) for v in curve)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_streams_match_the_model(family):
    model = tiny_model(family)
    spec = get_arch(model)
    ids = random_windows(1, 24)
    seen = {}
    handles = []
    layers = get_layers(model, spec)
    norm_name = MLP_NORM.get(family, "post_attention_layernorm")
    parallel = spec.parallel_residual(model.config)
    for i, layer in enumerate(layers):
        if not parallel:
            handles.append(get_module(layer, norm_name).register_forward_pre_hook(
                lambda _m, args, i=i: seen.__setitem__(i, args[0].detach().clone())))
    try:
        with torch.no_grad(), capture_residuals(model, spec) as cap:
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    # X_0..X_{L-1} are what transformers reports as the inputs of each layer
    for i in range(len(layers)):
        torch.testing.assert_close(cap.x[i], out.hidden_states[i].float())
    for i, y in enumerate(cap.y):
        if parallel:  # Y_l = X_l + attention output; the MLP adds the rest
            assert not torch.allclose(y, cap.x[i]) and not torch.allclose(y, cap.x[i + 1])
        else:
            torch.testing.assert_close(y.reshape(seen[i].shape), seen[i].float(), rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_after_a_forward_that_raises():
    model = tiny_model("llama")
    before = count_hooks(model)

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    get_layers(model)[2].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), capture_residuals(model) as _cap:
        assert count_hooks(model) > before + 1
        model(random_windows(1, 8))
    assert count_hooks(model) == before + 1  # only the test's own hook is left


def test_hooks_are_removed_when_calibration_stops_early():
    model = tiny_model("qwen2")
    before = count_hooks(model)
    events = iter_calibration(model, random_windows(4, 40))
    first = next(events)
    assert count_hooks(model) > before
    events.close()
    assert count_hooks(model) == before
    assert first.scores.batches_done == 1 and not first.scores.complete


def test_streaming_yields_one_event_per_batch_consistent_with_the_final_scores():
    model = tiny_model("llama")
    windows = random_windows(5, 40)
    events = list(iter_calibration(model, windows, batch_size=2))
    assert [e.batch_index for e in events] == [1, 2, 3]
    assert events[-1].done and events[-1].scores.complete
    assert [e.tokens_seen for e in events] == [80, 160, 200]
    # the running mean after batch 1 equals a calibration on batch 1 alone
    alone = run_calibration(model, windows[:2], batch_size=2)
    for est in alone.estimators:
        assert events[0].scores.entropy_curve[est] == pytest.approx(alone.entropy_curve[est])
    # the final scores are the mean of three one-batch runs
    parts = [run_calibration(model, windows[i : i + 2], batch_size=2) for i in (0, 2, 4)]
    final = events[-1].scores
    for b in final.blocks:
        part_mean = sum(p.block(b.layer, b.kind).cosine_importance for p in parts) / 3
        assert b.cosine_importance == pytest.approx(part_mean)


def test_padding_is_excluded_from_statistics():
    model = tiny_model("llama")
    windows = random_windows(1, 40)
    padded = torch.cat([windows, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 40), torch.zeros(1, 10)], dim=1)
    plain = run_calibration(model, windows, estimators=("bucket",))
    masked = run_calibration(model, padded, estimators=("bucket",), attention_mask=mask)
    assert masked.calibration["tokens"] == 40
    assert masked.entropy_curve["bucket"] == pytest.approx(plain.entropy_curve["bucket"], rel=1e-4)


def test_statistics_state_does_not_grow_with_the_number_of_samples():
    model = tiny_model("llama")
    sizes = []
    for n in (2, 8):
        stats_sizes = []
        for event in iter_calibration(model, random_windows(n, 40)):
            stats_sizes.append(len(str(event.scores.to_dict())))
        sizes.append(stats_sizes[-1])
        assert max(stats_sizes) - min(stats_sizes) < 0.05 * max(stats_sizes)
    assert abs(sizes[0] - sizes[1]) < 0.05 * sizes[0]
    small, large = RunningStats(30, ("bucket", "knn")), RunningStats(30, ("bucket", "knn"))
    x, y = torch.randn(31, 40, 16), torch.randn(30, 40, 16)
    settings = EstimatorSettings(("bucket", "knn"))
    small.add_batch(x, y, settings)
    for _ in range(6):
        large.add_batch(x, y, settings)
    assert small.state_bytes() == large.state_bytes()


def test_statistics_are_float32_for_a_bfloat16_model():
    model = tiny_model("llama").to(torch.bfloat16)
    with torch.no_grad(), capture_residuals(model) as cap:
        model(random_windows(1, 16))
    assert all(t.dtype == torch.float32 for t in cap.x + cap.y)
    scores = run_calibration(model, random_windows(2, 40))
    assert all(math.isfinite(b.delta_entropy["bucket"]) for b in scores.blocks)


def test_calibration_on_an_accelerate_dispatched_model_with_offload(tmp_path):
    from accelerate import dispatch_model

    model = tiny_model("llama")
    reference = run_calibration(copy.deepcopy(model), random_windows(2, 40))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu"}
    dispatched = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    scores = run_calibration(dispatched, random_windows(2, 40))
    assert scores.entropy_curve["bucket"] == pytest.approx(reference.entropy_curve["bucket"], rel=1e-4)
    assert [b.cosine_importance for b in scores.blocks] == pytest.approx(
        [b.cosine_importance for b in reference.blocks], rel=1e-4, abs=1e-6)


def test_bad_calibration_inputs_give_clear_messages():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="more than 25 tokens"):
        next(iter_calibration(model, random_windows(2, 20)))
    with pytest.raises(ValueError, match="Unknown entropy estimator"):
        EstimatorSettings(("bucket", "gauss"))
    with pytest.raises(ValueError, match="samples, seq_len"):
        next(iter_calibration(model, torch.zeros(0, 10, dtype=torch.long)))
