"""The real bundled model (SmolLM2-135M-Instruct): all blocks scored, and the entropy curve's shape.

Measured shape (bucket estimator, gsm8k, see docs/results.md): entropy drops over the first
layer, climbs gently, then collapses at X_12 where the first token of every window becomes an
attention sink with a ~150x larger norm; from there it rises over every remaining layer.
With the first token left out of the statistics the collapse disappears.
"""

import math

import pytest

from entrodrop.calibrate import run_calibration
from entrodrop.data import load_corpus, make_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(bundled_model):
    return make_windows(bundled_model.tokenizer, load_corpus("gsm8k"), num_samples=6, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def scores(bundled_model, windows):
    return run_calibration(bundled_model.model, windows, estimators=("bucket", "knn"), spec=bundled_model.arch)


def test_all_blocks_of_the_30_layers_are_scored(scores):
    assert scores.num_layers == 30
    assert len(scores.blocks) == 90
    for b in scores.blocks:
        assert all(math.isfinite(v) for v in (*b.delta_entropy.values(), b.cosine_importance, b.angular_distance))
    assert len(scores.entropy_curve["bucket"]) == 31


def test_bucket_entropy_falls_first_then_rises_over_most_later_layers(scores):
    curve = scores.entropy_curve["bucket"]
    boundary = scores.stage_boundary["bucket"]
    assert curve[1] < curve[0]  # the first block compresses
    assert 8 <= boundary <= 16  # the minimum sits mid-network (the attention-sink collapse)
    later = [curve[i + 1] - curve[i] for i in range(boundary, 30)]
    assert sum(d > 0 for d in later) >= 0.8 * len(later)  # expansion stage: rising almost everywhere
    assert curve[30] > curve[boundary] + 200


def test_the_collapse_comes_from_the_first_token(bundled_model, windows):
    without_sink = run_calibration(bundled_model.model, windows, estimators=("bucket",), skip_first=1,
                                   spec=bundled_model.arch)
    curve = without_sink.entropy_curve["bucket"]
    steps = [(curve[i + 1] - curve[i]) / curve[i] for i in range(30)]
    assert min(steps) > -0.05  # no layer loses more than 5% of the entropy any more
    assert curve[30] > curve[1]


def test_knn_entropy_grows_with_the_residual_norm(scores):
    curve = scores.entropy_curve["knn"]
    assert sum(curve[i + 1] > curve[i] for i in range(30)) >= 27
