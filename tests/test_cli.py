"""The `entrodrop` command line: scan and select on a tiny local model."""

import json

import pytest
from tiny_models import tiny_config

from entrodrop.cli import main

SCAN_KEYS = {"model", "num_layers", "entropy_curve", "stage_boundary", "blocks", "calibration"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return str(save_tiny_model(tiny_config("qwen2"), tmp_path_factory.mktemp("qwen2"), tiny_tokenizer))


@pytest.fixture(scope="module")
def scan_json(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "s.json"
    code = main(["scan", tiny_dir, "--data", "gsm8k", "--samples", "3", "--seq-len", "40",
                 "--estimators", "bucket,knn,renyi", "--json", str(out)])
    assert code == 0
    return out


def test_scan_writes_the_documented_json(scan_json):
    data = json.loads(scan_json.read_text())
    assert SCAN_KEYS <= set(data)
    assert data["num_layers"] == 4
    assert set(data["entropy_curve"]) == {"bucket", "knn", "renyi"}
    assert all(len(c) == 5 for c in data["entropy_curve"].values())
    assert {"layer", "kind", "delta_entropy", "cosine_importance"} <= set(data["blocks"][0])
    assert {b["kind"] for b in data["blocks"]} == {"attn", "mlp", "layer"}
    assert {"data", "samples", "seq_len", "seed", "tokens"} <= set(data["calibration"])
    assert data["calibration"]["samples"] == 3 and data["calibration"]["tokens"] == 120


def test_scan_prints_a_per_block_table(tiny_dir, capsys):
    assert main(["scan", tiny_dir, "--samples", "2", "--seq-len", "40", "--estimators", "bucket"]) == 0
    out = capsys.readouterr().out
    assert "stage boundary at X_" in out and "attn dH" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "2 ", "3 "))]) == 4


@pytest.mark.parametrize("criterion,kind", [("entrodrop", "attn"), ("cosine", "mlp"), ("angular", "layer")])
def test_select_prints_and_saves_a_plan(scan_json, tmp_path, capsys, criterion, kind):
    plan_path = tmp_path / "plan.json"
    code = main(["select", str(scan_json), "--criterion", criterion, "--kind", kind, "--count", "1",
                 "--protect", "none", "--out", str(plan_path)])
    assert code == 0
    assert f"criterion {criterion}" in capsys.readouterr().out
    plan = json.loads(plan_path.read_text())
    assert len(plan["blocks"]) == 1 and plan["blocks"][0]["kind"] == kind


def test_cli_errors_are_one_clear_line(scan_json, tmp_path, capsys):
    assert main(["select", str(scan_json), "--kind", "layer", "--count", "4", "--protect", "none"]) == 2
    assert "nothing would remain" in capsys.readouterr().err
    assert main(["scan", str(tmp_path / "missing-model"), "--samples", "1"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "none.json"), "--count", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["linear", "lora"])
def test_heal_checks_both_models_and_exports_the_healed_one(tiny_dir, tmp_path, capsys, method):
    from transformers import AutoModelForCausalLM

    out, report = tmp_path / "healed", tmp_path / "heal.json"
    code = main(["heal", tiny_dir, "--plan", "layer:2", "--data", "gsm8k", "--seq-len", "40", "--method", method,
                 "--steps", "3", "--train-windows", "6", "--val-windows", "2", "--batch-windows", "2",
                 "--eval-samples", "2", "--max-new-tokens", "0", "--out", str(out), "--json", str(report)])
    printed = capsys.readouterr().out
    assert code == 0 and "Verification PASSED" in printed
    assert f"{method} heal:" in printed and "the plan as dropped:" in printed and f"healed ({method}):" in printed
    record = json.loads(report.read_text())["heal"]
    assert record["method"] == method and record["train_windows"] == 6 and record["val_windows"] == 2
    assert record["before"]["num_windows"] == record["after"]["num_windows"] == 2  # the same report windows
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3  # vanilla reload, no peft
    assert "## Healing" in (out / "README.md").read_text()
    # a bad setting fails before the model loads, with the option's name
    assert main(["heal", tiny_dir, "--plan", "layer:2", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "steps" in capsys.readouterr().err


def test_gguf_exports_of_safetensors_sources_refuse_stored_tensors_and_unconverted_families(tiny_dir, tmp_path, capsys):
    code = main(["prune", tiny_dir, "--plan", "layer:2", "--format", "gguf", "--gguf-type", "stored",
                 "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert code == 2 and "came from safetensors: choose one of q8_0" in err and "--format safetensors" in err
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())
    code = main(["heal", tiny_dir, "--plan", "layer:2", "--method", "linear", "--format", "gguf",
                 "--out", str(tmp_path / "h")])  # refused before the heal runs: a Qwen2 checkpoint is not converted
    out, err = capsys.readouterr()
    assert code == 2 and "'qwen2' model loaded from safetensors is not supported" in err and "heal" not in out
