"""Calibration and evaluation text: bundled sets, local files, `datasets` sets, pasted text.

A corpus is a list of documents. :func:`split_corpus` splits it into three disjoint parts by each
document's content (:mod:`entrodrop.split`): ``calibration`` (what the method reads), ``development``
(what defaults and the trade-off sweep may be tuned on) and ``report`` (what checks and published
results are measured on), with no seed, so every tool that sees the same corpus agrees on which text
it may choose on and which it reports on. :func:`make_windows` turns one part into fixed-length token
windows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from entrodrop.bundled import BUNDLED_DATASETS, BUNDLED_MIXES, DATASET_FILES, bundled_dataset_path  # noqa: F401
from entrodrop.loading import check_seq_len, looks_like_path
from entrodrop.split import ALL, PARTS, assign_parts, resolve_part, split_text

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".md", ".text")
TABLE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# A Hugging Face data set id, "NAME" or "OWNER/NAME", and a configuration name (after ":").
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_CONFIG = re.compile(r"^[\w.+-]+$")
HUB_NAME_EXAMPLE = "wikitext:wikitext-2-raw-v1"
HUB_MAX_DOCUMENTS = 50_000  # hub sets are streamed; stop after this many documents


@dataclass
class TextCorpus:
    """Named list of non-empty documents."""

    name: str
    documents: list[str]
    parts: tuple[str, ...] | None = None  # each document's part when fixed by the sources (a mix)

    def __len__(self) -> int:
        return len(self.documents)


def _make_corpus(name: str, documents: Iterable) -> TextCorpus:
    docs = [d.strip() for d in documents if isinstance(d, str) and d.strip()]
    if not docs:
        raise ValueError(f"'{name}' has no non-empty text. Give a source with some text in it.")
    return TextCorpus(name, docs)


def _paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def _pick_column(name: str, available: list[str], string_columns: list[str], column: str | None) -> str:
    """``column`` if present; else "text"; else the only string column; else a ValueError."""
    listing = ", ".join(available)
    if column is not None:
        if column not in available:
            raise ValueError(f"Column '{column}' not found in '{name}'. Available columns: {listing}.")
        return column
    if "text" in available:
        return "text"
    if len(string_columns) == 1:
        return string_columns[0]
    found = f"{len(string_columns)} text columns" if string_columns else "no text column"
    raise ValueError(
        f"'{name}' has {found}; choose one with column=. Available columns: {listing}."
    )


def _documents_from_frame(name: str, frame, column: str | None) -> TextCorpus:
    from pandas.api.types import is_string_dtype

    available = [str(c) for c in frame.columns]
    string_columns = [str(c) for c in frame.columns if is_string_dtype(frame[c])]
    return _make_corpus(name, frame[_pick_column(name, available, string_columns, column)].tolist())


def _documents_from_rows(name: str, dataset, column: str | None) -> TextCorpus:
    """Documents from a ``datasets`` Dataset or IterableDataset, read row by row (streams stay streams)."""
    rows = iter(dataset)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"'{name}' has no rows. Give a source with some text in it.")
    features = getattr(dataset, "features", None)
    if features:
        string_columns = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    else:
        string_columns = [c for c, v in first.items() if isinstance(v, str)]
    chosen = _pick_column(name, list(first), string_columns, column)
    texts = (row.get(chosen) for row in itertools.chain([first], rows))
    non_empty = (t for t in texts if isinstance(t, str) and t.strip())
    docs = list(itertools.islice(non_empty, HUB_MAX_DOCUMENTS))
    if len(docs) == HUB_MAX_DOCUMENTS:
        logger.warning("'%s': using the first %d documents only.", name, HUB_MAX_DOCUMENTS)
    return _make_corpus(name, docs)


def _read_table(path: Path):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            return pd.DataFrame(json.load(f))
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    return pd.read_parquet(path)


def mix_corpora(name: str, corpora: Iterable[TextCorpus]) -> TextCorpus:
    """One corpus of the documents of several, each document keeping the part it has in its own corpus, so
    a choice made on the mix's calibration part is never scored on text any source reports on."""
    documents: list[str] = []
    parts: list[str] = []
    for corpus in corpora:
        own = document_parts(corpus)
        if own is None:
            raise ValueError(f"'{corpus.name}' has one distinct document; a mix needs sources of two or more.")
        parts.extend(own)
        documents.extend(corpus.documents)
    return TextCorpus(name, documents, tuple(parts))


