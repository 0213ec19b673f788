"""GGUF export: the bundled SmolLM2 GGUF through the GGUF -> GGUF path (size, metadata, bytes, logits), attention
drops as a ``deci`` file, a healed model's own weights in a block or float type or in the source's own types (the
tensor layout checked against both bundled files), and every refusal (Gemma 3 layers that would change kind, sub-blocks outside the Llama family, a
safetensors source, a healed model as stored, an architecture whose layout is not checked, a truncated source)
before anything is written."""

import copy
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer
from gguf import GGUFReader, GGUFValueType
from test_prune import sharp_model
from tiny_models import LAYERS

from entrodrop.export import ModelSource, TargetNotEmptyError
from entrodrop.export.gguf_export import check_gguf_export, export_gguf
from entrodrop.export.gguf_tensors import ModelTensors, check_float_arch, encode, round_trip, within_rounding
from entrodrop.export.gguf_write import plan_gguf
from entrodrop.gguf import gguf_reader
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


def test_a_gemma_3_27b_plan_is_refused_where_llama_cpp_would_change_its_attention_scale():
    """llama.cpp scales the 62-layer Gemma 3 by 1/sqrt(hidden / heads) = 1/sqrt(168), every other depth by
    1/sqrt(head size) = 1/sqrt(128): any whole-layer drop from the 27B changes its scale, so it is refused."""
    sizes = {"general.architecture": "gemma3", "gemma3.block_count": 62, "gemma3.embedding_length": 5376,
             "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128}  # Gemma 3 27B's
    six = DropPlan.parse(",".join(f"layer:{i}" for i in range(6, 12)), 62)  # every kept layer keeps its kind
    with pytest.raises(ValueError, match=r"1/sqrt\(168\) for its 62 layers, 1/sqrt\(128\) for 56"):
        plan_gguf(sizes, six)
    assert plan_gguf({**sizes, "gemma3.attention.key_length": 168}, six).kept_layers[6] == 12  # the same scale


def test_plans_that_gguf_expresses_get_their_layout():
    layout = plan_gguf(fake_reader("gemma3", 18), DropPlan.parse(",".join(f"layer:{i}" for i in range(6, 12)), 18))
    assert layout.kept_layers == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17] and layout.arch == "gemma3"
    layout = plan_gguf(fake_reader("llama", 6), DropPlan.parse("attn:1,attn:3,mlp:3", 6))
    assert layout.arch == "deci" and layout.kept_layers == [0, 1, 2, 4, 5]  # attn+mlp of 3: the whole layer
    assert layout.no_attn == {1} and layout.no_ffn == set()


def test_sources_without_quantised_tensors_and_bad_files_are_refused(tmp_path):
    model = sharp_model("llama")
    plan = DropPlan.parse("layer:1", LAYERS)
    for kept in ("stored", "source"):  # both keep the quantisation of a .gguf file, which there is not
        with pytest.raises(ValueError, match=f"'{kept}' keeps .* came from safetensors: choose one of q8_0, q5_1"):
            check_gguf_export(model, plan, ModelSource(name="tiny", source="local"), gguf_type=kept)
    with pytest.raises(ValueError, match="'gpt2' model loaded from safetensors is not supported.*convert_hf_to_gguf"):
        check_gguf_export(sharp_model("gpt2"), plan, ModelSource(name="tiny", source="local"))
    with pytest.raises(ValueError, match="would lose the heal.*source, or one of q8_0, q5_1, q5_0, q4_1, q4_0, f16"):
        check_gguf_export(model, plan, ModelSource(name="tiny", source="gguf"), heal="linear", gguf_type="stored")
    with pytest.raises(ValueError, match="Unknown GGUF tensor type 'q4_k'"):
        check_gguf_export(model, plan, ModelSource(name="tiny", source="gguf"), gguf_type="q4_k")
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


