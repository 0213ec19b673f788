"""Does llama.cpp tokenize a converted file as the source tokenizer does? One check per pre-tokenizer name the
GGUF converter writes (``gpt-2``, ``smollm``, ``llama-bpe``).

    npm install --prefix /tmp/llamacpp node-llama-cpp@3.21.1      # once: a prebuilt llama.cpp (~730 MB)
    .venv/bin/python benchmarks/bench_gguf_tokenizers.py [--vocab 2000] [--texts 16] [--llama-cpp /tmp/llamacpp] \
        [--json out.json]

For each name: a byte-level BPE tokenizer of ``--vocab`` tokens built as that family builds its own (GPT-2's
split; SmolLM's digits one by one, then GPT-2's split; Llama 3's split expression with whole-piece lookup and
a BOS token), trained on the calibration part of gsm8k; a tiny random Llama with that vocabulary, exported to
GGUF by :func:`entrodrop.export.export_gguf` (converted from the model and tokenizer, one layer dropped);
then llama.cpp's token ids of ``--texts`` texts from the **report** parts of gsm8k and GPQA (the first 400
characters of a window's text each), plus edge lines (digit runs, contractions, doubled spaces, tabs,
non-Latin script, the tokenizer's special tokens), against the tokenizer's own ids (special-token text
parsed by both, none added). A name written for the wrong split shows here as texts that differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gguf import llama_cpp  # noqa: E402

from entrodrop.data import load_corpus, split_corpus  # noqa: E402
from entrodrop.export import ModelSource, export_gguf  # noqa: E402
from entrodrop.plan import DropPlan  # noqa: E402

EDGE_LINES = [
    "In 2024, 1234 + 5678 = 6912.\n\tDone!  x",
    "I'm sure they'll say it's fine; WE'VE SEEN IT'S FINE.",
    "   three leading spaces, two trailing  ",
    "naïve café — 東京 ✓ 3.14159 ½",
    "line one\n\n\nline four\r\nline five",
    "It costs.  50 dollars, or  7 and  250.",  # spaces before digits: where SmolLM's digit split shows
]


def build_tokenizer(name: str, texts: list[str], vocab: int):
    """A byte-level BPE tokenizer split as the family ``name`` splits text, trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from entrodrop.export.gguf_vocab import _LLAMA3_SPLIT

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = {"gpt-2": byte_level,
             "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
             "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])}
    backend = Tokenizer(models.BPE(ignore_merges=name == "llama-bpe"))
    backend.pre_tokenizer = split[name]
    backend.decoder = decoders.ByteLevel()
    eos, bos = "<|endoftext|>", "<|begin_of_text|>"
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[eos, bos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    if name == "llama-bpe":  # Llama 3 puts its BOS before every text
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                               special_tokens=[(bos, backend.token_to_id(bos))])
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos)


def tiny_llama(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def texts_of(source: str, part: str, count: int) -> list[str]:
    return [d[:400] for d in split_corpus(load_corpus(source))[part].documents[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--texts", type=int, default=16, help="per data set (gsm8k and GPQA report parts)")
    parser.add_argument("--llama-cpp", default="/tmp/llamacpp", help="folder where node-llama-cpp is installed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    train = texts_of("gsm8k", "calibration", 2000)
    texts = texts_of("gsm8k", "report", args.texts) + texts_of("gpqa", "report", args.texts) + EDGE_LINES
    results = {"vocab": args.vocab, "texts": len(texts), "names": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt-2", "smollm", "llama-bpe"):
            tokenizer = build_tokenizer(name, train, args.vocab)
            model = tiny_llama(len(tokenizer))
            checks = texts + [f"{tokenizer.eos_token} then {tokenizer.eos_token}text"]
            out = export_gguf(model, tokenizer, DropPlan.parse("layer:1", 3), Path(tmp) / name, gguf_type="f32",
                              source=ModelSource(name=f"tiny-{name}", source="local"))
            path = next(out.path.glob("*.gguf"))
            written = json.loads((out.path / "entrodrop.json").read_text())
            cpp = llama_cpp(Path(args.llama_cpp), path, tokenizer("a")["input_ids"], 1, texts=checks)["tokenized"]
            ours = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in checks]
            differing = [i for i, (a, b) in enumerate(zip(ours, cpp, strict=True)) if a != b]
            row = {"verification_ok": out.ok, "texts": len(checks), "same_ids": len(checks) - len(differing),
                   "tokens": sum(map(len, ours)), "differing": [checks[i][:80] for i in differing],
                   "written": written["source"]["converted"]}
            results["names"][name] = row
            print(f"{name}: llama.cpp's ids equal the tokenizer's for {row['same_ids']} of {row['texts']} texts "
                  f"({row['tokens']} tokens); export verification {'PASSED' if out.ok else 'FAILED'}"
                  + "".join(f"\n    differs: {t!r}" for t in row["differing"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
