import itertools
import json
import logging
import re
import tempfile
import time

import pandas as pd
import pytest
import torch

from entrodrop.data import (
    TextCorpus,
    bundled_dataset_path,
    load_corpus,
    make_windows,
    mix_corpora,
    split_corpus,
)


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


PART_NAMES = ("calibration", "development", "report")


def test_split_is_deterministic_disjoint_and_60_20_20():
    corpus = load_corpus("gsm8k")
    parts = split_corpus(corpus)
    again = split_corpus(load_corpus("gsm8k"))
    assert list(parts) == list(PART_NAMES)
    assert all(parts[p].documents == again[p].documents for p in PART_NAMES)
    shares = {p: len(parts[p]) / len(corpus) for p in PART_NAMES}
    assert 0.55 < shares["calibration"] < 0.65
    assert 0.15 < shares["development"] < 0.25 and 0.15 < shares["report"] < 0.25
    assert sum(len(parts[p]) for p in PART_NAMES) == len(corpus)
    for a, b in itertools.combinations(PART_NAMES, 2):
        assert not set(parts[a].documents) & set(parts[b].documents)


def test_a_document_s_part_is_decided_by_its_content_alone():
    """A repeated document (other case or spacing) lands in one part, and a document keeps its part whatever
    corpus it is in and wherever it stands there."""
    from entrodrop.split import content_unit, part_of_unit

    docs = [f"Problem {i}: Natalia sold {i} clips in April and half as many in May." for i in range(60)]
    repeated = docs + ["  PROBLEM 7:   natalia sold 7 clips in april\nand half as many in may.  ", docs[3]]
    parts = split_corpus(TextCorpus("r", repeated))
    where = {p: {d.casefold().split()[1] for d in parts[p].documents} for p in PART_NAMES}
    for a, b in itertools.combinations(PART_NAMES, 2):
        assert not where[a] & where[b]  # no problem number in two parts
    shuffled = split_corpus(TextCorpus("s", list(reversed(docs[:40]))))
    for doc in docs[:40]:
        own = next(p for p in PART_NAMES if doc in parts[p].documents)
        assert doc in shuffled[own].documents and own == part_of_unit(content_unit(doc))


@pytest.mark.parametrize("num_docs", [3, 4, 5])
def test_split_small_corpora_gives_each_part_a_document(num_docs):
    parts = split_corpus(TextCorpus("small", [f"document {i}" for i in range(num_docs)]))
    assert all(parts[p].documents for p in PART_NAMES)
    assert sum(len(parts[p]) for p in PART_NAMES) == num_docs


def test_two_documents_give_a_calibration_and_a_report_part():
    parts = split_corpus(TextCorpus("two", ["first document", "second document"]))
    assert len(parts["calibration"]) == len(parts["report"]) == 1 and not parts["development"].documents


def test_a_mix_keeps_every_document_in_the_part_its_own_set_gives_it():
    sources = [load_corpus("gsm8k"), load_corpus("gpqa")]
    mixed = load_corpus("gsm8k+gpqa")
    assert mixed.documents == sources[0].documents + sources[1].documents
    parts = split_corpus(mixed)
    for part in PART_NAMES:
        own = [split_corpus(c)[part].documents for c in sources]
        assert parts[part].documents == own[0] + own[1], part
    # so windows of the mix's calibration part never hold a token of a source's report text
    small = [TextCorpus(name, [f"{name} document number {i} " * 3 for i in range(6)]) for name in ("a", "b")]
    assert split_corpus(mix_corpora("a+b", small))["report"].documents == [
        d for c in small for d in split_corpus(c)["report"].documents]
    with pytest.raises(ValueError, match="one distinct document"):
        mix_corpora("x", [TextCorpus("one", ["just this", "JUST  this"]), small[0]])


def test_split_single_document_by_characters():
    text = " ".join(f"word{i}" for i in range(200))
    parts = split_corpus(TextCorpus("one", [text]))
    cal, dev, rep = (parts[p].documents[0] for p in PART_NAMES)
    assert text.startswith(cal) and text.endswith(rep) and f" {dev} " in text
    assert f"{cal} {dev} {rep}" == text  # cut on whitespace boundaries, nothing lost, nothing twice
    assert 0.55 < len(cal) / len(text) < 0.65 and 0.15 < len(dev) / len(text) < 0.25


def test_windows_shape_and_seed(tiny_tokenizer):
    corpus = load_corpus("gpqa")
    windows = make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=0)
    assert windows.shape == (8, 32) and windows.dtype == torch.long
    assert torch.equal(windows, make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=0))
    assert not torch.equal(windows, make_windows(tiny_tokenizer, corpus, num_samples=8, seq_len=32, seed=1))
    assert len({tuple(w.tolist()) for w in windows}) == 8


