import os
import threading
import time

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config, T5Config, ViTConfig

from entrodrop import loading
from entrodrop.cache import ModelCache
from entrodrop.gguf import gguf_parse_once, gguf_reader, strip_gguf_quantization
from entrodrop.loading import (
    InsufficientMemoryError,
    load_config,
    load_model,
    model_facts,
    resolve_model_spec,
)


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size,
    )


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    return str(save_tiny_model(tiny_llama_config(len(tiny_tokenizer)), path, tiny_tokenizer))


def test_local_folder_loads(tiny_llama_dir):
    messages = []
    loaded = load_model(tiny_llama_dir, progress=messages.append)
    assert loaded.source == "local"
    assert loaded.num_layers == 3
    assert loaded.arch.family == "llama"
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token  # fallback: tiny tokenizer has no pad
    assert len(messages) >= 3 and messages[-1].startswith("Loaded")
    ids = loaded.tokenizer("The fox jumps.", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.shape == (1, ids.shape[1], len(loaded.tokenizer))

    facts = model_facts(loaded)
    assert facts["architecture"] == "LlamaForCausalLM"
    assert facts["family"] == "llama" and facts["model_type"] == "llama"
    assert facts["num_layers"] == 3 and facts["hidden_size"] == 64
    assert facts["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert facts["memory_bytes"] >= 4 * facts["parameters"]
    assert facts["dtype"] == "float32" and facts["source"] == "local" and facts["gguf_file"] is None


@pytest.mark.parametrize(
    "make_config, family",
    [
        (lambda v: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=v), "qwen2"),
        (lambda v: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=v), "gpt2"),
    ],
)
def test_other_families_load(tmp_path, tiny_tokenizer, make_config, family):
    save_tiny_model(make_config(len(tiny_tokenizer)), tmp_path, tiny_tokenizer)
    loaded = load_model(str(tmp_path))
    assert loaded.arch.family == family
    assert loaded.num_layers == 2


