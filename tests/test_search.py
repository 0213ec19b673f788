"""Our measured criteria: ablation (each block dropped alone) and recommended (greedy by measured loss)."""

import math

import pytest
import torch
from test_evaluate import fake_scores
from test_prune import sharp_model
from tiny_models import LAYERS, VOCAB

from entrodrop.evaluate import mean_loss
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.race import GREEDY, RaceResult, race_lines
from entrodrop.race import iter_race as iter_compare
from entrodrop.search import (
    ablation_plan,
    candidate_pool,
    iter_ablation,
    iter_recommend,
    iter_select,
    rival_plans,
)


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


def stub_losses(monkeypatch, single: dict[int, float], together: float):
    """Stub the search's loss: dense 1.0, each block its own increase, and ``together`` more for every pair
    dropped at once (>= 0: dropping blocks together hurts at least as much as apart). Counts measurements."""
    import entrodrop.search as search

    calls = {"n": 0}

    def loss(model, windows, plan=None, batch_size=1):
        layers = plan.layers_of("attn") if plan is not None else []
        calls["n"] += bool(layers)
        pairs = len(layers) * (len(layers) - 1) / 2
        return 1.0 + sum(single[layer] for layer in layers) + together * pairs

    monkeypatch.setattr(search, "mean_loss", loss)
    return calls


@pytest.mark.parametrize("together", [0.0, 0.05])
def test_lazy_search_picks_what_the_full_greedy_picks_with_fewer_measurements(model, windows, monkeypatch,
                                                                              together):
    single = {0: 0.30, 1: 0.10, 2: 0.20, 3: 0.05}
    calls = stub_losses(monkeypatch, single, together)
    scores = fake_scores(LAYERS)
    runs = {}
    for search in ("lazy", "greedy"):
        calls["n"] = 0
        runs[search] = (last(iter_recommend(model, scores, windows, kind="attn", count=3, search=search,
                                            pool_per_criterion=LAYERS)), calls["n"])
    (lazy, lazy_n), (greedy, greedy_n) = runs["lazy"], runs["greedy"]
    assert [s["chosen"] for s in greedy.meta["steps"]] == [3, 1, 2]  # the smallest increases, in order
    assert [s["chosen"] for s in lazy.meta["steps"]] == [3, 1, 2]
    assert lazy.meta["loss"] == pytest.approx(greedy.meta["loss"])
    assert lazy_n < greedy_n  # stale bounds spared re-measuring the blocks that could not win


def test_full_greedy_re_measures_every_candidate_at_every_step(model, windows, monkeypatch):
    calls = stub_losses(monkeypatch, {0: 0.30, 1: 0.10, 2: 0.20, 3: 0.05}, 0.0)
    last(iter_recommend(model, fake_scores(LAYERS), windows, kind="attn", count=3, search="greedy",
                        pool_per_criterion=LAYERS))
    assert calls["n"] == LAYERS + (LAYERS - 1) + (LAYERS - 2)  # the ablation, then 3 + 2 at steps 2 and 3


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


def test_final_comparison_recommends_the_lowest_of_the_greedy_and_every_rival_plan(model, windows):
    scores = fake_scores(LAYERS)
    compare_on = torch.randint(1, VOCAB, (4, 20), generator=torch.Generator().manual_seed(7))
    events = list(iter_recommend(model, scores, windows[:1], kind="attn", count=2, compare_on=compare_on))
    assert events[-1].stage == "compare" and events[-1].done == events[-1].total
    plan = last(events)
    ablation = last(iter_ablation(model, LAYERS, windows[:1], kind="attn"))
    rivals = rival_plans(scores, ablation, "attn", 2, range(LAYERS), "none", "bucket")
    assert set(rivals) == {"entrodrop", "cosine", "angular", "ablation"}
    # each rival keeps its own default protection where it can reach the count (released leaves one of 4 layers)
    assert rivals["entrodrop"].meta["protect"] == "none"
    assert rival_plans(scores, ablation, "attn", 1, range(LAYERS), "none", "bucket")["entrodrop"].meta["protect"] \
        == "released"
    candidates = [*rivals.values(), DropPlan(LAYERS, [DroppedBlock(s["chosen"], "attn") for s in plan.meta["steps"]])]
    losses = [mean_loss(model, compare_on, p) for p in candidates]
    assert mean_loss(model, compare_on, plan) == pytest.approx(min(losses))
    compared = plan.meta["compared"]
    assert any(GREEDY in name for name in compared) and plan.meta["compare_windows"] == 4
    assert min(v["loss"] for v in compared.values()) == pytest.approx(min(losses))
    assert all("lowest of" in b.reason and "4 calibration windows" in b.reason for b in plan.blocks)
    assert all(v["windows"] == 4 for v in compared.values())  # one round: nothing set aside
    assert plan.criterion == "recommended"


