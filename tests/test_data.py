import json
import logging
import time

import pandas as pd
import pytest
import torch

from entrodrop.data import TextCorpus, bundled_dataset_path, load_corpus, make_windows, split_corpus


def _contains_window(stream: torch.Tensor, window: torch.Tensor) -> bool:
    if stream.numel() < window.numel():
        return False
    return bool((stream.unfold(0, window.numel(), 1) == window).all(dim=1).any())


def _stream(tokenizer, corpus: TextCorpus) -> torch.Tensor:
    ids = tokenizer(corpus.documents, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc])


def test_bundled_gsm8k():
    corpus = load_corpus("gsm8k")
    assert len(corpus.documents) == 1319
    first = corpus.documents[0]
    assert first.startswith("Janet") and "\n" in first and "#### 18" in first  # question + answer


def test_bundled_gpqa():
    corpus = load_corpus("GPQA")
    assert 190 <= len(corpus.documents) <= 200
    frame = pd.read_csv(bundled_dataset_path("gpqa"))
    row = frame.iloc[0]
    assert corpus.documents[0].startswith(row["Question"].strip())
    assert row["Correct Answer"].strip() in corpus.documents[0]
    # a column choice reads just that column
    answers = load_corpus("gpqa", column="Correct Answer")
    assert answers.documents[0] == row["Correct Answer"].strip()


def test_split_is_deterministic_disjoint_and_about_20_percent():
    corpus = load_corpus("gsm8k")
    calibration, heldout = split_corpus(corpus)
    again = split_corpus(load_corpus("gsm8k"))
    assert calibration.documents == again[0].documents and heldout.documents == again[1].documents
    assert 0.15 < len(heldout.documents) / len(corpus.documents) < 0.25
    assert len(calibration.documents) + len(heldout.documents) == len(corpus.documents)
    assert not set(calibration.documents) & set(heldout.documents)


@pytest.mark.parametrize("num_docs", [2, 3, 5])
def test_split_small_corpora_gives_each_part_a_document(num_docs):
    calibration, heldout = split_corpus(TextCorpus("small", [f"document {i}" for i in range(num_docs)]))
    assert calibration.documents and heldout.documents
    assert len(calibration.documents) + len(heldout.documents) == num_docs


def test_split_single_document_by_characters():
    text = " ".join(f"word{i}" for i in range(200))
    calibration, heldout = split_corpus(TextCorpus("one", [text]))
    cal, held = calibration.documents[0], heldout.documents[0]
    assert text.startswith(cal) and text.endswith(held)
    assert text[len(cal)] == " "  # cut on a whitespace boundary, not inside a word
    assert 0.75 < len(cal) / len(text) < 0.85


def test_windows_shape_and_seed(tiny_tokenizer):
    corpus = load_corpus("gpqa")
    windows = make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=0)
    assert windows.shape == (8, 32) and windows.dtype == torch.long
    assert torch.equal(windows, make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=0))
    assert not torch.equal(windows, make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=1))
    assert len({tuple(w.tolist()) for w in windows}) == 8


def test_heldout_windows_come_from_heldout_documents(tiny_tokenizer):
    corpus = load_corpus("gpqa")
    calibration, heldout = split_corpus(corpus)
    eos = tiny_tokenizer.eos_token_id
    calibration_stream, heldout_stream = _stream(tiny_tokenizer, calibration), _stream(tiny_tokenizer, heldout)
    for part, own, other in (("heldout", heldout_stream, calibration_stream),
                             ("calibration", calibration_stream, heldout_stream)):
        windows = make_windows(tiny_tokenizer, corpus, num_samples=6, seq_len=24, part=part)
        for window in windows:
            # eos separates documents; look for the longest run of one document's tokens
            runs = torch.tensor_split(window, (window == eos).nonzero().flatten().tolist())
            piece = max((r[r != eos] for r in runs), key=len)
            assert _contains_window(own, piece)
            assert not _contains_window(other, piece)


def test_gsm8k_tokenises_fast(tiny_tokenizer):
    corpus = load_corpus("gsm8k")
    start = time.perf_counter()
    windows = make_windows(tiny_tokenizer, corpus, num_samples=64, seq_len=128)
    assert windows.shape == (64, 128)
    assert time.perf_counter() - start < 10
    start = time.perf_counter()
    make_windows(tiny_tokenizer, corpus, num_samples=64, seq_len=128, seed=3)  # cached token stream
    assert time.perf_counter() - start < 1


