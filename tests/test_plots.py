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
    assert [t.name for t in lines] == ["H(X_l), bucket", "H(X_l), knn"]
    for trace, est in zip(lines, ("bucket", "knn"), strict=True):
        assert list(trace.y) == pytest.approx(tiny_scores.entropy_curve[est])
        assert list(trace.x) == list(range(tiny_scores.num_layers + 1))
    mids = [t for t in fig.data if t.mode == "markers"]
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
    dh, cos = fig.data
    assert list(dh.x) == list(range(L)) and list(cos.x) == list(range(L))
    assert list(dh.y) == pytest.approx([m - c for m, c in zip(MID, CURVE[:-1], strict=True)])
    assert list(cos.y) == pytest.approx([b.cosine_importance for b in scores.blocks_of("attn")])
    assert dh.marker.color[5] == plots.DROP_COLOR and dh.marker.color[0] == plots.PROTECTED_COLOR
    assert dh.marker.color[1] == plots.KEEP_COLOR
    assert cos.customdata[6][0] == 1  # layer 6 has the lowest cosine importance: rank 1
    assert cos.customdata[0][1].startswith("protected")
    assert "1 ticked to drop" in fig.layout.title.text
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
