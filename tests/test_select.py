"""Selection policies, protections and plan validation on hand-built scores."""

import pytest

from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.scores import BlockScore, Scores, detect_stage_boundary
from entrodrop.select import plan_from_ticks, protected_layers, rank_blocks, select_blocks

L = 8
# Entropy falls until X_3, then rises: layers 0..2 compress, 3..7 expand.
CURVE = [10.0, 8.0, 7.0, 6.0, 6.5, 7.5, 8.0, 9.5, 11.0]
ATTN_DH = [0.1, 0.2, 0.3, 0.9, 0.4, 0.05, 0.4, 0.01]  # smallest: 7 (last), 0, 5, 1 ...
ATTN_COS = [0.5, 0.1, 0.2, 0.05, 0.3, 0.4, 0.02, 0.6]


def make_scores() -> Scores:
    blocks = []
    for layer in range(L):
        blocks.append(BlockScore(layer, "attn", {"bucket": ATTN_DH[layer]}, ATTN_COS[layer], ATTN_COS[layer] / 2))
        blocks.append(BlockScore(layer, "mlp", {"bucket": 1.0 + layer}, 0.1 * layer, 0.05 * layer))
        blocks.append(BlockScore(layer, "layer", {"bucket": CURVE[layer + 1] - CURVE[layer]}, 0.2, 0.1))
    # angular distance between X_i and X_j grows with |i - j|, except a near-identity span 4..6
    matrix = [[abs(i - j) * 0.1 for j in range(L + 1)] for i in range(L + 1)]
    matrix[4][6] = matrix[6][4] = 0.01
    return Scores(model="toy", num_layers=L, estimators=["bucket"], entropy_curve={"bucket": CURVE},
                  mid_entropy={"bucket": CURVE[:-1]}, stage_boundary={"bucket": detect_stage_boundary(CURVE)},
                  blocks=blocks, angular_matrix=matrix, complete=True)


def test_stage_boundary_is_found_and_robust_to_one_noisy_layer():
    assert detect_stage_boundary(CURVE) == 3
    noisy = CURVE.copy()
    noisy[2] = 8.3  # a bump while falling: "first layer where it rises" would answer 1
    noisy[5] = 6.4  # a dip while rising
    assert detect_stage_boundary(noisy) == 3
    assert detect_stage_boundary([1, 2, 3, 4]) == 0  # only rises: no compression stage
    assert detect_stage_boundary([4, 3, 2, 1]) == 3  # only falls


def test_entrodrop_protects_the_compression_stage_and_the_last_layer():
    plan = select_blocks(make_scores(), "entrodrop", "attn", count=2, protect="stage")
    assert plan.layers_of("attn") == [4, 5]  # 7 (last) and 0, 1, 2 (compression) are protected
    assert plan.meta["stage_boundary"] == 3
    assert all("delta_entropy[bucket]" in b.reason for b in plan.blocks)


def test_released_protection_matches_the_authors_code():
    scores = make_scores()
    assert sorted(protected_layers(scores, "released")) == [0, 1, L - 1]
    plan = select_blocks(scores, "entrodrop", "attn", count=2, protect="released")
    assert plan.layers_of("attn") == [2, 5]
    assert select_blocks(scores, "entrodrop", "attn", count=2).to_dict() == plan.to_dict()  # the default


def test_stage_boundary_override_and_ties_break_by_layer():
    scores = make_scores()
    plan = select_blocks(scores, "entrodrop", "attn", count=1, protect="stage", stage_boundary=6)
    assert plan.layers_of("attn") == [6]
    for b in scores.blocks_of("attn"):
        b.delta_entropy["bucket"] = 1.0
    assert select_blocks(scores, "entrodrop", "attn", count=2, protect="none").layers_of("attn") == [0, 1]


def test_cosine_baseline_drops_smallest_importance_unprotected():
    plan = select_blocks(make_scores(), "cosine", "attn", count=3)
    assert plan.layers_of("attn") == [1, 3, 6]
    assert rank_blocks(make_scores(), "cosine", "attn")[0] == (6, 0.02)


