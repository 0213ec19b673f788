"""A transformers tokenizer as the vocabulary llama.cpp reads from a GGUF file (``tokenizer.ggml.*``), for
:mod:`.gguf_convert`. Two kinds are written, each only where llama.cpp would tokenize as the tokenizer does;
anything else is refused with the reason (a file that loads and tokenizes differently is worse than none):

* **byte-level BPE** (``tokenizer.ggml.model`` ``gpt2``; Llama-family checkpoints): vocabulary and merges, and
  the pre-tokenizer by the name llama.cpp knows. llama.cpp picks the regular expressions that split text
  before BPE from ``tokenizer.ggml.pre`` alone (read in its ``llama-vocab.cpp``), so the name must be the one
  whose expressions the tokenizer's own pre-tokenizer runs. Three are recognised from the structure of
  ``tokenizer.json``'s ``pre_tokenizer``: GPT-2's byte-level expression alone is ``gpt-2``; digits split one
  by one and then that expression is ``smollm`` (SmolLM, StarCoder); Llama 3's expression as a ``Split`` step
  and then byte-level without its own expression is ``llama-bpe``, which llama.cpp runs with whole-piece
  lookup before merging (the BPE model's ``ignore_merges``, required to match).
* **SentencePiece BPE** (``tokenizer.ggml.model`` ``llama``; Gemma 3): ``tokenizer.json`` holds it as a BPE
  model with byte fallback behind a normaliser that spells spaces ``▁``. llama.cpp's SentencePiece tokenizer
  merges the adjacent pair whose joined piece has the highest *score*, and ``tokenizer.json`` has no scores,
  only merges; a SentencePiece BPE vocabulary lists its pieces best first, so the scores written are minus
  each normal piece's rank, and the tokenizer's merges are checked to follow that order. Control tokens and
  user-defined ones get -1000, bytes 0, as llama.cpp's converter writes them. Gemma declares runs of spaces
  user-defined pieces (its GGUF files spell them with spaces, which transformers respells as ``▁`` runs), and
  llama.cpp matches user-defined pieces in the raw text, so they are written with spaces. Checked against the
  bundled Gemma 3 file (tests/test_gemma.py): the same tokens and types, and scores in the same order
  (the same values for all pieces but the single characters, whose scores sit 31 lower in Google's file).
"""

from __future__ import annotations

import json

# Llama 3's split (tokenizer.json writes it as a Split step before a ByteLevel step without its own regex);
# llama.cpp's pre-tokenizer "llama-bpe" runs the same expression and looks a whole piece up before merging it
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_SPACE = "\u2581"  # SentencePiece's spelling of a space
_SPM_NORMALIZER = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
# transformers' GemmaTokenizer splits at spaces after the normaliser has replaced them: no split at all
_SPM_NO_OP_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = 1, 3, 4, 5, 6  # gguf.TokenType
_SCORE_SPECIAL = -1000.0  # llama.cpp's converter: control and user-defined pieces
WAY_ON = ("Convert the safetensors export with llama.cpp's convert_hf_to_gguf.py, or export safetensors "
          "(format='safetensors').")


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"The tokenizer ({type(tokenizer).__name__}) has no tokenizer.json to convert: GGUF needs "
                         f"its vocabulary and merges. {WAY_ON}")
    return json.loads(backend.to_str())


