"""GGUF exports against the pruned model and against llama.cpp: size, agreement, KV cache.

    npm install --prefix /tmp/llamacpp node-llama-cpp@3.21.1      # once: a prebuilt llama.cpp (~730 MB)
    .venv/bin/python benchmarks/bench_gguf.py [--counts layer=4,attn=8] [--plan BLOCKS ...] \
        [--heal linear|lora] [--gguf-type auto|stored|source|adapter|q8_0|q4_1|f16|...] \
        [--from-safetensors [--rope-llama3 8,1,4,64]] [--prompts 8] [--new-tokens 8] [--llama-cpp /tmp/llamacpp] \
        [--json out.json]

For each plan (``--counts``: ``recommended`` for that many blocks of that kind, chosen on the calibration
part of gsm8k as the app does; ``--plan``: blocks given), on the bundled SmolLM2 (Q4_1 GGUF):

* with ``--from-safetensors``: the model saved as safetensors and loaded from there first, so the export
  converts it (the metadata and tokenizer written by EntroDrop); ``--rope-llama3`` gives it Llama 3.1's RoPE
  scaling first (written as ``rope_freqs``), and llama.cpp's continuations are also compared with the model
  left unscaled, the control that shows the scaling acts;
* with ``--heal``: the plan healed first (the method's defaults, on the calibration part of gsm8k), and the
  healed model written with its own weights (``--gguf-type``, the library's ``auto`` unless given); every comparison below is
  then with the healed model, and also with the healed model with its weights rounded as the file holds them
  (so llama.cpp's arithmetic and the file's rounding are told apart); with ``--gguf-type adapter`` (a LoRA
  heal), llama.cpp runs the stored base with the adapter file, and without it as the control;
* ``export_gguf``: the file's size against the source's and against (kept layers / 30) x the source's, and
  its own verification verdict;
* agreement on ``--prompts`` prompts, each the first 32 tokens of a window of the **report** part of
  gsm8k: the greedy continuation (``--new-tokens``) of the pruned model in transformers (de-quantised
  weights, the plan's preview) against llama.cpp running the exported GGUF. The same comparison of the
  dense float model with llama.cpp running the source GGUF is the baseline: llama.cpp computes with the
  quantised weights, so even the dense model's continuations can part from the float model's;
* llama.cpp's tokens of 9 texts (the first 64 tokens of each prompt's window, decoded, and a line of digits,
  tabs and doubled spaces) against the tokenizer's, special-token text parsed by both;
* llama.cpp's KV cache for 512 cells, dense and pruned, with flash attention off and on (llama.cpp pads
  the V cache of layers of different widths to the widest without flash attention).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_heal import recommended_plans  # noqa: E402

from entrodrop.checks import load_windows  # noqa: E402
from entrodrop.evaluate import greedy_generate  # noqa: E402
from entrodrop.export import ModelSource, export_gguf  # noqa: E402
from entrodrop.export.gguf_tensors import ModelTensors, quantised_copy, resolve_gguf_type  # noqa: E402
from entrodrop.heal import HealSettings, heal, heal_record  # noqa: E402
from entrodrop.loading import bundled_model_path, load_model  # noqa: E402
from entrodrop.plan import DropPlan  # noqa: E402
from entrodrop.prune import preview_plan  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "llama_cpp_greedy.mjs"


def llama_cpp(prefix: Path, model: Path, ids: list[int], n: int, flash: bool = False, texts: list[str] = (),
              lora: Path | None = None) -> dict:
    """llama.cpp's greedy continuation of ``ids`` (with the LoRA adapter ``lora``), its KV-cache line and its
    tokens of ``texts`` (the script runs inside ``prefix``)."""
    script = prefix / SCRIPT.name
    script.write_text(SCRIPT.read_text())
    out = subprocess.run(["node", str(script), str(model), json.dumps(ids), str(n), "1" if flash else "0",
                          json.dumps(list(texts)), str(lora or "")], cwd=prefix, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def float_greedy(model, ids: list[int], n: int, plan: DropPlan | None) -> list[int]:
    with preview_plan(model, plan) if plan is not None else torch.no_grad():
        tokens = greedy_generate(model, None, torch.tensor([ids]), n, pad_token_id=0, min_new_tokens=n)
    return tokens.tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Prompts whose continuations are identical, and the mean length of the common prefix."""
    prefixes = []
    for x, y in zip(a, b, strict=True):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefixes.append(k)
    return {"identical": sum(k == len(x) for k, x in zip(prefixes, a, strict=True)), "prompts": len(a),
            "mean_common_prefix": sum(prefixes) / len(prefixes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="layer=4,attn=8")
    parser.add_argument("--plan", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--llama-cpp", default="/tmp/llamacpp", help="folder where node-llama-cpp is installed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heal", choices=("linear", "lora"), default=None)
    parser.add_argument("--gguf-type", default="auto", help="default: the library's auto")
    parser.add_argument("--from-safetensors", action="store_true",
                        help="save the de-quantised model as safetensors and load it from there, so the export "
                             "converts it (metadata and tokenizer written by EntroDrop, not copied)")
    parser.add_argument("--rope-llama3", default=None, metavar="FACTOR,LOW,HIGH,ORIGINAL",
                        help="with --from-safetensors: give the model Llama 3.1's RoPE scaling with these parameters "
                             "(e.g. 8,1,4,64: most frequencies divided by 8 within the prompts' length), so the "
                             "export writes rope_freqs; also compares llama.cpp with the model left unscaled")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log as it happens
    prefix = Path(args.llama_cpp)
    loaded = load_model("smollm2")
    scratch = tempfile.TemporaryDirectory()
    if args.from_safetensors:
        from entrodrop.gguf import strip_gguf_quantization

        strip_gguf_quantization(loaded.model)
        theta = loaded.model.config.rope_parameters["rope_theta"]
        if args.rope_llama3:
            factor, low, high, original = (float(v) for v in args.rope_llama3.split(","))
            loaded.model.config.rope_parameters = {
                "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": int(original)}
        loaded.model.save_pretrained(scratch.name)
        loaded.tokenizer.save_pretrained(scratch.name)
        loaded = load_model(scratch.name, dtype="float32")
        if args.rope_llama3:  # the same weights with positions unscaled: what a reader without rope_freqs runs
            from transformers import AutoModelForCausalLM

            unscaled = AutoModelForCausalLM.from_pretrained(
                scratch.name, dtype=torch.float32, rope_parameters={"rope_type": "default", "rope_theta": theta}).eval()
    elif args.rope_llama3:
        parser.error("--rope-llama3 needs --from-safetensors")
    source = ModelSource.of(loaded)
    reference_gguf = Path(bundled_model_path("smollm2"))  # the dense model's own file, for the baseline
    counts = [(k.split("=")[0], int(k.split("=")[1])) for k in args.counts.split(",") if k.strip()]
    plans = recommended_plans(loaded, counts, 32, 256)
    plans.update({f"given {p}": DropPlan.parse(p, loaded.num_layers) for p in args.plan})
    windows, described = load_windows(loaded.tokenizer, {"source": "gsm8k"}, num_samples=args.prompts, seq_len=256,
                                      part="report", config=loaded.model.config)
    prompts = [w[:32].tolist() for w in windows]
    n = args.new_tokens
    dense_float = [float_greedy(loaded.model, p, n, None) for p in prompts]
    dense_cpp = [llama_cpp(prefix, reference_gguf, p, n)["tokens"] for p in prompts]
    kv_dense = {fa: llama_cpp(prefix, reference_gguf, prompts[0], 1, fa)["kv"] for fa in (False, True)}
    texts = [loaded.tokenizer.decode(w[:64]) for w in windows] + ["In 2024, 1234 + 5678 = 6912.\n\tDone!  x"]
    # the bundled file is the unscaled model: no baseline for a model given another RoPE
    results = {"prompts": described, "new_tokens": n,
               "baseline": None if args.rope_llama3 else agreement(dense_float, dense_cpp),
               "kv_dense": kv_dense, "plans": {}}
    print(f"dense: llama.cpp (source GGUF) vs transformers (float): {results['baseline']}")
    print(f"dense KV cache: {kv_dense}")
    gguf_type = resolve_gguf_type(args.gguf_type, heal=args.heal, gguf_source=bool(source.gguf_file))
    results.update(heal=args.heal, gguf_type=gguf_type)
    with tempfile.TemporaryDirectory() as tmp:
        for label, plan in plans.items():
            model, record = loaded.model, None
            if args.heal:
                settings = HealSettings(method=args.heal)
                calib, _ = load_windows(loaded.tokenizer, {"source": "gsm8k"},
                                        num_samples=settings.train_windows + settings.val_windows, seq_len=256,
                                        part="calibration", config=loaded.model.config)
                healed = heal(loaded.model, plan, calib, settings)
                model, record = healed.model, heal_record(healed)
                print(f"\n{label}: {healed.summary()}")
            out = export_gguf(model, loaded.tokenizer, plan, Path(tmp) / label.replace(" ", "-"), source=source,
                              gguf_type=gguf_type, heal=record)
            path = next(p for p in out.path.glob("*.gguf") if not p.name.endswith("-heal-lora.gguf"))
            lora = next(out.path.glob("*-heal-lora.gguf"), None)  # GGUF type adapter: the heal beside the base
            kept = plan.num_layers - len(plan.layers_of("layer"))
            row = {"blocks": plan.compact(), "ok": out.ok, "verdict": out.verdict, "bytes": out.weights_bytes,
                   "source_bytes": out.source_bytes, "ratio": out.weights_bytes / out.source_bytes,
                   "ideal_ratio": kept / plan.num_layers, "heal": record and record["method"]}
            pruned_float = [float_greedy(model, p, n, plan) for p in prompts]
            pruned_cpp = [llama_cpp(prefix, path, p, n, lora=lora)["tokens"] for p in prompts]
            row["agreement"] = agreement(pruned_float, pruned_cpp)
            if lora is not None:  # the control: the base alone, without the heal
                row["adapter_bytes"] = lora.stat().st_size
                row["agreement_without_adapter"] = agreement(
                    pruned_float, [llama_cpp(prefix, path, p, n)["tokens"] for p in prompts])
                print(f"  llama.cpp with the adapter vs the healed model: {row['agreement']}; without it (the "
                      f"control): {row['agreement_without_adapter']}; adapter {lora.stat().st_size / 2**20:.1f} MiB")
            cpp_ids = llama_cpp(prefix, path, prompts[0], 1, texts=texts)["tokenized"]
            ours = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
            row["tokenizer_agreement"] = {"texts": len(texts), "same_ids": sum(a == b for a, b in zip(ours, cpp_ids, strict=True))}
            print(f"  llama.cpp's tokens of {len(texts)} texts equal the tokenizer's: "
                  f"{row['tokenizer_agreement']['same_ids']} of {len(texts)}")
            if gguf_type not in ("stored", "adapter"):  # the file's own rounding apart from llama.cpp's arithmetic
                reader = GGUFReader(source.gguf_file) if gguf_type == "source" else None
                tensors = ModelTensors(model, reader.fields["general.architecture"].contents(), plan.num_layers,
                                       source=reader) if reader is not None else None
                rounded = quantised_copy(model, gguf_type, tensors)
                rounded_float = [float_greedy(rounded, p, n, plan) for p in prompts]
                row["agreement_with_rounded"] = agreement(rounded_float, pruned_cpp)
                row["rounding_agreement"] = agreement(pruned_float, rounded_float)
                print(f"  llama.cpp vs transformers with the weights rounded as the file holds them: "
                      f"{row['agreement_with_rounded']}\n  transformers, rounded vs not: {row['rounding_agreement']}")
                del rounded
            if args.rope_llama3:
                row["agreement_unscaled"] = agreement([float_greedy(unscaled, p, n, plan) for p in prompts], pruned_cpp)
                print(f"  llama.cpp vs transformers with RoPE unscaled (the control): {row['agreement_unscaled']}")
            row["kv"] = {fa: llama_cpp(prefix, path, prompts[0], 1, fa)["kv"] for fa in (False, True)}
            results["plans"][label] = row
            print(f"\n{label}: {plan.compact()}\n  {out.verdict}\n  size {out.weights_bytes / 2**20:.1f} MiB, "
                  f"x{row['ratio']:.4f} the source (kept layers: x{row['ideal_ratio']:.4f}, goal <= x"
                  f"{row['ideal_ratio'] * 1.05:.4f})\n  llama.cpp (pruned GGUF) vs transformers (pruned, float): "
                  f"{row['agreement']}\n  KV cache: {row['kv']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    scratch.cleanup()


if __name__ == "__main__":
    main()