def _load_bundled(name: str, column: str | None) -> TextCorpus:
    if name in BUNDLED_MIXES:
        return mix_corpora(name, (_load_bundled(part, column) for part in BUNDLED_MIXES[name]))
    frame = _read_table(bundled_dataset_path(name))
    if column is not None:
        return _documents_from_frame(name, frame, column)
    fields = list(DATASET_FILES[name][1])
    joined = frame[fields].fillna("").astype(str).agg("\n".join, axis=1)
    return _make_corpus(name, joined.tolist())


def _undecodable(path: Path, err: UnicodeDecodeError) -> ValueError:
    """A message that names the file, the encoding tried and the offending byte with the text before it.

    Readers decode in chunks, so ``err.start`` is not a file offset: show the context instead."""
    bad = err.object[err.start:err.start + 1]
    before = err.object[max(0, err.start - 24):err.start].decode("utf-8", "replace").splitlines()
    context = f" after {before[-1]!r}" if before and before[-1] else ""
    return ValueError(
        f"'{path}' is not UTF-8 text: byte 0x{bad.hex()}{context} cannot be decoded (encoding='utf-8' was tried; "
        f"{err.reason}). Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`, or 'Save as UTF-8' in an "
        "editor) and load it again."
    )


def _load_file(path: Path, column: str | None) -> TextCorpus:
    try:
        return _read_file(path, column)
    except UnicodeDecodeError as err:  # a ValueError too, but one that names neither the file nor a remedy
        raise _undecodable(path, err) from err


def _read_file(path: Path, column: str | None) -> TextCorpus:
    suffix = path.suffix.lower()
    if suffix in TEXT_EXTENSIONS:
        if column is not None:
            logger.warning("'%s' is plain text; ignoring column=%r.", path.name, column)
        return _make_corpus(path.name, _paragraphs(path.read_text(encoding="utf-8")))
    if suffix in TABLE_EXTENSIONS:
        return _documents_from_frame(path.name, _read_table(path), column)
    raise ValueError(
        f"Unsupported file type '{suffix or path.name}'. Use one of "
        f"{', '.join(TEXT_EXTENSIONS + TABLE_EXTENSIONS)}, or a folder written by Dataset.save_to_disk."
    )


def _select_split(name: str, dataset, split: str | None):
    """One split of a DatasetDict: ``split``, else "train", else the first."""
    if not hasattr(dataset, "keys"):
        return dataset
    splits = list(dataset.keys())
    if split is not None and split not in splits:
        raise ValueError(f"'{name}' has no split '{split}'. Available splits: {', '.join(splits)}.")
    return dataset[split or ("train" if "train" in splits else splits[0])]


def _load_folder(path: Path, column: str | None, split: str | None) -> TextCorpus:
    import datasets

    name = path.name
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))  # written by (Dataset|DatasetDict).save_to_disk
    else:
        try:  # a folder of data files: let `datasets` pick the format
            dataset = datasets.load_dataset(str(path), split=split, streaming=True)
        except Exception as err:
            raise ValueError(f"Could not read folder '{path}' as a data set: {err}") from err
    return _documents_from_rows(name, _select_split(name, dataset, split), column)