def test_windows_of_each_part_come_from_that_part_s_documents(tiny_tokenizer):
    corpus = load_corpus("gpqa")
    parts = split_corpus(corpus)
    eos = tiny_tokenizer.eos_token_id
    streams = {p: _stream(tiny_tokenizer, parts[p]) for p in PART_NAMES}
    for part in PART_NAMES:
        windows = make_windows(tiny_tokenizer, corpus, num_samples=6, seq_len=24, part=part)
        for window in windows:
            # eos separates documents; look for the longest run of one document's tokens
            runs = torch.tensor_split(window, (window == eos).nonzero().flatten().tolist())
            piece = max((r[r != eos] for r in runs), key=len)
            assert _contains_window(streams[part], piece)
            assert not any(_contains_window(streams[other], piece) for other in PART_NAMES if other != part)
    # "heldout", the old name, is the report part
    assert torch.equal(make_windows(tiny_tokenizer, corpus, num_samples=3, seq_len=24, part="heldout"),
                       make_windows(tiny_tokenizer, corpus, num_samples=3, seq_len=24, part="report"))


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
    with pytest.raises(ValueError, match=r"The report text has only \d+ tokens; one window needs 256"):
        make_windows(tiny_tokenizer, corpus, num_samples=4, seq_len=256, part="report")


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


# -- undecodable text -------------------------------------------------------------------------------
LATIN1 = "Caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade.\n\nSecond paragraph \u00e0 la carte."


@pytest.mark.parametrize("name, content", [
    ("notes.txt", LATIN1),
    ("rows.jsonl", json.dumps({"text": LATIN1}, ensure_ascii=False) + "\n"),
    ("table.csv", "text\n\"" + LATIN1 + "\"\n"),
    ("rows.json", json.dumps([{"text": LATIN1}], ensure_ascii=False)),
])
def test_non_utf8_file_names_the_file_and_encoding(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not UTF-8 text: byte 0xe9 after '")
                       + r"[^']*Caf' .*encoding='utf-8'.*Save the file as UTF-8"):
        load_corpus(str(path))


# -- sequence length against the model --------------------------------------------------------------
def test_windows_refuse_seq_len_beyond_the_models_positions(tiny_tokenizer, monkeypatch):
    from transformers import GPT2Config, LlamaConfig

    corpus = load_corpus("gpqa")
    config = LlamaConfig(max_position_embeddings=64)
    assert make_windows(tiny_tokenizer, corpus, num_samples=2, seq_len=64, config=config).shape == (2, 64)
    monkeypatch.setattr("entrodrop.data._token_stream", lambda *a, **k: pytest.fail("tokenised before the check"))
    with pytest.raises(ValueError, match=r"seq_len=65 is longer than the 64 token positions.*Use seq_len=64 or less"):
        make_windows(tiny_tokenizer, corpus, num_samples=2, seq_len=65, config=config)
    with pytest.raises(ValueError, match=r"seq_len=4096 is longer than the 1024 token positions"):
        make_windows(tiny_tokenizer, corpus, num_samples=2, seq_len=4096, config=GPT2Config())


# -- hub names are never server paths ----------------------------------------------------------------
@pytest.fixture
def nothing_read(monkeypatch):
    """Fail the test if a local file or folder is read, or the hub (datasets) is asked."""
    import datasets

    import entrodrop.data as data

    def refuse(*_args, **_kwargs):
        raise AssertionError("a server path was read")

    for name in ("_load_file", "_load_folder", "_read_table", "_load_bundled"):
        monkeypatch.setattr(data, name, refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "load_from_disk", refuse)