def assert_gguf_layout_is_the_files(model, gguf_path) -> None:
    """The layout the writer gives a model's weights (Llama's per-head Q/K row order, Gemma's 1 + w norms) is
    llama.cpp's: the model de-quantised from a GGUF file, written back, is that file's tensors exactly."""
    from gguf.quants import dequantize

    reader = gguf_reader(gguf_path)  # shared where the caller is inside gguf_parse_once
    arch = reader.fields["general.architecture"].contents()
    tensors = ModelTensors(model, arch, reader.fields[f"{arch}.block_count"].contents())
    wanted = ("token_embd", "blk.1.attn_q.", "blk.1.attn_k.", "blk.1.attn_v.", "blk.1.attn_norm", "blk.1.ffn_down",
              "blk.1.attn_q_norm", "blk.1.post_attention_norm", "output_norm")
    checked = [t for t in reader.tensors if t.name.startswith(wanted)]
    assert len(checked) >= 7
    for t in checked:
        stored = dequantize(t.data, t.tensor_type).reshape(tensors.array(t.name).shape)
        assert np.array_equal(stored, tensors.array(t.name)), t.name


@pytest.mark.slow
def test_the_models_weights_in_gguf_layout_are_the_source_files_own(bundled_model):
    assert_gguf_layout_is_the_files(bundled_model.model, bundled_model.gguf_file)  # Gemma 3's: tests/test_gemma.py


@pytest.mark.slow
def test_a_healed_model_is_written_from_its_own_weights_and_reloads_with_its_logits(bundled_model, tmp_path):
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from entrodrop.data import load_corpus, make_windows
    from entrodrop.heal import HealSettings, heal, heal_record

    plan = DropPlan(30, DropPlan.parse(WHOLE, 30).blocks, criterion="recommended")
    calib = make_windows(bundled_model.tokenizer, load_corpus("gsm8k"), num_samples=6, seq_len=64, seed=0)
    healed = heal(bundled_model.model, plan, calib, HealSettings(method="linear", train_windows=4, val_windows=2))
    source = ModelSource.of(bundled_model)
    with pytest.raises(ValueError, match="would lose the heal"):  # the source's bytes are not the healed weights
        export_gguf(healed.model, bundled_model.tokenizer, plan, tmp_path / "stored", source=source,
                    heal=heal_record(healed), gguf_type="stored")
    assert not (tmp_path / "stored").exists()
    result = export_gguf(healed.model, bundled_model.tokenizer, plan, tmp_path / "q8", source=source,
                         heal=heal_record(healed), gguf_type="q8_0")
    assert result.ok, result.verdict
    reloaded = result.verification["loaders"]["transformers from_pretrained(gguf_file=...)"]
    assert reloaded["max_abs_diff"] <= 1e-4 and 0 < reloaded["rounding_kl"] < 0.02  # the model as the file rounds it
    assert "the model's own weights within q8_0 rounding" in result.verdict
    path = next((tmp_path / "q8").glob("*-healed-q8_0.gguf"))
    reader = GGUFReader(str(path))
    meta = fields(reader)
    assert meta["general.file_type"] == 7 and meta["entrodrop.heal"] == "linear" and meta["entrodrop.weights"] == "q8_0"
    assert meta["llama.block_count"] == 26 and meta["tokenizer.chat_template"]  # the source's metadata kept
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["blk.0.attn_norm.weight"].tensor_type == T.F32 and by_name["blk.0.ffn_up.weight"].tensor_type == T.Q8_0
    # the heal's folds are in the file: some kept tensor is not the dense model's, every one is the healed model's
    dense, ours = (ModelTensors(m, "llama", 30) for m in (bundled_model.model, healed.model))

    def source_name(name: str) -> str:  # blk.N of the file is blk.<N-th kept layer> of the dense layout
        index, _, rest = name[4:].partition(".")
        return f"blk.{meta['entrodrop.source_layers'][int(index)]}.{rest}"

    quantised = [n for n, t in by_name.items() if n.startswith("blk.") and t.tensor_type == T.Q8_0]
    changed = [n for n in quantised if not within_rounding(np.asarray(by_name[n].data), T.Q8_0,
                                                           dense.array(source_name(n)))]
    assert changed and all(within_rounding(np.asarray(by_name[n].data), T.Q8_0, ours.array(source_name(n)))
                           for n in quantised)
    assert result.weights_bytes < 26 / 30 * sum(p.numel() for p in healed.model.parameters()) * 1.2
    card = (tmp_path / "q8" / "README.md").read_text()
    assert "healed with linear" in card and "q8_0" in card and "llama-cli -m" in card
    assert dequantize(by_name["token_embd.weight"].data, T.Q8_0).shape[-1] == 576

    # in the source's own types: what the heal left alone is the source's bytes, what it changed is Q4_1 again
    kept = export_gguf(healed.model, bundled_model.tokenizer, plan, tmp_path / "source", source=source,
                       heal=heal_record(healed))  # auto after a linear heal: the source's own types
    assert kept.ok, kept.verdict
    reloaded = kept.verification["loaders"]["transformers from_pretrained(gguf_file=...)"]
    assert reloaded["max_abs_diff"] <= 1e-4 and reloaded["generation_matches"]
    assert kept.weights_bytes <= 26 / 30 * kept.source_bytes * 1.05  # the size of the unhealed export
    reader = GGUFReader(str(next((tmp_path / "source").glob("*-pruned-healed.gguf"))))
    meta = fields(reader)
    source_file = GGUFReader(str(bundled_model.gguf_file))
    assert meta["general.file_type"] == fields(source_file)["general.file_type"]
    source_tensors = {t.name: t for t in source_file.tensors}
    copied, requantised = [], []
    for t in reader.tensors:
        src = source_tensors[source_name(t.name) if t.name.startswith("blk.") else t.name]
        assert t.tensor_type == src.tensor_type, t.name
        (copied if np.array_equal(t.data, src.data) else requantised).append(t.name)
    assert set(requantised) == set(changed)  # exactly the tensors the heal folded its maps into
    assert kept.verification["loaders"]["gguf reader (structure, bytes)"]["requantised"] == len(requantised)
    assert all(within_rounding(np.asarray(by_name_t.data), T.Q4_1, ours.array(source_name(by_name_t.name)))
               for by_name_t in reader.tensors if by_name_t.name in requantised)
    assert len(copied) > 10 * len(requantised)