def test_explicit_dtype(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert model_facts(loaded)["dtype"] == "bfloat16"


def test_dtype_choice_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16, float16"):
        load_model(tiny_llama_dir, dtype="int8")


def test_resolve_specs(tiny_llama_dir):
    hub = resolve_model_spec("HuggingFaceTB/SmolLM2-360M")
    assert (hub.kind, hub.path) == ("hub", "HuggingFaceTB/SmolLM2-360M")
    assert resolve_model_spec("gpt2").kind == "hub"
    local = resolve_model_spec(tiny_llama_dir)
    assert local.kind == "local" and local.gguf_file is None
    bundled = resolve_model_spec("SmolLM2")
    assert bundled.kind == "bundled" and bundled.name == "SmolLM2-135M-Instruct"
    assert os.path.isfile(bundled.gguf_path) and bundled.gguf_path.endswith(".Q4_1.gguf")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "No model given"),
        ("   ", "No model given"),
        ("./no_such_model", "No such file or folder"),
        ("/no/such/dir/model", "No such file or folder"),
        ("a/b/c", "No such file or folder"),
        ("missing.gguf", "No such GGUF file"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_model_spec(spec)


def test_folder_without_config(tmp_path):
    (tmp_path / "README.md").write_text("nothing here")
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        load_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_spec(str(path))


def test_unknown_hub_id_offline_fails_at_once():
    # conftest sets HF_HUB_OFFLINE=1: the hub counts as unreachable, only the local cache is read.
    start = time.monotonic()
    with pytest.raises(ValueError, match="Hub is not reachable .* 'no-such-org/no-such-model' is not in the local cache"):
        load_config("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="Pass a local folder or .gguf file"):
        load_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 5


def test_unknown_hub_id_online(monkeypatch):
    # a reachable hub that does not know the id: the "check the id" message
    import transformers

    monkeypatch.setattr("entrodrop.loading.hub_reachable", lambda *a, **k: True)

    def missing(*_args, **_kwargs):
        raise OSError("no-such-org/no-such-model is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", missing)
    with pytest.raises(ValueError, match="Could not find model 'no-such-org/no-such-model' on the Hugging Face Hub"):
        load_config("no-such-org/no-such-model")


def test_encoder_only_refused(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-only"):
        load_model(str(tmp_path))


def test_encoder_decoder_refused(tmp_path):
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_model(str(tmp_path))


def test_non_causal_refused(tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal decoder LM"):
        load_model(str(tmp_path))


def test_memory_check_before_weights(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(loading, "available_memory_bytes", lambda device: 1000)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load when memory is short")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(InsufficientMemoryError, match=r"needs about .* KiB .* has only 1000 B free.*device_map='auto' and an offload_folder"):
        load_model(tiny_llama_dir)


def test_estimate_model_bytes(tiny_llama_dir):
    config = load_config(tiny_llama_dir)
    dense = load_model(tiny_llama_dir).model
    num_params = sum(p.numel() for p in dense.parameters())
    assert loading.estimate_model_bytes(config, torch.float32) == 4 * num_params
    assert loading.estimate_model_bytes(config, torch.bfloat16) == 2 * num_params


def test_device_map_offload_to_disk(tiny_llama_dir, tmp_path, monkeypatch):
    dense = load_model(tiny_llama_dir)
    monkeypatch.setattr(loading, "available_memory_bytes", lambda device: 1000)  # no check with device_map
    offloaded = load_model(
        tiny_llama_dir, device_map="auto", max_memory={"cpu": "1KB"}, offload_folder=str(tmp_path / "offload")
    )
    assert "disk" in set(offloaded.model.hf_device_map.values())
    assert offloaded.device == torch.device("cpu")
    ids = torch.tensor([[1, 5, 9, 14]])
    torch.testing.assert_close(offloaded.model(ids).logits, dense.model(ids).logits)


def test_strip_gguf_quantization(tiny_llama_dir, tmp_path):
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    model = load_model(tiny_llama_dir).model
    # What a GGUF checkpoint loaded without dequantize=True carries: save_pretrained refuses it.
    model.config.quantization_config = GgufConfig(gguf_file="model.gguf")
    model.hf_quantizer = GgufHfQuantizer(model.config.quantization_config)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")

    strip_gguf_quantization(model)
    strip_gguf_quantization(model)  # idempotent
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in (tmp_path / "saved" / "config.json").read_text()


def test_model_cache_lru(tiny_llama_dir, tmp_path, tiny_tokenizer, monkeypatch):
    other_dir = str(save_tiny_model(tiny_llama_config(len(tiny_tokenizer)), tmp_path, tiny_tokenizer, seed=1))
    calls = []
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: calls.append(spec) or real_load(spec, **kw))

    cache = ModelCache(max_models=2)
    first = cache.get_or_load(tiny_llama_dir)
    assert cache.get_or_load(tiny_llama_dir) is first and calls == [tiny_llama_dir]
    assert cache.get_or_load(tiny_llama_dir + "/", dtype="float32", device="cpu") is first  # same key
    as_bf16 = cache.get_or_load(tiny_llama_dir, dtype="bfloat16")  # another key
    assert as_bf16 is not first and len(cache) == 2
    cache.get_or_load(tiny_llama_dir)  # touch: now the bf16 entry is least recently used
    cache.get_or_load(other_dir)
    assert len(cache) == 2
    assert ModelCache.make_key(tiny_llama_dir, "bfloat16") not in cache
    assert ModelCache.make_key(tiny_llama_dir) in cache


def test_model_cache_byte_budget_keeps_newest(tiny_llama_dir, tmp_path, tiny_tokenizer):
    other_dir = str(save_tiny_model(tiny_llama_config(len(tiny_tokenizer)), tmp_path, tiny_tokenizer, seed=1))
    cache = ModelCache(max_models=5, max_bytes=1)  # any model is over budget
    cache.get_or_load(tiny_llama_dir)
    newest = cache.get_or_load(other_dir)
    assert cache.keys() == [ModelCache.make_key(other_dir)]
    assert cache.get_or_load(other_dir) is newest


def test_model_cache_loads_once_under_concurrency(tiny_llama_dir, monkeypatch):
    calls = []
    real_load = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: calls.append(spec) or real_load(spec, **kw))
    cache = ModelCache()
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_load(tiny_llama_dir))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results) and len(results) == 4


@pytest.mark.slow
def test_bundled_model_facts(bundled_model):
    facts = model_facts(bundled_model)
    assert bundled_model.source == "bundled" and bundled_model.gguf_file.endswith(".gguf")
    assert facts["name"] == "SmolLM2-135M-Instruct"
    assert facts["architecture"] == "LlamaForCausalLM" and facts["family"] == "llama"
    assert facts["num_layers"] == 30 and facts["hidden_size"] == 576
    assert 130e6 < facts["parameters"] < 140e6
    assert bundled_model.tokenizer.chat_template
    assert bundled_model.tokenizer.pad_token is not None


@pytest.mark.slow
def test_bundled_model_saves_and_reloads(bundled_model, tmp_path):
    model = bundled_model.model
    strip_gguf_quantization(model)  # a no-op here: load_model asked transformers to de-quantise
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path)
    bundled_model.tokenizer.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path))
    assert reloaded.source == "local" and reloaded.num_layers == 30
    assert reloaded.tokenizer.chat_template == bundled_model.tokenizer.chat_template
    ids = bundled_model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, model(ids).logits)


@pytest.fixture(scope="module")
def subblock_export(tmp_path_factory, tiny_tokenizer):
    """A tiny llama exported with an attention and an MLP sub-block dropped (weights absent from the files)."""
    from tiny_models import LAYERS, tiny_model

    from entrodrop.export import export_pruned
    from entrodrop.plan import DropPlan

    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("export") / "pruned"
    result = export_pruned(model, tiny_tokenizer, DropPlan.parse("attn:1,mlp:2", LAYERS), out)
    assert result.ok, result.verdict
    return out, result


