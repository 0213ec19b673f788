"""The gradio-free logic behind the web app: tables, plan summaries, disagreement, explainer, hub push."""

import io
import math

import pandas as pd
import pytest
import torch
from tiny_models import random_windows, tiny_model

from entrodrop import report
from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.costs import measure_block_costs, summarize_plan
from entrodrop.export import push_folder_to_hub
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.scores import BlockScore, Scores, detect_stage_boundary
from entrodrop.select import protected_layers, rank_blocks, select_blocks

L = 8
CURVE = [10.0, 8.0, 7.0, 6.0, 6.5, 7.5, 8.0, 9.5, 11.0]  # falls to X_3, then rises
MID = [9.0, 7.5, 6.5, 6.2, 7.0, 7.8, 9.0, 10.0]
ATTN_COS = [0.5, 0.1, 0.2, 0.05, 0.3, 0.4, 0.02, 0.6]


def hand_scores(complete: bool = True) -> Scores:
    """Scores whose attention entropy increases are MID - CURVE, exactly as calibration defines them."""
    blocks = []
    for i in range(L):
        blocks.append(BlockScore(i, "attn", {"bucket": MID[i] - CURVE[i]}, ATTN_COS[i], ATTN_COS[i] / 2))
        blocks.append(BlockScore(i, "mlp", {"bucket": CURVE[i + 1] - MID[i]}, 0.1 * (i + 1), 0.05 * (i + 1)))
        blocks.append(BlockScore(i, "layer", {"bucket": CURVE[i + 1] - CURVE[i]}, 0.2 + 0.01 * i, 0.1 + 0.01 * i))
    matrix = [[abs(i - j) * 0.1 for j in range(L + 1)] for i in range(L + 1)]
    last = [[abs(i - j) * (0.05 + 0.01 * ((i + j) % 3)) for j in range(L + 1)] for i in range(L + 1)]
    return Scores(model="toy", num_layers=L, estimators=["bucket"], entropy_curve={"bucket": CURVE},
                  mid_entropy={"bucket": MID}, stage_boundary={"bucket": detect_stage_boundary(CURVE)}, blocks=blocks,
                  angular_matrix=matrix, calibration={"tokens": 512, "bins": 20}, batches_done=2 if not complete else 4,
                  batches_total=4, complete=complete, angular_matrix_last=last)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tiny_scores(tiny):
    return run_calibration(tiny, random_windows(2, 48), settings=EstimatorSettings(estimators=("bucket", "knn")))


# -- tables ----------------------------------------------------------------------------------------
def test_scores_frame_has_every_block_and_consistent_entropies(tiny_scores):
    frame = report.scores_frame(tiny_scores)
    assert len(frame) == 3 * tiny_scores.num_layers
    for est in ("bucket", "knn"):
        delta = frame[f"entropy_out_{est}"] - frame[f"entropy_in_{est}"]
        assert (delta - frame[f"delta_entropy_{est}"]).abs().max() < 1e-6
    attn3 = frame[(frame.kind == "attn") & (frame.layer == 3)].iloc[0]
    assert attn3["entropy_in_bucket"] == pytest.approx(tiny_scores.entropy_curve["bucket"][3])
    assert attn3["entropy_out_bucket"] == pytest.approx(tiny_scores.mid_entropy["bucket"][3])
    assert attn3["cosine_importance"] == pytest.approx(tiny_scores.block(3, "attn").cosine_importance)


def test_scores_csv_round_trips(tiny_scores):
    text = report.scores_csv(tiny_scores)
    assert text.splitlines()[0].startswith("layer,kind,entropy_in_bucket")
    back = pd.read_csv(io.StringIO(text))
    pd.testing.assert_frame_equal(back, report.scores_frame(tiny_scores), check_dtype=False)


