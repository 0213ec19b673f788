"""Plotly figures drawn from calibration scores."""

import shutil

import pytest
from test_report import CURVE, MID, L, hand_scores
from tiny_models import random_windows, tiny_model

from entrodrop import plots
from entrodrop.calibrate import EstimatorSettings, run_calibration


@pytest.fixture(scope="module")
def tiny_scores():
    return run_calibration(tiny_model("qwen2"), random_windows(2, 48), settings=EstimatorSettings(estimators=("bucket", "knn")))


def test_entropy_figure_draws_each_estimator_with_stages(tiny_scores):
    fig = plots.entropy_figure(tiny_scores)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["H(X_l), bucket, without massive-activation tokens",
                                       "H(X_l), knn, without massive-activation tokens"]
    for trace, est in zip(lines, ("bucket", "knn"), strict=True):
        assert list(trace.y) == pytest.approx(tiny_scores.sinkfree_curve(est))
        assert list(trace.x) == list(range(tiny_scores.num_layers + 1))
    mids = [t for t in fig.data if t.name.startswith("H(Y_l)")]
    assert list(mids[0].x) == [i + 0.5 for i in range(tiny_scores.num_layers)]
    assert "batches" in fig.layout.title.text


def test_entropy_figure_shades_compression_and_expansion_at_the_boundary():
    fig = plots.entropy_figure(hand_scores())
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert [(r.x0, r.x1) for r in rects] == [(0, 3), (3, L)]
    assert rects[0].fillcolor == plots.COMPRESSION_FILL and rects[1].fillcolor == plots.EXPANSION_FILL
    assert lines[0].x0 == 3 and any("X_3" in a.text for a in fig.layout.annotations)
    override = plots.entropy_figure(hand_scores(), stage_boundary={"bucket": 5})
    assert [s.x0 for s in override.layout.shapes if s.type == "line"] == [5]


def test_partial_scores_show_progress_in_titles():
    partial = hand_scores(complete=False)
    assert "2/4 batches" in plots.entropy_figure(partial).layout.title.text
    assert "2/4 batches" in plots.blocks_figure(partial).layout.title.text


def test_blocks_figure_compares_both_criteria_and_colours_ticks():
    scores = hand_scores()
    fig = plots.blocks_figure(scores, "attn", "bucket", ticked={5}, protected={0: "compression stage"})
    dh, cos = fig.data[:2]
    assert list(dh.x) == list(range(L)) and list(cos.x) == list(range(L))
    assert list(dh.y) == pytest.approx([m - c for m, c in zip(MID, CURVE[:-1], strict=True)])
    assert list(cos.y) == pytest.approx([b.cosine_importance for b in scores.blocks_of("attn")])
    assert dh.marker.color[5] == plots.DROP_COLOR and dh.marker.color[0] == plots.PROTECTED_COLOR
    assert dh.marker.color[1] == plots.KEEP_COLOR
    assert cos.customdata[6][0] == 1  # layer 6 has the lowest cosine importance: rank 1
    assert cos.customdata[0][1].startswith("protected")
    assert "1 ticked to drop" in fig.layout.title.text
    assert [t.name for t in fig.data[2:]] == ["kept (blue)", "ticked to drop (red)", "protected (grey)"]
    assert [t.marker.color for t in fig.data[2:]] == [plots.KEEP_COLOR, plots.DROP_COLOR, plots.PROTECTED_COLOR]
    by_cosine = plots.blocks_figure(scores, "attn", "bucket", ticked={5}, criterion="cosine")
    assert "1 ticked to drop by cosine" in by_cosine.layout.title.text
    assert fig.layout.yaxis2.domain[1] < fig.layout.yaxis.domain[0]  # stacked: readable on a narrow screen
    mlp = plots.blocks_figure(scores, "mlp", "bucket")
    assert "MLP" in mlp.layout.title.text


def test_rank_figure_places_each_block_by_its_two_ranks():
    scores = hand_scores()
    fig = plots.rank_figure(scores, "attn", "bucket", ticked={6})
    points = fig.data[1]
    assert len(points.x) == L
    layer6 = list(points.text).index("6")
    assert points.y[layer6] == 1 and points.marker.color[layer6] == plots.DROP_COLOR


