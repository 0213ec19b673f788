"""Entropy curves of several calibrations on normalised axes (relative depth, nats per dimension)."""

import pytest
from test_claims import FALL_THEN_RISE, make_scores
from tiny_models import random_windows, tiny_model

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.compare import ALL_TOKENS, SINKFREE, compare_curves, compare_figure, trend_curve
from entrodrop.scores import detect_stage_boundary


def with_d(scores, d, **calibration):
    scores.calibration.update(hidden_size=d, **calibration)
    return scores


def test_series_are_normalised_by_depth_and_width():
    deep = with_d(make_scores({"bucket": FALL_THEN_RISE}, data="gsm8k"), 8)  # L = 8
    shallow = with_d(make_scores({"bucket": [4.0, 3.0, 5.0, 6.0, 7.0]}, data="gpqa"), 2)  # L = 4
    a, b = compare_curves([deep, shallow])
    assert a.relative_depth[0] == 0.0 and a.relative_depth[-1] == 1.0 and len(a.relative_depth) == 9
    assert b.relative_depth == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert a.entropy_per_dim == pytest.approx([h / 8 for h in FALL_THEN_RISE])
    assert b.entropy_per_dim[0] == pytest.approx(2.0)
    assert (a.boundary, b.boundary) == (2, 1) and b.boundary_depth == 0.25
    assert a.label == "fake, gsm8k" and b.label == "fake, gpqa"


def test_figure_marks_each_boundary_on_its_curve():
    series = compare_curves({"one": with_d(make_scores({"bucket": FALL_THEN_RISE}), 8),
                             "two": with_d(make_scores({"bucket": [4.0, 3.0, 5.0, 6.0, 7.0]}), 2)})
    fig = compare_figure(series)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    diamonds = [t for t in fig.data if t.mode == "markers"]
    assert [t.legendgroup for t in lines] == ["one", "two"]
    assert [(d.x[0], d.y[0]) for d in diamonds] == [(0.25, 7.0 / 8), (0.25, 3.0 / 2)]
    assert [shape.x0 for shape in fig.layout.shapes] == [0.25, 0.25]
    assert "l / L" in fig.layout.xaxis.title.text and "nats" in fig.layout.yaxis.title.text


def test_different_estimators_are_refused():
    bucket = with_d(make_scores({"bucket": FALL_THEN_RISE}), 8)
    knn = with_d(make_scores({"knn": FALL_THEN_RISE}), 8)
    with pytest.raises(ValueError, match="different estimators are different quantities"):
        compare_curves([bucket, knn])
    with pytest.raises(ValueError, match="different bins"):
        compare_curves([with_d(make_scores({"bucket": FALL_THEN_RISE}), 8, bins=20),
                        with_d(make_scores({"bucket": FALL_THEN_RISE}, data="gpqa"), 8, bins=80)])


def test_bad_inputs_say_what_to_do():
    scores = make_scores({"bucket": FALL_THEN_RISE})  # no hidden_size recorded
    with pytest.raises(ValueError, match="two or more"):
        compare_curves([scores])
    with pytest.raises(ValueError, match="hidden_sizes"):
        compare_curves({"a": scores, "b": scores})
    assert compare_curves({"a": scores, "b": scores}, hidden_sizes={"a": 4, "b": 4})[0].hidden_size == 4
    with pytest.raises(TypeError, match="Scores"):
        compare_curves({"a": scores, "b": {"model": "x"}})


def test_sink_free_curve_is_preferred_and_labelled():
    collapse = [10.0, 11.0, 12.0, 13.0, 3.0, 5.0, 6.0, 7.0, 8.0]
    scores = make_scores({"bucket": collapse}, sinkfree={"bucket": FALL_THEN_RISE})
    curve, kind, boundary = trend_curve(scores, "bucket")
    assert (curve, kind, boundary) == (FALL_THEN_RISE, SINKFREE, 2)
    curve, kind, boundary = trend_curve(scores, "bucket", ALL_TOKENS)
    assert (kind, boundary) == (ALL_TOKENS, detect_stage_boundary(collapse))  # its own boundary, same rule
    with pytest.raises(ValueError, match="no sink-free"):
        trend_curve(make_scores({"bucket": collapse}), "bucket", SINKFREE)


def test_real_calibrations_of_two_tiny_families_compare():
    """Calibration records d, so two architectures of different width need no extra argument."""
    llama = run_calibration(tiny_model("llama"), random_windows(2, 48), settings=EstimatorSettings(estimators=("bucket",)))
    qwen = run_calibration(tiny_model("qwen2"), random_windows(2, 48), settings=EstimatorSettings(estimators=("bucket",)))
    llama.calibration["data"], qwen.calibration["data"] = "random", "random"
    series = compare_curves({"llama": llama, "qwen2": qwen})
    for s, scores in zip(series, (llama, qwen), strict=True):
        assert s.hidden_size == scores.calibration["hidden_size"] > 0
        assert s.entropy_per_dim[-1] == pytest.approx(scores.entropy_curve["bucket"][-1] / s.hidden_size)
