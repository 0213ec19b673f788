"""Capture hooks and streaming calibration on tiny random models of every family."""

import copy
import math

import pytest
import torch
from tiny_models import FAMILIES, random_windows, tiny_model

from entrodrop.arch import get_arch, get_layers, get_module
from entrodrop.calibrate import EstimatorSettings, RunningStats, iter_calibration, run_calibration
from entrodrop.capture import capture_residuals, count_hooks
from entrodrop.scores import detect_stage_boundary

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
    scores = run_calibration(model, random_windows(2, 48), settings=EstimatorSettings(estimators=("bucket", "knn", "renyi")))
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
    assert [e.done for e in events] == [1, 2, 3] and {e.total for e in events} == {3}
    assert events[-1].finished and not events[-2].finished and events[-1].scores.complete
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
    plain = run_calibration(model, windows, settings=EstimatorSettings(estimators=("bucket",)))
    masked = run_calibration(model, padded, settings=EstimatorSettings(estimators=("bucket",)), attention_mask=mask)
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


def _streams_with_a_sink(L=6, n=60, d=16, sink_from=3, seed=0):
    """Random X (L+1, N, d) and Y (L, N, d); token 0 is 300x larger from X_{sink_from} (and Y_{sink_from}) on."""
    torch.manual_seed(seed)
    xs, ys = torch.randn(L + 1, n, d), torch.randn(L, n, d)
    xs[sink_from:, 0] *= 300
    ys[sink_from:, 0] *= 300
    return xs, ys


def test_massive_tokens_are_reported_and_left_out_of_the_sinkfree_curve_only():
    from entrodrop.estimators import entropy

    L = 6
    xs, ys = _streams_with_a_sink(L)
    stats = RunningStats(L, ("bucket", "knn"))
    ids = torch.arange(100, 160)
    stats.add_batch(xs, ys, EstimatorSettings(("bucket", "knn")), positions=torch.arange(60), token_ids=ids)
    scores = stats.to_scores("toy", {}, 1)
    for est in ("bucket", "knn"):  # the method's curve keeps every token; the sink-free one drops token 0 everywhere
        assert scores.entropy_curve[est] == pytest.approx(entropy(xs, est).tolist())
        assert scores.entropy_curve_sinkfree[est] == pytest.approx(entropy(xs[:, 1:], est).tolist())
        assert scores.mid_entropy_sinkfree[est] == pytest.approx(entropy(ys[:, 1:], est).tolist())
    # streams before the sink are measured on the same token set as those after it
    assert scores.entropy_curve_sinkfree["bucket"][0] != pytest.approx(scores.entropy_curve["bucket"][0])
    report = scores.massive_tokens
    assert report["threshold"] == 20.0
    assert [s["stream"] for s in report["streams"]][:4] == ["X_0", "Y_0", "X_1", "Y_1"]
    assert len(report["streams"]) == 2 * L + 1 and report["streams"][-1]["stream"] == "X_6"
    hit = [s for s in report["streams"] if s["count"]]
    assert [s["stream"] for s in hit] == ["X_3", "Y_3", "X_4", "Y_4", "X_5", "Y_5", "X_6"]
    assert all(s["positions"] == {"0": 1} and s["token_ids"] == {"100": 1} and s["max_ratio"] > 100 for s in hit)
    assert all(s["max_ratio"] < 20 for s in report["streams"] if not s["count"])
    assert report["first_stream"] == "X_3" and report["first_layer"] == 3
    assert report["excluded_tokens"] == 1 and report["fallback_batches"] == 0
    assert scores.stage_boundary["bucket"] == detect_stage_boundary(scores.entropy_curve_sinkfree["bucket"])


def test_without_massive_tokens_the_sinkfree_curve_is_the_all_token_curve():
    torch.manual_seed(0)
    stats = RunningStats(4, ("bucket",))
    stats.add_batch(torch.randn(5, 40, 8), torch.randn(4, 40, 8), EstimatorSettings(("bucket",)))
    scores = stats.to_scores("toy", {}, 1)
    assert scores.entropy_curve_sinkfree == scores.entropy_curve
    assert scores.mid_entropy_sinkfree == scores.mid_entropy
    assert scores.massive_tokens["first_layer"] is None and scores.massive_tokens["excluded_tokens"] == 0


