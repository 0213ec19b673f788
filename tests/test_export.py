"""Exports that reload (plain transformers, load_pruned, remote code), verified, written atomically."""

import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from test_prune import sharp_model
from tiny_models import FAMILIES, LAYERS, VOCAB

import entrodrop.export.target as export_target
import entrodrop.export.write as export_write
from entrodrop.arch import get_arch
from entrodrop.evaluate import compare
from entrodrop.export import ModelSource, export_pruned, load_pruned, zip_export
from entrodrop.plan import DropPlan
from entrodrop.prune import prune_model

WHOLE = "layer:1,layer:3"
SUBBLOCKS = "attn:0,layer:1,mlp:2"
INPUT = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))

# Runs in a fresh interpreter with transformers only: loads each folder, compares with the logits
# the in-memory pruned model gave, and reports whether anything imported entrodrop.
_FRESH_RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=job["remote"]).eval()
    expected = torch.load(job["expected"])
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out[job["name"]] = {"module": type(model).__module__, "diff": float((logits - expected).abs().max()),
                        "new_tokens": generated.shape[1] - ids.shape[1],
                        "layers": model.config.num_hidden_layers}
out["entrodrop_imported"] = any(m == "entrodrop" or m.startswith("entrodrop.") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tokenizer):
    """Whole-layer and sub-block exports of every family, plus a fresh-process reload of all of them."""
    root = tmp_path_factory.mktemp("exports")
    made, jobs = {}, []
    for family in FAMILIES:
        model = sharp_model(family)
        for label, text in (("whole", WHOLE), ("sub", SUBBLOCKS)):
            plan = DropPlan.parse(text, LAYERS)
            out = root / f"{family}-{label}"
            result = export_pruned(model, tiny_tokenizer, plan, out, write_remote_code=True)
            with torch.no_grad():
                expected = prune_model(model, plan)(INPUT).logits
            torch.save(expected, root / f"{family}-{label}.pt")
            made[(family, label)] = (result, expected, model, plan)
            jobs.append({"name": f"{family}-{label}", "dir": str(out), "expected": str(root / f"{family}-{label}.pt"),
                         "ids": INPUT.tolist(), "remote": label == "sub"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(root / "modules_cache")}
    proc = subprocess.run([sys.executable, "-c", _FRESH_RELOAD, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    return made, fresh


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_layer_export_reloads_with_plain_transformers(exports, family):
    made, fresh = exports
    result, expected, model, plan = made[(family, "whole")]
    assert result.ok, result.verdict
    assert "AutoModelForCausalLM.from_pretrained: ok" in result.verdict
    assert not result.remote_code and "modeling_entrodrop.py" not in result.files
    config = json.loads((result.path / "config.json").read_text())
    assert "auto_map" not in config and "entrodrop_dropped" not in config
    row = fresh[f"{family}-whole"]
    assert row["diff"] <= 1e-5 and row["new_tokens"] == 4
    assert row["layers"] == LAYERS - 2
    assert fresh["entrodrop_imported"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_subblock_export_reloads_with_load_pruned_and_remote_code(exports, family):
    made, fresh = exports
    result, expected, model, plan = made[(family, "sub")]
    assert result.ok, result.verdict
    assert result.remote_code and "modeling_entrodrop.py" in result.files
    assert set(result.verification["loaders"]) == {"entrodrop.load_pruned", "from_pretrained(trust_remote_code=True)"}
    reloaded = load_pruned(result.path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT).logits, expected, rtol=0, atol=1e-5)
    row = fresh[f"{family}-sub"]
    assert row["module"].endswith("modeling_entrodrop") and row["diff"] <= 1e-5 and row["new_tokens"] == 4
    # the dropped weights are not in the file: attn of (new) layer 0, mlp of (new) layer 1
    spec = get_arch(model)
    with safe_open(str(result.path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    gone = (f"{spec.layers}.0.{spec.attn[0]}.", f"{spec.layers}.1.{spec.mlp[-1]}.")
    assert keys and not [k for k in keys if k.startswith(gone)]


def test_metadata_card_and_checks(tmp_path, tiny_tokenizer):
    model = sharp_model("llama")
    plan = DropPlan(LAYERS, DropPlan.parse("attn:2,mlp:1", LAYERS).blocks, criterion="entrodrop")
    windows = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    quality = compare(model, plan, windows)
    scores = {"model": "tiny", "num_layers": LAYERS, "calibration": {"data": "gsm8k", "samples": 4},
              "blocks": [{"layer": 2, "kind": "attn", "delta_entropy": {"bucket": 0.125}, "cosine_importance": 0.01,
                          "angular_distance": 0.02}]}
    result = export_pruned(model, tiny_tokenizer, plan, tmp_path / "out", scores=scores,
                           checks={"quality": quality, "generations": [{"prompt": "hi", "dense": "a", "pruned": "b"}]},
                           write_remote_code=False)
    assert result.ok and not result.remote_code
    files = set(result.files)
    assert {"model.safetensors", "config.json", "tokenizer.json", "entrodrop.json", "README.md"} <= files
    assert "modeling_entrodrop.py" not in files
    meta = json.loads((result.path / "entrodrop.json").read_text())
    assert meta["plan"]["blocks"] == plan.to_dict()["blocks"]
    assert meta["criterion"] == "entrodrop"
    assert meta["calibration"] == {"data": "gsm8k", "samples": 4}
    assert meta["scores"]["blocks"][0]["delta_entropy"] == {"bucket": 0.125}
    assert {"torch", "transformers", "entrodrop"} <= set(meta["versions"])
    assert meta["checks"]["quality"]["pruned_perplexity"] == pytest.approx(quality.pruned_perplexity)
    assert meta["verification"]["ok"] is True
    card = (result.path / "README.md").read_text()
    assert "Verification PASSED" in card and "| 2 | attn |" in card and "bucket 0.125" in card
    assert "perplexity" in card and "load_pruned" in card
    assert oct((result.path / "model.safetensors").stat().st_mode & 0o777) == \
        oct((result.path / "README.md").stat().st_mode & 0o777)
    archive = zip_export(result.path)
    assert archive == tmp_path / "out.zip"
    with zipfile.ZipFile(archive) as z:
        assert "out/config.json" in z.namelist()


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path, tiny_tokenizer):
    model = sharp_model("gpt2")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    plan = DropPlan.parse("layer:0", LAYERS)
    with pytest.raises(ValueError, match="overwrite"):
        export_pruned(model, tiny_tokenizer, plan, target)
    assert (target / "old.txt").read_text() == "keep me"
    result = export_pruned(model, tiny_tokenizer, plan, target, overwrite=True)
    assert result.ok and not (target / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temp or backup folder left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_pruned(model, tiny_tokenizer, plan, empty).ok


def _no_heavy_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pruned before checking the target")

    monkeypatch.setattr(export_write, "prune_model", fail)


def test_unwritable_target_fails_before_heavy_work(tmp_path, tiny_tokenizer, monkeypatch):
    _no_heavy_work(monkeypatch)
    model = sharp_model("llama")
    plan = DropPlan.parse("layer:0", LAYERS)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="a_file is a file, so .* cannot be created inside it"):  # not a permission
        export_pruned(model, tiny_tokenizer, plan, blocker / "sub" / "out")
    with pytest.raises(ValueError, match="is a file"):
        export_pruned(model, tiny_tokenizer, plan, blocker)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="permission denied"):
                export_pruned(model, tiny_tokenizer, plan, locked / "out")
        finally:
            locked.chmod(0o700)
    monkeypatch.setattr(export_target.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=0))
    with pytest.raises(OSError, match="Not enough disk space") as info:
        export_pruned(model, tiny_tokenizer, plan, tmp_path / "out")
    assert info.value.errno == errno.ENOSPC


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("stage", ["weights", "tokenizer", "metadata"])
def test_disk_full_mid_write_leaves_nothing(tmp_path, tiny_tokenizer, monkeypatch, stage):
    model = sharp_model("qwen2")
    if stage == "weights":
        original = type(model).save_pretrained

        def partial_save(self, path, *args, **kwargs):
            (Path(path) / "model.safetensors").write_bytes(b"\0" * 128)  # half-written file
            _disk_full()

        monkeypatch.setattr(type(model), "save_pretrained", partial_save)
        assert original is not partial_save
    elif stage == "tokenizer":
        monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", _disk_full)
    else:
        real_write_text = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "README.md":
                _disk_full()
            return real_write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="Disk full while writing") as info:
        export_pruned(model, tiny_tokenizer, DropPlan.parse("attn:1,layer:2", LAYERS), tmp_path / "out")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing_and_keeps_an_old_export(tmp_path, tiny_tokenizer, monkeypatch):
    model = sharp_model("opt")
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous export")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_write, "verify_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_pruned(model, tiny_tokenizer, DropPlan.parse("layer:2", LAYERS), target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_failed_verification_is_reported(tmp_path, tiny_tokenizer):
    result = export_pruned(sharp_model("phi3"), tiny_tokenizer, DropPlan.parse("mlp:3", LAYERS), tmp_path / "out",
                           atol=-1.0)  # no difference can pass a negative tolerance
    assert not result.ok and result.verdict.startswith("Verification FAILED")
    assert "Verification FAILED" in (result.path / "README.md").read_text()


def test_gguf_source_exports_dequantised_floats(tmp_path, tiny_tokenizer):
    model = sharp_model("llama")
    source = ModelSource(source="gguf", name="tiny-q4", gguf_file="/models/tiny-q4.gguf")
    result = export_pruned(model, tiny_tokenizer, DropPlan.parse("layer:3", LAYERS), tmp_path / "out", source=source)
    assert result.ok
    assert "de-quantised float safetensors from GGUF" in (result.path / "README.md").read_text()
    meta = json.loads((result.path / "entrodrop.json").read_text())
    assert meta["gguf"] is True and meta["source"]["gguf_file"] == "/models/tiny-q4.gguf"
    assert "quantization_config" not in json.loads((result.path / "config.json").read_text())


def test_bad_arguments(tmp_path, tiny_tokenizer):
    model = sharp_model("llama")
    with pytest.raises(TypeError, match="DropPlan"):
        export_pruned(model, tiny_tokenizer, "layer:1", tmp_path / "a")
    with pytest.raises(ValueError, match="tokenizer"):
        export_pruned(model, None, DropPlan.parse("layer:1", LAYERS), tmp_path / "b")
    with pytest.raises(ValueError, match="made for a model with 6 layers"):
        export_pruned(model, tiny_tokenizer, DropPlan.parse("layer:1", 6), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a model folder"):
        load_pruned(tmp_path)


def test_cli_prune_writes_a_verified_folder(tmp_path, tiny_tokenizer):
    from conftest import save_tiny_model
    from tiny_models import tiny_config

    from entrodrop.cli import main

    model_dir = save_tiny_model(tiny_config("llama"), tmp_path / "model", tiny_tokenizer)
    out = tmp_path / "pruned"
    code = main(["prune", str(model_dir), "--plan", "attn:1,layer:2", "--out", str(out), "--remote-code",
                 "--eval-samples", "0", "--max-new-tokens", "0"])
    assert code == 0
    assert (out / "modeling_entrodrop.py").is_file()
    assert "Verification PASSED" in (out / "README.md").read_text()
    assert main(["prune", str(model_dir), "--plan", "layer:2", "--out", str(out), "--eval-samples", "0"]) == 2


@pytest.mark.slow
def test_bundled_model_layer_export_reloads_in_plain_transformers(bundled_model, tmp_path):
    plan = DropPlan.parse("layer:20,layer:22,layer:24,layer:26", bundled_model.model.config.num_hidden_layers)
    result = export_pruned(bundled_model.model, bundled_model.tokenizer, plan, tmp_path / "p",
                           source=ModelSource.of(bundled_model))
    assert result.ok, result.verdict
    card = (result.path / "README.md").read_text()
    assert "Verification PASSED" in card and "de-quantised float safetensors from GGUF" in card
    script = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
              f"m = AutoModelForCausalLM.from_pretrained({str(result.path)!r}); "
              f"t = AutoTokenizer.from_pretrained({str(result.path)!r}); "
              "ids = t('The answer is', return_tensors='pt').input_ids; "
              "out = m.generate(ids, max_new_tokens=5, do_sample=False); "
              "print(m.config.num_hidden_layers, out.shape[1] - ids.shape[1], 'entrodrop' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["26", "5", "False"]


def test_export_dtype_size_and_truthful_card(tmp_path, tiny_tokenizer):
    from entrodrop.checks import ChecksResult
    from entrodrop.export import default_export_dtype, export_size_bytes

    model = sharp_model("llama")
    plan = DropPlan(LAYERS, DropPlan.parse("layer:3", LAYERS).blocks, criterion="cosine")
    gguf = ModelSource(source="gguf", name="tiny-q4", gguf_file=str(tmp_path / "tiny.gguf"))
    (tmp_path / "tiny.gguf").write_bytes(b"x" * 1000)
    assert default_export_dtype(model) == "float32" and default_export_dtype(model, gguf) == "bfloat16"
    expected = export_size_bytes(model, plan, source=gguf)
    assert expected == export_size_bytes(model, plan, "float32") // 2
    windows = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    checks = ChecksResult(quality=compare(model, plan, windows))
    result = export_pruned(model, tiny_tokenizer, plan, tmp_path / "out", source=gguf, checks=checks)
    assert result.ok and result.dtype == "bfloat16"  # reloads within the bfloat16 tolerance
    weights = (result.path / "model.safetensors").stat().st_size
    assert result.weights_bytes == weights and abs(weights - expected) < 0.05 * expected
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    card = (result.path / "README.md").read_text()
    assert "dropped with cosine importance (LLM-Drop / ShortGPT)" in card and "dropped with EntroDrop" not in card
    assert "in bfloat16" in card and "the source (1000 B, GGUF file tiny.gguf)" in card
    assert "Check verdict:" in card or "damaged" in card
    meta = json.loads((result.path / "entrodrop.json").read_text())
    assert meta["check_verdict"]["level"] in ("usable", "degraded", "damaged")
    f32 = export_pruned(model, tiny_tokenizer, plan, tmp_path / "f32", dtype="float32")
    assert f32.ok and f32.weights_bytes > 1.9 * weights
    with pytest.raises(ValueError, match="bfloat16, float16, float32"):
        export_pruned(model, tiny_tokenizer, plan, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_zip_reports_bytes_and_leaves_nothing_when_stopped(tmp_path, tiny_tokenizer):
    from entrodrop.export import iter_zip_export, publish

    result = export_pruned(sharp_model("llama"), tiny_tokenizer, DropPlan.parse("layer:3", LAYERS), tmp_path / "out")
    total = sum(p.stat().st_size for p in result.path.iterdir())
    events = list(iter_zip_export(result.path))
    assert events[0].done == 0 and events[-1].done == events[-1].total == total
    assert events[-1].partial == tmp_path / "out.zip" and all(e.total == total for e in events)
    with zipfile.ZipFile(events[-1].partial) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.testzip() is None
    publish.ZIP_CHUNK, chunk = 1024, publish.ZIP_CHUNK
    try:
        stream = iter_zip_export(result.path, tmp_path / "stopped.zip")
        next(stream), next(stream)
        stream.close()
    finally:
        publish.ZIP_CHUNK = chunk
    assert not list(tmp_path.glob("*stopped*"))