def test_block_table_ranks_match_the_selection_module():
    scores = hand_scores()
    protected = protected_layers(scores, "stage", estimator="bucket")
    table = report.block_table(scores, "attn", "bucket", ticked={5, 6}, protected=protected)
    assert list(table.layer) == list(range(L))
    for criterion in ("entrodrop", "cosine", "angular"):
        expected = {layer: r for r, (layer, _) in enumerate(rank_blocks(scores, criterion, "attn"), 1)}
        assert dict(zip(table.layer, table[f"rank {criterion}"], strict=True)) == expected
    assert list(table["drop"]) == ["✓" if i in (5, 6) else "" for i in range(L)]
    assert table.protected[0].startswith("compression stage") and table.protected[L - 1].startswith("last layer")
    assert table.protected[5] == ""
    assert table["cosine importance"][6] == pytest.approx(0.02)


# -- plan summaries ------------------------------------------------------------
def test_plan_summary_words_numbers_and_protection_warning(tiny):
    costs = measure_block_costs(tiny, seq_len=16)
    plan = DropPlan(costs.num_layers, [DroppedBlock(0, "attn", "x"), DroppedBlock(2, "attn", "y")], criterion="manual")
    summary = summarize_plan(plan, costs)
    text = report.plan_summary_markdown(plan, summary, {0: "compression stage"})
    assert "drop 2 blocks" in text and f"{summary.params_removed:,}" in text
    assert f"×{summary.ideal_speedup:.2f}" in text
    assert "layer 0: compression stage" in text and "hand-edited" in text
    empty = DropPlan(costs.num_layers, [])
    assert "Nothing ticked" in report.plan_summary_markdown(empty, summarize_plan(empty, costs))


# -- disagreement -------------------------------------------------------------------------------
def test_spearman_rank_correlation():
    assert report._spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert report._spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report._spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(report._spearman([1, 1, 1], [1, 2, 3]))


def test_criteria_disagreement_matches_each_selection():
    scores = hand_scores()
    d = report.criteria_disagreement(scores, "attn", 3, "bucket")
    for criterion in ("entrodrop", "cosine", "angular"):
        expected = [b.layer for b in select_blocks(scores, criterion, "attn", count=3).blocks]
        assert d.chosen[criterion] == expected
    union = sorted(set().union(*(set(v) for v in d.chosen.values())))
    assert list(d.table.layer) == union
    row6 = d.table[d.table.layer == 6].iloc[0]
    assert row6["cosine"] == "✓" and row6["rank cosine"] == 1  # 6 has the smallest cosine importance
    # cosine and angular are proportional here: perfectly correlated
    assert d.spearman["cosine~angular"] == pytest.approx(1.0)
    text = d.markdown()
    common = sorted(set(d.chosen["entrodrop"]) & set(d.chosen["cosine"]))
    assert f"agree on {len(common)} of 3" in text and "Spearman" in text


def test_disagreement_reports_a_criterion_that_cannot_choose():
    d = report.criteria_disagreement(hand_scores(), "attn", 6, "bucket")  # released protection leaves 5 eligible
    assert d.chosen["entrodrop"] is None and "only 5 of 8 are eligible" in d.errors["entrodrop"]
    assert d.chosen["cosine"] is not None and "cannot choose" in d.markdown()
    assert "above 0" in report.criteria_disagreement(hand_scores(), "attn", 0, "bucket").markdown()


# -- explainer -----------------------------------------------------------------------------------
def test_explainer_uses_the_measured_numbers():
    scores = hand_scores()
    text = report.explain_scores(scores, "attn", "bucket", count=2, protect="stage")
    assert "layers 0–2" in text and "X_3" in text and "6.0 at X_3" in text and "11.0 at X_8" in text
    dh = sorted(range(L), key=lambda i: (MID[i] - CURVE[i], i))
    assert f"layers {dh[0]} ({MID[dh[0]] - CURVE[dh[0]]:+.3g})" in text
    assert "layers 6 (0.02)" in text  # lowest cosine importance first
    assert "*lower* the entropy" in text  # several attention blocks reduce entropy here
    assert "the 2 with the" in text and "among the other 4" in text
    released = report.explain_scores(scores, "attn", "bucket", count=2)  # the default protection
    assert "as in the authors' released code" in released and "among the other 5" in released
    partial = report.explain_scores(hand_scores(complete=False), "attn", "bucket")
    assert "after 2 of 4 batches" in partial