def test_fewer_windows_than_asked_returns_all(tiny_tokenizer, caplog):
    corpus = load_corpus("text", text="one two three four five six seven eight nine ten " * 20)
    with caplog.at_level(logging.WARNING, logger="entrodrop.data"):
        windows = make_windows(tiny_tokenizer, corpus, num_samples=1000, seq_len=16)
    assert 1 <= windows.shape[0] < 1000
    assert "using all of them" in caplog.text


def test_too_short_text(tiny_tokenizer):
    corpus = load_corpus("text", text="Short text here.\n\nAnother short paragraph.")
    with pytest.raises(ValueError, match=r"The heldout text has only \d+ tokens; one window needs 256"):
        make_windows(tiny_tokenizer, corpus, num_samples=4, seq_len=256, part="heldout")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 4, "seq_len": 1}, "seq_len"),
    ({"num_samples": 0, "seq_len": 16}, "num_samples"),
    ({"num_samples": 4, "seq_len": 16, "part": "test"}, "Unknown part"),
])
def test_window_argument_errors(tiny_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_windows(tiny_tokenizer, load_corpus("gpqa"), **kwargs)


def test_pasted_text_paragraphs():
    corpus = load_corpus("text", text="First paragraph.\nStill first.\n\n  \n\nSecond paragraph.\n")
    assert corpus.documents == ["First paragraph.\nStill first.", "Second paragraph."]


@pytest.mark.parametrize("text", [None, "", "  \n\n \n"])
def test_empty_text(text):
    with pytest.raises(ValueError, match="text is empty"):
        load_corpus("text", text=text)


def test_txt_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Alpha beta.\n\nGamma delta.\n\n\nEpsilon.", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.name == "notes.txt"
    assert corpus.documents == ["Alpha beta.", "Gamma delta.", "Epsilon."]


def test_jsonl_default_text_field_and_column_choice(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "doc one", "title": "t1", "n": 1}, {"text": "", "title": "t2", "n": 2},
            {"text": "doc three", "title": "t3", "n": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_corpus(str(path)).documents == ["doc one", "doc three"]  # empty strings dropped
    assert load_corpus(str(path), column="title").documents == ["t1", "t2", "t3"]


def test_only_string_field_is_the_default(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "hello there", "n": 1}\n{"body": "general", "n": 2}\n', encoding="utf-8")
    assert load_corpus(str(path)).documents == ["hello there", "general"]


def test_ambiguous_fields_list_the_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="choose one with column=.*Available columns: question, answer"):
        load_corpus(str(path))


def test_csv_column_and_missing_column(tmp_path):
    path = tmp_path / "table.csv"
    pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}).to_csv(path, index=False)
    assert load_corpus(str(path), column="completion").documents == ["c1", "c2"]
    with pytest.raises(ValueError, match="Column 'body' not found.*Available columns: prompt, completion"):
        load_corpus(str(path), column="body")


def test_parquet(tmp_path):
    path = tmp_path / "table.parquet"
    pd.DataFrame({"text": ["a parquet doc", "another"], "score": [0.1, 0.2]}).to_parquet(path)
    assert load_corpus(str(path)).documents == ["a parquet doc", "another"]


def test_file_with_only_empty_strings(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_corpus(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"%PDF")
    with pytest.raises(ValueError, match="Unsupported file type '.pdf'"):
        load_corpus(str(path))


def test_missing_file():
    with pytest.raises(ValueError, match="No such file or folder"):
        load_corpus("./no_such_file.txt")


def test_saved_dataset_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["saved one", "saved two"], "id": [1, 2]}).save_to_disk(tmp_path / "ds")
    corpus = load_corpus(str(tmp_path / "ds"))
    assert corpus.name == "ds" and corpus.documents == ["saved one", "saved two"]

    DatasetDict({
        "validation": Dataset.from_dict({"content": ["val doc"]}),
        "train": Dataset.from_dict({"content": ["train doc", "train doc 2"]}),
    }).save_to_disk(tmp_path / "dd")
    assert load_corpus(str(tmp_path / "dd")).documents == ["train doc", "train doc 2"]
    assert load_corpus(str(tmp_path / "dd"), split="validation").documents == ["val doc"]
    with pytest.raises(ValueError, match="no split 'test'. Available splits: validation, train"):
        load_corpus(str(tmp_path / "dd"), split="test")


def test_folder_of_data_files_is_streamed(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "part.jsonl").write_text('{"text": "streamed a"}\n{"text": "streamed b"}\n', encoding="utf-8")
    assert load_corpus(str(folder)).documents == ["streamed a", "streamed b"]


def test_unknown_hub_name_is_a_clear_error():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"hub may be unreachable or the name wrong\. Bundled sets: gsm8k, gpqa"):
        load_corpus("no_such_dataset_xyz:some_config")
    assert time.perf_counter() - start < 30  # offline mode: no network retries
