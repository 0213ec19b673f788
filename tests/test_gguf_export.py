"""GGUF export: the bundled SmolLM2 GGUF through the GGUF -> GGUF path (size, metadata, bytes, logits), attention
drops as a ``deci`` file, and every refusal (Gemma 3 layers that would change kind, sub-blocks outside the Llama
family, a safetensors source, a healed model, a truncated source) before anything is written."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from gguf import GGUFReader, GGUFValueType
from test_prune import sharp_model
from tiny_models import LAYERS

from entrodrop.export import ModelSource, TargetNotEmptyError
from entrodrop.export.gguf_export import check_gguf_export, export_gguf
from entrodrop.export.gguf_write import plan_gguf
from entrodrop.plan import DropPlan

WHOLE = "layer:3,layer:12,layer:25,layer:26"
ATTN = "attn:3,attn:6,attn:7,attn:9,attn:25,attn:26,attn:28,attn:29"


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}


@pytest.mark.slow
def test_whole_layers_copy_the_source_tensors_and_reload_with_the_same_logits(bundled_model, tmp_path):
    plan = DropPlan(30, DropPlan.parse(WHOLE, 30).blocks, criterion="recommended")
    source = ModelSource.of(bundled_model)
    result = export_gguf(bundled_model.model, bundled_model.tokenizer, plan, tmp_path / "out", source=source)
    assert result.ok, result.verdict
    checks = result.verification["loaders"]
    assert checks["gguf reader (structure, bytes)"]["ok"] and checks["gguf reader (structure, bytes)"]["layers"] == 26
    assert checks["transformers from_pretrained(gguf_file=...)"]["max_abs_diff"] == 0.0  # the same bytes, de-quantised
    assert result.weights_bytes <= 26 / 30 * result.source_bytes * 1.05  # quantised as stored, not a float file
    files = {p.name for p in (tmp_path / "out").iterdir()}
    gguf_name = next(n for n in files if n.endswith(".gguf"))
    assert {"Modelfile", "README.md", "entrodrop.json"} <= files
    meta = fields(GGUFReader(str(tmp_path / "out" / gguf_name)))
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 26
    assert meta["entrodrop.dropped"] == WHOLE and meta["entrodrop.criterion"] == "recommended"
    assert meta["entrodrop.source_layers"] == [i for i in range(30) if i not in (3, 12, 25, 26)]
    assert meta["tokenizer.chat_template"]  # the tokenizer and chat template come along
    card = (tmp_path / "out" / "README.md").read_text()
    assert "llama-cli -m" in card and "ollama create" in card and "Verification PASSED" in card
    with pytest.raises(TargetNotEmptyError):
        export_gguf(bundled_model.model, bundled_model.tokenizer, plan, tmp_path / "out", source=source)


@pytest.mark.slow
def test_attention_drops_become_a_deci_file_without_those_tensors(bundled_model, tmp_path):
    plan = DropPlan.parse(ATTN, 30)
    result = export_gguf(bundled_model.model, bundled_model.tokenizer, plan, tmp_path / "attn",
                         source=ModelSource.of(bundled_model))
    assert result.ok, result.verdict
    path = next((tmp_path / "attn").glob("*.gguf"))
    reader = GGUFReader(str(path))
    meta = fields(reader)
    dropped = {3, 6, 7, 9, 25, 26, 28, 29}
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 30
    assert [i for i, h in enumerate(meta["deci.attention.head_count"]) if h == 0] == sorted(dropped)
    assert sum(1 for h in meta["deci.attention.head_count_kv"] if h > 0) == 22  # KV cache: 22 of 30 layers
    assert set(meta["deci.feed_forward_length"]) == {1536}
    assert not any(k.startswith("llama.") for k in meta)  # every key renamed to the written architecture
    names = {t.name for t in reader.tensors}
    assert "blk.3.attn_q.weight" not in names and "blk.3.attn_norm.weight" not in names
    assert "blk.3.ffn_down.weight" in names and "blk.4.attn_q.weight" in names
    assert reader.fields["deci.attention.head_count"].types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]
    assert meta["deci.attention.head_count"][0] > 0  # llama.cpp takes the head size from layer 0
    assert "deci" in (tmp_path / "attn" / "README.md").read_text()


def fake_reader(arch: str, layers: int) -> SimpleNamespace:
    values = {"general.architecture": arch, f"{arch}.block_count": layers}
    return SimpleNamespace(fields={k: SimpleNamespace(contents=lambda v=v: v) for k, v in values.items()})


@pytest.mark.parametrize("arch, blocks, message", [
    ("gemma3", "layer:0", r"layer 5 \(global\) would sit at index 4 and run as sliding-window"),  # kinds move
    ("gemma3", "attn:4", "no way to express dropped attention or MLP sub-blocks for 'gemma3'"),
    ("llama", "mlp:2", "cannot express an MLP dropped alone"),  # deci skips the whole layer where the FFN is 0
    ("llama", "attn:0,attn:3", r"first kept layer \(layer 0\) must keep its attention"),
    ("llama", "layer:0,attn:1", r"first kept layer \(layer 1\) must keep its attention"),
    ("falcon", "layer:1", "not supported yet"),
])
def test_plans_gguf_cannot_run_faithfully_are_refused_with_the_reason(arch, blocks, message):
    with pytest.raises(ValueError, match=message):
        plan_gguf(fake_reader(arch, 18), DropPlan.parse(blocks, 18))


def test_plans_that_gguf_expresses_get_their_layout():
    layout = plan_gguf(fake_reader("gemma3", 18), DropPlan.parse(",".join(f"layer:{i}" for i in range(6, 12)), 18))
    assert layout.kept_layers == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17] and layout.arch == "gemma3"
    layout = plan_gguf(fake_reader("llama", 6), DropPlan.parse("attn:1,attn:3,mlp:3", 6))
    assert layout.arch == "deci" and layout.kept_layers == [0, 1, 2, 4, 5]  # attn+mlp of 3: the whole layer
    assert layout.no_attn == {1} and layout.no_ffn == set()


def test_sources_without_quantised_tensors_and_bad_files_are_refused(tmp_path):
    model = sharp_model("llama")
    plan = DropPlan.parse("layer:1", LAYERS)
    with pytest.raises(ValueError, match="needs a model loaded from a .gguf file.*format='safetensors'"):
        check_gguf_export(model, plan, ModelSource(name="tiny", source="local"))
    with pytest.raises(ValueError, match="would lose the heal"):
        check_gguf_export(model, plan, ModelSource(name="tiny", source="gguf"), healed=True)
    with pytest.raises(ValueError, match="drops no block"):
        check_gguf_export(model, DropPlan(LAYERS, []), ModelSource(name="tiny", source="gguf"))
    from entrodrop.bundled import bundled_model_path

    cut = tmp_path / "cut.gguf"
    with open(bundled_model_path("smollm2"), "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(2_000_000))  # a download cut short
    with pytest.raises(ValueError, match="cannot be read .* truncated or corrupted"):
        check_gguf_export(model, plan, ModelSource(name="cut", source="gguf", gguf_file=str(cut)))
    whole = tmp_path / "whole.gguf"
    shutil.copy(bundled_model_path("smollm2"), whole)
    with pytest.raises(ValueError, match="plan is for a model with 4 layers but the GGUF source has 30"):
        check_gguf_export(model, plan, ModelSource(name="copy", source="gguf", gguf_file=str(whole)))
    assert torch.is_tensor(next(model.parameters()))
