"""GGUF exports against the pruned model and against llama.cpp: size, agreement, KV cache.

    npm install --prefix /tmp/llamacpp node-llama-cpp@3.21.1      # once: a prebuilt llama.cpp (~730 MB)
    .venv/bin/python benchmarks/bench_gguf.py [--model smollm2|gemma3-270m] [--counts layer=4,attn=8] [--plan BLOCKS ...] \
        [--heal linear|lora] [--gguf-type auto|stored|source|adapter|q8_0|q4_1|f16|...] \
        [--from-safetensors [--rope-llama3 8,1,4,64]] [--prompts 8] [--new-tokens 8] [--llama-cpp /tmp/llamacpp] \
        [--json out.json]

For each plan (``--counts``: ``recommended`` for that many blocks of that kind, chosen on the calibration
part of gsm8k as the app does; ``--plan``: blocks given), on a bundled model (``--model``: SmolLM2, a Q4_1 GGUF,
or Gemma 3 270M, a Q4_K_M GGUF); a plan the export refuses is reported with the refusal:

* with ``--from-safetensors``: the model saved as safetensors and loaded from there first, so the export
  converts it (the metadata and tokenizer written by EntroDrop); ``--rope-llama3`` gives it Llama 3.1's RoPE
  scaling first (written as ``rope_freqs``), and llama.cpp's continuations are also compared with the model
  left unscaled, the control that shows the scaling acts;
* with ``--heal``: the plan healed first (the method's defaults, on the calibration part of gsm8k), and the
  healed model written with its own weights (``--gguf-type``, the library's ``auto`` unless given); every comparison below is
  then with the healed model, and also with the healed model with its weights rounded as the file holds them
  (so llama.cpp's arithmetic and the file's rounding are told apart); with ``--gguf-type adapter`` (a LoRA
  heal), llama.cpp runs the stored base with the adapter file, and without it as the control;
* ``export_gguf``: the file's size against the source's and against (kept layers / all layers) x the source's, and
  its own verification verdict;
* agreement on ``--prompts`` prompts, each the first 32 tokens of a window of the **report** part of
  gsm8k (``--part development`` for choosing a default; the report part is for quoting): the greedy continuation (``--new-tokens``) of the pruned model in transformers (de-quantised
  weights, the plan's preview) against llama.cpp running the exported GGUF. The same comparison of the
  dense float model with llama.cpp running the source GGUF is the baseline: llama.cpp computes with the
  quantised weights, so even the dense model's continuations can part from the float model's;
* teacher-forced (``--kl-windows`` report-part windows of ``--kl-len`` tokens, from token 32 on): at every position,
  whether llama.cpp and transformers rank the same token first, and the KL of llama.cpp's next-token
  distribution to transformers' (coarsened to llama.cpp's 20 likeliest tokens and the rest: a lower bound of the
  full KL), for the dense model and the source file (the baseline) and for each exported file; free of the
  near-ties that make a greedy continuation part for good at one flipped token; with ``--from-safetensors`` and
  a type of its own (q8_0, f16, ...), also the dense model converted to that type, against the float model and
  against the model rounded as that file holds it: llama.cpp's own error at the type, measured the same way;
  and, wherever a file rounds the weights, what the rounding alone costs in transformers (KL of the rounded
  model to the float one, full distributions), which says how sensitive the model is to any such change;
* llama.cpp's tokens of 9 texts (the first 64 tokens of each prompt's window, decoded, and a line of digits,
  tabs and doubled spaces) against the tokenizer's, special-token text parsed by both;
* llama.cpp's KV cache for 512 cells, dense and pruned, with flash attention off and on (llama.cpp pads
  the V cache of layers of different widths to the widest without flash attention).
"""

from __future__ import annotations

import argparse
import json
import math
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
from entrodrop.export import ModelSource, export_gguf, gguf_type_for  # noqa: E402
from entrodrop.export.gguf_tensors import ModelTensors, quantised_copy  # noqa: E402
from entrodrop.heal import HealSettings, heal, heal_record  # noqa: E402
from entrodrop.loading import bundled_model_path, load_model  # noqa: E402
from entrodrop.plan import DropPlan  # noqa: E402
from entrodrop.prune import preview_plan  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "llama_cpp_greedy.mjs"


def node_script(prefix: Path, name: str) -> Path:
    """This folder's node script ``name`` copied into ``prefix``, where node-llama-cpp is installed (node resolves
    the package from the script's own folder)."""
    script = prefix / name
    script.write_text((SCRIPT.parent / name).read_text())
    return script


