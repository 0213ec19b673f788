"""The real bundled model (SmolLM2-135M-Instruct): all blocks scored, and the entropy curve's shape.

Measured shape (gsm8k, see docs/method.md): from X_12 on, the first token of every window is a
massive activation (an attention sink, norm ~27,500 against a median of ~135, 44x-208x the
median up to X_28). With all tokens (the method's curve) the bucket entropy collapses there
(1482 -> 871 on these windows), because a per-dimension min-max histogram then puts every other
token into one bin. With the massive tokens left out (the sink-free curve) it falls over the
first layer (the compression stage of the paper) and rises, with small dips, to X_30; the stage
boundary is found on that curve.
"""

import math

import pytest

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.data import load_corpus, make_windows

pytestmark = pytest.mark.slow
NUM_WINDOWS = 6


@pytest.fixture(scope="module")
def windows(bundled_model):
    return make_windows(bundled_model.tokenizer, load_corpus("gsm8k"), num_samples=NUM_WINDOWS, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def scores(bundled_model, windows):
    return run_calibration(bundled_model.model, windows, settings=EstimatorSettings(estimators=("bucket", "knn")),
                           spec=bundled_model.arch)


def test_all_blocks_of_the_30_layers_are_scored(scores):
    assert scores.num_layers == 30
    assert len(scores.blocks) == 90
    for b in scores.blocks:
        assert all(math.isfinite(v) for v in (*b.delta_entropy.values(), b.cosine_importance, b.angular_distance))
    assert len(scores.entropy_curve["bucket"]) == 31
    assert len(scores.entropy_curve_sinkfree["bucket"]) == 31 and len(scores.mid_entropy_sinkfree["bucket"]) == 30


def test_the_first_token_of_every_window_is_a_massive_activation_from_layer_12(scores):
    report = scores.massive_tokens
    assert 10 <= report["first_layer"] <= 14
    massive = [s for s in report["streams"] if s["count"]]
    assert len(massive) >= 20  # it persists over most of the later streams
    for s in massive:
        assert s["positions"].get("0", 0) == NUM_WINDOWS  # position 0 of every window
        assert s["max_ratio"] > 20
    early = [s for s in report["streams"] if int(s["stream"].split("_")[1]) < 10]
    assert all(s["count"] == 0 and s["max_ratio"] < 20 for s in early)
    assert report["excluded_tokens"] >= NUM_WINDOWS


def test_sinkfree_bucket_curve_falls_to_its_first_minimum_within_layers_1_to_3_and_ends_above_it(scores):
    curve = scores.entropy_curve_sinkfree["bucket"]
    boundary = scores.stage_boundary["bucket"]
    assert 1 <= boundary <= 3
    assert curve[boundary] < curve[0]  # a compression stage: entropy fell
    assert curve[30] > curve[boundary]
    later = [curve[i + 1] - curve[i] for i in range(boundary, 30)]
    assert sum(d > 0 for d in later) >= 0.6 * len(later)  # rising over most later layers
    steps = [(curve[i + 1] - curve[i]) / curve[i] for i in range(boundary, 30)]
    assert min(steps) > -0.05  # no collapse once the sink is out


def test_the_methods_all_token_curve_keeps_the_sink_and_collapses_at_it(scores):
    first = scores.massive_tokens["first_layer"]
    curve, free = scores.entropy_curve["bucket"], scores.entropy_curve_sinkfree["bucket"]
    assert curve[first] < 0.7 * curve[first - 1]  # the collapse the sink causes in the method's curve
    assert free[first] > 0.95 * free[first - 1]
    # the method's block scores are differences of the all-token curve, as released
    layer_delta = scores.block(first - 1, "layer").delta_entropy["bucket"]
    assert layer_delta == pytest.approx(curve[first] - curve[first - 1])


def test_knn_entropy_grows_with_the_residual_norm(scores):
    for curve in (scores.entropy_curve["knn"], scores.entropy_curve_sinkfree["knn"]):
        assert sum(curve[i + 1] > curve[i] for i in range(30)) >= 27
        assert curve[0] > -1000  # no zero-radius blow-up at the embeddings
