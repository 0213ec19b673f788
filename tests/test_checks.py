"""Typed checks: one set of rows for every renderer, and the checks run once for both front ends."""

import pytest
import torch
from tiny_models import LAYERS, VOCAB, random_windows, tiny_model

from entrodrop.checks import (
    ChecksResult,
    Generation,
    check_rows,
    checks_frame,
    checks_markdown,
    checks_text,
    iter_checks,
)
from entrodrop.evaluate import compare, measure_speed
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.progress import run_to_end


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plan():
    return DropPlan.parse("attn:1", LAYERS)


@pytest.fixture(scope="module")
def measured(model, plan):
    windows = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    quality = compare(model, plan, windows)
    speed = measure_speed(model, plan, prefill_tokens=16, decode_tokens=2, repeats=1, warmup=0)
    return ChecksResult(quality=quality, speed=speed,
                        generations=[Generation("hi | there", "a\nb", "c", same=False)])


def test_rows_hold_measure_dense_pruned_and_change(measured):
    rows = {r.measure: r for r in check_rows(measured)}
    q, s = measured.quality, measured.speed
    assert rows["perplexity (held-out)"].pruned == f"{q.pruned_perplexity:.4g}"
    assert rows["perplexity (held-out)"].change == f"×{q.perplexity_ratio:.3f}"
    assert rows["parameters"].pruned == f"{q.pruned_params:,}"
    assert rows["ideal speed-up from FLOPs"].change == f"×{s.ideal_speedup:.2f}"
    assert rows["generation: hi | there"].change == "differs"
    assert [r.measure for r in check_rows(measured, generations=False)][-1] == "ideal speed-up from FLOPs"
    assert check_rows(ChecksResult()) == []


def test_every_renderer_shows_the_same_rows(measured):
    frame = checks_frame(measured)
    assert list(frame.columns) == ["measure", "dense", "pruned", "change"]
    assert list(frame.measure) == [r.measure for r in check_rows(measured, generations=False)]
    text = checks_text(measured)
    card = checks_markdown(measured)
    for row in check_rows(measured, generations=False):
        assert row.measure in text and row.pruned in text
        assert row.measure in card and row.pruned in card
    assert "hi \\| there" in card and "a b" in card  # one line per cell in the card
    assert checks_text(ChecksResult()) == "" and checks_markdown(ChecksResult()) == ""


def test_result_round_trips_through_both_dict_shapes(measured):
    as_dict = measured.to_dict()
    again = ChecksResult.from_dict(as_dict)
    assert again.quality == measured.quality and again.speed == measured.speed
    assert again.generations == measured.generations
    # what the CLI kept: report objects and generation dicts
    legacy = ChecksResult.from_dict({"quality": measured.quality, "generations": [{"prompt": "p", "dense": "d",
                                                                                   "pruned": "d", "same": True}]})
    assert legacy.quality is measured.quality and legacy.generations == [Generation("p", "d", "d", True)]
    assert not ChecksResult() and legacy
    with pytest.raises(TypeError, match="QualityReport"):
        ChecksResult.from_dict({"quality": 3})


def test_iter_checks_streams_every_stage_and_ends_with_the_result(model, plan, tiny_tokenizer):
    events = list(iter_checks(model, plan, tiny_tokenizer, data={"source": "text", "text": "one two three. " * 400},
                              eval_samples=2, seq_len=16, speed=True, prefill_tokens=8, decode_tokens=2, repeats=1,
                              warmup=0, prompts=["hello"], max_new_tokens=3))
    stages = [e.stage for e in events]
    assert stages[:2] == ["read", "read"] and stages[-1] == "generate"
    assert stages.index("compare") < stages.index("speed") < stages.index("generate")
    final = events[-1].partial
    assert final.quality.num_windows == 2 and final.quality.complete
    assert final.speed is not None and final.generations[0].prompt == "hello"
    assert final.eval_data == {"data": "text", "part": "report", "samples": 2, "seq_len": 16, "seed": 0}
    rows = {r.measure: r for r in check_rows(final)}
    assert "perplexity (report part)" in rows and rows["report part of text"].dense == "2 windows"
    assert events[2].partial.speed is None  # each event carries the result so far, not a later one
    nothing = run_to_end(iter_checks(model, plan, tiny_tokenizer))
    assert isinstance(nothing, ChecksResult) and not nothing