def test_final_comparison_keeps_the_greedy_plan_when_it_is_lowest(model, windows):
    ablation = last(iter_ablation(model, LAYERS, windows, kind="mlp"))
    greedy = DropPlan(LAYERS, [DroppedBlock(ablation.ranking()[0][0], "mlp", "greedy reason")], criterion="recommended")
    worst = max(ablation.losses, key=ablation.losses.get)
    rival = DropPlan(LAYERS, [DroppedBlock(worst, "mlp", "rival reason")], criterion="cosine")
    same = DropPlan(LAYERS, [DroppedBlock(ablation.ranking()[0][0], "mlp", "same")], criterion="angular")
    plan = last(iter_compare(model, greedy, {"cosine": rival, "angular": same}, windows))
    assert plan.layers_of("mlp") == greedy.layers_of("mlp")
    assert plan.meta["compared"][f"{GREEDY} = angular"]["loss"] == pytest.approx(
        mean_loss(model, windows, greedy))
    assert plan.meta["chosen_plan"] == f"{GREEDY} = angular"  # identical plans are measured once
    assert len(plan.meta["compared"]) == 2
    assert plan.blocks[0].reason.startswith("greedy reason; lowest of 2 plans")


def test_a_rival_that_wins_is_recommended_with_its_reasons(model, windows):
    ablation = last(iter_ablation(model, LAYERS, windows, kind="mlp"))
    best, worst = ablation.ranking()[0][0], ablation.ranking()[-1][0]
    greedy = DropPlan(LAYERS, [DroppedBlock(worst, "mlp", "greedy reason")], criterion="recommended", meta={"k": 1})
    rival = DropPlan(LAYERS, [DroppedBlock(best, "mlp", "cosine importance 0.01")], criterion="cosine")
    plan = last(iter_compare(model, greedy, {"cosine": rival}, windows))
    assert plan.layers_of("mlp") == [best] and plan.criterion == "recommended" and plan.meta["k"] == 1
    assert plan.meta["chosen_plan"] == "cosine"
    assert "in cosine's plan: cosine importance 0.01" in plan.blocks[0].reason


def test_iter_select_compares_on_its_own_windows_and_can_skip_the_comparison(model, windows):
    scores = fake_scores(LAYERS)
    with_compare = [e.stage for e in iter_select(model, scores, windows, kind="attn", count=2, num_windows=1)]
    without = [e.stage for e in iter_select(model, scores, windows, kind="attn", count=2, num_windows=1,
                                            compare_windows=0)]
    assert "compare" in with_compare and "compare" not in without
    plan = last(iter_select(model, scores, windows, kind="attn", count=2, num_windows=1, compare_windows=2))
    assert plan.meta["compare_windows"] == 2 and plan.meta["windows"] == 1
    with pytest.raises(ValueError, match="compare_windows at least 0"):
        last(iter_select(model, scores, windows, kind="attn", count=2, compare_windows=-1))


def test_clearly_worse_plans_leave_the_race_after_the_first_round(model, monkeypatch):
    """Per-window losses stubbed per plan: a far worse plan is set aside after the first round, a close
    one races to the last window, and the lowest over the shared windows wins."""
    import entrodrop.race as race

    windows = torch.zeros(12, 8, dtype=torch.long)
    offsets = {0: 0.0, 1: 2.0, 2: -0.01}  # attn layer of each plan -> loss offset over the greedy plan's
    wobble = [0.3 * (-1) ** i for i in range(12)]  # a close rival's per-window noise: never "clearly" better or worse
    read: dict[int, int] = {}

    def losses(model, part, plan, batch_size=1):
        layer = plan.blocks[0].layer
        start = read.get(layer, 0)
        read[layer] = start + part.shape[0]
        return [1.0 + offsets[layer] + (wobble[i] if layer == 2 else 0.0) for i in range(start, read[layer])]

    monkeypatch.setattr(race, "window_losses", losses)
    greedy, worse, close = (DropPlan(LAYERS, [DroppedBlock(layer, "attn", f"r{layer}")]) for layer in (0, 1, 2))
    events = list(iter_compare(model, greedy, {"cosine": worse, "angular": close}, windows, first_round=3))
    plan = last(events)
    compared = plan.meta["compared"]
    assert read == {0: 12, 1: 3, 2: 12}  # rounds of 3, 6, 12 windows; the worse plan only the first
    assert compared["cosine"]["windows"] == 3 and compared["angular"]["windows"] == 12
    assert plan.meta["chosen_plan"] == "angular" and plan.layers_of("attn") == [2]
    assert "1 clearly worse set aside after 3 windows" in plan.blocks[0].reason
    assert "in angular's plan: r2" in plan.blocks[0].reason
    assert events[-1].done == events[-1].total
    alone = last(iter_compare(model, greedy, {"cosine": greedy}, windows))  # one distinct plan: nothing to measure
    assert "every other criterion chose the same blocks" in alone.blocks[0].reason


