"""What healing wins back, measured on text that neither the choice nor the heal nor its defaults read.

    .venv/bin/python benchmarks/bench_heal.py [--model smollm2] [--counts layer=4,attn=8] [--plan BLOCKS ...] \
        [--methods linear,lora] [--steps 40] [--minutes 5] [--lr 1e-3] [--rank 16] [--batch-windows 4] \
        [--train-windows 32] [--ridge 1e-3] [--curve-every 5] [--eval-part report] [--eval-samples 16] [--seq-len 256] \
        [--gguf-types source,adapter,q8_0] [--threads 2] [--json out.json]

For each plan (``--counts``: the ``recommended`` plan for that many blocks of that kind, chosen on the
calibration part of gsm8k with the app's defaults; ``--plan``: blocks given as ``layer:4,attn:9``):

* the plan's damage on ``--eval-part`` (default ``report``) of gsm8k and of GPQA (text of another kind):
  dense and dropped perplexity on ``--eval-samples`` windows;
* for every method: a heal on calibration windows only (``HealSettings`` with the options above; the
  library's defaults where an option is not given), then the healed model on the same windows:
  perplexity, **the share of the lost nats won back** ``(ln ppl_dropped - ln ppl_healed) / (ln ppl_dropped -
  ln ppl_dense)`` with its paired standard error over windows, wall time, and the peak resident memory the
  heal added (kernel high-water mark, teacher and student together);
* with ``--gguf-types``, the healed model as each GGUF type stores it (weights rounded as the file holds them,
  :func:`~entrodrop.export.gguf_tensors.quantised_copy`; ``source`` re-quantises the tensors the heal changed
  in the source file's own types and keeps the others as stored; ``adapter``, after a LoRA heal: the stored
  tensors plus the LoRA adapter file's float16 product, as llama.cpp adds it), scored the same way, with the
  file's size over the unhealed GGUF export's (the source's tensors of the kept layers, as stored; with the
  adapter file's bytes for ``adapter``);
* for lora, the curve of the share won back on gsm8k against minutes of training, scored every
  ``--curve-every`` steps (the time spent scoring is left out of the minutes).

Defaults are placed with ``--eval-part development``; the tables in docs/results.md quote ``report``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_calibration's memory probes
from bench_calibration import peak_rss, reset_peak_rss  # noqa: E402

from entrodrop.calibrate import run_calibration  # noqa: E402
from entrodrop.checks import load_windows  # noqa: E402
from entrodrop.evaluate import compare, window_losses  # noqa: E402
from entrodrop.heal import HealProgress, HealResult, HealSettings, iter_heal, recovered_fraction  # noqa: E402
from entrodrop.loading import load_model  # noqa: E402
from entrodrop.plan import DropPlan  # noqa: E402
from entrodrop.progress import run_to_end  # noqa: E402
from entrodrop.search import SELECTION_WINDOWS, iter_select  # noqa: E402

EVAL_SETS = ("gsm8k", "gpqa")


def recommended_plans(loaded, counts: list[tuple[str, int]], samples: int, seq_len: int) -> dict[str, DropPlan]:
    """The app's default choice for every (kind, count), from one calibration on the calibration part of gsm8k."""
    if not counts:
        return {}
    windows, _ = load_windows(loaded.tokenizer, {"source": "gsm8k"}, num_samples=max(samples, SELECTION_WINDOWS),
                              seq_len=seq_len, part="calibration", config=loaded.model.config)
    scores = run_calibration(loaded.model, windows[:samples])
    plans = {}
    for kind, count in counts:
        plan = run_to_end(iter_select(loaded.model, scores, windows, criterion="recommended", kind=kind, count=count))
        plans[f"recommended {count} {kind}"] = plan
    return plans


def lost_share(before, loss: float) -> float:
    """Share of the lost nats won back by a model whose mean loss on ``before``'s windows is ``loss``."""
    lost = before.pruned_nll - before.dense_nll
    return (before.pruned_nll - loss) / lost if lost > 0 else float("nan")