def check_hub_dataset_name(source: str) -> tuple[str, str | None]:
    """``(name, config)`` of a Hugging Face data set name ``"NAME"``, ``"OWNER/NAME"`` or ``"...:CONFIG"``;
    ValueError for anything that could reach the server's own files.

    Refused: absolute, home-folder and ``..`` paths, anything not shaped like a hub id, the names of
    `datasets`' file-format builders (``csv``, ``json``, ``text``, ...: they read local files), and
    names that exist as a file or folder relative to the working folder (`datasets` would read those
    instead of asking the hub; refused with the message of a hub miss, so the answer never tells whether
    such a file exists). The last check is one ``lstat``; nothing is opened or listed.
    """
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    text = (source or "").strip()
    never = (f"With hub_only=True the source is a Hugging Face data set name such as '{HUB_NAME_EXAMPLE}' "
             "('NAME', 'OWNER/NAME', optionally ':CONFIG'), never a file on this server; for your own text, "
             "upload a file, paste it, or pick a bundled set.")
    if not text:
        raise ValueError(f"No data set name given. {never}")
    if "\\" in text:
        raise ValueError(f"'{text}' contains a backslash, which data set names never do. {never}")
    name, sep, config = text.partition(":")
    if name.startswith("/"):
        raise ValueError(f"'{text}' is an absolute path. {never}")
    if name.startswith("~"):
        raise ValueError(f"'{text}' is a home-folder path. {never}")
    if ".." in name:
        raise ValueError(f"'{text}' contains '..', which data set names never do. {never}")
    if not _HUB_DATASET_ID.match(name):
        raise ValueError(f"'{text}' is not a Hugging Face data set name. {never}")
    if sep and not _HUB_CONFIG.match(config):
        raise ValueError(f"'{config}' is not a valid configuration name (after ':' in '{text}'). {never}")
    if name.lower() in _PACKAGED_DATASETS_MODULES:
        raise ValueError(f"'{name}' is a file-format reader of the datasets library, not a data set. {never}")
    if os.path.lexists(name):  # `datasets` would read it instead of asking the hub; answered as a hub miss
        raise ValueError(_hub_miss(text))
    return name, config or None


def _hub_miss(source: str) -> str:
    """The one answer to a hub-only data set name that cannot be loaded, whatever the reason (so it never
    tells whether a file of that name exists on the server)."""
    return (f"Could not load the Hugging Face data set '{source}': the hub does not have it or is not reachable from "
            f"this server. Check the name (e.g. '{HUB_NAME_EXAMPLE}'), or upload a file, paste text or pick a "
            "bundled set.")


def _load_hub(source: str, column: str | None, split: str | None, *, hub_only: bool = False) -> TextCorpus:
    import datasets

    name, _, config = source.partition(":")
    try:
        # Streamed, so a large set such as C4 is read only as far as needed.
        dataset = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as err:  # DatasetNotFoundError, ConnectionError, offline mode, unknown split...
        if hub_only:
            logger.info("Hub data set %r not loaded: %s: %s", source, type(err).__name__, err)
            raise ValueError(_hub_miss(source)) from err
        what = "it is not a bundled set or a local file, and "
        raise ValueError(
            f"Could not load '{source}': {what}loading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). The hub may be unreachable or the name wrong. Bundled sets: "
            f"{', '.join(BUNDLED_DATASETS)}; or give a {'/'.join(TEXT_EXTENSIONS + TABLE_EXTENSIONS)} file, "
            "or paste text."
        ) from err
    return _documents_from_rows(source, dataset, column)


def load_corpus(
    source: str,
    *,
    column: str | None = None,
    text: str | None = None,
    split: str | None = None,
    hub_only: bool = False,
) -> TextCorpus:
    """Load text from a bundled set, a local file or folder, a hub set ("NAME" or "NAME:CONFIG"),
    or, with ``source="text"``, from ``text`` itself (blank lines separate documents).

    ``column`` picks the field of table-like sources (default: "text", else the only string
    field); ``split`` the split of `datasets` sources (default "train", else the first).

    ``hub_only=True`` says ``source`` is a Hugging Face data set name typed by someone who must not
    reach this machine's files (the web app's hub field): bundled aliases, local paths and pasted
    text are not considered, and :func:`check_hub_dataset_name` refuses anything path-like before
    the file system or the network is touched; a name that cannot be loaded, for whatever reason, gets one
    message.
    """
    if hub_only:
        name, config = check_hub_dataset_name(source)
        return _load_hub(f"{name}:{config}" if config else name, column, split, hub_only=True)
    if source == "text":
        if not text or not text.strip():
            raise ValueError("The text is empty. Paste some text, or pick a data set.")
        return _make_corpus("text", _paragraphs(text))
    key = (source or "").strip()
    if not key:
        raise ValueError(f"No data source given. Use one of {', '.join(BUNDLED_DATASETS)}, a file, or text.")
    if key.lower() in BUNDLED_DATASETS:
        return _load_bundled(key.lower(), column)
    path = Path(key).expanduser()
    if path.is_file():
        return _load_file(path, column)
    if path.is_dir():
        return _load_folder(path, column, split)
    if looks_like_path(key, TEXT_EXTENSIONS + TABLE_EXTENSIONS):
        raise ValueError(f"No such file or folder: '{source}'. Check the path.")
    return _load_hub(key, column, split)


