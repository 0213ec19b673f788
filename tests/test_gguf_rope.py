"""RoPE scaling through GGUF: Llama 3.1+ scaling written as llama.cpp's ``rope_freqs`` tensor and linear scaling
as its two keys, both read back on load (transformers' GGUF loader reads neither, so without this a model loaded
from such a file runs with other positions than llama.cpp runs), and the scalings that cannot be read back
refused with the reason."""

import pytest
import torch
from gguf import GGUFReader, GGUFWriter, RopeScalingType
from test_prune import sharp_model
from tiny_models import LAYERS
from transformers import AutoModelForCausalLM, LlamaConfig

from entrodrop.export import ModelSource
from entrodrop.export.gguf_convert import check_convertible
from entrodrop.export.gguf_export import export_gguf
from entrodrop.gguf import ROPE_FREQS, gguf_rope_parameters, llama3_rope_parameters, rope_freq_factors
from entrodrop.loading import load_model
from entrodrop.plan import DropPlan
from entrodrop.prune import preview_plan

RELOAD = "transformers from_pretrained(gguf_file=...)"
# the tiny model's 8 frequencies (head_dim 16, theta 1e4) have wavelengths 6, 20, 63, 199, 628, ...: 199 and 628
# fall between 1024/16 and 1024, so two are blended, two divided by 4 and four kept
TINY_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 16.0, "original_max_position_embeddings": 1024}


def scaled_model(rope_parameters: dict):
    """The sharp tiny Llama built with ``rope_parameters`` (rotary frequencies are computed at construction)."""
    weights = sharp_model("llama")
    config = weights.config
    config.rope_parameters = rope_parameters
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(weights.state_dict())
    return model