def gguf_sizes(loaded, plan: DropPlan, result: HealResult, evals: dict, gguf_types: list[str]) -> dict:
    """The healed model as each GGUF type stores it (weights rounded as the file holds them), scored on every
    eval set, and the file's tensor bytes over the unhealed export's (the kept tensors as stored)."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    from entrodrop.export import ModelSource
    from entrodrop.export.gguf_adapter import adapted_copy, lora_factors, write_lora_adapter
    from entrodrop.export.gguf_export import expected_tensors
    from entrodrop.export.gguf_tensors import ModelTensors, quantised_copy
    from entrodrop.export.gguf_write import plan_gguf
    from entrodrop.prune import prune_model

    reader = GGUFReader(ModelSource.of(loaded).gguf_file)
    layout = plan_gguf(reader, plan)
    tensors = ModelTensors(result.model, layout.source_arch, plan.num_layers, source=reader)
    by_name = {t.name: t for t in reader.tensors}
    kept = list(expected_tensors(reader, layout).values())

    def size(gguf_type: str | None) -> int:
        total = 0
        for name in kept:
            qtype = None if gguf_type is None else tensors.written_type(name, gguf_type)
            block, nbytes = GGML_QUANT_SIZES[by_name[name].tensor_type if qtype is None else qtype]
            total += int(by_name[name].n_elements) // block * nbytes
        return total

    unhealed = size(None)
    out = {}
    for gguf_type in gguf_types:
        if gguf_type == "adapter" and result.method != "lora":
            continue  # a linear heal's maps are not of low rank
        if gguf_type == "adapter":  # the stored base and the LoRA adapter file, as llama.cpp adds them
            with tempfile.TemporaryDirectory() as tmp:
                names = expected_tensors(reader, layout)
                new_name = {src: new for new, src in names.items()}
                rank = result.settings["rank"]
                adapter = Path(tmp) / "adapter.gguf"
                factors = lora_factors(tensors, rank, kept=new_name)
                write_lora_adapter(adapter, layout.arch, {new_name[n]: f for n, f in factors.items()}, rank, {})
                model = adapted_copy(result.model, layout.source_arch, adapter,
                                     Path(ModelSource.of(loaded).gguf_file), names)
                file_bytes = unhealed + adapter.stat().st_size
        else:
            model, file_bytes = quantised_copy(result.model, gguf_type, tensors), size(gguf_type)
        rounded = prune_model(model, plan).eval()
        del model
        scored = {}
        for name, ev in evals.items():
            after = compare(loaded.model, plan, ev["windows"], pruned_model=rounded)
            share, error = recovered_fraction(ev["before"], after)
            scored[name] = {"perplexity": after.pruned_perplexity, "recovered": share, "recovered_error": error}
        out[gguf_type] = {"size_vs_unhealed": file_bytes / unhealed, "eval": scored}
        del rounded
    return out


def run_heal(loaded, plan: DropPlan, settings: HealSettings, heal_windows, evals: dict, curve_every: int,
             gguf_types: list[str] = ()) -> dict:
    """One heal, timed and probed for memory, then scored on every eval set; lora's curve on the first set."""
    first = next(iter(evals))
    curve, scoring = [], 0.0
    baseline = reset_peak_rss()
    started = time.perf_counter()
    result = None
    for event in iter_heal(loaded.model, plan, heal_windows, settings):
        if isinstance(event.partial, HealResult):
            result = event.partial
        elif isinstance(event.partial, HealProgress) and event.partial.model is not None and curve_every and \
                event.partial.step % curve_every == 0:
            pause = time.perf_counter()
            minutes = (pause - started - scoring) / 60  # training time so far, earlier scoring left out
            losses = window_losses(event.partial.model, evals[first]["windows"], plan)
            share = lost_share(evals[first]["before"], sum(losses) / len(losses))
            scoring += time.perf_counter() - pause
            curve.append({"step": event.partial.step, "minutes": minutes, "recovered": share})
    seconds = time.perf_counter() - started - scoring
    added = peak_rss() - baseline
    pruned = result.pruned()
    out = {"method": settings.method, "seconds": seconds, "added_peak_mb": added / 2**20,
           "steps": result.steps_done, "best_step": result.best_step, "val_kl_before": result.val_kl_before,
           "val_kl_after": result.val_kl_after, "notes": result.notes, "settings": settings.to_dict(),
           "curve": curve, "eval": {}}
    for name, ev in evals.items():
        after = compare(loaded.model, plan, ev["windows"], pruned_model=pruned)
        share, error = recovered_fraction(ev["before"], after)
        out["eval"][name] = {"perplexity": after.pruned_perplexity, "kl": after.kl_mean, "top1": after.top1_agreement,
                             "recovered": share, "recovered_error": error, "window_nll": after.window_nll}
    if gguf_types:
        out["gguf"] = gguf_sizes(loaded, plan, result, evals, list(gguf_types))
    if curve:
        curve.append({"step": result.steps_done, "minutes": seconds / 60, "recovered": out["eval"][first]["recovered"]})
    return out