def test_write_figures_html_always_png_with_chromium(tmp_path):
    figs = {"entropy": plots.entropy_figure(hand_scores()), "blocks": plots.blocks_figure(hand_scores())}
    html = plots.write_figures(figs, tmp_path / "a", png=False)
    text = html[0].read_text()
    assert html == [tmp_path / "a" / "plots.html"]
    assert text.count("<h2>") == 2 and "plotly" in text.lower() and "Entropy per layer" in text
    if shutil.which("chromium") is None and shutil.which("google-chrome") is None:
        pytest.skip("PNG export needs Chrome or Chromium (make test installs Debian's chromium)")
    written = plots.write_figures(figs, tmp_path / "b")
    pngs = [p for p in written if p.suffix == ".png"]
    assert [p.name for p in pngs] == ["entropy.png", "blocks.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_empty_figure_shows_its_message():
    assert plots.empty_figure("hello").layout.annotations[0].text == "hello"


def test_tradeoff_figure_has_one_line_per_criterion_and_clickable_points():
    from entrodrop.costs import measure_block_costs
    from entrodrop.plots import tradeoff_figure
    from entrodrop.verify import SweepRow, tradeoff_points

    L = 4

    def row(criterion, count, ppl):
        blocks = [{"layer": i, "kind": "attn", "reason": ""} for i in range(count)]
        return SweepRow(criterion, count, {"num_layers": L, "blocks": blocks, "criterion": criterion, "meta": {}},
                        10.0, ppl, 0.1, 0.9, 100 - count, 100)
    rows = [row("cosine", 0, 10.0), row("cosine", 2, 12.0), row("recommended", 0, 10.0), row("recommended", 2, 11.0)]
    points = tradeoff_points(rows, measure_block_costs(tiny_model("llama"), seq_len=16))
    assert points[0]["expected_speedup"] == pytest.approx(1.0) and points[1]["expected_speedup"] > 1.0
    assert points[1]["params_removed_share"] > 0
    fig = tradeoff_figure(points, dense_perplexity=10.0, highlight=("recommended", 2))
    lines = [t for t in fig.data if t.name in ("cosine", "recommended")]
    assert [t.name for t in lines] == ["cosine", "recommended"]
    assert [list(c) for c in lines[1].customdata] == [["recommended", 0], ["recommended", 2]]
    assert fig.data[-1].name == "picked" and fig.data[-1].y[0] == 11.0
    assert fig.layout.yaxis.type == "log"


def sink_scores():
    """hand_scores with an all-token curve that collapses at X_5 (a sink) and the sink-free one rising."""
    scores = hand_scores()
    collapse = [10.0, 10.5, 11.0, 11.5, 12.0, 3.0, 5.0, 6.0, 7.0]
    scores.entropy_curve_sinkfree = {"bucket": list(CURVE)}
    scores.mid_entropy_sinkfree = {"bucket": list(MID)}
    scores.entropy_curve = {"bucket": collapse}
    names = [f"{k}_{i}" for i in range(L) for k in ("X", "Y")] + [f"X_{L}"]
    streams = [{"stream": n, "count": 4 if i >= 10 else 0, "max_ratio": 160.0 if i >= 10 else 2.0,
                "median_norm": 10.0, "max_norm": 1600.0 if i >= 10 else 20.0,
                "positions": {"0": 4} if i >= 10 else {}, "token_ids": {"1": 4} if i >= 10 else {}}
               for i, n in enumerate(names)]
    scores.massive_tokens = {"threshold": 100.0, "streams": streams, "first_stream": "X_5", "first_layer": 5,
                             "excluded_tokens": 4, "fallback_batches": 0}
    return scores


def test_sink_free_curve_by_default_and_all_tokens_one_toggle_away():
    scores = sink_scores()
    teach = plots.entropy_figure(scores)
    line = next(t for t in teach.data if t.mode == "lines+markers")
    assert list(line.y) == CURVE and "without massive-activation tokens" in line.name
    assert [s.x0 for s in teach.layout.shapes if s.type == "line"] == [3]  # the sink-free boundary
    method = plots.entropy_figure(scores, curve="all-token")
    line = next(t for t in method.data if t.mode == "lines+markers")
    assert list(line.y)[5] == 3.0 and "all tokens" in line.name
    assert "all tokens" in method.layout.title.text and "without massive" in teach.layout.title.text
    with pytest.raises(ValueError, match="curve must be one of"):
        plots.entropy_figure(scores, curve="sinks")


def test_entropy_legend_names_every_shading_and_marker():
    fig = plots.entropy_figure(hand_scores())
    names = [t.name for t in fig.data]
    assert "compression stage (shaded blue)" in names and "expansion stage (shaded orange)" in names
    assert "stage boundary" in names and any("hollow" in n for n in names)
    partial = plots.entropy_figure(hand_scores(complete=False), history={"bucket": [(1, [5.0] * (L + 1))]})
    assert "running means over 2 of 4 batches" in partial.layout.title.text
    faint = [t for t in partial.data if t.name == "running mean after 1 batch"]
    assert len(faint) == 1 and list(faint[0].y) == [5.0] * (L + 1)


def test_norms_figure_shows_the_sink_above_the_threshold():
    fig = plots.norms_figure(sink_scores())
    median, largest, threshold = fig.data
    assert fig.layout.yaxis.type == "log"
    assert list(threshold.y) == [1000.0] * (2 * L + 1)
    assert largest.y[10] > threshold.y[10] and largest.y[9] < threshold.y[9]
    assert largest.x[10] == 5.0 and any("X_5" in a.text for a in fig.layout.annotations)
    assert "no token norms" in plots.norms_figure(hand_scores()).layout.annotations[0].text