def llama_cpp(prefix: Path, model: Path, ids: list[int], n: int, flash: bool = False, texts: list[str] = (),
              lora: Path | None = None) -> dict:
    """llama.cpp's greedy continuation of ``ids`` (with the LoRA adapter ``lora``), its KV-cache line and its
    tokens of ``texts`` (the script runs inside ``prefix``)."""
    script = node_script(prefix, SCRIPT.name)
    out = subprocess.run(["node", str(script), str(model), json.dumps(ids), str(n), "1" if flash else "0",
                          json.dumps(list(texts)), str(lora or "")], cwd=prefix, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned(model, plan: DropPlan | None):
    """``model`` runs ``plan`` within this block (the dense model for None), without gradients."""
    return preview_plan(model, plan) if plan is not None else torch.no_grad()


def llama_cpp_scores(prefix: Path, path: Path, windows: list[list[int]], start: int = 32, k: int = 20,
                     lora: Path | None = None) -> list:
    """llama.cpp running ``path`` (with the adapter ``lora``) teacher-forced along ``windows``: its ``k`` likeliest
    next tokens and their probabilities after each position from ``start - 1`` on (llama_cpp_scores.mjs)."""
    script = node_script(prefix, "llama_cpp_scores.mjs")
    args = ["node", str(script), str(path), json.dumps(windows), str(start), str(k)] + ([str(lora)] if lora else [])
    out = subprocess.run(args, cwd=prefix, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["windows"]


def next_token_logits(model, plan: DropPlan | None, window: list[int], start: int) -> torch.Tensor:
    """``model``'s logits (float64) under ``plan`` for the tokens of ``window`` from ``start`` on: (positions, vocab)."""
    with planned(model, plan), torch.no_grad():
        return model(torch.tensor([window])).logits[0, start - 1:-1].double()


def teacher_forced(cpp: list, model, plan: DropPlan | None, windows: list[list[int]], start: int = 32) -> dict:
    """llama.cpp's distributions ``cpp`` (:func:`llama_cpp_scores` of ``windows``) against transformers running
    ``model`` under ``plan``: the share of positions where both rank the same token first, and the mean
    KL(llama.cpp || transformers) of the next-token distributions coarsened to llama.cpp's likeliest tokens and
    the rest (a lower bound of the full KL, by the data-processing inequality)."""
    kls, same = [], 0
    for window, positions in zip(windows, cpp, strict=True):
        probs = torch.softmax(next_token_logits(model, plan, window, start), -1)
        for ours, top in zip(probs, positions, strict=True):
            tokens = [t for t, _ in top]
            p = torch.tensor([pr for _, pr in top], dtype=torch.float64)
            q = ours[tokens]
            rest_p, rest_q = max(1 - float(p.sum()), 1e-12), max(1 - float(q.sum()), 1e-12)
            kls.append(float((p * (p / q).log()).sum()) + rest_p * math.log(rest_p / rest_q))
            same += int(tokens[0] == int(ours.argmax()))
    return {"positions": len(kls), "top1_agreement": same / len(kls), "kl": sum(kls) / len(kls)}


def rounding_kl(model, rounded, plan: DropPlan | None, windows: list[list[int]], start: int = 32) -> float:
    """Mean KL(rounded || model) of the next-token distributions along ``windows`` from token ``start`` on, both
    in transformers (full distributions): what the file's rounding alone costs, and so how sensitive the model is."""
    kls = []
    for window in windows:
        ours = torch.log_softmax(next_token_logits(model, plan, window, start), -1)
        theirs = torch.log_softmax(next_token_logits(rounded, plan, window, start), -1)
        kls += (theirs.exp() * (theirs - ours)).sum(-1).tolist()
    return sum(kls) / len(kls)


def float_greedy(model, ids: list[int], n: int, plan: DropPlan | None) -> list[int]:
    with planned(model, plan):
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
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "gemma3-270m"))
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
    parser.add_argument("--part", default="report", choices=("report", "development"),
                        help="the part of gsm8k the prompts and scored windows come from")
    parser.add_argument("--kl-windows", type=int, default=2,
                        help="windows scored teacher-forced in llama.cpp (0: none)")
    parser.add_argument("--kl-len", type=int, default=96, help="their length; scored from token 32 on")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rope_llama3 and not args.from_safetensors:
        parser.error("--rope-llama3 needs --from-safetensors")
    if args.rope_llama3 and args.model != "smollm2":
        parser.error("--rope-llama3 gives the Llama-family SmolLM2 Llama 3's scaling; it has no meaning for Gemma 3")
    if args.kl_windows and args.kl_len <= 32:
        parser.error("--kl-len must be over 32: positions are scored from token 32 on")
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows in a log as it happens
    prefix = Path(args.llama_cpp)
    loaded = load_model(args.model)
    scratch = tempfile.TemporaryDirectory()
    if args.from_safetensors:
        from entrodrop.gguf import strip_gguf_quantization

        strip_gguf_quantization(loaded.model)
        if args.rope_llama3:
            theta = loaded.model.config.rope_parameters["rope_theta"]
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
    source = ModelSource.of(loaded)
    reference_gguf = Path(bundled_model_path(args.model))  # the dense model's own file, for the baseline
    counts = [(k.split("=")[0], int(k.split("=")[1])) for k in args.counts.split(",") if k.strip()]
    plans = recommended_plans(loaded, counts, 32, 256)
    plans.update({f"given {p}": DropPlan.parse(p, loaded.num_layers) for p in args.plan})
    windows, described = load_windows(loaded.tokenizer, {"source": "gsm8k"}, num_samples=args.prompts, seq_len=256,
                                      part=args.part, config=loaded.model.config)
    prompts = [w[:32].tolist() for w in windows]
    scored = [w[:args.kl_len].tolist() for w in windows[:args.kl_windows]]
    n = args.new_tokens
    dense_float = [float_greedy(loaded.model, p, n, None) for p in prompts]
    dense_cpp = [llama_cpp(prefix, reference_gguf, p, n)["tokens"] for p in prompts]
    kv_dense = {fa: llama_cpp(prefix, reference_gguf, prompts[0], 1, fa)["kv"] for fa in (False, True)}
    texts = [loaded.tokenizer.decode(w[:64]) for w in windows] + ["In 2024, 1234 + 5678 = 6912.\n\tDone!  x"]
    # the bundled file is the unscaled model: no baseline for a model given another RoPE
    results = {"prompts": described, "new_tokens": n,
               "baseline": None if args.rope_llama3 else agreement(dense_float, dense_cpp),
               "kv_dense": kv_dense, "plans": {}}
    if scored and not args.rope_llama3:
        results["baseline_teacher_forced"] = teacher_forced(llama_cpp_scores(prefix, reference_gguf, scored),
                                                            loaded.model, None, scored)
    print(f"dense: llama.cpp (source GGUF) vs transformers (float): {results['baseline']}; teacher-forced: "
          f"{results.get('baseline_teacher_forced')}")
    print(f"dense KV cache: {kv_dense}")
    gguf_type = gguf_type_for(loaded.model, source, args.gguf_type, args.heal)
    results.update(heal=args.heal, gguf_type=gguf_type)
    if scored and args.from_safetensors and not args.rope_llama3 and gguf_type not in ("stored", "source", "adapter"):
        # the dense model converted the same way: llama.cpp's own error at this type, the pruned files' yardstick
        from entrodrop.export.gguf_convert import write_dense_gguf

        dense_file = Path(scratch.name) / f"dense-{gguf_type}.gguf"
        write_dense_gguf(loaded.model, loaded.tokenizer, dense_file, gguf_type)
        rounded = quantised_copy(loaded.model, gguf_type)
        cpp = llama_cpp_scores(prefix, dense_file, scored)
        results["baseline_same_type"] = {
            "float": teacher_forced(cpp, loaded.model, None, scored),
            "rounded": teacher_forced(cpp, rounded, None, scored),
            "rounding_kl": rounding_kl(loaded.model, rounded, None, scored)}
        del rounded
        dense_file.unlink()
        print(f"dense converted to {gguf_type}, teacher-forced: llama.cpp vs transformers (float): "
              f"{results['baseline_same_type']['float']}; vs transformers rounded as the file: "
              f"{results['baseline_same_type']['rounded']}; the rounding alone, in transformers: KL "
              f"{results['baseline_same_type']['rounding_kl']:.3g}")
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
            try:
                out = export_gguf(model, loaded.tokenizer, plan, Path(tmp) / label.replace(" ", "-"), source=source,
                                  gguf_type=gguf_type, heal=record)
            except ValueError as refusal:  # what llama.cpp cannot run faithfully, refused before writing
                results["plans"][label] = {"blocks": plan.compact(), "refused": str(refusal)}
                print(f"\n{label}: {plan.compact()}\n  refused: {refusal}")
                continue
            path = next(p for p in out.path.glob("*.gguf") if not p.name.endswith("-heal-lora.gguf"))
            lora = next(out.path.glob("*-heal-lora.gguf"), None)  # GGUF type adapter: the heal beside the base
            kept = plan.num_layers - len(plan.layers_of("layer"))
            row = {"blocks": plan.compact(), "ok": out.ok, "verdict": out.verdict, "bytes": out.weights_bytes,
                   "source_bytes": out.source_bytes, "ratio": out.weights_bytes / out.source_bytes,
                   "ideal_ratio": kept / plan.num_layers, "heal": record and record["method"]}
            pruned_float = [float_greedy(model, p, n, plan) for p in prompts]
            pruned_cpp = [llama_cpp(prefix, path, p, n, lora=lora)["tokens"] for p in prompts]
            row["agreement"] = agreement(pruned_float, pruned_cpp)
            cpp = llama_cpp_scores(prefix, path, scored, lora=lora) if scored else None
            if scored:
                row["teacher_forced"] = teacher_forced(cpp, model, plan, scored)
                print(f"  teacher-forced, llama.cpp vs transformers: {row['teacher_forced']}")
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
                if scored:  # llama.cpp's arithmetic alone: against the weights it reads
                    row["teacher_forced_rounded"] = teacher_forced(cpp, rounded, plan, scored)
                    row["rounding_kl"] = rounding_kl(model, rounded, plan, scored)
                    print(f"  teacher-forced, llama.cpp vs transformers rounded as the file: {row['teacher_forced_rounded']}"
                          f"; the rounding alone, in transformers: KL {row['rounding_kl']:.3g}")
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