@pytest.mark.slow
def test_attention_drops_in_float16_are_a_deci_file_of_the_models_weights(bundled_model, tmp_path):
    plan = DropPlan.parse(ATTN, 30)
    result = export_gguf(bundled_model.model, bundled_model.tokenizer, plan, tmp_path / "f16",
                         source=ModelSource.of(bundled_model), gguf_type="f16")
    assert result.ok, result.verdict
    reader = GGUFReader(str(next((tmp_path / "f16").glob("*-f16.gguf"))))
    meta = fields(reader)
    assert meta["general.architecture"] == "deci" and meta["general.file_type"] == 1
    assert "blk.3.attn_q.weight" not in {t.name for t in reader.tensors}
    assert "within f16 rounding" in result.verdict


def test_rounding_bounds_pass_the_rounding_and_fail_just_past_it():
    from gguf import GGMLQuantizationType as T

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[1, :32] *= 1e-6  # a block whose float16 scale is subnormal
    w[2, 32:] = 0.25  # a constant block: no range
    w[3, :32] += 40.0  # a block far from zero: the minimum's float16 rounding matters
    for qtype in (T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0, T.F16, T.BF16, T.F32):
        assert within_rounding(encode(w, qtype), qtype, w), qtype.name
    # half a step of the block's range for the types with a minimum (Q4_1: 15 steps from min to max)
    step = np.ptp(w[0, :32]) / 15
    for delta, inside in ((0.45 * step, True), (0.7 * step, False)):
        moved = w.copy()
        moved[0, 3] = round_trip(w, T.Q4_1)[0, 3] + delta
        assert within_rounding(encode(w, T.Q4_1), T.Q4_1, moved) is inside
    # Q4_0 clips its top level: the value opposite the largest magnitude lands a whole step off, and passes
    opposite = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
    assert np.abs(round_trip(opposite, T.Q4_0) - opposite).max() == pytest.approx(1 / 8)
    assert within_rounding(encode(opposite, T.Q4_0), T.Q4_0, opposite)
    assert not within_rounding(encode(opposite, T.Q4_0), T.Q4_0, opposite + np.float32(0.15))
    q8 = encode(w, T.Q8_0)
    step = np.abs(w[0, :32]).max() / 127
    for delta, inside in ((0.45 * step, True), (0.7 * step, False)):
        moved = w.copy()
        moved[0, 3] = round_trip(w, T.Q8_0)[0, 3] + delta
        assert within_rounding(q8, T.Q8_0, moved) is inside
    for qtype, rel in ((T.F16, 2.0 ** -11), (T.BF16, 2.0 ** -8)):
        moved = w.copy()
        moved[2, 5] = round_trip(w, qtype)[2, 5] * (1 + 2.5 * rel)
        assert not within_rounding(encode(w, qtype), qtype, moved)
    swapped = w[[1, 0, 2, 3]]
    for qtype in (T.Q8_0, T.Q4_1):  # another tensor's values, or rows, fail
        assert not within_rounding(encode(w, qtype), qtype, swapped)
    with pytest.raises(ValueError, match="'qwen2' GGUF is not supported.*stored"):
        check_float_arch("qwen2")


