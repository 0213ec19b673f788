"""The export's words: the model card ``README.md``, the one-line verification verdict and the reload hint.

Everything here is a pure function of the metadata written to ``entrodrop.json``, so a card can be
regenerated from an existing export.
"""

from __future__ import annotations

from ..checks import ChecksResult, checks_markdown
from ..devices import format_bytes


def verdict_line(verification: dict) -> str:
    """One line: PASSED/FAILED and, per loader, the logit difference and whether generation matched."""
    parts = []
    for name, r in verification["loaders"].items():
        if "error" in r:
            parts.append(f"{name}: FAILED to reload ({r['error']})")
            continue
        detail = f"max |logit diff| {r['max_abs_diff']:.2e} (tolerance {verification['atol']:.0e}), " \
                 f"generation {'identical' if r['generation_matches'] else 'DIFFERENT'}"
        if r["missing_keys"] or r["unexpected_keys"]:
            detail += f", {len(r['missing_keys'])} missing / {len(r['unexpected_keys'])} unexpected weights"
        parts.append(f"{name}: {'ok' if r['ok'] else 'FAILED'} ({detail})")
    head = "PASSED" if verification["ok"] else "FAILED"
    return f"Verification {head}: " + "; ".join(parts)


def reload_hint(subblocks: bool, remote_code: bool) -> str:
    """The Python lines that reload an export; ``PATH`` stands for its folder."""
    if not subblocks:
        return ('from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
                'tokenizer = AutoTokenizer.from_pretrained("PATH")')
    hint = ('from entrodrop.export import load_pruned\n'
            'model = load_pruned("PATH")')
    if remote_code:
        hint += ('\n# or, without EntroDrop installed (runs the modeling_entrodrop.py in this folder):\n'
                 'from transformers import AutoModelForCausalLM\n'
                 'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)')
    return hint


def heal_lines(heal: dict, adapter: dict | None = None) -> list[str]:
    """The card's healing section: method, what it taught on, steps and time, before and after; ``adapter``: the
    LoRA adapter file a GGUF export ships the heal in."""
    settings = heal.get("settings") or {}
    data = heal.get("data") or {}
    where = f"the {data.get('part', 'calibration')} part of {data['data']}" if data.get("data") else "calibration text"
    if heal["method"] == "lora":
        how = (f"LoRA distillation (rank {settings.get('rank')}, targets {settings.get('targets')}, lr "
               f"{settings.get('lr')}, loss {settings.get('loss')}), {heal['steps_done']} step(s) of "
               f"{settings.get('batch_windows')} window(s), " +
               (f"shipped as the llama.cpp LoRA adapter `{adapter['file']}` ({format_bytes(adapter['bytes'])}) beside "
                f"`{adapter['base_file']}`, which holds the source's tensors as stored: run them together (below)"
                if adapter else "adapters merged into the weights (no peft needed)"))
    else:
        how = ("a linear map per removed span, fitted by ridge least squares and folded into the output projection "
               "of the kept block before it (same architecture as the pruned model)")
    lines = [f"- Method: **{heal['method']}**: {how}.",
             f"- Taught on {heal['train_windows']} windows of {heal['seq_len']} tokens from {where}; the state kept is "
             f"the best on {heal['val_windows']} other calibration windows (step {heal['best_step']}).",
             f"- Time: {heal['seconds']:.0f} s" + (" (stopped early)" if heal.get("stopped") else "") + ".",
             f"- Validation KL(dense ‖ model): {heal['val_kl_before']:.4f} before, {heal['val_kl_after']:.4f} after "
             "(nats per token)."]
    before, after = heal.get("before") or {}, heal.get("after") or {}
    if before and after:
        lines += ["", f"Checked on {heal.get('checked_on', 'held-out text')}, which the heal never read:", "",
                  "| measure | dense | dropped | healed |", "|---|---:|---:|---:|",
                  f"| perplexity | {before['dense_perplexity']:.4g} | {before['pruned_perplexity']:.4g} | "
                  f"{after['pruned_perplexity']:.4g} |",
                  f"| KL(dense ‖ model), nats/token | 0 | {before['kl_mean']:.3g} | {after['kl_mean']:.3g} |",
                  f"| top-1 agreement with dense | 100% | {100 * before['top1_agreement']:.1f}% | "
                  f"{100 * after['top1_agreement']:.1f}% |"]
        if heal.get("recovered") is not None:
            lines += ["", f"Share of the lost nats won back: {100 * heal['recovered']:.0f}%"
                          + (f" ± {100 * heal['recovered_error']:.0f}%" if heal.get("recovered_error") else "") + "."]
    lines += [f"- Note: {note}." for note in heal.get("notes") or []]
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


_FLOAT_GGUF_TYPES = ("f16", "bf16", "f32")  # GGUF types that do not quantise the weights


