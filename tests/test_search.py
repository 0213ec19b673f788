"""Our measured criteria: ablation (each block dropped alone) and recommended (greedy by measured loss)."""

import itertools

import pytest
import torch
from test_evaluate import fake_scores
from test_prune import sharp_model
from tiny_models import LAYERS, VOCAB

from entrodrop.evaluate import mean_loss
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.search import ablation_plan, candidate_pool, iter_ablation, iter_recommend


@pytest.fixture(scope="module")
def model():
    return sharp_model("llama", seed=3)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))


def last(events):
    result = None
    for event in events:
        if event.partial is not None:
            result = event.partial
    return result


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def test_ablation_measures_each_block_alone(model, windows):
    ablation = last(iter_ablation(model, LAYERS, windows, kind="mlp"))
    assert sorted(ablation.losses) == list(range(LAYERS))
    assert ablation.dense_loss == pytest.approx(mean_loss(model, windows))
    for layer in range(LAYERS):
        alone = mean_loss(model, windows, DropPlan(LAYERS, [DroppedBlock(layer, "mlp")]))
        assert ablation.losses[layer] == pytest.approx(alone)
    ranked = [layer for layer, _ in ablation.ranking()]
    assert ranked == sorted(range(LAYERS), key=lambda layer: (ablation.losses[layer], layer))
    plan = ablation_plan(fake_scores(LAYERS), ablation, "mlp", 2)
    assert plan.criterion == "ablation" and plan.layers_of("mlp") == ranked[:2]
    assert "dropped alone" in plan.blocks[0].reason


def test_full_greedy_picks_the_best_block_at_every_step(model, windows):
    scores = fake_scores(LAYERS)
    plan = last(iter_recommend(model, scores, windows, kind="attn", count=2, search="greedy",
                               pool_per_criterion=LAYERS))
    first = min(range(LAYERS), key=lambda layer: (mean_loss(model, windows, DropPlan.parse(f"attn:{layer}", LAYERS)),
                                                   layer))
    rest = [layer for layer in range(LAYERS) if layer != first]
    second = min(rest, key=lambda layer: (
        mean_loss(model, windows, DropPlan.parse(f"attn:{first},attn:{layer}", LAYERS)), layer))
    assert plan.criterion == "recommended"
    assert sorted(plan.layers_of("attn")) == sorted([first, second])
    assert plan.meta["steps"][0]["chosen"] == first and plan.meta["steps"][1]["chosen"] == second
    reasons = {b.layer: b.reason for b in plan.blocks}
    assert "chosen at step 1" in reasons[first] and "nats over dense" in reasons[first]
    assert plan.meta["loss"] == pytest.approx(mean_loss(model, windows, plan))


def test_lazy_search_measures_less_and_reaches_a_plan_no_worse_than_the_best_pair(model, windows):
    scores = fake_scores(LAYERS)
    lazy_events = list(iter_recommend(model, scores, windows, kind="mlp", count=2, search="lazy",
                                      pool_per_criterion=LAYERS))
    greedy_events = list(iter_recommend(model, scores, windows, kind="mlp", count=2, search="greedy",
                                        pool_per_criterion=LAYERS))
    lazy, greedy = last(lazy_events), last(greedy_events)
    assert lazy_events[-1].done <= greedy_events[-1].done  # never more measurements than the full search
    pairs = {pair: mean_loss(model, windows, DropPlan(LAYERS, [DroppedBlock(i, "mlp") for i in pair]))
             for pair in itertools.combinations(range(LAYERS), 2)}
    assert lazy.meta["loss"] <= max(pairs.values())
    assert greedy.meta["loss"] == pytest.approx(pairs[tuple(sorted(greedy.layers_of("mlp")))])


def test_pool_is_the_union_of_each_criterion_best_candidates(model, windows):
    scores = fake_scores(LAYERS)  # entropy prefers high layers, cosine low layers
    ablation = last(iter_ablation(model, LAYERS, windows, kind="attn"))
    pool = candidate_pool(scores, ablation, "attn", range(LAYERS), 1)
    assert LAYERS - 1 in pool and "entrodrop" in pool[LAYERS - 1]
    assert 0 in pool and "cosine" in pool[0]
    assert ablation.ranking()[0][0] in pool
    plan = last(iter_recommend(model, scores, windows, kind="attn", count=1, pool_per_criterion=1))
    assert plan.layers_of("attn")[0] in pool


def test_stopping_early_keeps_the_plan_so_far_and_the_model_intact(model, windows):
    before = state(model)
    plans = []
    for event in iter_recommend(model, fake_scores(LAYERS), windows, kind="attn", count=3):
        if event.partial is not None:
            plans.append(event.partial)
            break
    assert len(plans[0]) == 1 and plans[0].meta["complete"] is False
    after = state(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_model_is_restored_when_a_measurement_fails(model, windows, monkeypatch):
    import entrodrop.search as search

    before = state(model)
    calls = {"n": 0}
    real = search.mean_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "mean_loss", flaky)
    with pytest.raises(RuntimeError):
        last(iter_recommend(model, fake_scores(LAYERS), windows, kind="attn", count=2))
    assert state(model)[1] == before[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=5), "only 4 of 4 are eligible"),
    (dict(count=3, protect="released"), "only 1 of 4 are eligible"),
    (dict(count=-1), "count must be 0 or more"),
    (dict(count=1, search="beam"), "Unknown search"),
])
def test_unreachable_requests_say_what_to_do(model, windows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        last(iter_recommend(model, fake_scores(LAYERS), windows, kind="attn", **kwargs))


def test_too_few_windows_are_refused(model):
    with pytest.raises(ValueError, match="calibration windows"):
        last(iter_recommend(model, fake_scores(LAYERS), torch.zeros(0, 8, dtype=torch.long), count=1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        last(iter_ablation(model, LAYERS, torch.zeros(2, 1, dtype=torch.long)))


def test_count_zero_is_the_dense_model(model, windows):
    plan = last(iter_recommend(model, fake_scores(LAYERS), windows, count=0))
    assert len(plan) == 0 and plan.criterion == "recommended"
