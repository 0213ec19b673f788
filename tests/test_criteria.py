"""The criterion registry: one record per criterion, read by selection, reports and sweeps."""

import pytest
from test_report import hand_scores

from entrodrop import criteria, select
from entrodrop.arch import BLOCK_KINDS, kind_label
from entrodrop.criteria import REGISTRY, get_criterion, ranked_criteria, resolve_estimator, score_criteria


@pytest.mark.parametrize("name", ranked_criteria())
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_every_ranked_criterion_ranks_every_block(name, kind):
    scores = hand_scores()
    if kind not in get_criterion(name).kinds:
        with pytest.raises(ValueError, match="chooses layer blocks only"):
            select.rank_blocks(scores, name, kind)
        return
    ranked = select.rank_blocks(scores, name, kind, estimator="bucket")
    assert sorted(layer for layer, _ in ranked) == list(range(scores.num_layers))
    values = [v for _, v in ranked]
    assert values == sorted(values)  # smallest score is dropped first
    plan = select.select_blocks(scores, name, kind, count=2, estimator="bucket", protect="none")
    assert len(plan.blocks) == 2 and plan.criterion == name
    if not (name.startswith("angular") and kind == "layer"):  # angular picks a span of whole layers
        assert all(get_criterion(name).reason_score("bucket") in b.reason for b in plan.blocks)


def test_registry_answers_what_the_old_tables_said():
    assert ranked_criteria() == ("entrodrop", "cosine", "angular", "angular-last")
    assert score_criteria() == ("entrodrop", "cosine", "angular", "angular-last", "manual")
    assert criteria.model_criteria() == ("recommended", "ablation")
    assert criteria.DEFAULT_CRITERION == "recommended" and get_criterion("recommended").ours
    assert {n: c.default_protection for n, c in REGISTRY.items()} == {
        "recommended": "none", "entrodrop": "released", "cosine": "none", "angular": "none", "angular-last": "none",
        "ablation": "none", "manual": "none"}
    assert all(c.label for c in REGISTRY.values())
    with pytest.raises(ValueError, match="Unknown criterion 'nope'"):
        get_criterion("nope")
    with pytest.raises(ValueError, match="has no ranking"):
        select.rank_blocks(hand_scores(), "manual", "attn")
    with pytest.raises(ValueError, match="Unknown criterion 'recommended' for selection from scores"):
        select.select_blocks(hand_scores(), "recommended", "attn", count=1)


def test_default_protection_comes_from_the_record():
    plan = select.select_blocks(hand_scores(), "entrodrop", "attn", count=1)
    assert plan.meta["protect"] == get_criterion("entrodrop").default_protection == "released"
    assert plan.meta["protected"] == [0, 1, hand_scores().num_layers - 1]
    assert select.select_blocks(hand_scores(), "cosine", "attn", count=1).meta["protect"] == "none"


def test_estimator_falls_back_to_the_first_calibrated_one():
    scores = hand_scores()
    assert resolve_estimator(scores, "bucket") == "bucket"
    assert resolve_estimator(scores, "knn") == "bucket"
    assert resolve_estimator(scores, None) == "bucket"
    assert resolve_estimator(["knn", "bucket"], "renyi") == "knn"
    with pytest.raises(ValueError, match="No entropy estimator"):
        resolve_estimator([], "bucket")


def test_one_label_per_kind():
    assert [kind_label(k) for k in BLOCK_KINDS] == ["attention", "MLP", "whole layer"]
    assert kind_label("layer", attributive=True) == "whole-layer"
    with pytest.raises(ValueError, match="Unknown block kind"):
        kind_label("head")


def test_entrodrop_ranks_with_knn_by_default_as_the_released_scorer():
    scores = hand_scores()
    if "knn" not in scores.estimators:
        scores.estimators.append("knn")
        for b in scores.blocks:
            b.delta_entropy["knn"] = -b.delta_entropy["bucket"]  # the opposite order
    plan = select.select_blocks(scores, "entrodrop", "attn", count=1)
    assert plan.meta["estimator"] == "knn" and "delta_entropy[knn]" in plan.blocks[0].reason
    assert select.select_blocks(scores, "entrodrop", "attn", count=1, estimator="bucket").meta["estimator"] == "bucket"
    with pytest.raises(ValueError, match="was not calibrated"):
        select.select_blocks(scores, "entrodrop", "attn", count=1, estimator="renyi")


def test_angular_labels_say_whose_method_each_kind_is():
    angular = get_criterion("angular")
    assert "Gromov" in angular.label_for("layer") and "Gromov" not in angular.label_for("attn")
    assert "ours" in angular.label_for("mlp")
    assert "as published" in get_criterion("angular-last").label


def test_angular_last_needs_the_last_token_matrix():
    scores = hand_scores()
    scores.angular_matrix_last = []
    with pytest.raises(ValueError, match="calibrate again"):
        select.select_blocks(scores, "angular-last", "layer", count=1)