def _transformers_warnings():
    """Collects what transformers logs while loading (its loggers do not propagate to pytest's caplog)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    return records, handler


def test_subblock_export_loads_through_the_pruned_path(subblock_export):
    import logging

    from entrodrop.export import load_pruned

    out, result = subblock_export
    records, handler = _transformers_warnings()
    modeling_logger = logging.getLogger("transformers.modeling_utils")
    modeling_logger.addHandler(handler)
    try:
        loaded = load_model(str(out))
    finally:
        modeling_logger.removeHandler(handler)
    assert not [r for r in records if "newly initialized" in r.getMessage()]
    assert loaded.dropped_blocks == ("attn:1", "mlp:2")

    reference = load_pruned(out).eval()
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=0)

    facts = model_facts(loaded)
    assert facts["parameters"] == result.pruned_params < result.dense_params
    assert facts["dropped_blocks"] == ["attn:1", "mlp:2"]


def test_subblock_export_memory_estimate_is_the_pruned_models(subblock_export):
    out, result = subblock_export
    config = load_config(str(out))
    assert loading.estimate_model_bytes(config, torch.float32) == 4 * result.pruned_params


def test_plain_model_has_no_dropped_blocks(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    assert loaded.dropped_blocks == ()
    assert model_facts(loaded)["dropped_blocks"] == []


def test_subblock_export_on_the_hub_is_refused_before_weights(subblock_export, monkeypatch):
    out, _ = subblock_export
    config = load_config(str(out))
    monkeypatch.setattr(loading, "load_config", lambda *a, **k: config)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights must not load")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"EntroDrop export with sub-blocks dropped \(attn:1, mlp:2\).*local folder"):
        load_model("someone/pruned-model")


def _write_small_gguf(path):
    """A tiny but well-formed GGUF file (llama metadata, one tensor); its config reads."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"model\.gguf' is empty \(0 bytes\).*Download it again"),
        (b"GGU", r"model\.gguf' is not a GGUF file.*3 bytes"),
        (b"<html>Not found</html>" * 4, r"model\.gguf' is not a GGUF file: it does not start with the GGUF magic"),
    ],
)
def test_broken_gguf_files_refused_up_front(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))
    with pytest.raises(ValueError, match=message):
        load_model(str(path))
    with pytest.raises(ValueError, match=message):
        loading.check_gguf_file(path)


def test_truncated_gguf_names_the_file(tmp_path):
    whole = _write_small_gguf(tmp_path / "whole.gguf")
    load_config(str(whole))  # the intact file reads
    loading.check_gguf_file(whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"Could not read the GGUF file '.*cut\.gguf'.*truncated or corrupt.*download it again"):
        load_config(str(cut))


def test_a_gguf_config_parses_the_file_once(tmp_path, monkeypatch):
    """transformers' config reader and the RoPE check share one parse (a vocabulary's parse costs seconds)."""
    import gguf

    opened = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)  # as someone else's patch would be
    path = _write_small_gguf(tmp_path / "small.gguf")
    load_config(str(path))
    assert opened == [str(path)]
    assert gguf.GGUFReader is Counting  # given back what it was before the load, not the shared reader


def test_gguf_readers_are_shared_within_a_scope_and_its_thread_only(tmp_path):
    import gguf

    path = _write_small_gguf(tmp_path / "small.gguf")
    assert gguf_reader(path) is not gguf_reader(path)  # outside a scope: a fresh parse each time
    with gguf_parse_once():
        first = gguf_reader(path)
        assert gguf.GGUFReader(str(path)) is first  # what transformers' `from gguf import GGUFReader` gets
        with gguf_parse_once():  # nested: the outer scope's readers
            assert gguf_reader(path) is first
        elsewhere = []
        worker = threading.Thread(target=lambda: elsewhere.append(gguf.GGUFReader(str(path))))
        worker.start()
        worker.join()
        assert isinstance(elsewhere[0], gguf.gguf_reader.GGUFReader) and elsewhere[0] is not first
        writer = gguf.GGUFWriter(str(path), "llama")  # the file rewritten, longer: parsed again
        writer.add_tensor("token_embd.weight", np.ones((128, 32), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        again = gguf_reader(path)
        assert again is not first and again.tensors[0].shape.tolist() == [32, 128]
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map


@pytest.mark.parametrize(
    "config, limit, key",
    [
        (LlamaConfig(max_position_embeddings=256), 256, "max_position_embeddings"),
        (GPT2Config(n_positions=128), 128, "max_position_embeddings"),  # gpt2 maps it onto n_positions
    ],
)
def test_check_seq_len(config, limit, key):
    loading.check_seq_len(config, limit)
    assert loading.max_positions(config) == (key, limit)
    with pytest.raises(ValueError, match=rf"seq_len={limit + 1} is longer than the {limit} token positions.*"
                                         rf"{key}={limit}.*Use seq_len={limit} or less"):
        loading.check_seq_len(config, limit + 1)
    with pytest.raises(TypeError, match="seq_len must be an integer"):
        loading.check_seq_len(config, 12.5)


def test_check_seq_len_without_a_position_field():
    from transformers import PretrainedConfig

    loading.check_seq_len(PretrainedConfig(), 10**6)  # nothing to check against: accepted
    assert loading.max_positions(PretrainedConfig()) is None