def test_window_losses_average_to_the_mean_loss(model, windows):
    from entrodrop.evaluate import window_losses

    plan = DropPlan(LAYERS, [DroppedBlock(1, "attn")])
    per = window_losses(model, windows, plan, batch_size=2)
    assert len(per) == windows.shape[0]
    assert sum(per) / len(per) == pytest.approx(mean_loss(model, windows, plan))
    assert per[0] == pytest.approx(mean_loss(model, windows[:1], plan))


def test_paired_difference_is_the_mean_gap_and_its_standard_error():
    from entrodrop.evaluate import paired_difference

    mean, error = paired_difference([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # gaps 1, 2, 3
    assert mean == pytest.approx(2.0) and error == pytest.approx(1 / math.sqrt(3))
    shared = [0.0, 10.0, -10.0]  # a window's difficulty, shared by both plans, cancels
    mean, error = paired_difference([s + 0.1 for s in shared], shared)
    assert mean == pytest.approx(0.1) and error == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(paired_difference([1.0], [0.5])[1])
    with pytest.raises(ValueError, match="same windows"):
        paired_difference([1.0, 2.0], [1.0])


def test_the_race_reads_only_windows_the_search_did_not_read(model, windows, monkeypatch):
    import entrodrop.race as race

    read = []
    real = race.window_losses

    def spy(model, part, plan, batch_size=1):
        read.append(part.clone())
        return real(model, part, plan, batch_size=batch_size)

    monkeypatch.setattr(race, "window_losses", spy)
    plan = last(iter_select(model, fake_scores(LAYERS), windows, kind="attn", count=2, num_windows=1))
    assert read and plan.meta["race"]["first_window"] == 1
    for part in read:
        assert not any(torch.equal(row, windows[0]) for row in part)  # the search's window: never raced on
        assert all(any(torch.equal(row, other) for other in windows[1:]) for row in part)
    assert plan.meta["race"]["windows"] == windows.shape[0] - 1
    with pytest.raises(ValueError, match="did not read"):
        last(iter_select(model, fake_scores(LAYERS), windows[:1], kind="attn", count=2, num_windows=1))


def test_the_race_names_its_winner_every_candidate_and_whether_the_lead_is_noise(model, monkeypatch):
    import entrodrop.race as race

    windows = torch.zeros(8, 8, dtype=torch.long)
    wobble = [0.3 * (-1) ** i for i in range(8)]

    def race_with(offsets: dict[int, float], noisy: set[int]) -> dict:
        def losses(model, part, plan, batch_size=1):
            layer = plan.blocks[0].layer
            return [1.0 + offsets[layer] + (wobble[i] if layer in noisy else 0.0) for i in range(part.shape[0])]

        monkeypatch.setattr(race, "window_losses", losses)
        greedy, *rivals = (DropPlan(LAYERS, [DroppedBlock(layer, "attn", f"r{layer}")]) for layer in offsets)
        return last(iter_compare(model, greedy, dict(zip(("cosine", "angular"), rivals, strict=False)), windows,
                                 first_round=8, first_window=1)).meta

    clear = race_with({0: 0.0, 1: 0.5}, noisy=set())
    result = RaceResult.from_dict(clear["race"])
    assert result.winner == GREEDY and result.lead_verdict == "clear" and result.first_window == 1
    runner = result.runner_up
    assert runner.name == "cosine" and runner.gap == pytest.approx(0.5) and runner.windows == 8
    lines = race_lines(clear)
    assert "calibration windows 2-9" in lines[0] and "a clear lead" in lines[0]
    assert any(line.startswith("cosine: loss 1.5000 nats on 8 window(s), +0.5000") for line in lines)
    noisy = race_with({0: 0.0, 1: 0.01, 2: 0.8}, noisy={1})
    result = RaceResult.from_dict(noisy["race"])
    assert result.winner == GREEDY and result.runner_up.name == "cosine" and result.lead_verdict == "noise"
    assert "within noise" in race_lines(noisy)[0]
    angular = next(c for c in result.candidates if c.name == "angular")
    assert angular.gap == pytest.approx(0.8) and angular.error == pytest.approx(0.0, abs=1e-12)
    alone = last(iter_compare(model, DropPlan(LAYERS, [DroppedBlock(0, "attn")]),
                              {"cosine": DropPlan(LAYERS, [DroppedBlock(0, "attn")])}, windows)).meta
    assert race_lines(alone) == [f"Race of whole plans: every criterion chose these blocks ({GREEDY} = cosine); "
                                 "nothing to race."]