def model_card(meta: dict, verdict: str, hint: str) -> str:
    """The card ``README.md``: front matter, what was dropped and why, calibration, checks, verdict, reload."""
    plan = meta["plan"]
    scores = meta.get("scores") or {}
    by_key = {(b["layer"], b["kind"]): b for b in scores.get("blocks", [])}
    source = meta["source"]
    gguf_file = meta.get("format") == "gguf"
    lines = [
        "---",
        f"library_name: {'gguf' if gguf_file else 'transformers'}",
        "tags:",
        "- entrodrop",
        "- pruned",
        "- block-pruning",
    ]
    if source.get("name") and source.get("source") == "hub":
        lines.append(f"base_model: {source['name']}")
    label = meta.get("criterion_label") or meta["criterion"]
    heal = meta.get("heal") or {}
    healed = f", healed with {heal['method']}" if heal else ""
    lines += ["---", "", f"# {source.get('name') or 'model'} — {len(plan['blocks'])} block(s) dropped with {label}"
                         f"{healed}", ""]
    lines.append(
        f"Pruned from **{source.get('name') or 'an unnamed model'}** ({source.get('family')}, "
        f"{plan['num_layers']} layers) by dropping {len(plan['blocks'])} block(s) chosen with the "
        f"**{meta['criterion']}** criterion ({label}). Parameters: {meta['parameters']['dense']:,} -> "
        f"{meta['parameters']['pruned']:,} ({meta['parameters']['removed']:,} removed)."
    )
    size = meta.get("size") or {}
    if size.get("weights_bytes"):
        ratio = size["weights_bytes"] / size["source_bytes"] if size.get("source_bytes") else float("nan")
        lines += ["", f"Size: **{format_bytes(size['weights_bytes'])}** of weights in {meta.get('dtype')}, "
                      f"×{ratio:.2f} the source ({format_bytes(size['source_bytes'])}, {size.get('source')})."]
    check_verdict = meta.get("check_verdict")
    if check_verdict:
        warn = "⚠ **A check found this plan damaged**: " if check_verdict["level"] == "damaged" else "Check verdict: "
        lines += ["", f"{warn}{check_verdict['text']} (thresholds: {check_verdict['thresholds']})."]
    if gguf_file and source.get("family") == "gemma3" and meta.get("gguf_type") not in _FLOAT_GGUF_TYPES:
        lines += ["", "⚠ **Quantised, and this is a pruned Gemma 3.** Measured on Gemma 3 270M without 6 of its 18 "
                      "layers (EntroDrop's docs/results.md, section 7, on its report texts): the pruned model is about "
                      "ten times as sensitive to rounding as the dense one, and llama.cpp's quantised arithmetic "
                      "moved its Q4_K_M and Q8_0 files 9-15 times as far from the model as it moves the dense "
                      "files from the dense model, while its f16 file ran as the model does. For a file llama.cpp "
                      "runs as EntroDrop's preview and checks did, export with GGUF type f16."]
    if meta.get("gguf"):
        lines += ["", "The source was a quantised GGUF file: these are **de-quantised float safetensors from GGUF**, "
                      "not the original quantisation."]
    lines += ["", "## What was dropped and why", "",
              "Layer indexes are those of the original (dense) model.", "",
              "| layer | block | reason | entropy increase | cosine importance |",
              "|---:|---|---|---|---|"]
    for b in plan["blocks"]:
        s = by_key.get((b["layer"], b["kind"]), {})
        delta = ", ".join(f"{k} {_fmt(v)}" for k, v in s.get("delta_entropy", {}).items()) or "—"
        cosine = _fmt(s["cosine_importance"]) if "cosine_importance" in s else "—"
        lines.append(f"| {b['layer']} | {b['kind']} | {b.get('reason') or '—'} | {delta} | {cosine} |")
    calibration = meta.get("calibration") or {}
    if calibration:
        lines += ["", "## Calibration", ""]
        lines += [f"- {k}: {_fmt(v)}" for k, v in calibration.items() if not isinstance(v, (dict, list))]
    if heal:
        lines += ["", "## Healing", "", *heal_lines(heal, meta.get("adapter"))]
    checks = meta.get("checks") or {}
    if checks:
        lines += ["", "## Measured checks" + (" (of the healed model)" if heal else ""), ""]
        lines.append(checks_markdown(ChecksResult.from_dict(checks)))
    if gguf_file:
        how = ["The file was read back after writing: its architecture, layer count, per-layer arrays and tensor "
               "set were checked against the plan and every kept tensor against the source, byte for byte"
               + ("; transformers reloaded it and its logits on a fixed input were compared with the in-memory "
                  "pruned model." if meta.get("gguf_architecture") != "deci" else
                  ". It uses llama.cpp's `deci` architecture (per-layer head counts and FFN widths, 0 where a "
                  "sub-block was dropped: no attention and no KV cache there), which llama.cpp runs and "
                  "transformers does not read.")
               + (" The LoRA adapter was read back too: what llama.cpp checks when it loads one (architecture, "
                  "tensor names and shapes), and the base plus the adapter's product against the healed weights"
                  + (", also through transformers' reload with the adapter added." if meta.get("gguf_architecture")
                     != "deci" else ".") if meta.get("adapter") else ""),
               "", "## How to run", "", "```bash", hint, "```", ""]
    else:
        how = ["The folder was reloaded from disk after writing; its logits on a fixed input were compared with "
               "the in-memory pruned model and a few tokens were generated greedily.", "",
               "## How to reload", "", "```python", hint, "```", ""]
    lines += ["", "## Verification", "", verdict, "", *how,
              "Written by EntroDrop Studio (entropy-based block pruning; Yang et al., arXiv 2504.03794). "
              "Full plan, scores and settings: `entrodrop.json`.", ""]
    return "\n".join(lines)
