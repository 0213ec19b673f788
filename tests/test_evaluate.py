"""Dense-vs-pruned checks: quality, FLOPs, speed, generations, loss-verified selection, sweeps."""

import json
import math
import re

import pytest
import torch
from test_prune import sharp_model
from tiny_models import LAYERS, VOCAB

from entrodrop.costs import count_parameters
from entrodrop.evaluate import (
    compare,
    encode_prompt,
    generate_side_by_side,
    iter_compare,
    iter_compare_many,
    mean_loss,
    measure_speed,
    window_losses,
)
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.progress import ProgressEvent
from entrodrop.prune import prune_model
from entrodrop.scores import BlockScore, Scores
from entrodrop.verify import Variant, format_sweep_table, sweep


@pytest.fixture(scope="module")
def model():
    return sharp_model("llama")


@pytest.fixture(scope="module")
def windows():
    return torch.randint(1, VOCAB, (5, 24), generator=torch.Generator().manual_seed(0))


def test_empty_plan_matches_the_dense_model(model, windows):
    report = compare(model, DropPlan(LAYERS), windows, batch_size=2)
    assert report.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert report.top1_agreement == 1.0
    assert report.pruned_perplexity == pytest.approx(report.dense_perplexity)
    assert report.pruned_params == report.dense_params == count_parameters(model)[0]
    # perplexity is exp of transformers' own mean next-token loss
    with torch.no_grad():
        loss = float(model(windows, labels=windows).loss)
    assert report.dense_perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    assert report.num_tokens == windows.shape[0] * (windows.shape[1] - 1)


def test_dropping_blocks_costs_quality_and_parameters(model, windows):
    plan = DropPlan.parse("attn:1,mlp:2,layer:3", LAYERS)
    report = compare(model, plan, windows)
    assert report.kl_mean > 0.01 and report.top1_agreement < 1.0
    assert report.pruned_perplexity != pytest.approx(report.dense_perplexity)
    physical = prune_model(model, plan)
    assert report.pruned_params == count_parameters(physical)[0] < report.dense_params
    assert report.pruned_bytes == 4 * report.pruned_params  # float32
    # the physically pruned model gives the same figures as the preview
    other = compare(model, plan, windows, pruned_model=physical)
    assert other.pruned_nll == pytest.approx(report.pruned_nll, abs=1e-5)
    assert other.kl_mean == pytest.approx(report.kl_mean, abs=1e-5)
    assert other.top1_agreement == report.top1_agreement
    assert mean_loss(model, windows, plan) == pytest.approx(report.pruned_nll, abs=1e-5)
    d = report.to_dict()
    assert d["perplexity_ratio"] == pytest.approx(report.pruned_perplexity / report.dense_perplexity)
    json.dumps(d)


def test_compare_streams_progress_events(model, windows):
    events = list(iter_compare(model, DropPlan.parse("attn:2", LAYERS), windows, batch_size=2))
    assert [(e.done, e.total) for e in events] == [(2, 5), (4, 5), (5, 5)]
    assert all(isinstance(e, ProgressEvent) and e.stage == "compare" for e in events)
    assert [e.partial.complete for e in events] == [False, False, True]
    assert events[0].partial.num_windows == 2


def test_many_plans_in_one_pass_equal_separate_checks(model, windows):
    plans = {"a": DropPlan.parse("attn:1", LAYERS), "b": DropPlan.parse("layer:2", LAYERS)}
    last = list(iter_compare_many(model, plans, windows, batch_size=3))[-1].partial
    for name, plan in plans.items():
        alone = compare(model, plan, windows)
        assert last[name].kl_mean == pytest.approx(alone.kl_mean, rel=1e-5)
        assert last[name].pruned_nll == pytest.approx(alone.pruned_nll, rel=1e-6)
        # per-window losses, for paired errors: one per window, the same as window_losses, averaging to the loss
        assert last[name].window_nll == pytest.approx(window_losses(model, windows, plan), rel=1e-5)
        assert sum(last[name].window_nll) / windows.shape[0] == pytest.approx(alone.pruned_nll, rel=1e-5)


