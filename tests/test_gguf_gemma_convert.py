"""safetensors -> GGUF for Gemma 3: the gemma3 metadata llama.cpp reads, a SentencePiece vocabulary with scores
rebuilt from tokenizer.json (checked against the real bundled file in tests/test_gemma.py), and the refusals
where llama.cpp would compute or tokenize otherwise (its hard-coded layer kinds, RoPE base and attention scale)."""

import copy

import pytest
import torch
from conftest import build_tiny_sentencepiece_tokenizer
from gguf import GGMLQuantizationType, GGUFReader
from tiny_models import _COMMON, tiny_model
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from entrodrop.export import ModelSource, export_gguf
from entrodrop.export.gguf_convert import check_convertible
from entrodrop.export.gguf_vocab import check_sentencepiece, sentencepiece_vocabulary
from entrodrop.plan import DropPlan

LAYERS = 6  # llama.cpp's Gemma 3: layers 0-4 sliding-window, layer 5 global


def gemma3_config(**changes) -> Gemma3TextConfig:
    settings = {**_COMMON, "num_hidden_layers": LAYERS, "head_dim": 16, "sliding_window": 16,
                "query_pre_attn_scalar": 16, **changes}
    return Gemma3TextConfig(**settings)


def gemma3_model(**changes):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gemma3_config(**changes)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that every block moves the argmax
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


@pytest.fixture(scope="module")
def spm_tokenizer():
    return build_tiny_sentencepiece_tokenizer()


def test_a_gemma_3_checkpoint_converts_to_a_gguf_that_reloads_with_its_logits_and_tokenizer(tmp_path, spm_tokenizer):
    model = gemma3_model()
    source = ModelSource(name=str(tmp_path / "tiny-gemma3"), source="local")
    result = export_gguf(model, spm_tokenizer, DropPlan.parse("layer:5", LAYERS), tmp_path / "out", source=source,
                         gguf_type="f32")
    assert result.ok, result.verdict
    loaders = result.verification["loaders"]
    assert loaders["transformers from_pretrained(gguf_file=...)"]["max_abs_diff"] <= 1e-4
    assert loaders["tokenizer from the file"]["same_ids"]
    reader = GGUFReader(str(next((tmp_path / "out").glob("*.gguf"))))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.block_count"] == LAYERS - 1
    assert meta["gemma3.attention.sliding_window"] == 16 and meta["gemma3.attention.key_length"] == 16
    assert meta["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 2
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert tokens[5:10] == ["<start_of_turn>", "<end_of_turn>", "\n", "  ", "   "]  # runs of spaces with spaces
    assert types[:10] == [3] * 7 + [4] * 3 and types[10] == 6 and tokens[10] == "<0x00>"
    assert scores[:10] == [-1000.0] * 10 and scores[10] == 0.0
    normal = [s for s, t in zip(scores, types, strict=True) if t == 1]
    assert normal == [float(-i) for i in range(len(normal))]  # best first, in the vocabulary's order
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reads the embedding
    norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    assert float(norm.data[0]) == pytest.approx(1.0 + model.model.layers[0].input_layernorm.weight[0].item())
    auto = export_gguf(model, spm_tokenizer, DropPlan.parse("layer:5", LAYERS), tmp_path / "auto", source=source)
    assert auto.ok, auto.verdict  # auto for Gemma 3: float16 (its pruned models are fragile in 8 bits)
    written = GGUFReader(str(next((tmp_path / "auto").glob("*-f16.gguf"))))
    assert {t.tensor_type for t in written.tensors if len(t.shape) > 1} == {GGMLQuantizationType.F16}
    q8 = export_gguf(model, spm_tokenizer, DropPlan.parse("layer:5", LAYERS), tmp_path / "q8", source=source,
                     gguf_type="q8_0")
    assert q8.ok, q8.verdict  # compared with the model rounded as the file holds it
    assert "export with GGUF type f16" in (tmp_path / "q8" / "README.md").read_text()  # the measured caveat
    assert "Quantised, and this is a pruned Gemma 3" not in (tmp_path / "auto" / "README.md").read_text()


@pytest.mark.parametrize(("changes", "message"), [
    ({"layer_types": ["sliding_attention", "full_attention"] * 3}, "layer 1 is full_attention"),
    ({"query_pre_attn_scalar": 256}, r"1/sqrt\(256\), and llama.cpp by 1/sqrt\(16\)"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "RoPE base 50000.*llama.cpp uses 10000"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}},
     "scales RoPE"),
    ({"final_logit_softcapping": 30.0}, "soft-caps logits"),
    ({"tie_word_embeddings": False}, "output matrix is not the token embedding"),
])
def test_gemma_3_checkpoints_llama_cpp_would_run_otherwise_are_refused(changes, message):
    model = tiny_model("gemma3")
    model.config = gemma3_config(**changes)
    with pytest.raises(ValueError, match=f"cannot be written as a GGUF llama.cpp runs the same: .*{message}.*"
                                         "convert_hf_to_gguf"):
        check_convertible(model)


def test_tokenizers_that_are_not_sentencepiece_as_llama_cpp_runs_it_are_refused(spm_tokenizer, tiny_tokenizer):
    from tokenizers import normalizers

    check_sentencepiece(spm_tokenizer)
    with pytest.raises(ValueError, match="without SentencePiece's byte fallback"):
        check_convertible(gemma3_model(), tiny_tokenizer)  # byte-level BPE: GPT-2's form, not Gemma's
    prefixed = copy.deepcopy(spm_tokenizer)  # Llama 2's form: a space put before every text
    prefixed.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    with pytest.raises(ValueError, match="otherwise than Gemma's SentencePiece form"):
        check_sentencepiece(prefixed)
    from transformers import GemmaTokenizer

    vocab = spm_tokenizer.get_vocab()
    merges = [("\u2581\u2581", "\u2581"), ("\u2581", "\u2581")]  # the longer run merged before the shorter
    with pytest.raises(ValueError, match="out of the order of its vocabulary"):
        check_sentencepiece(GemmaTokenizer(vocab=vocab, merges=merges))
    tokens, scores, types = sentencepiece_vocabulary(spm_tokenizer, len(spm_tokenizer) + 2)
    assert tokens[-2:] == [f"[PAD{len(spm_tokenizer)}]", f"[PAD{len(spm_tokenizer) + 1}]"] and types[-2:] == [5, 5]
    with pytest.raises(ValueError, match="has token id .* embedding has 100 rows"):
        sentencepiece_vocabulary(spm_tokenizer, 100)