def test_a_lower_massive_ratio_catches_smaller_outliers():
    xs, ys = _streams_with_a_sink()
    xs[1, 5] *= 8  # an 8x token in X_1 only: not massive at 20x, massive at 5x
    for ratio, first in ((20.0, "X_3"), (5.0, "X_1")):
        stats = RunningStats(6, ("bucket",), massive_ratio=ratio)
        stats.add_batch(xs, ys, EstimatorSettings(("bucket",), massive_ratio=ratio))
        assert stats.massive.report()["first_stream"] == first
    with pytest.raises(ValueError, match="massive_ratio must be above 1"):
        EstimatorSettings(massive_ratio=0.5)


def test_too_many_massive_tokens_for_knn_fall_back_to_all_tokens():
    torch.manual_seed(0)
    xs, ys = torch.randn(3, 30, 8), torch.randn(2, 30, 8)
    xs[1, :3] *= 500  # 3 sinks leave 27 tokens: enough for k = 25
    stats = RunningStats(2, ("knn",))
    stats.add_batch(xs, ys, EstimatorSettings(("knn",)))
    assert stats.massive.excluded_tokens == 3 and stats.massive.fallback_batches == 0
    xs[2, 3:6] *= 500  # 6 tokens massive somewhere: 24 left, knn needs more than 25
    stats = RunningStats(2, ("knn",))
    stats.add_batch(xs, ys, EstimatorSettings(("knn",)))
    assert stats.massive.excluded_tokens == 0 and stats.massive.fallback_batches == 1
    scores = stats.to_scores("toy", {}, 1)
    assert scores.entropy_curve_sinkfree == scores.entropy_curve


def test_massive_token_report_stays_bounded_over_many_batches():
    from entrodrop.calibrate import MAX_TRACKED

    L, settings = 2, EstimatorSettings(("bucket",))
    stats = RunningStats(L, ("bucket",))
    sizes = []
    for batch in range(40):  # a sink at a new position with a new token id every batch
        torch.manual_seed(batch)
        xs, ys = torch.randn(L + 1, 40, 8), torch.randn(L, 40, 8)
        xs[:, batch % 40] *= 300
        stats.add_batch(xs, ys, settings, positions=torch.arange(40), token_ids=torch.arange(40) + 1000 * batch)
        sizes.append(stats.state_bytes())
    assert sizes[-1] == sizes[MAX_TRACKED + 1]  # growth stops once the capped dicts are full
    x0 = stats.massive.report()["streams"][0]
    assert len(x0["positions"]) == MAX_TRACKED + 1 and x0["positions"]["other"] == 40 - MAX_TRACKED
    assert sum(x0["token_ids"].values()) == x0["count"] == 40


def test_calibration_reports_window_positions_and_token_ids_of_a_sink():
    model = tiny_model("llama")
    layers = get_layers(model)

    def make_sink(_module, _args, output):  # layer 1 turns position 0 into a massive activation
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0] *= 1000
        return output

    handle = layers[1].register_forward_hook(make_sink)
    try:
        windows = random_windows(3, 40)
        scores = run_calibration(model, windows, batch_size=2)
    finally:
        handle.remove()
    report = scores.massive_tokens
    assert report["first_stream"] == "X_2" and report["first_layer"] == 2
    x2 = report["streams"][4]
    assert x2["stream"] == "X_2" and x2["count"] == 3 and x2["positions"] == {"0": 3}
    expected_ids = {}
    for t in windows[:, 0].tolist():
        expected_ids[str(t)] = expected_ids.get(str(t), 0) + 1
    assert x2["token_ids"] == expected_ids
    assert report["excluded_tokens"] == 3
    assert scores.calibration["massive_ratio"] == 20.0


def test_iter_calibration_takes_settings_only():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="estimators"):
        next(iter_calibration(model, random_windows(2, 40), estimators=("bucket",)))
    with pytest.raises(TypeError, match="EstimatorSettings"):
        next(iter_calibration(model, random_windows(2, 40), settings=("bucket",)))