def test_bad_windows_are_refused(model):
    with pytest.raises(ValueError, match="samples, seq_len"):
        compare(model, DropPlan(LAYERS), torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        compare(model, DropPlan(LAYERS), torch.ones(2, 1, dtype=torch.long))


def test_measure_speed_reports_both_models(model):
    report = measure_speed(model, DropPlan.parse("layer:1,layer:2", LAYERS), None, prefill_tokens=32,
                           decode_tokens=4, repeats=2)
    assert report.dense_prefill_s > 0 and report.pruned_prefill_s > 0
    assert report.dense_decode_tps > 0 and report.pruned_decode_tps > 0
    assert report.prefill_speedup == pytest.approx(report.dense_prefill_s / report.pruned_prefill_s)
    assert 0 < report.ideal_flops_removed < 1 and report.ideal_speedup > 1
    assert report.prefill_tokens == 32 and report.repeats == 2
    json.dumps(report.to_dict())


def test_prefill_length_is_capped_by_the_position_limit(model):
    report = measure_speed(model, DropPlan(LAYERS), None, prefill_tokens=10_000, decode_tokens=2, repeats=1,
                           warmup=0)
    assert report.prefill_tokens + 2 < model.config.max_position_embeddings


def test_side_by_side_generations_use_the_chat_template(model, tiny_tokenizer):
    plain = encode_prompt(tiny_tokenizer, "What is 12 + 30?")
    tiny_tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    try:
        templated = encode_prompt(tiny_tokenizer, "What is 12 + 30?")
        rows = generate_side_by_side(model, DropPlan(LAYERS), tiny_tokenizer, ["hello", "What is 12 + 30?"],
                                     max_new_tokens=6)
    finally:
        tiny_tokenizer.chat_template = None
    assert templated.shape[1] > plain.shape[1]
    assert [r["prompt"] for r in rows] == ["hello", "What is 12 + 30?"]
    assert all(r["same"] and r["dense"] == r["pruned"] for r in rows)  # empty plan: identical
    rows = generate_side_by_side(model, DropPlan.parse("layer:0,layer:1,layer:2", LAYERS), tiny_tokenizer,
                                 ["The quick brown fox"], max_new_tokens=8)
    assert not rows[0]["same"]


def fake_scores(num_layers: int, kind: str = "attn") -> Scores:
    """Scores whose entropy ranking prefers higher layers (all layers in the expansion stage)."""
    blocks = [
        BlockScore(layer, k, {"bucket": float(num_layers - layer) + (0.5 if k == "mlp" else 0.0)}, 0.1 * layer, 0.1)
        for layer in range(num_layers) for k in ("attn", "mlp", "layer")
    ]
    curve = [float(i) for i in range(num_layers + 1)]
    return Scores(model="tiny", num_layers=num_layers, estimators=["bucket"], entropy_curve={"bucket": curve},
                  mid_entropy={"bucket": curve[:-1]}, stage_boundary={"bucket": 0}, blocks=blocks,
                  angular_matrix=[[0.1] * (num_layers + 1) for _ in range(num_layers + 1)],
                  calibration={"data": "fake"}, complete=True)


def test_sweep_rows_cover_every_criterion_and_count(model, windows):
    scores = fake_scores(LAYERS)
    selection = torch.randint(0, VOCAB, (3, windows.shape[1]), generator=torch.Generator().manual_seed(11))
    rows = sweep(model, scores, windows, criteria=("entrodrop", "cosine", "recommended"), kind="attn",
                 counts=(0, 1, 2), protect="none", selection_windows=selection)
    assert [(r.criterion, r.count) for r in rows] == [
        (c, n) for c in ("entrodrop", "cosine", "recommended") for n in (0, 1, 2)]
    for r in rows:
        assert len(r.plan["blocks"]) == r.count
        assert len(r.window_nll) == windows.shape[0]  # saved for paired errors between rows
        if r.count == 0:
            assert r.kl_mean == pytest.approx(0.0, abs=1e-6) and r.top1_agreement == 1.0
        else:
            assert r.kl_mean > 0 and r.pruned_params < r.dense_params
    # entrodrop (high layers first) and cosine (low layers first) choose differently here
    by = {(r.criterion, r.count): r for r in rows}
    assert by[("entrodrop", 1)].plan["blocks"] != by[("cosine", 1)].plan["blocks"]
    assert "criterion" in format_sweep_table(rows)
    # the measured criterion picks what its own search picks on the same windows
    from entrodrop.progress import run_to_end
    from entrodrop.search import iter_select
    alone = run_to_end(iter_select(model, scores, selection, kind="attn", count=2, protect="none"))
    assert by[("recommended", 2)].plan["blocks"] == alone.to_dict()["blocks"]
    # the scored windows never reach the choice: other scored windows, the same plans
    other = torch.randint(0, VOCAB, tuple(windows.shape), generator=torch.Generator().manual_seed(12))
    again = sweep(model, scores, other, criteria=("recommended",), kind="attn", counts=(1, 2), protect="none",
                  selection_windows=selection)
    assert [r.plan["blocks"] for r in again] == [by[("recommended", n)].plan["blocks"] for n in (1, 2)]


def test_sweep_refuses_what_it_cannot_answer_before_measuring(model, windows):
    scores = fake_scores(LAYERS)
    with pytest.raises(ValueError, match="Unknown criterion 'bogus'"):
        sweep(model, scores, windows, criteria=("cosine", "bogus"), counts=(0, 1))
    with pytest.raises(ValueError, match="only 1 of 4 are eligible"):
        sweep(model, scores, windows, criteria=("entrodrop",), counts=(0, 2), protect="released")
    with pytest.raises(ValueError, match="Counts must be whole numbers"):
        sweep(model, scores, windows, criteria=("cosine",), counts=(0, LAYERS))
    with pytest.raises(ValueError, match="selection_windows"):
        sweep(model, scores, windows, criteria=("ablation",), counts=(1,))
    rows = sweep(model, scores, windows, criteria=(Variant("entrodrop", protect="none", label="ed-none"), "cosine"),
                 counts=(1,))
    assert [r.criterion for r in rows] == ["ed-none", "cosine"]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, tiny_tokenizer):
    from conftest import _TINY_CORPUS, save_tiny_model
    from tiny_models import tiny_config

    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model(tiny_config("llama"), root / "model", tiny_tokenizer)
    text = "\n\n".join(f"{s} Number {i}." for i in range(60) for s in _TINY_CORPUS)
    (root / "text.txt").write_text(text)
    return root, model_dir