def test_the_app_table_from_real_report_dicts(model):
    plan = DropPlan(4, [DroppedBlock(1, "attn")])
    quality = compare(model, plan, random_windows(2, 24)).to_dict()
    speed = measure_speed(model, plan, prefill_tokens=16, decode_tokens=2, repeats=1, warmup=0).to_dict()
    table = checks_frame(ChecksResult.from_dict({"quality": quality, "speed": speed}))
    rows = dict(zip(table.measure, table.pruned, strict=True))
    assert rows["perplexity (held-out)"] == f"{quality['pruned_perplexity']:.4g}"
    assert rows["top-1 agreement with dense"] == f"{100 * quality['top1_agreement']:.1f}%"
    assert rows["parameters"] == f"{quality['pruned_params']:,}"
    assert any(m.startswith("prefill latency, 16 tokens") for m in table.measure)
    assert list(checks_frame(ChecksResult.from_dict({"quality": quality})).measure)[-1] == "held-out text"
    assert checks_frame(ChecksResult.from_dict(None)).empty


def _quality(dense_nll: float, pruned_nll: float, top1: float):
    from entrodrop.evaluate import QualityReport

    return QualityReport(num_windows=4, num_tokens=100, dense_nll=dense_nll, pruned_nll=pruned_nll, kl_mean=0.1,
                         top1_agreement=top1, dense_params=10, pruned_params=8, dense_bytes=40, pruned_bytes=32)


@pytest.mark.parametrize(("ratio", "top1", "level", "text"), [
    (1.08, 0.91, "usable", "usable: perplexity +8%, top-1 91%"),
    (12.7, 0.349, "damaged", "damaged: perplexity ×12.7, top-1 35%"),
    (1.85, 0.62, "degraded", "degraded: perplexity +85%, top-1 62%"),
    (1.10, 0.45, "damaged", "damaged: perplexity +10%, top-1 45%"),  # small rise, but most choices changed
    (1.10, 0.70, "degraded", "degraded: perplexity +10%, top-1 70%"),
])
def test_verdict_levels_and_text(ratio, top1, level, text):
    import math

    from entrodrop.checks import THRESHOLDS_TEXT, verdict

    v = verdict(ChecksResult(quality=_quality(2.0, 2.0 + math.log(ratio), top1)))
    assert (v.level, v.text) == (level, text)
    assert v.thresholds == THRESHOLDS_TEXT and "+15%" in v.thresholds and "×2" in v.thresholds
    assert verdict(ChecksResult()) is None


def test_history_and_side_by_side(measured, plan):
    from entrodrop.checks import CheckRecord, history_frame, plan_key, side_by_side_frame

    damaged = ChecksResult(quality=_quality(2.0, 4.5, 0.3), generations=[Generation("p", "dense", "gibberish")])
    other = DropPlan(LAYERS, plan.blocks, criterion="cosine")
    records = [CheckRecord(1, plan, measured), CheckRecord(2, other, damaged)]
    table = history_frame(records)
    assert list(table.columns) == ["#", "plan", "criterion", "count", "healed", "perplexity", "KL", "top-1",
                                   "speed-up", "verdict"]
    assert table["healed"].tolist() == ["—", "—"]
    assert table["criterion"].tolist() == ["manual", "cosine"] and table["count"].tolist() == [1, 1]
    assert table["verdict"][1].startswith("damaged: perplexity ×12.2")
    assert table["speed-up"][1] == "—" and table["speed-up"][0].startswith("×")
    assert plan_key(plan) == plan_key(other) == "attn@1"
    both = side_by_side_frame(records[0], records[1])
    assert list(both.columns) == ["measure", "#1 manual, 1 blocks", "#2 cosine, 1 blocks"]
    by_measure = dict(zip(both["measure"], both["#2 cosine, 1 blocks"], strict=True))
    assert by_measure["generation: p"].startswith("gibberish") and by_measure["verdict"].startswith("damaged")
    assert dict(zip(both["measure"], both["#1 manual, 1 blocks"], strict=True))["generation: p"] == "—"
    again = CheckRecord.from_dict(records[1].to_dict())
    assert again.verdict == records[1].verdict and again.plan.criterion == "cosine"


def test_a_healed_check_is_kept_apart_from_the_plan_as_dropped(measured, plan):
    from entrodrop.checks import CheckRecord, history_frame, side_by_side_frame

    dropped, healed = CheckRecord(1, plan, measured), CheckRecord(2, plan, measured, healed="lora, 40 step(s)")
    assert dropped.key != healed.key and healed.key.startswith(dropped.key)  # a heal never stands for the drop
    assert healed.title() == "#2 manual, 1 blocks, healed (lora, 40 step(s))"
    assert history_frame([dropped, healed])["healed"].tolist() == ["—", "lora, 40 step(s)"]
    both = side_by_side_frame(dropped, healed)
    assert dict(zip(both["measure"], both[healed.title()], strict=True))["healed"] == "lora, 40 step(s)"
    assert CheckRecord.from_dict(healed.to_dict()).healed == "lora, 40 step(s)"
    assert CheckRecord.from_dict({k: v for k, v in dropped.to_dict().items() if k != "healed"}).healed == ""