def test_last_token_angular_matrix_reads_only_the_last_real_token_of_each_window():
    model = tiny_model("llama")
    windows = random_windows(2, 30)
    padded = torch.cat([windows, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 30), torch.zeros(2, 6)], dim=1)
    scores = run_calibration(model, padded, settings=EstimatorSettings(estimators=("bucket",)), attention_mask=mask,
                             batch_size=2)
    with torch.no_grad(), capture_residuals(model) as cap:
        model(windows)
    L = len(cap.x) - 1
    last = [x[:, -1] for x in cap.x]  # X_l of each window's last token, (B, d)
    for i, j in ((0, L), (1, 3), (2, L - 1)):
        cos = torch.nn.functional.cosine_similarity(last[i], last[j], dim=-1).clamp(-1, 1).double()
        expected = float((torch.arccos(cos) / math.pi).mean())
        assert scores.angular_matrix_last[i][j] == pytest.approx(expected, abs=1e-5)
    assert scores.angular_matrix_last != scores.angular_matrix  # all tokens differ from the last one alone


def test_calibration_resumed_on_other_threads_leaves_no_grad_mode_behind():
    """The app resumes generators on whichever worker thread is free: inference mode must not be held
    across a yield (it is thread-local), or it leaks into the thread and breaks the next batch elsewhere."""
    import threading

    model = tiny_model("llama")
    windows = random_windows(4, 40)
    settings = EstimatorSettings(estimators=("bucket", "knn"))
    events = iter_calibration(model, windows, settings=settings)
    leaked, last = [], []

    def step():
        last[:] = [next(events)]
        leaked.append(torch.is_inference_mode_enabled())

    for _ in range(4):  # every batch on a fresh thread, as gradio's worker pool may do
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    assert leaked == [False] * 4 and last[0].finished
    single = run_calibration(model, windows, settings=settings)
    for est in ("bucket", "knn"):
        assert last[0].scores.entropy_curve[est] == pytest.approx(single.entropy_curve[est])


def _scores_equal_bitwise(a, b) -> bool:
    """Every number of two scores JSONs the same float (no tolerance)."""
    return a.to_dict() == b.to_dict()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_overlapped_statistics_give_bitwise_the_same_scores_and_events(family):
    model = tiny_model(family)
    windows = random_windows(5, 40)
    settings = EstimatorSettings(estimators=("bucket", "knn"))
    plain = list(iter_calibration(model, windows, settings=settings, batch_size=2, overlap=False))
    overlapped = list(iter_calibration(model, windows, settings=settings, batch_size=2, overlap=True))
    assert [e.done for e in overlapped] == [e.done for e in plain] == [1, 2, 3]
    for a, b in zip(plain, overlapped, strict=True):
        assert _scores_equal_bitwise(a.scores, b.scores)


def test_overlapped_calibration_stopped_early_removes_hooks_and_joins_its_thread():
    import threading

    model = tiny_model("qwen2")
    before = count_hooks(model)
    events = iter_calibration(model, random_windows(6, 40), overlap=True)
    first = next(events)
    assert any(t.name.startswith("entrodrop-statistics") for t in threading.enumerate())
    events.close()
    assert count_hooks(model) == before
    assert not any(t.name.startswith("entrodrop-statistics") for t in threading.enumerate())
    assert first.scores.batches_done == 1 and not torch.is_inference_mode_enabled()


def test_an_error_in_the_statistics_thread_reaches_the_caller(monkeypatch):
    from entrodrop import calibrate

    model = tiny_model("llama")
    calls = []
    real_add = calibrate.RunningStats.add_batch

    def failing_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("statistics failed on batch 2")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(calibrate.RunningStats, "add_batch", failing_add)
    before = count_hooks(model)
    events = iter_calibration(model, random_windows(4, 40), overlap=True)
    assert next(events).done == 1
    with pytest.raises(FloatingPointError, match="batch 2"):
        next(events)
    assert count_hooks(model) == before