def document_parts(corpus: TextCorpus) -> list[str] | None:
    """The part of every document (:func:`entrodrop.split.assign_parts`, or as a mix's sources fixed them);
    None for a corpus of one distinct document, which :func:`split_corpus` cuts by characters."""
    if corpus.parts is not None:
        return list(corpus.parts)
    return assign_parts(corpus.documents)


def split_corpus(corpus: TextCorpus) -> dict[str, TextCorpus]:
    """The deterministic ``{"calibration", "development", "report"}`` parts of ``corpus``, the same for every
    caller and seed (:mod:`entrodrop.split`: by a hash of each document's normalised text; one distinct
    document is cut at 60% and 80% of its characters, on whitespace)."""
    parts = document_parts(corpus)
    if parts is None:
        pieces = split_text(corpus.documents[0]) if corpus.documents else dict.fromkeys(PARTS, "")
        return {part: TextCorpus(f"{corpus.name} ({part})", [pieces[part]] if pieces[part] else []) for part in PARTS}
    return {part: TextCorpus(f"{corpus.name} ({part})", [d for d, p in zip(corpus.documents, parts, strict=True)
                                                          if p == part]) for part in PARTS}


def _corpus_part(corpus: TextCorpus, part: str) -> TextCorpus:
    part = resolve_part(part)
    return corpus if part == ALL else split_corpus(corpus)[part]


_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_SIZE = 8
_TOKEN_CACHE_LOCK = threading.Lock()


def _corpus_fingerprint(corpus: TextCorpus) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for doc in corpus.documents:
        digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    if corpus.parts is not None:  # a mix: the parts are fixed by its sources
        digest.update(repr(corpus.parts).encode())
    return digest.hexdigest()


def _token_stream(tokenizer, corpus: TextCorpus, part: str) -> torch.Tensor:
    """All documents of ``part`` tokenised and joined with eos between them; shape (num_tokens,)."""
    part = resolve_part(part)
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           corpus.name, part, _corpus_fingerprint(corpus))
    with _TOKEN_CACHE_LOCK:
        if key in _TOKEN_CACHE:
            _TOKEN_CACHE.move_to_end(key)
            return _TOKEN_CACHE[key]
    docs = _corpus_part(corpus, part).documents
    ids: list[int] = []
    if docs:
        # One batch call: fast tokenizers encode the whole list in parallel.
        encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, doc_ids in enumerate(encoded):
            ids.extend(sep if i else [])
            ids.extend(doc_ids)
    stream = torch.tensor(ids, dtype=torch.long)
    with _TOKEN_CACHE_LOCK:
        _TOKEN_CACHE[key] = stream
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    return stream