def pct(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--counts", default="layer=4,attn=8", help="KIND=COUNT,...: recommended plans ('' for none)")
    parser.add_argument("--plan", action="append", default=[], help="blocks such as layer:4,layer:13 (repeatable)")
    parser.add_argument("--methods", default="linear,lora")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None, help="lora: wall-time budget per heal")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ridge", type=float, default=None, help="linear: ridge term (towards no change)")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--batch-windows", type=int, default=None)
    parser.add_argument("--train-windows", type=int, default=None)
    parser.add_argument("--loss", default=None, choices=("kl", "kl+ce"))
    parser.add_argument("--targets", default=None, choices=("all", "attn", "mlp"))
    parser.add_argument("--curve-every", type=int, default=5, help="lora: score held-out every N steps (0: never)")
    parser.add_argument("--eval-part", default="report", choices=("report", "development"))
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--gguf-types", default="", help="e.g. source,q8_0: also score the healed model as each "
                        "GGUF type stores it (a GGUF-loaded model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr, "rank": args.rank, "loss": args.loss,
                                    "batch_windows": args.batch_windows, "train_windows": args.train_windows,
                                    "targets": args.targets, "ridge": args.ridge,
                                    "max_seconds": args.minutes * 60 if args.minutes else None}.items()
                 if v is not None}
    loaded = load_model(args.model)
    counts = [(k.split("=")[0], int(k.split("=")[1])) for k in args.counts.split(",") if k.strip()]
    start = time.perf_counter()
    plans = recommended_plans(loaded, counts, args.calib_samples, args.seq_len)
    print(f"calibration and recommended choices: {time.perf_counter() - start:.0f} s")
    plans.update({f"given {p}": DropPlan.parse(p, loaded.num_layers) for p in args.plan})
    evals = {}
    for name in EVAL_SETS:
        windows, described = load_windows(loaded.tokenizer, {"source": name}, num_samples=args.eval_samples,
                                          seq_len=args.seq_len, part=args.eval_part, config=loaded.model.config)
        evals[name] = {"windows": windows, "described": described}
    results = {"model": loaded.name, "eval_part": args.eval_part, "eval_samples": args.eval_samples,
               "seq_len": args.seq_len, "threads": args.threads, "overrides": overrides, "plans": {}}
    for label, plan in plans.items():
        for ev in evals.values():
            ev["before"] = compare(loaded.model, plan, ev["windows"])
        settings_base = HealSettings(**overrides)
        heal_windows, heal_data = load_windows(loaded.tokenizer, {"source": "gsm8k"},
                                               num_samples=settings_base.train_windows + settings_base.val_windows,
                                               seq_len=args.seq_len, part="calibration", config=loaded.model.config)
        row = {"plan": plan.to_dict(), "blocks": plan.compact(), "heal_data": heal_data, "before": {
            name: {"dense": ev["before"].dense_perplexity, "dropped": ev["before"].pruned_perplexity,
                   "kl": ev["before"].kl_mean, "window_nll": ev["before"].window_nll} for name, ev in evals.items()},
            "methods": {}}
        print(f"\n{label}: {plan.compact()}")
        for name, ev in evals.items():
            print(f"  {name} {args.eval_part} ({ev['described']['samples']} x {args.seq_len}): dense "
                  f"{ev['before'].dense_perplexity:.2f}, dropped {ev['before'].pruned_perplexity:.2f}")
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            settings = HealSettings(**{**overrides, "method": method})
            try:
                out = run_heal(loaded, plan, settings, heal_windows, evals, args.curve_every if method == "lora" else 0,
                               [t.strip() for t in args.gguf_types.split(",") if t.strip()])
            except ValueError as exc:  # a method this architecture cannot take: say so, go on
                print(f"  {method}: refused: {exc}")
                row["methods"][method] = {"refused": str(exc)}
                continue
            row["methods"][method] = out
            scored = ", ".join(f"{name} {e['perplexity']:.2f} (won back {pct(e['recovered'])} ± "
                               f"{pct(e['recovered_error'])})" for name, e in out["eval"].items())
            print(f"  {method}: {out['seconds']:.0f} s, +{out['added_peak_mb']:.0f} MB peak, {out['steps']} step(s) "
                  f"(best {out['best_step']}): {scored}")
            for gguf_type, g in out.get("gguf", {}).items():
                print(f"    as GGUF {gguf_type} (x{g['size_vs_unhealed']:.2f} the unhealed export's tensors): " + ", ".join(
                    f"{name} {e['perplexity']:.2f} (won back {pct(e['recovered'])} ± {pct(e['recovered_error'])})"
                    for name, e in g["eval"].items()))
            if out["curve"]:
                print("    curve (minutes: won back on gsm8k): " + ", ".join(
                    f"{c['minutes']:.1f}: {pct(c['recovered'])}" for c in out["curve"]))
        results["plans"][label] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