REPO = str(__import__("pathlib").Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name, message", [
    ("/etc/passwd", "absolute path"),
    ("/etc", "absolute path"),
    (REPO, "absolute path"),
    ("~/.ssh", "home-folder path"),
    ("../secrets", r"'\.\.'"),
    ("owner/../../etc", r"'\.\.'"),
    ("C:\\Windows", "backslash"),
    ("..\\secrets", "backslash"),
    ("a/b/c", "not a Hugging Face data set name"),
    ("wikitext:../../etc", "not a valid configuration name"),
    ("csv", "file-format reader of the datasets library"),  # would read data_files from the server
    ("text:x", "file-format reader of the datasets library"),
    ("", "No data set name"),
])
def test_hub_only_refuses_paths_without_reading(nothing_read, name, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(name, hub_only=True)


@pytest.mark.parametrize("name", ["tests", "entrodrop", "tests/test_data.py", "pyproject.toml"])
def test_hub_only_answers_names_that_exist_on_the_server_as_hub_misses(nothing_read, monkeypatch, name):
    monkeypatch.chdir(REPO)  # relative names resolve against the server's working folder
    with pytest.raises(ValueError) as on_disk:
        load_corpus(name, hub_only=True)
    import datasets

    def not_on_the_hub(*args, **kwargs):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.chdir(tempfile.mkdtemp())  # the same name where nothing of it exists: the hub is asked
    monkeypatch.setattr(datasets, "load_dataset", not_on_the_hub)
    with pytest.raises(ValueError) as missing:
        load_corpus(name, hub_only=True)
    assert str(on_disk.value) == str(missing.value)  # no answer tells whether the server has such a file
    assert "does not have it or is not reachable" in str(on_disk.value)


def test_hub_only_loads_a_hub_name(monkeypatch, tmp_path):
    import datasets

    import entrodrop.data as data

    asked = []

    def fake_load_dataset(name, config, split, streaming):
        asked.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["hub doc one", "hub doc two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_load_file", lambda *a, **k: pytest.fail("read a local file"))
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus("Salesforce/wikitext:wikitext-2-raw-v1", hub_only=True)
    assert corpus.documents == ["hub doc one", "hub doc two"]
    assert asked == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train", True)]


def test_hub_only_does_not_take_bundled_aliases(monkeypatch):
    # "gsm8k" in the hub field means the hub's gsm8k, not the copy bundled on the server
    import datasets

    import entrodrop.data as data

    asked = []
    monkeypatch.setattr(data, "_load_bundled", lambda *a, **k: pytest.fail("read the bundled file"))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: asked.append(name) or
                        datasets.Dataset.from_dict({"text": ["from the hub"]}))
    assert load_corpus("gsm8k", hub_only=True).documents == ["from the hub"] and asked == ["gsm8k"]


def test_library_messages_speak_of_parameters(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_corpus(str(path))
    assert "column=" in str(info.value) and "--column" not in str(info.value)


def test_window_capacity_counts_each_part_and_offers_a_length_that_fits(tiny_tokenizer):
    from entrodrop.data import window_capacity

    corpus = TextCorpus("notes", [f"Paragraph {i}: entropy of hidden states rises over later layers." for i in range(20)])
    corpus = TextCorpus("notes", [f"Paragraph {i}: entropy of hidden states rises over later layers." for i in range(40)])
    parts = split_corpus(corpus)
    cap = window_capacity(tiny_tokenizer, corpus, 64)
    # make_windows' stream: the documents' tokens with one eos between documents
    for part in PART_NAMES:
        assert getattr(cap, f"{part}_tokens") == _stream(tiny_tokenizer, parts[part]).numel() + len(parts[part]) - 1
        assert cap.windows(part) == getattr(cap, f"{part}_tokens") // 64
    fit = cap.fitting_seq_len(8, step=16)
    assert fit % 16 == 0 and fit * 8 <= cap.calibration_tokens and fit <= cap.report_tokens
    refit = window_capacity(tiny_tokenizer, corpus, fit)
    refit.check(8, step=16)  # the offered length really fits
    assert refit.calibration_windows >= 8 and refit.report_windows >= 1
    with pytest.raises(ValueError, match=f"{cap.calibration_windows} window\\(s\\) of 64, not the 40 asked for. "
                                         "Use 16 tokens per window"):
        cap.check(40, step=16)
    with pytest.raises(ValueError, match="not the 1000 asked for. Give more text"):
        cap.check(1000)
    short = window_capacity(tiny_tokenizer, TextCorpus("x", ["a b c d e f", "g h"]), 8)
    with pytest.raises(ValueError, match="report part has .* less than one window .* Give more text"):
        short.check(1, minimum=8)
    with pytest.raises(ValueError, match="at least 2"):
        window_capacity(tiny_tokenizer, corpus, 1)


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tiny_tokenizer):
    """Gemma's tokenizer puts BOS before every text and the model is far off without it (dense perplexity
    ~400 on gsm8k): its windows start with BOS; a tokenizer that adds none gets none."""
    from conftest import build_tiny_tokenizer

    from entrodrop.data import window_capacity, window_prefix

    with_bos = build_tiny_tokenizer(bos="<bos>")
    bos = with_bos.bos_token_id
    assert window_prefix(with_bos) == [bos] and window_prefix(tiny_tokenizer) == []
    corpus = load_corpus("gpqa")
    windows = make_windows(with_bos, corpus, num_samples=6, seq_len=32, part="report")
    assert windows.shape == (6, 32) and (windows[:, 0] == bos).all() and not (windows[:, 1:] == bos).any()
    plain = make_windows(tiny_tokenizer, corpus, num_samples=6, seq_len=32, part="report")
    assert not (plain[:, 0] == bos).all()
    # the capacity counts what make_windows takes: seq_len - 1 text tokens per window
    cap = window_capacity(with_bos, corpus, 32)
    assert cap.prefix == 1 and cap.windows("report") == cap.report_tokens // 31
    assert make_windows(with_bos, corpus, num_samples=10 ** 6, seq_len=32, part="report").shape[0] == cap.report_windows