@pytest.mark.parametrize("theta, head_dim, params", [
    (500000.0, 128, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (500000.0, 64, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (10000.0, 16, {k: v for k, v in TINY_LLAMA3.items() if k not in ("rope_type", "rope_theta")}),
])
def test_llama_3_scaling_is_fitted_back_from_its_divisors(theta, head_dim, params):
    """Llama 3.1 8B's and 3.2 1B's scaling, and the tiny test model's: divisors -> parameters -> the same."""
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=1 << 20,
                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, **params})
    factors = rope_freq_factors(config)
    assert factors.shape == (head_dim // 2,) and factors[0] == pytest.approx(1) and factors[-1] == pytest.approx(
        params["factor"])
    assert llama3_rope_parameters(factors, theta, head_dim) == {"rope_type": "llama3", "rope_theta": theta, **params}
    # the same divisors from another (low, high, context) with the same ratios: an equivalent config
    halved = dict(params, low_freq_factor=2.0, high_freq_factor=2 * params["high_freq_factor"],
                  original_max_position_embeddings=2 * params["original_max_position_embeddings"])
    assert llama3_rope_parameters(factors, theta, head_dim) == llama3_rope_parameters(
        rope_freq_factors(LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=1 << 20,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, **halved})),
        theta, head_dim)
    assert rope_freq_factors(LlamaConfig()) is None  # unscaled
    wrong = factors.copy()
    wrong[len(wrong) // 2:] *= 1.5  # not Llama 3's shape
    with pytest.raises(ValueError, match="not Llama 3's RoPE scaling.*safetensors folder"):
        llama3_rope_parameters(wrong, theta, head_dim)


def test_a_llama_3_scaled_checkpoint_exports_rope_freqs_and_loads_back_scaled(tmp_path, tiny_tokenizer):
    """safetensors -> GGUF writes rope_freqs; loading that file gives the scaled model (same logits), where
    transformers alone gives another; and a GGUF -> GGUF export of it keeps the tensor, verified."""
    model = scaled_model(TINY_LLAMA3)
    source = ModelSource(name=str(tmp_path / "tiny-llama31"), source="local")
    result = export_gguf(model, tiny_tokenizer, DropPlan.parse("layer:1", LAYERS), tmp_path / "f32", source=source,
                         gguf_type="f32")
    assert result.ok, result.verdict
    assert result.verification["loaders"][RELOAD]["max_abs_diff"] <= 1e-5
    path = next((tmp_path / "f32").glob("*.gguf"))
    reader = GGUFReader(str(path))
    freqs = next(t for t in reader.tensors if t.name == ROPE_FREQS)
    assert freqs.tensor_type.name == "F32"
    assert torch.equal(torch.from_numpy(freqs.data.copy()), torch.from_numpy(rope_freq_factors(model.config)))
    assert gguf_rope_parameters(path) == TINY_LLAMA3

    # the file loaded (its 3 layers) against the model under the plan: the same logits; unscaled, others
    loaded = load_model(str(path), dtype="float32", device="cpu").model
    assert loaded.config.rope_parameters == TINY_LLAMA3
    ids = torch.arange(1, 121).view(1, -1) % 300 + 1
    with torch.inference_mode():
        with preview_plan(model, DropPlan.parse("layer:1", LAYERS)):
            want = model(input_ids=ids).logits
        assert (loaded(input_ids=ids).logits - want).abs().max() <= 1e-4
        unscaled = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        assert (unscaled(input_ids=ids).logits - want).abs().max() > 1e-2  # what loading without the fix runs

    # that file as a GGUF source: stored and re-written weights both keep rope_freqs as the source has it
    src = ModelSource(name=path.stem, source="gguf", gguf_file=str(path))
    for gguf_type in ("stored", "q8_0"):
        again = export_gguf(loaded, tiny_tokenizer, DropPlan.parse("layer:0", LAYERS - 1), tmp_path / gguf_type,
                            source=src, gguf_type=gguf_type)
        assert again.ok, again.verdict
        written = GGUFReader(str(next((tmp_path / gguf_type).glob("*.gguf"))))
        assert [t.data.tolist() for t in written.tensors if t.name == ROPE_FREQS] == [freqs.data.tolist()]


def test_linear_scaling_is_written_as_llama_cpps_keys_and_read_back(tmp_path, tiny_tokenizer):
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    result = export_gguf(scaled_model(linear), tiny_tokenizer, DropPlan.parse("layer:2", LAYERS), tmp_path / "out",
                         source=ModelSource(name=str(tmp_path / "tiny-linear"), source="local"), gguf_type="f32")
    assert result.ok, result.verdict
    path = next((tmp_path / "out").glob("*.gguf"))
    meta = {k: f.contents() for k, f in GGUFReader(str(path)).fields.items()}
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert gguf_rope_parameters(path) == linear


def test_scalings_that_cannot_be_written_or_read_back_are_refused(tmp_path):
    yarn = scaled_model({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match="scales RoPE as 'yarn'.*convert_hf_to_gguf"):
        check_convertible(yarn)

    def gguf_file(name: str, arch: str, scaling: str | None) -> str:
        path = tmp_path / name
        writer = GGUFWriter(str(path), arch)
        writer.add_rope_freq_base(10000.0)
        if scaling:
            writer.add_rope_scaling_type(RopeScalingType(scaling))
            writer.add_rope_scaling_factor(4.0)
        writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return str(path)

    assert gguf_rope_parameters(gguf_file("plain.gguf", "llama", None)) is None
    with pytest.raises(ValueError, match="scales RoPE as 'yarn'.*safetensors folder"):
        gguf_rope_parameters(gguf_file("yarn.gguf", "llama", "yarn"))
    with pytest.raises(ValueError, match="gemma3 model has RoPE scaling \\(linear\\).*Llama-family files only"):
        gguf_rope_parameters(gguf_file("gemma.gguf", "gemma3", "linear"))
    with pytest.raises(ValueError, match="gemma3 model has RoPE scaling"):
        load_model(str(tmp_path / "gemma.gguf"))  # refused where the config is read, before any weight