def test_angular_drops_the_closest_contiguous_span_of_layers():
    plan = select_blocks(make_scores(), "angular", "layer", count=2)
    assert plan.layers_of("layer") == [4, 5]
    assert "span 4..5" in plan.blocks[0].reason


def test_count_from_fraction_and_zero_count():
    scores = make_scores()
    assert len(select_blocks(scores, "cosine", "mlp", fraction=0.25)) == 2
    assert len(select_blocks(scores, "entrodrop", "attn", count=0)) == 0


def test_selection_errors_say_what_to_do():
    scores = make_scores()
    with pytest.raises(ValueError, match="only 4 of 8 are eligible"):
        select_blocks(scores, "entrodrop", "attn", count=5, protect="stage")
    with pytest.raises(ValueError, match="only 5 of 8 are eligible"):
        select_blocks(scores, "entrodrop", "attn", count=6)  # released: 0, 1 and 7
    with pytest.raises(ValueError, match="Unknown criterion"):
        select_blocks(scores, "random", "attn", count=1)
    with pytest.raises(ValueError, match="exactly one of count"):
        select_blocks(scores, "cosine", "attn")
    with pytest.raises(ValueError, match="not calibrated"):
        select_blocks(scores, "entrodrop", "attn", count=1, estimator="knn")
    with pytest.raises(ValueError, match="every block"):
        select_blocks(scores, "cosine", "layer", count=L)


def test_manual_plan_and_plan_validation():
    plan = select_blocks(make_scores(), "manual", "mlp", layers=[3, 1])
    assert plan.layers_of("mlp") == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        DropPlan(L, [DroppedBlock(L, "attn")])
    with pytest.raises(ValueError, match="listed twice"):
        DropPlan(L, [DroppedBlock(2, "attn"), DroppedBlock(2, "attn")])
    with pytest.raises(ValueError, match="nothing would remain"):
        DropPlan(2, [DroppedBlock(0, "layer"), DroppedBlock(1, "attn"), DroppedBlock(1, "mlp")])
    with pytest.raises(ValueError, match="dropped whole"):
        DropPlan(L, [DroppedBlock(2, "layer"), DroppedBlock(2, "attn")])
    with pytest.raises(ValueError, match="KIND:LAYER"):
        DropPlan.parse("attn:x", L)
    assert DropPlan.parse("attn:3, layer:5, 6", L).keys() == {(3, "attn"), (5, "layer"), (6, "attn")}


def test_scores_and_plans_round_trip_through_json(tmp_path):
    scores = make_scores()
    scores.save(tmp_path / "s.json")
    again = Scores.load(tmp_path / "s.json")
    assert again == scores
    plan = select_blocks(scores, "entrodrop", "attn", count=2)
    plan.save(tmp_path / "p.json")
    assert DropPlan.load(tmp_path / "p.json").keys() == plan.keys()
    with pytest.raises(ValueError, match="entrodrop scan"):
        Scores.from_dict({"model": "x"})


def test_plan_from_ticks_keeps_reasons_and_marks_edits():
    scores = make_scores()
    auto = select_blocks(scores, "entrodrop", "attn", count=2, protect="stage")
    same = plan_from_ticks(scores, "attn", {b.layer for b in auto.blocks}, auto)
    assert same.criterion == "entrodrop" and [b.reason for b in same.blocks] == [b.reason for b in auto.blocks]
    edited = plan_from_ticks(scores, "attn", {auto.blocks[0].layer, 2}, auto)
    assert edited.criterion == "manual" and edited.meta["edited_from"] == "entrodrop"
    reasons = {b.layer: b.reason for b in edited.blocks}
    assert reasons[2] == "ticked by hand" and reasons[auto.blocks[0].layer].startswith("entrodrop:")
    assert plan_from_ticks(scores, "attn", [], auto).blocks == []
    with pytest.raises(ValueError, match="drops every block"):
        plan_from_ticks(scores, "layer", range(L))
