"""Healing (entrodrop.heal): both methods on tiny models of every family, a healed export that reloads in
vanilla transformers with the same logits, the dense model bitwise unchanged whatever happens, stop keeping
the best state, the memory bound, bad inputs refused; the real bundled model's loss falls when it heals."""

import hashlib

import pytest
import torch
from test_prune import sharp_model
from tiny_models import FAMILIES, LAYERS, VOCAB

from entrodrop.heal import HealSettings, heal, iter_heal, recovered_fraction, split_windows
from entrodrop.heal.linear import fit_map, spans_of
from entrodrop.heal.lora import lora_targets
from entrodrop.plan import DroppedBlock, DropPlan
from entrodrop.progress import run_to_end
from entrodrop.prune import preview_plan

QUICK = dict(steps=4, train_windows=8, val_windows=2, batch_windows=2, validate_every=2)
NO_FOLD = {"gemma2", "gemma3"}  # a norm stands between the output projection and the residual add


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def windows(n=12, length=24, seed=1):
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits_under(model, plan, ids):
    with torch.no_grad(), preview_plan(model, plan):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["linear", "lora"])
def test_both_methods_on_every_family_leave_the_dense_model_bitwise_unchanged(family, method):
    model = sharp_model(family, seed=2)
    before = fingerprint(model)
    plan = DropPlan.parse("layer:1,attn:2", LAYERS)
    settings = HealSettings(method=method, **QUICK)
    if method == "linear" and family in NO_FOLD:
        with pytest.raises(ValueError, match="norm stands between.*method='lora'"):
            heal(model, plan, windows(), settings)
        assert fingerprint(model) == before
        return
    result = heal(model, plan, windows(), settings)
    assert fingerprint(model) == before  # the shared dense model is only read
    assert result.method == method and result.plan is plan and result.model is not model
    assert result.val_kl_after <= result.val_kl_before + 1e-9  # the kept state is never worse on validation
    ids = windows(2, 16, seed=5)
    pruned = result.pruned()
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, logits_under(result.model, plan, ids), atol=1e-4)
    assert not [n for n, _ in result.model.named_modules() if "lora" in n.lower()]  # merged: no peft left


def test_lora_lowers_the_kl_and_changes_only_kept_blocks():
    model = sharp_model("llama", seed=3)
    plan = DropPlan.parse("layer:1", LAYERS)
    result = heal(model, plan, windows(16), HealSettings(method="lora", steps=12, train_windows=12, val_windows=4,
                                                          batch_windows=4, validate_every=3, lr=3e-3))
    assert result.val_kl_after < result.val_kl_before and result.best_step > 0
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed and all(".layers.1." not in n for n in changed)  # the dropped layer was never taught
    assert all("proj" in n for n in changed)  # LoRA merged into the linear layers only


def test_lora_targets_skip_the_dropped_sub_blocks():
    model = sharp_model("llama")
    names = lora_targets(model, DropPlan.parse("attn:1,layer:2", LAYERS))
    assert "model.layers.1.self_attn.q_proj" not in names and "model.layers.1.mlp.down_proj" in names
    assert not [n for n in names if ".layers.2." in n]
    assert {n for n in lora_targets(model, DropPlan.parse("attn:1", LAYERS), "mlp")} == {
        f"model.layers.{i}.mlp.{p}" for i in range(LAYERS) for p in ("gate_proj", "up_proj", "down_proj")}


def test_the_least_squares_map_recovers_an_exact_linear_relation():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(500, 8, generator=g, dtype=torch.float64)
    truth = torch.randn(8, 8, generator=g, dtype=torch.float64)
    T = fit_map(m, m @ truth.T, ridge=1e-12)
    assert torch.allclose(T, truth, atol=1e-6)
    eye = torch.eye(8, dtype=torch.float64)
    shrunk = fit_map(m, m @ truth.T, ridge=10.0)  # a large ridge pulls the map towards the identity (no change)
    assert (shrunk - eye).norm() < 0.5 * (truth - eye).norm() and shrunk.norm() > 0.5 * eye.norm()
    assert torch.allclose(fit_map(m, m, ridge=10.0), eye, atol=1e-9)  # data saying "no change" is left as it is


def test_spans_are_runs_of_consecutive_removed_writers():
    plan = DropPlan.parse("layer:1,attn:2,mlp:3,attn:0", 6)
    assert spans_of(plan) == [(0, 0), (2, 4), (7, 7)]  # attn 0; layer 1 + attn 2; mlp 3


def test_linear_heal_folds_into_the_block_before_the_span():
    model = sharp_model("llama", seed=4)
    plan = DropPlan.parse("layer:2", LAYERS)
    result = heal(model, plan, windows(40, 32), HealSettings(method="linear", train_windows=36, val_windows=4))
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed <= {"model.layers.1.mlp.down_proj.weight"}  # the MLP that writes X_2, or nothing (reverted)
    if changed:
        assert result.val_kl_after < result.val_kl_before
    else:
        assert "undone" in result.notes[-1]