def bpe_pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE ``tokenizer``'s pre-tokenizer (module docstring); ValueError when
    there is none."""
    spec = _spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"The tokenizer is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''}; "
                         f"EntroDrop converts byte-level BPE tokenizers only for this architecture. {WAY_ON}")
    if spec.get("normalizer") is not None:
        raise ValueError(f"The tokenizer normalises text ({spec['normalizer'].get('type')}) before BPE, which "
                         f"llama.cpp's BPE tokenizer does not do. {WAY_ON}")

    def byte_level(p: dict, regex: bool = True) -> bool:
        return all(p.get(k) == v for k, v in {**_BYTE_LEVEL, "use_regex": regex}.items())

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    name = None
    if len(steps) == 1 and byte_level(steps[0]):
        name = "gpt-2"
    elif len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1]):
        name = "smollm"
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": _LLAMA3_SPLIT}
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        name = "llama-bpe"
    if name is None:
        raise ValueError(f"llama.cpp splits text before BPE by a named set of expressions, and this tokenizer's "
                         f"pre-tokenizer ({json.dumps(pre)[:200]}) is not one EntroDrop can name (it knows GPT-2's, "
                         f"SmolLM's and Llama 3's); a wrong name would load and tokenize differently. {WAY_ON}")
    # llama.cpp takes a piece found whole in the vocabulary as one token under llama-bpe only (ignore_merges)
    lookup = bool(model.get("ignore_merges"))
    if lookup != (name == "llama-bpe"):
        does = "looks whole pieces up before merging" if lookup else "merges every piece"
        raise ValueError(f"The tokenizer splits text as llama.cpp's '{name}' does, but it {does} (ignore_merges="
                         f"{lookup}), which llama.cpp does not do under that name: some words would tokenize "
                         f"differently. {WAY_ON}")
    return name


def check_sentencepiece(tokenizer) -> None:
    """Refuse (ValueError naming why) a tokenizer that is not SentencePiece BPE as llama.cpp runs it: a BPE model
    with byte fallback and all 256 byte pieces, spaces spelled ``▁`` and no prefix space (Gemma's form), merges
    in the vocabulary's order."""
    spec = _spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("ignore_merges"):
        raise ValueError(f"The tokenizer is a {model.get('type')} model without SentencePiece's byte fallback (or "
                         f"one that looks whole pieces up first); a Gemma 3 GGUF holds a SentencePiece BPE "
                         f"vocabulary. {WAY_ON}")
    if spec.get("normalizer") != _SPM_NORMALIZER or spec.get("pre_tokenizer") not in (None, _SPM_NO_OP_SPLIT):
        raise ValueError(f"The tokenizer prepares text ({json.dumps(spec.get('normalizer'))[:120]}, then "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:120]}) otherwise than Gemma's SentencePiece form "
                         "(spaces spelled as '\u2581', nothing prepended, no split), the one EntroDrop writes as llama.cpp "
                         f"runs it. {WAY_ON}")
    vocab = model.get("vocab") or {}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:
        raise ValueError(f"The tokenizer falls back to bytes but has no byte pieces such as {missing[0]}; llama.cpp "
                         f"needs all 256. {WAY_ON}")
    last = -1
    for merge in model.get("merges") or []:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        joined = vocab.get(left + right)
        if joined is None or joined < last:
            raise ValueError(f"The tokenizer merges '{left}' + '{right}' out of the order of its vocabulary, while "
                             f"llama.cpp's SentencePiece tokenizer merges by a score per piece, which EntroDrop takes "
                             f"from that order: some words would tokenize differently. {WAY_ON}")
        last = joined


def _added(tokenizer) -> dict:
    return {t.content: t for t in tokenizer.added_tokens_decoder.values()}


def _pieces(tokenizer, size: int) -> list[str | None]:
    """The token strings by id, ``size`` of them as the embedding has rows (None: no token has that id)."""
    tokens: list[str | None] = [None] * size
    for text, i in tokenizer.get_vocab().items():
        if i >= size:
            raise ValueError(f"The tokenizer has token id {i}, but the model's embedding has {size} rows.")
        tokens[i] = text
    return tokens


def bpe_vocabulary(tokenizer, size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their GGUF token types, for a byte-level BPE tokenizer."""
    added = _added(tokenizer)
    tokens, types = [], []
    for i, text in enumerate(_pieces(tokenizer, size)):
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        else:
            tokens.append(text)
            types.append((_TOKEN_CONTROL if added[text].special else _TOKEN_USER_DEFINED) if text in added
                         else _TOKEN_NORMAL)
    return tokens, types


def sentencepiece_vocabulary(tokenizer, size: int) -> tuple[list[str], list[float], list[int]]:
    """Token strings by id, their scores and their GGUF token types, for a SentencePiece BPE tokenizer (module
    docstring)."""
    added = _added(tokenizer)
    tokens, scores, types = [], [], []
    rank = 0
    for i, text in enumerate(_pieces(tokenizer, size)):
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(_SCORE_SPECIAL)
            types.append(_TOKEN_UNUSED)
        elif text in added:
            tokens.append(text)
            scores.append(_SCORE_SPECIAL)
            types.append(_TOKEN_CONTROL if added[text].special else _TOKEN_USER_DEFINED)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            scores.append(0.0)
            types.append(_TOKEN_BYTE)
        elif len(text) > 1 and set(text) == {_SPACE}:  # a run of spaces: user-defined in Gemma's vocabulary
            tokens.append(" " * len(text))
            scores.append(_SCORE_SPECIAL)
            types.append(_TOKEN_USER_DEFINED)
        else:
            tokens.append(text)
            scores.append(float(-rank))
            types.append(_TOKEN_NORMAL)
            rank += 1
    return tokens, scores, types


def _merges(tokenizer) -> list[str]:
    merges = _spec(tokenizer)["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_vocabulary(writer, tokenizer, size: int, kind: str) -> None:
    """Add ``tokenizer`` to the GGUF ``writer`` as llama.cpp reads it: ``kind`` ``bpe`` or ``sentencepiece``
    (module docstring), ``size`` tokens as the embedding has rows; a SentencePiece tokenizer as
    :func:`check_sentencepiece` passed it (the converter's ``check_convertible`` runs it first)."""
    if kind == "bpe":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer_name(tokenizer))
        tokens, types = bpe_vocabulary(tokenizer, size)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(tokenizer))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        tokens, scores, types = sentencepiece_vocabulary(tokenizer, size)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if isinstance(token_id, int):
            add(token_id)
    ids = tokenizer("a")["input_ids"]  # what encoding adds around a text, as the tokenizer does it
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
