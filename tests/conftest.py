"""Shared test helpers: offline hub settings, a tiny tokenizer, tiny random models, the bundled model."""

import os

# Before transformers / datasets / huggingface_hub are imported: never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests load tiny models from local folders through the app; tests/test_ui_access.py turns this off to
# check the public default.
os.environ.setdefault("ENTRODROP_ALLOW_LOCAL_MODELS", "1")

import json  # noqa: E402
import socket  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_EOS = "<|endoftext|>"
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Entropy of hidden representations falls over the first blocks and rises over the later ones.",
    "A block whose entropy increase is small adds little information and can be dropped.",
    "What is 12 + 30? The answer is 42.",
]


def build_tiny_tokenizer(vocab_size: int = 384, bos: str | None = None, pre_tokenizer=None, ignore_merges: bool = False):
    """A byte-level BPE tokenizer trained on a few sentences (covers any text), with an eos token; with
    ``bos``, also that BOS token, put before every text it encodes (as Gemma's tokenizer does).
    ``pre_tokenizer`` replaces GPT-2's byte-level split; ``ignore_merges`` looks whole pieces up first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TINY_EOS] + ([bos] if bos else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    if bos is None:
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS)
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS, bos_token=bos)


def build_tiny_sentencepiece_tokenizer(vocab_size: int = 384):
    """A SentencePiece BPE tokenizer laid out as Gemma's is: control tokens, a user-defined newline and runs of
    spaces, the 256 byte pieces, merged pieces in merge order, single characters last; spaces spelled '▁'."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    space = "\u2581"
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    fixed = control + ["\n", space * 2, space * 3] + [f"<0x{b:02X}>" for b in range(256)]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", space)
    alphabet = sorted({space if c == " " else c for text in _TINY_CORPUS for c in text})
    merged_slots = vocab_size - len(fixed) - len(alphabet)
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merged_slots, show_progress=False)
    trainer_tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]["merges"][:merged_slots]
    merges = [(space, space), (space * 2, space)] + [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained]
    pieces = fixed + [a + b for a, b in merges[2:]] + alphabet
    tokenizer = GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": control[5:]})
    tokenizer.add_tokens(["\n"])
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer with an eos token and no pad token (len() fits a tiny vocab)."""
    return build_tiny_tokenizer()


def save_tiny_model(config, path, tokenizer=None, seed: int = 0):
    """Build a random-init ``*ForCausalLM`` from ``config`` and save it (and the tokenizer) to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bundled_model():
    """The real bundled model (SmolLM2-135M-Instruct from GGUF), loaded once per session (~20 s)."""
    from entrodrop.loading import load_model

    return load_model("smollm2")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app():
    """The studio app served on a free local port for the ``with`` block; yields its URL."""
    from entrodrop import ui

    demo = ui.build_app()
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **ui.launch_style())
    try:
        yield demo.local_url
    finally:
        demo.close()