def test_a_linear_span_at_the_input_is_said_and_refused_when_it_is_the_only_one():
    model = sharp_model("llama")
    with pytest.raises(ValueError, match="no kept block before it"):
        heal(model, DropPlan.parse("attn:0", LAYERS), windows(), HealSettings(method="linear", **QUICK))
    result = heal(model, DropPlan.parse("attn:0,layer:2", LAYERS), windows(), HealSettings(method="linear", **QUICK))
    assert any("first attention block" in note for note in result.notes)


def test_stop_keeps_the_best_state_so_far_and_the_dense_model():
    model = sharp_model("llama", seed=5)
    before = fingerprint(model)
    plan = DropPlan.parse("layer:1", LAYERS)
    asked = {"n": 0}

    def stop_after_three():
        asked["n"] += 1
        return asked["n"] >= 3

    events = list(iter_heal(model, plan, windows(16), HealSettings(method="lora", steps=50, train_windows=12,
                                                                    val_windows=4, batch_windows=2, validate_every=1,
                                                                    lr=3e-3), should_stop=stop_after_three))
    result = events[-1].partial
    assert result.stopped and result.steps_done == 3 and fingerprint(model) == before
    measured = [h["val_kl"] for h in result.history if h["val_kl"] is not None]
    assert result.val_kl_after == pytest.approx(min(measured), abs=1e-6)  # the best validation, not the last
    assert [e.done for e in events[:-1]] == [1, 2, 3]


def test_a_failure_mid_heal_leaves_the_dense_model_unchanged(monkeypatch):
    import entrodrop.heal.lora as lora

    model = sharp_model("llama", seed=6).requires_grad_(False)  # as loading leaves it
    before = fingerprint(model)
    calls = {"n": 0}
    real = lora.kl_per_token

    def failing(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(lora, "kl_per_token", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        heal(model, DropPlan.parse("layer:1", LAYERS), windows(), HealSettings(method="lora", **QUICK))
    assert fingerprint(model) == before
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("plan, settings, message", [
    (None, HealSettings(), "No plan to heal"),
    (DropPlan(LAYERS, []), HealSettings(), "drops nothing"),
    (DropPlan.parse("attn:1", LAYERS + 2), HealSettings(), "made for a model with 6 layers"),
    (DropPlan.parse("attn:1", LAYERS), HealSettings(steps=0), "steps must be a whole number of at least 1"),
    (DropPlan.parse("attn:1", LAYERS), HealSettings(method="magic"), "Unknown heal method"),
    (DropPlan.parse("attn:1", LAYERS), HealSettings(lr=-1.0), "lr must be a positive number"),
    (DropPlan.parse("attn:1", LAYERS), HealSettings(targets="embeddings"), "Unknown LoRA targets"),
])
def test_bad_inputs_get_a_clear_message_and_change_nothing(plan, settings, message):
    model = sharp_model("llama")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message):
        heal(model, plan, windows(), settings)
    assert fingerprint(model) == before


def test_too_few_windows_and_the_validation_slice():
    with pytest.raises(ValueError, match="at least 2 calibration windows"):
        split_windows(windows(1), HealSettings())
    train, val = split_windows(windows(12), HealSettings(train_windows=32, val_windows=4))
    assert val.shape[0] == 2 and train.shape[0] == 10  # asked for more than given: a slice is still kept apart
    assert not any(torch.equal(a, b) for a in train for b in val)


def test_memory_bound_is_checked_before_it_starts(monkeypatch):
    import entrodrop.heal.core as core

    monkeypatch.setattr(core, "available_memory_bytes", lambda device: 2**20)  # the tiny model needs about 3 MiB
    model = sharp_model("llama")
    with pytest.raises(ValueError, match=r"Healing would need about .* but only 1\.0 MiB is free.*batch_windows"):
        heal(model, DropPlan.parse("layer:1", LAYERS), windows(), HealSettings(**QUICK))


def test_recovered_fraction_of_the_lost_nats():
    from entrodrop.evaluate import QualityReport

    def report(pruned, per_window):
        return QualityReport(4, 100, 1.0, pruned, 0.1, 0.9, 10, 8, 40, 32, window_nll=per_window)

    before, after = report(2.0, [1.9, 2.1, 2.0, 2.0]), report(1.25, [1.2, 1.3, 1.25, 1.25])
    fraction, error = recovered_fraction(before, after)
    assert fraction == pytest.approx(0.75) and error == pytest.approx((0.005 / 3 / 4) ** 0.5, rel=1e-6)  # sample spread of the gains / sqrt(4), over 1 lost nat


def test_healed_whole_layer_export_reloads_in_vanilla_transformers(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from entrodrop.export import export_pruned
    from entrodrop.heal import heal_record

    model = sharp_model("llama", seed=7)
    plan = DropPlan(LAYERS, [DroppedBlock(2, "layer", "test")])
    result = heal(model, plan, windows(), HealSettings(method="lora", **QUICK))
    exported = export_pruned(result.model, tiny_tokenizer, plan, tmp_path / "healed", dtype="float32",
                             heal=heal_record(result))
    assert exported.ok, exported.verdict
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    ids = windows(2, 16, seed=9)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, logits_under(result.model, plan, ids), atol=1e-4)
    card = (tmp_path / "healed" / "README.md").read_text()
    assert "healed with lora" in card and "## Healing" in card and "Method: **lora**" in card
    assert "peft" not in (tmp_path / "healed" / "config.json").read_text()


@pytest.mark.slow
def test_healing_the_bundled_model_lowers_its_loss(bundled_model):
    from entrodrop.data import load_corpus, make_windows

    calib = make_windows(bundled_model.tokenizer, load_corpus("gsm8k"), num_samples=8, seq_len=96, seed=0)
    plan = DropPlan.parse("layer:4,layer:13,layer:14,layer:26", bundled_model.num_layers)
    events = list(iter_heal(bundled_model.model, plan, calib, HealSettings(
        method="lora", steps=6, train_windows=6, val_windows=2, batch_windows=2, validate_every=3)))
    losses = [e.partial.train_loss for e in events[:-1]]
    result = run_to_end(iter(events))
    assert losses[-1] < losses[0]  # training loss falls
    assert result.val_kl_after < result.val_kl_before  # and the calibration-side validation KL with it
    linear = heal(bundled_model.model, plan, calib, HealSettings(method="linear", train_windows=6, val_windows=2))
    assert linear.val_kl_after <= linear.val_kl_before


def test_a_span_whose_map_raises_the_validation_kl_is_undone(monkeypatch):
    import entrodrop.heal.linear as linear

    real, calls = linear.fit_map, []

    def fit(m, target, ridge):
        calls.append(1)
        fitted = real(m, target, ridge)
        return fitted if len(calls) == 1 else 50 * fitted  # the second span's map is absurd

    monkeypatch.setattr(linear, "fit_map", fit)
    model = sharp_model("llama", seed=4)
    plan = DropPlan.parse("layer:1,layer:3", LAYERS)  # spans: writers 2-3 (into writer 1), 6-7 (into writer 5)
    result = heal(model, plan, windows(24, 32), HealSettings(method="linear", train_windows=20, val_windows=4))
    dense = dict(model.named_parameters())
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, dense[n])}
    assert "model.layers.2.mlp.down_proj.weight" not in changed  # writer 5 restored
    assert any("writers 6-7" in note and "undone" in note for note in result.notes)
    assert len(calls) == 2 and result.val_kl_after <= result.val_kl_before