def window_prefix(tokenizer) -> list[int]:
    """The ids each window starts with: ``[bos]`` where the tokenizer puts BOS before every text (Gemma, far
    off without it: dense perplexity ~400 on gsm8k), else none (SmolLM2, GPT-2 style tokenizers)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
    return [int(bos)] if probe and probe[0] == bos else []


def make_windows(
    tokenizer,
    corpus: TextCorpus,
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    part: str = "calibration",
    config=None,
) -> torch.LongTensor:
    """``num_samples`` random non-overlapping token windows of ``seq_len`` from one part of ``corpus``
    (``calibration``, ``development``, ``report`` or ``all``; ``heldout`` is the old name of ``report``).

    Returns shape (N, seq_len) with N = num_samples, or fewer (with a warning) when the text
    holds fewer windows. Each window starts with the tokenizer's BOS where it adds one to every text
    (:func:`window_prefix`), then ``seq_len`` minus that many tokens of text. Deterministic for a given seed. ``config``, the config of the model the
    windows are for, makes ``seq_len`` beyond its positions a ValueError before any tokenising
    (:func:`~entrodrop.loading.check_seq_len`); pass it whenever the model is known.
    """
    if config is not None:
        check_seq_len(config, seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens (got {seq_len}).")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1 (got {num_samples}).")
    part = resolve_part(part)
    stream = _token_stream(tokenizer, corpus, part)  # (num_tokens,)
    prefix = window_prefix(tokenizer)
    body = seq_len - len(prefix)  # text tokens per window
    num_windows = stream.numel() // body
    if num_windows == 0:
        raise ValueError(
            f"The {part} text has only {stream.numel()} tokens; one window needs {body}. "
            "Give more text or a shorter sequence length."
        )
    if num_windows < num_samples:
        logger.warning(
            "The %s text of '%s' holds only %d windows of %d tokens; using all of them instead of %d.",
            part, corpus.name, num_windows, seq_len, num_samples,
        )
    windows = stream[: num_windows * body].view(num_windows, body)  # (W, T - len(prefix))
    if prefix:
        windows = torch.cat([torch.tensor(prefix, dtype=windows.dtype).expand(num_windows, -1), windows], dim=1)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_windows, generator=generator)[:num_samples]
    return windows[chosen]  # (N, T), a copy



@dataclass(frozen=True)
class WindowCapacity:
    """How many disjoint windows of ``seq_len`` tokens each part of a corpus holds."""

    seq_len: int
    calibration_tokens: int
    development_tokens: int
    report_tokens: int
    prefix: int = 0  # tokens each window starts with that are not text (the BOS of :func:`window_prefix`)

    def windows(self, part: str) -> int:
        """Disjoint windows of ``seq_len`` in ``part``."""
        return getattr(self, f"{resolve_part(part)}_tokens") // (self.seq_len - self.prefix)

    @property
    def calibration_windows(self) -> int:
        return self.windows("calibration")

    @property
    def development_windows(self) -> int:
        return self.windows("development")

    @property
    def report_windows(self) -> int:
        return self.windows("report")

    def fitting_seq_len(self, samples: int, *, step: int = 1, minimum: int = 2) -> int | None:
        """The longest window (a multiple of ``step``, at least ``minimum``) at which the calibration part
        holds ``samples`` windows and the report part at least one; None when none does."""
        longest = min(self.calibration_tokens // max(samples, 1), self.report_tokens) + self.prefix
        longest -= longest % max(step, 1)
        return longest if longest >= minimum else None

    def check(self, samples: int, *, step: int = 1, minimum: int = 2) -> None:
        """ValueError unless the calibration part holds ``samples`` windows and the report part one (so a
        check is never scored on text a choice was made on); the message offers the window length that fits."""
        problems = []
        if self.calibration_windows < samples:
            problems.append(f"its calibration part has {self.calibration_tokens:,} tokens: "
                            f"{self.calibration_windows} window(s) of {self.seq_len}, not the {samples} asked for")
        if self.report_windows < 1:
            problems.append(f"its report part has {self.report_tokens:,} tokens, less than one window of "
                            f"{self.seq_len}, so a check could not be scored on text no choice was made on")
        if not problems:
            return
        fit = self.fitting_seq_len(samples, step=step, minimum=minimum)
        remedy = (f"Use {fit} tokens per window (fits {samples} calibration windows and a report one), ask for "
                  f"{max(self.calibration_windows, 1)} sample(s), or give more text."
                  if fit else "Give more text (a few paragraphs more), or pick a bundled set.")
        raise ValueError(f"The text does not fit: {'; '.join(problems)}. {remedy}")


def window_capacity(tokenizer, corpus: TextCorpus, seq_len: int) -> WindowCapacity:
    """Tokens and disjoint ``seq_len`` windows in each part of ``corpus`` (the :func:`split_corpus` parts,
    tokenised as :func:`make_windows` does), so a front end can say before calibrating what the text holds
    instead of using fewer windows than asked."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens (got {seq_len}).")
    return WindowCapacity(seq_len, *(_token_stream(tokenizer, corpus, part).numel() for part in PARTS),
                          prefix=len(window_prefix(tokenizer)))  # seq_len >= 2 > the prefix of at most one BOS