def test_each_tensor_gets_the_type_its_gguf_type_says():
    from gguf import GGMLQuantizationType as T

    from entrodrop.export.gguf_tensors import ggml_type, resolve_gguf_type

    assert ggml_type("q4_1", (64, 64)) == T.Q4_1 and ggml_type("q5_0", (64, 64)) == T.Q5_0
    assert ggml_type("q4_1", (64,)) == T.F32 and ggml_type("q4_0", (64, 40)) == T.F16  # norms; rows not whole blocks
    assert ggml_type("source", (64, 64), T.Q4_1) == T.Q4_1 and ggml_type("source", (64, 64), T.F16) == T.F16
    assert ggml_type("source", (64, 64), T.Q4_K) == T.Q8_0  # gguf has no K-quant quantiser
    with pytest.raises(ValueError, match="needs the source file's tensor type"):
        ggml_type("source", (64, 64))
    # auto: a GGUF source's bytes as dropped; a linear heal in the source's types; a LoRA heal, or no GGUF source,
    # q8_0; a Gemma 3, float16
    assert resolve_gguf_type("auto", heal=None, gguf_source=True) == "stored"
    assert resolve_gguf_type("auto", heal="linear", gguf_source=True) == "source"
    assert resolve_gguf_type("auto", heal="lora", gguf_source=True) == "q8_0"
    assert resolve_gguf_type("auto", heal="linear", gguf_source=False) == "q8_0"
    assert resolve_gguf_type("auto", heal=None, gguf_source=False, model_type="llama") == "q8_0"
    for source in (True, False):  # Gemma 3: float16 from any source, healed or not
        for heal in (None, "linear", "lora"):
            assert resolve_gguf_type("auto", heal=heal, gguf_source=source, model_type="gemma3_text") == "f16"
    assert resolve_gguf_type("auto", heal=None, gguf_source=True, model_type="gemma3") == "f16"  # multimodal config
    assert resolve_gguf_type("stored", heal=None, gguf_source=True, model_type="gemma3_text") == "stored"
    assert resolve_gguf_type("q4_0", heal="lora", gguf_source=True) == "q4_0"