def test_one_pass_fits_each_span_on_the_streams_the_spans_before_it_leave():
    """All spans fitted in one forward give the maps of one forward per span in depth order: the deeper
    span's fit reads the output of the shallower span's folded writer."""
    from entrodrop.heal.core import student_copy
    from entrodrop.heal.linear import _fit_pass, _targets

    model = sharp_model("llama", seed=4)
    plan = DropPlan.parse("layer:1,layer:3", LAYERS)
    train, spans, settings = windows(12, 32), [(2, 3), (6, 7)], HealSettings(method="linear")
    targets = _targets(model, train, spans)
    together = _fit_pass(student_copy(model), plan, train, targets, spans, settings)
    one_by_one, student = {}, student_copy(model)
    for span in spans:
        one_by_one.update(_fit_pass(student, plan, train, targets, [span], settings))
    for span in spans:
        assert torch.allclose(together[span][0], one_by_one[span][0], rtol=1e-6, atol=1e-9)
    # and not the map the deeper span gets when the shallower one is left unhealed
    alone = _fit_pass(student_copy(model), plan, train, targets, [spans[1]], settings)[spans[1]][0]
    assert not torch.allclose(alone, together[spans[1]][0], rtol=1e-4, atol=1e-6)


def test_spans_after_an_undone_map_are_fitted_again_without_it(monkeypatch):
    import entrodrop.heal.linear as linear

    real, calls = linear.fit_map, []

    def fit(m, target, ridge):
        calls.append(1)
        fitted = real(m, target, ridge)
        return 50 * fitted if len(calls) == 1 else fitted  # the first span's first map is absurd

    monkeypatch.setattr(linear, "fit_map", fit)
    model = sharp_model("llama", seed=4)
    plan = DropPlan.parse("layer:1,layer:3", LAYERS)
    result = heal(model, plan, windows(24, 32), HealSettings(method="linear", train_windows=20, val_windows=4))
    assert len(calls) == 3  # both spans in the first pass, the second again in a pass without the first's map
    assert any("writers 2-3" in note and "undone" in note for note in result.notes)
    dense = dict(model.named_parameters())
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, dense[n])}
    assert "model.layers.0.mlp.down_proj.weight" not in changed  # writer 1 restored