def test_gap_to_the_best_other_criterion_is_paired_over_windows():
    from entrodrop.verify import SweepRow, format_gaps, gap_to_best_other

    def row(criterion, count, layers, losses):
        plan = DropPlan(LAYERS, [DroppedBlock(layer, "attn") for layer in layers]).to_dict()
        return SweepRow(criterion, count, plan, 7.0, math.exp(sum(losses) / len(losses)), 0.1, 0.9, 1, 2, losses)

    shared = [2.0, 3.0, 1.0, 2.5]  # each window's difficulty: cancels in the paired difference
    rows = [row("recommended", 1, [0], [x + 0.01 for x in shared]),
            row("cosine", 1, [1], shared),  # the lowest other: recommended is 0.01 above it on every window
            row("angular", 1, [2], [x + 0.5 for x in shared]),
            row("recommended", 2, [0, 1], [x + 0.02 * (-1) ** i for i, x in enumerate(shared)]),
            row("cosine", 2, [1, 2], shared),
            row("recommended", 3, [0, 2], shared), row("cosine", 3, [0, 2], shared)]
    g = gap_to_best_other(rows, "recommended", 1)
    assert g["other"] == "cosine" and g["gap"] == pytest.approx(0.01) and g["error"] == pytest.approx(0, abs=1e-9)
    assert g["verdict"] == "higher"  # a steady gap, however small, is real
    assert gap_to_best_other(rows, "recommended", 2)["verdict"] == "noise"  # +-0.02 by window: no gap
    assert gap_to_best_other(rows, "recommended", 3)["same_plan"]
    assert gap_to_best_other(rows, "recommended", 9) is None
    text = format_gaps(rows, "recommended")
    assert "+0.0100 +- 0.0000 nats against cosine: higher" in text and "within noise" in text
    assert "same blocks as cosine" in text


def test_cli_eval_and_sweep(cli_setup, capsys):
    from entrodrop.cli import main

    root, model_dir = cli_setup
    common = [str(model_dir), "--data", str(root / "text.txt"), "--seq-len", "32", "--eval-samples", "2",
              "--samples", "4", "--estimators", "bucket"]
    out = root / "eval.json"
    assert main(["eval", *common, "--plan", "attn:1,layer:2", "--max-new-tokens", "3", "--prefill-tokens", "16",
                 "--decode-tokens", "2", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"quality", "speed", "generations", "plan"} <= set(data)
    assert data["quality"]["num_windows"] == 2 and data["quality"]["pruned_params"] < data["quality"]["dense_params"]
    out = root / "sweep.json"
    assert main(["sweep", *common, "--criteria", "entrodrop,cosine,recommended", "--counts", "0,1", "--kind", "mlp",
                 "--protect", "none", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "entrodrop's loss minus the lowest other criterion's, paired over the 2 development windows" in printed
    assert re.search(r"scored on the development part of \S*text\.txt: 2 windows x 32 tokens", printed)
    data = json.loads(out.read_text())
    assert [(r["criterion"], r["count"]) for r in data["rows"]] == [
        ("entrodrop", 0), ("entrodrop", 1), ("cosine", 0), ("cosine", 1), ("recommended", 0), ("recommended", 1)]
    # no plan: calibrate, then select with entrodrop
    assert main(["eval", *common, "--count", "1", "--kind", "attn", "--protect", "none", "--no-speed",
                 "--max-new-tokens", "0"]) == 0


@pytest.mark.slow
def test_bundled_model_loses_quality_and_parameters_when_dropping_attention(bundled_model):
    from entrodrop.calibrate import EstimatorSettings, run_calibration
    from entrodrop.data import load_corpus, make_windows
    from entrodrop.select import select_blocks

    tok, model = bundled_model.tokenizer, bundled_model.model
    corpus = load_corpus("gsm8k")
    calibration = make_windows(tok, corpus, num_samples=4, seq_len=128, seed=0, part="calibration")
    heldout = make_windows(tok, corpus, num_samples=4, seq_len=128, seed=0, part="heldout")
    scores = run_calibration(model, calibration, settings=EstimatorSettings(estimators=("bucket",)))
    plan = select_blocks(scores, "entrodrop", "attn", count=4)
    assert len(plan.layers_of("attn")) == 4
    report = compare(model, plan, heldout)
    assert math.isfinite(report.pruned_perplexity)
    assert report.pruned_perplexity > report.dense_perplexity
    assert report.pruned_params < report.dense_params
    assert 0 < report.top1_agreement < 1