def test_a_transformers_checkpoint_converts_to_gguf_that_reloads_with_its_logits_and_tokenizer(tmp_path, tiny_tokenizer):
    """safetensors -> GGUF: the Llama metadata and byte-level BPE tokenizer written from the model's config and
    tokenizer; the file reloads in transformers with the pruned model's logits and encodes text to the same ids."""
    model = sharp_model("llama")
    source = ModelSource(name=str(tmp_path / "tiny-llama"), source="local")
    plan = DropPlan.parse("layer:1", LAYERS)
    result = export_gguf(model, tiny_tokenizer, plan, tmp_path / "f32", source=source, gguf_type="f32")
    assert result.ok, result.verdict
    loaders = result.verification["loaders"]
    assert loaders["transformers from_pretrained(gguf_file=...)"]["max_abs_diff"] <= 1e-4
    assert loaders["tokenizer from the file"]["same_ids"]
    path = next((tmp_path / "f32").glob("tiny-llama-1layer-pruned-f32.gguf"))
    reader = GGUFReader(str(path))
    meta = fields(reader)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == LAYERS - 1
    tokenizer = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}
    assert tokenizer["tokenizer.ggml.model"] == "gpt2" and tokenizer["tokenizer.ggml.pre"] == "gpt-2"
    assert tokenizer["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert meta["llama.attention.head_count"] == model.config.num_attention_heads
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    tokens = tokenizer["tokenizer.ggml.tokens"]
    assert len(tokens) == model.config.vocab_size and tokens[tiny_tokenizer.eos_token_id] == tiny_tokenizer.eos_token
    assert tokenizer["tokenizer.ggml.token_type"][tiny_tokenizer.eos_token_id] == 3  # control
    assert len(tokenizer["tokenizer.ggml.merges"]) > 100
    assert "output.weight" in {t.name for t in reader.tensors}  # not tied: its own output matrix
    assert not list(tmp_path.glob(".entrodrop-convert-*"))  # the dense scratch file is gone
    meta_json = (tmp_path / "f32" / "entrodrop.json").read_text()
    assert "converted to GGUF in f32" in meta_json
    attn = export_gguf(model, tiny_tokenizer, DropPlan.parse("attn:1,attn:2", LAYERS), tmp_path / "deci",
                       source=source)  # auto: q8_0, the only sensible default without stored tensors
    assert attn.ok, attn.verdict
    meta = fields(GGUFReader(str(next((tmp_path / "deci").glob("*-q8_0.gguf")))))
    assert meta["general.architecture"] == "deci" and meta["deci.attention.head_count"][1:3] == [0, 0]
    small = export_gguf(model, tiny_tokenizer, plan, tmp_path / "q4", source=source, gguf_type="q4_1")
    assert small.ok, small.verdict  # the reload equals the model rounded to 4 bits, as the file holds it
    assert small.verification["loaders"]["transformers from_pretrained(gguf_file=...)"]["max_abs_diff"] <= 1e-4
    reader = GGUFReader(str(next((tmp_path / "q4").glob("*-q4_1.gguf"))))
    assert fields(reader)["general.file_type"] == 3  # MOSTLY_Q4_1
    assert {t.tensor_type.name for t in reader.tensors} == {"Q4_1", "F32"}


def test_tokenizers_llama_cpp_cannot_name_are_refused(tiny_tokenizer):
    from tokenizers import pre_tokenizers

    from entrodrop.export.gguf_vocab import bpe_pre_tokenizer_name as _pre_tokenizer_name

    assert _pre_tokenizer_name(tiny_tokenizer) == "gpt-2"
    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert _pre_tokenizer_name(tok) == "smollm"  # SmolLM's: digits one by one, then GPT-2's expression
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ValueError, match="not one EntroDrop can name.*convert_hf_to_gguf"):
        _pre_tokenizer_name(tok)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # a leading space added
    with pytest.raises(ValueError, match="not one EntroDrop can name"):
        _pre_tokenizer_name(tok)
    llama3 = llama3_style_tokenizer()
    assert _pre_tokenizer_name(llama3) == "llama-bpe"
    merging = llama3_style_tokenizer(ignore_merges=False)  # Llama 3's split, but every piece merged
    with pytest.raises(ValueError, match="splits text as llama.cpp's 'llama-bpe' does, but it merges every piece"):
        _pre_tokenizer_name(merging)
    looking_up = build_tiny_tokenizer(ignore_merges=True)  # GPT-2's split with whole-piece lookup
    with pytest.raises(ValueError, match="'gpt-2' does, but it looks whole pieces up"):
        _pre_tokenizer_name(looking_up)


def llama3_style_tokenizer(ignore_merges: bool = True):
    """A tiny tokenizer built as Llama 3's is: its split expression, then byte-level, whole pieces looked up first,
    and a BOS token before every text."""
    from tokenizers import Regex, pre_tokenizers

    from entrodrop.export.gguf_vocab import _LLAMA3_SPLIT

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return build_tiny_tokenizer(bos="<|begin_of_text|>", pre_tokenizer=split, ignore_merges=ignore_merges)


def test_a_llama_3_style_checkpoint_converts_with_llama_cpps_llama_bpe_tokenizer(tmp_path):
    """Llama 3's pre-tokenizer is written as 'llama-bpe' with its BOS, and the file's tokenizer encodes as the
    source does (digits in threes, contractions apart: the fixed text has both)."""
    tokenizer = llama3_style_tokenizer()
    source = ModelSource(name=str(tmp_path / "tiny-llama3"), source="local")
    result = export_gguf(sharp_model("llama"), tokenizer, DropPlan.parse("layer:2", LAYERS), tmp_path / "out",
                         source=source)
    assert result.ok, result.verdict
    assert result.verification["loaders"]["tokenizer from the file"]["same_ids"]
    meta = {k: f.contents() for k, f in GGUFReader(str(next((tmp_path / "out").glob("*.gguf")))).fields.items()}
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