def test_explainer_without_compression_stage_and_before_calibration():
    rising = hand_scores()
    rising.entropy_curve = {"bucket": [float(i) for i in range(L + 1)]}
    rising.stage_boundary = {"bucket": 0}
    text = report.explain_scores(rising, "layer", "bucket", protect="stage")
    assert "no compression stage was detected" in text
    assert "only the last layer" in text
    assert "start a calibration" in report.explain_scores(None)
    assert "set by hand" in report.explain_scores(hand_scores(), "attn", "bucket", stage_boundary=4)


# -- hub push -------------------------------------------------------------------------------------
def test_push_needs_an_export_repo_and_token(tmp_path):
    with pytest.raises(ValueError, match="Export the pruned model first"):
        push_folder_to_hub(tmp_path, "me/x", "tok")
    (tmp_path / "entrodrop.json").write_text("{}")  # what every export (safetensors or GGUF) writes
    with pytest.raises(ValueError, match="repository id"):
        push_folder_to_hub(tmp_path, "", "tok")
    with pytest.raises(ValueError, match="access token"):
        push_folder_to_hub(tmp_path, "me/x", " ")


def test_push_offline_says_the_hub_is_unreachable(tmp_path):
    (tmp_path / "entrodrop.json").write_text("{}")  # what every export (safetensors or GGUF) writes
    with pytest.raises(ValueError, match="Could not reach the Hugging Face Hub"):
        push_folder_to_hub(tmp_path, "me/x", "hf_token")


def test_push_uploads_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["upload"] = (folder_path, repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "entrodrop.json").write_text("{}")  # what every export (safetensors or GGUF) writes
    url = push_folder_to_hub(tmp_path, "me/pruned", "hf_abc", private=True)
    assert url == "https://huggingface.co/me/pruned"
    assert calls == {"token": "hf_abc", "create": ("me/pruned", True, True), "upload": (str(tmp_path), "me/pruned")}


@pytest.mark.slow
def test_explainer_on_the_bundled_model_names_its_boundary(bundled_model):
    from entrodrop.data import load_corpus, make_windows

    windows = make_windows(bundled_model.tokenizer, load_corpus("gsm8k"), num_samples=2, seq_len=64)
    with torch.inference_mode():
        scores = run_calibration(bundled_model.model, windows, settings=EstimatorSettings(estimators=("bucket",)), model_name=bundled_model.name)
    boundary = scores.stage_boundary["bucket"]
    text = report.explain_scores(scores, "attn", "bucket")
    assert scores.num_layers == 30 and "SmolLM2-135M-Instruct" in text
    if 0 < boundary < 30:
        assert f"X_{boundary}, the stage boundary" in text
    least = min(scores.blocks_of("attn"), key=lambda b: (b.delta_entropy["bucket"], b.layer))
    assert f"layers {least.layer} (" in text


def test_protection_is_described_in_runs():
    protected = protected_layers(hand_scores(), "stage", estimator="bucket")
    text = report.describe_protection(protected)
    assert text == ("layers 0–2: compression stage (entropy still falling before X_3); "
                    "layer 7: last layer (writes the stream the LM head reads)")
    assert report.describe_protection({0: "a", 1: "b", 3: "a"}) == "layer 0: a; layer 1: b; layer 3: a"
    assert report.describe_protection({}) == "none"


def test_explainer_names_the_sink_with_this_models_numbers():
    from test_plots import sink_scores

    scores = sink_scores()
    text = report.explain_scores(scores, "attn", "bucket")
    assert "### Massive activations (attention sinks)" in text
    assert "at **X_5** (layer 5), mostly at position 0 of the window (its first token)" in text
    assert "×160" in text and "**4 token(s)**" in text and "every other token lands in the same bin" in text
    # the stages are read on the sink-free curve (boundary X_3), not on the collapse at X_5
    assert "to 6.0 at X_3, the stage boundary" in text and "without massive-activation tokens" in text
    assert "moving average" not in text
    quiet = hand_scores()
    quiet.massive_tokens = {**scores.massive_tokens, "first_stream": None, "first_layer": None}
    assert "no token was left out" in report.explain_scores(quiet, "attn", "bucket")
    assert "Massive activations" not in report.explain_scores(hand_scores(), "attn", "bucket")
