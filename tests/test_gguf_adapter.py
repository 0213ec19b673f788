"""GGUF type ``adapter``: a LoRA-healed model exported as the source's stored tensors plus a llama.cpp LoRA adapter
holding the heal. On a tiny Llama converted to a Q8_0 GGUF source and loaded from it, with a rank-4 update added
to kept matrices (Q and K among them: their rows are permuted in llama.cpp's layout): the base's bytes are the
source's, the adapter has llama.cpp's keys, names and shapes, and the base reloaded with the adapter added gives
the updated model's logits. What an adapter cannot carry is refused with the reason."""

import copy

import pytest
import torch
from gguf import GGUFReader
from test_prune import sharp_model
from tiny_models import LAYERS

from entrodrop.export import ModelSource
from entrodrop.export.gguf_adapter import read_lora_adapter
from entrodrop.export.gguf_convert import write_dense_gguf
from entrodrop.export.gguf_export import check_gguf_export, export_gguf
from entrodrop.heal import HealResult, HealSettings, heal_record
from entrodrop.loading import load_model
from entrodrop.plan import DropPlan

RANK = 4
UPDATED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory, tiny_tokenizer):
    """The sharp tiny Llama written as a Q8_0 GGUF and loaded from it (its weights: that file de-quantised)."""
    path = tmp_path_factory.mktemp("source") / "tiny-llama-Q8_0.gguf"
    write_dense_gguf(sharp_model("llama"), tiny_tokenizer, path, "q8_0")
    return load_model(str(path), dtype="float32", device="cpu")


def lora_healed(model, layers, rank: int = RANK, seed: int = 0):
    """A copy of ``model`` with a rank-``rank`` update, of a LoRA heal's size, on some matrices of ``layers``."""
    healed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in layers:
            for name in UPDATED:
                w = healed.model.layers[i].get_submodule(name).weight
                w += 0.02 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
    return healed


def lora_record(healed, plan: DropPlan) -> dict:
    """What an export keeps of a LoRA heal of rank RANK that made ``healed``."""
    return heal_record(HealResult("lora", plan, healed, HealSettings(rank=RANK).to_dict(), [], 0.5, 0.2, best_step=3,
                                  steps_done=3, seconds=1.0, stopped=False, train_windows=4, val_windows=1, seq_len=16))


def test_a_lora_heal_becomes_the_stored_source_and_an_adapter_that_gives_its_logits(gguf_source, tmp_path):
    plan = DropPlan.parse("layer:1", LAYERS)
    healed = lora_healed(gguf_source.model, [0, 2, 3])
    source = ModelSource.of(gguf_source)
    result = export_gguf(healed, gguf_source.tokenizer, plan, tmp_path / "out", source=source, gguf_type="adapter",
                         heal=lora_record(healed, plan))
    assert result.ok, result.verdict
    loaders = result.verification["loaders"]
    reload = loaders["transformers from_pretrained(gguf_file=...) + adapter"]
    assert reload["max_abs_diff"] <= 1e-4  # against the model as the files hold it (float16 factors)
    assert reload["rounding_kl"] < 1e-5  # what float16 factors cost against the healed model itself
    adapter_check = loaders["LoRA adapter (structure, base + update)"]
    assert adapter_check["rank"] == RANK and adapter_check["tensors"] == 2 * 3 * len(UPDATED)
    assert "kept tensors byte-identical to the source" in result.verdict
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    base, adapter = "tiny-llama-Q8_0-1layer-pruned.gguf", "tiny-llama-Q8_0-1layer-pruned-heal-lora.gguf"
    assert base in files and adapter in files
    assert (tmp_path / "out" / "Modelfile").read_text() == f"FROM ./{base}\nADAPTER ./{adapter}\n"
    assert f"--lora {adapter}" in result.reload_hint
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"shipped as the llama.cpp LoRA adapter `{adapter}`" in card and f"--lora {adapter}" in card
    # llama.cpp's checks on loading an adapter: keys, names of base tensors, a (rank, in) and b (out, rank)
    assert {t.tensor_type.name for t in GGUFReader(str(tmp_path / "out" / adapter)).tensors} == {"F16"}
    meta, pairs = read_lora_adapter(tmp_path / "out" / adapter)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == RANK and meta["general.architecture"] == "llama"
    base_tensors = {t.name: t for t in GGUFReader(str(tmp_path / "out" / base)).tensors}
    # the dense layers 0, 2, 3 are layers 0, 1, 2 of the pruned file
    assert {n.split(".")[1] for n in pairs} == {"0", "1", "2"} and "blk.1.attn_q.weight" in pairs
    for name, (a, b) in pairs.items():
        in_dim, out_dim = (int(n) for n in base_tensors[name].shape)
        assert a.shape == (RANK, in_dim) and b.shape == (out_dim, RANK)
    assert all(t.tensor_type.name in ("Q8_0", "F32") for t in base_tensors.values())  # the source's, as stored
    assert result.weights_bytes == sum((tmp_path / "out" / f).stat().st_size for f in (base, adapter))

    # attention drops: a deci base (not read by transformers) and its adapter, checked against each other
    attn = export_gguf(healed, gguf_source.tokenizer, DropPlan.parse("attn:1,attn:2", LAYERS), tmp_path / "deci",
                       source=source, gguf_type="adapter", heal=lora_record(healed, plan))
    assert attn.ok, attn.verdict
    meta, pairs = read_lora_adapter(next((tmp_path / "deci").glob("*-heal-lora.gguf")))
    assert meta["general.architecture"] == "deci" and "blk.2.attn_q.weight" not in pairs
    assert "blk.2.ffn_down.weight" in pairs and "blk.3.attn_q.weight" in pairs


def test_what_an_adapter_cannot_carry_is_refused(gguf_source, tmp_path, tiny_tokenizer):
    plan = DropPlan.parse("layer:1", LAYERS)
    source = ModelSource.of(gguf_source)
    model = gguf_source.model
    with pytest.raises(ValueError, match="linear method.*choose 'source'"):
        check_gguf_export(model, plan, source, heal="linear", gguf_type="adapter")
    with pytest.raises(ValueError, match="not healed: choose 'stored'"):
        check_gguf_export(model, plan, source, gguf_type="adapter")
    with pytest.raises(ValueError, match="'stored' copies the source's tensors.*or adapter, for a LoRA heal"):
        check_gguf_export(model, plan, source, heal="lora", gguf_type="stored")
    with pytest.raises(ValueError, match="keeps the quantisation of the .gguf file"):
        check_gguf_export(sharp_model("llama"), plan, ModelSource(name="tiny", source="local"), heal="lora",
                          gguf_type="adapter", tokenizer=tiny_tokenizer)
    too_wide = lora_healed(model, [0], rank=RANK + 2)
    with pytest.raises(ValueError, match="more than a rank-4 update.*q8_0"):
        export_gguf(too_wide, gguf_source.tokenizer, plan, tmp_path / "wide", source=source, gguf_type="adapter",
                    heal=lora_record(model, plan))
    norm = copy.deepcopy(model)
    with torch.no_grad():
        norm.model.layers[0].input_layernorm.weight += 0.1
    with pytest.raises(ValueError, match="blk.0.attn_norm.weight, which is not a matrix"):
        export_gguf(norm, gguf_source.tokenizer, plan, tmp_path / "norm", source=source, gguf_type="adapter", heal=lora_record(model, plan))
    assert not (tmp_path / "wide").exists() and not (tmp_path / "norm").exists()  # nothing half-written
