"""Export a plan as a verified GGUF folder: :func:`export_gguf` (the writer is :mod:`.gguf_write`).

The folder holds ``<name>.gguf``, an Ollama ``Modelfile``, ``entrodrop.json`` and a model card that says how
to run it. Verification reads the written file back:

* **structure** (every export): architecture, ``block_count``, every per-layer array's length, the tensor
  set expected from the plan, and every kept tensor's type, shape and bytes equal to the source's (or, where
  the model's own weights were written, each tensor within its type's rounding of the model's weight);
* **logits** (architectures transformers reads from GGUF, i.e. all but ``deci``): the file reloaded with
  ``from_pretrained(..., gguf_file=...)`` against the in-memory model under the plan's preview (with its
  weights rounded as the file stores them, where they were written in Q8_0 or a 16-bit type), on a fixed
  input: largest logit difference and greedy tokens. ``deci`` files (sub-block plans) are run by llama.cpp,
  not transformers: ``benchmarks/bench_gguf.py`` compares them with the pruned model there;
* **tokenizer** (a converted checkpoint): the ids transformers' tokenizer from the file gives a fixed text
  against the source tokenizer's;
* **LoRA adapter** (GGUF type ``adapter``: the heal beside the source's stored tensors, :mod:`.gguf_adapter`):
  what llama.cpp checks when it loads one, every changed tensor's update present, the base plus the product
  against the healed weights, and the logits check above run on the base with the adapter added.

A file that fails is still reported (``ok`` False), never left half-written: writing is atomic.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..checks import ChecksResult
from ..costs import plan_parameter_counts
from ..criteria import get_criterion
from ..gguf import gguf_parse_once, gguf_reader
from ..loading import load_config
from ..plan import DropPlan
from ..prune import check_plan, preview_plan
from .card import model_card
from .gguf_adapter import (
    adapted_copy,
    apply_lora_adapter,
    check_adapter_heal,
    check_lora_adapter,
    heal_rank,
    lora_factors,
    write_lora_adapter,
)
from .gguf_convert import check_convertible, write_dense_gguf
from .gguf_tensors import (
    GGUF_TYPES,
    ModelTensors,
    check_float_arch,
    quantised_copy,
    resolve_gguf_type,
    within_rounding,
)
from .gguf_write import ATTN_TENSORS, FFN_TENSORS, GGUFPlan, _layer_of, plan_gguf, write_gguf
from .metadata import EXPORT_FORMAT_VERSION, METADATA_FILE, ModelSource, jsonable, package_versions
from .target import atomic_folder, check_target
from .verification import _FIXED_TEXT, _default_atol, _fixed_input, _greedy
from .write import ExportResult

logger = logging.getLogger(__name__)
# bytes of a 32-value block over 32: Q8_0 32 int8 and a float16 scale; Q5_1 5-bit values, scale and minimum; ...
_BYTES_PER_WEIGHT = {"q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "f16": 2,
                     "bf16": 2, "f32": 4}


def gguf_source_file(model: nn.Module, source: ModelSource | None) -> Path | None:
    """The GGUF file ``model`` was loaded from, or None for a transformers checkpoint (converted on export)."""
    path = (source or ModelSource()).gguf_file
    if not path:
        return None
    if not Path(path).is_file():
        raise ValueError(f"The GGUF file the model was loaded from ({path}) is gone; load the model again.")
    return Path(path)


def gguf_type_for(model: nn.Module, source: ModelSource | None, gguf_type: str = "auto",
                  heal: str | None = None) -> str:
    """``gguf_type`` with ``auto`` decided (:func:`~.gguf_tensors.resolve_gguf_type`) for ``model`` loaded from
    ``source`` and healed by the method ``heal`` (None: not healed); the others as given."""
    return resolve_gguf_type(gguf_type, heal=heal, gguf_source=gguf_source_file(model, source) is not None,
                             model_type=getattr(model.config, "model_type", None))


def check_gguf_export(model: nn.Module, plan: DropPlan, source: ModelSource | None, *, heal: str | None = None,
                      gguf_type: str = "auto", tokenizer=None) -> GGUFPlan:
    """Refuse, before any work, a GGUF export that cannot be written faithfully; the layout otherwise.

    ``heal`` is the method a healed model was healed with (None: not healed). A model not loaded from GGUF is
    converted (:mod:`.gguf_convert`, which says what it refuses); give its ``tokenizer`` to have that checked
    here too."""
    check_plan(model, plan)
    if not plan.blocks:
        raise ValueError("The plan drops no block, so the export would be the dense model: give blocks to drop.")
    gguf_type = gguf_type_for(model, source, gguf_type, heal)
    path = gguf_source_file(model, source)
    own = ", ".join(t for t in GGUF_TYPES if t not in ("auto", "stored", "source", "adapter"))
    if heal is not None and gguf_type == "stored":
        raise ValueError("A healed model has new weights, while GGUF type 'stored' copies the source's tensors as "
                         "stored, so it would lose the heal. Choose a type that writes the model's own weights "
                         f"(source, or one of {own}{'; or adapter, for a LoRA heal' if heal == 'lora' else ''}), "
                         "or export the healed model as safetensors.")
    if gguf_type == "adapter":
        check_adapter_heal(heal)
    if path is None:
        if gguf_type in ("stored", "source", "adapter"):
            raise ValueError(f"GGUF type '{gguf_type}' keeps the quantisation of the .gguf file a model was loaded "
                             f"from, and this one came from safetensors: choose one of {own}, which write its own "
                             "weights, or export safetensors (format='safetensors').")
        layout = plan_gguf(check_convertible(model, tokenizer), plan)
    else:
        try:
            reader = gguf_reader(path)
        except Exception as exc:  # a truncated or corrupted file: numpy's and gguf's own errors
            raise ValueError(f"The GGUF source '{path.name}' cannot be read ({type(exc).__name__}: {exc}); it may be "
                             "truncated or corrupted. Download it again.") from exc
        layout = plan_gguf(reader, plan)
    if gguf_type != "stored":
        check_float_arch(layout.source_arch)
    return layout


@gguf_parse_once()  # the source and the written file are each parsed once (entrodrop.gguf)
def export_gguf(model: nn.Module, tokenizer, plan: DropPlan, out_dir: str | os.PathLike, *, scores=None,
                checks: ChecksResult | dict | None = None, source: ModelSource | None = None,
                overwrite: bool = False, verify: bool = True, name: str | None = None, gguf_type: str = "auto",
                heal: dict | None = None) -> ExportResult:
    """Write ``plan`` applied to the GGUF file ``model`` was loaded from into the folder ``out_dir`` and verify it.

    ``model`` is the de-quantised dense model, or the healed copy with ``heal`` (what the heal measured,
    :func:`entrodrop.heal.heal_record`), in the dense layout: the reference the written file is compared with,
    under the plan's preview; it is not changed. ``gguf_type`` is one of :data:`~.gguf_tensors.GGUF_TYPES`:
    ``stored`` copies the source's tensors byte for byte, ``adapter`` does too and writes a LoRA heal as a
    llama.cpp adapter file beside them, the others write the model's own weights (``auto``:
    :func:`~.gguf_tensors.resolve_gguf_type`). A model loaded from
    safetensors or the hub is converted first (:mod:`.gguf_convert`: the Llama family and Gemma 3, with a
    tokenizer llama.cpp runs the same), the dense file written to a scratch folder beside ``out_dir`` and removed after.
    Raises before writing: ValueError for what GGUF cannot express (sub-block plans outside the Llama family,
    Gemma 3 plans that move a layer's attention kind, a checkpoint or tokenizer the converter refuses, a
    healed model as ``stored``), TargetNotEmptyError, PermissionError, OSError (ENOSPC for a full disk)."""
    source = source or ModelSource()
    method = heal["method"] if heal else None
    gguf_type = gguf_type_for(model, source, gguf_type, method)
    layout = check_gguf_export(model, plan, source, heal=method, gguf_type=gguf_type, tokenizer=tokenizer)
    src_path = gguf_source_file(model, source)
    weights = None if gguf_type == "stored" else ModelTensors(model, layout.source_arch, plan.num_layers, source=src_path)
    # the source's own types keep the source's name, which usually says its quantisation (…Q4_1.gguf); an
    # adapter's base is the unhealed pruned file, and the adapter file says it holds the heal
    suffix = ("-healed" if heal and gguf_type != "adapter" else "") + \
        ("" if gguf_type in ("stored", "source", "adapter") else f"-{gguf_type}")
    base = src_path.stem if src_path is not None else \
        re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.name or "model").name).strip("-")[:60] or "model"
    stem = name or f"{base}-{len(plan.blocks)}{plan.blocks[0].kind}-pruned{suffix}"
    if gguf_type in ("stored", "source", "adapter"):  # source: at most twice, where K-quants become Q8_0
        needed = src_path.stat().st_size * (1 if gguf_type == "stored" else 2)
    else:
        needed = int(sum(p.numel() for p in model.parameters()) * _BYTES_PER_WEIGHT[gguf_type])
    # a converted checkpoint is written whole first (a scratch file beside the target), then pruned
    target = check_target(out_dir, overwrite, needed_bytes=needed * (2 if src_path is None else 1))
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".entrodrop-convert-") as scratch:
        if src_path is None:
            src_path = Path(scratch) / f"{base}-{gguf_type}.gguf"
            write_dense_gguf(model, tokenizer, src_path, gguf_type)
            converted = f"{source.name or 'the model'} converted to GGUF in {gguf_type}"
        else:
            converted = None
        return _write_gguf_folder(model, tokenizer, plan, layout, src_path, target, stem, weights, gguf_type,
                                  scores=scores, checks=checks, source=source, verify=verify, heal=heal,
                                  converted=converted)


def _write_gguf_folder(model, tokenizer, plan: DropPlan, layout: GGUFPlan, src_path: Path, target: Path, stem: str,
                       weights: ModelTensors | None, gguf_type: str, *, scores, checks, source: ModelSource,
                       verify: bool, heal: dict | None, converted: str | None) -> ExportResult:
    if isinstance(checks, dict):
        checks = ChecksResult.from_dict(checks)
    label = get_criterion(plan.criterion)
    data = (scores.calibration if scores is not None and not isinstance(scores, dict)
            else (scores or {}).get("calibration")) or {}
    provenance = {"dropped": plan.compact(), "criterion": plan.criterion,
                  "source_file": src_path.name if converted is None else source.name,
                  "data": data.get("data"), "source_block_count": plan.num_layers,
                  "version": package_versions()["entrodrop"], "weights": "source" if weights is None else gguf_type,
                  "heal": heal["method"] if heal else None}
    adapter = gguf_type == "adapter"
    with atomic_folder(target) as tmp:
        out_file = tmp / f"{stem}.gguf"
        write_gguf(src_path, plan, out_file, {**provenance, "heal": None, "weights": "source"} if adapter else provenance,
                   weights=None if adapter else weights, gguf_type=gguf_type)
        adapter_file = None
        if adapter:  # the heal beside the stored base (gguf_adapter)
            adapter_file = tmp / f"{stem}-heal-lora.gguf"
            rank = heal_rank(heal)
            new_name = {s: n for n, s in expected_tensors(gguf_reader(src_path), layout).items()}
            factors = lora_factors(weights, rank, kept=new_name)
            write_lora_adapter(adapter_file, layout.arch, {new_name[n]: f for n, f in factors.items()}, rank,
                               {**provenance, "base_file": out_file.name})
        verification = verify_gguf(out_file, src_path, layout, model, plan, tokenizer, weights=weights,
                                   gguf_type=gguf_type, check_tokenizer=converted is not None,
                                   adapter=adapter_file) \
            if verify else {"ok": False, "skipped": True, "loaders": {}}
        verdict = gguf_verdict(verification)
        size = out_file.stat().st_size + (adapter_file.stat().st_size if adapter_file else 0)
        dense_params, _, pruned_params, _ = plan_parameter_counts(model, plan)
        hint = run_hint(out_file.name, layout, adapter_file.name if adapter_file else None)
        meta = jsonable({
            "format_version": EXPORT_FORMAT_VERSION, "format": "gguf", "gguf_architecture": layout.arch,
            "source": {"name": source.name, "source": source.source,
                       "gguf_file": str(src_path) if converted is None else None, "converted": converted,
                       "family": layout.source_arch, "model_type": getattr(model.config, "model_type", None)},
            "plan": plan.to_dict(), "criterion": plan.criterion,
            "criterion_label": label.label_for(plan.blocks[0].kind),
            "dtype": "the source's quantisation (tensors copied byte for byte)" if weights is None else
                     "the source's quantisation (tensors copied byte for byte), the heal as a LoRA adapter "
                     f"(rank {heal_rank(heal)}, float16 factors)" if adapter else
                     f"{gguf_type}: {GGUF_TYPES[gguf_type]}" + (", norms in float32" if gguf_type not in ("f32", "source")
                                                                 else ""),
            "gguf_type": gguf_type, "heal": heal,
            "adapter": {"file": adapter_file.name, "bytes": adapter_file.stat().st_size,
                        "base_file": out_file.name} if adapter_file else None,
            "size": {"weights_bytes": size, "source_bytes": src_path.stat().st_size,
                     "source": f"GGUF file {src_path.name}" if converted is None else f"the dense model in {gguf_type}"},
            "num_layers": {"dense": plan.num_layers, "pruned": len(layout.kept_layers)},
            "parameters": {"dense": dense_params, "pruned": pruned_params, "removed": dense_params - pruned_params},
            "scores": scores.to_dict() if scores is not None and not isinstance(scores, dict) else scores,
            "calibration": data or None, "checks": checks.to_dict() if checks else None,
            "verification": {**verification, "verdict": verdict}, "reload": hint, "versions": package_versions()})
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
        (tmp / "Modelfile").write_text(f"FROM ./{out_file.name}\n"
                                       + (f"ADAPTER ./{adapter_file.name}\n" if adapter_file else ""))
        (tmp / "README.md").write_text(model_card(meta, verdict, hint))
    return ExportResult(path=target, ok=bool(verification["ok"]), verdict=verdict, verification=verification,
                        plan=plan.to_dict(), remote_code=False, reload_hint=hint,
                        files=sorted(p.name for p in target.iterdir()), dense_params=dense_params,
                        pruned_params=pruned_params, dtype="gguf", weights_bytes=size,
                        source_bytes=src_path.stat().st_size)


def run_hint(file_name: str, layout: GGUFPlan, adapter: str | None = None) -> str:
    """Shell lines that run the file (with its LoRA adapter, if any) with llama.cpp and Ollama."""
    note = ("# a 'deci' file (layers without attention or MLP): llama.cpp and runtimes built on it load it\n"
            if layout.arch == "deci" else "")
    lora = f" --lora {adapter}" if adapter else ""
    modelfile = f"FROM ./{file_name}" + (f", ADAPTER ./{adapter}" if adapter else "")
    return (f"{note}llama-cli -m {file_name}{lora} -p \"What is 12 + 30?\" -n 64\n"
            f"ollama create pruned -f Modelfile   # the Modelfile beside it: {modelfile}\n"
            "ollama run pruned")


def expected_tensors(source_reader, layout: GGUFPlan) -> dict[str, str]:
    """New tensor name -> source tensor name, as :func:`~.gguf_write.write_gguf` maps them."""
    new_index = {old: new for new, old in enumerate(layout.kept_layers)}
    out = {}
    for tensor in source_reader.tensors:
        located = _layer_of(tensor.name)
        if located is None:
            out[tensor.name] = tensor.name
            continue
        old, rest = located
        if old not in new_index:
            continue
        new, part = new_index[old], rest.split(".")[0]
        if (new in layout.no_attn and part in ATTN_TENSORS) or (new in layout.no_ffn and part in FFN_TENSORS):
            continue
        out[f"blk.{new}.{rest}"] = tensor.name
    return out


def verify_gguf(path: Path, source_path: Path, layout: GGUFPlan, model: nn.Module, plan: DropPlan, tokenizer, *,
                weights: ModelTensors | None = None, gguf_type: str = "stored", check_tokenizer: bool = False,
                adapter: Path | None = None) -> dict:
    """Read ``path`` back (structure, and logits where transformers can load it); see the module docstring.

    With ``weights`` (the model's own tensors were written), each written tensor must de-quantise to the
    model's weight within ``gguf_type``'s rounding, and the reloaded logits must equal those of the model
    with its weights rounded the same way (:func:`~.gguf_tensors.quantised_copy`). With an ``adapter`` (GGUF
    type ``adapter``: ``path`` holds the source's tensors as stored), the adapter is read back against the
    base and ``weights`` (:func:`~.gguf_adapter.check_lora_adapter`), and the reloaded base with the adapter
    added must give the healed model's logits."""
    import numpy as np
    from gguf import GGUFValueType

    loaders: dict[str, dict] = {}
    entry: dict = {}
    try:
        written, src = gguf_reader(path), gguf_reader(source_path)
        problems = []
        arch = written.fields["general.architecture"].contents()
        n_new = len(layout.kept_layers)
        if arch != layout.arch:
            problems.append(f"architecture {arch!r}, expected {layout.arch!r}")
        if written.fields[f"{arch}.block_count"].contents() != n_new:
            problems.append(f"block_count is not {n_new}")
        for key, field_ in written.fields.items():
            if key.startswith(f"{arch}.") and field_.types[0] == GGUFValueType.ARRAY and len(field_.data) != n_new:
                problems.append(f"{key} has {len(field_.data)} values for {n_new} layers")
        if layout.arch == "deci":
            heads = written.fields["deci.attention.head_count"].contents()
            ffn = written.fields["deci.feed_forward_length"].contents()
            problems += [f"layer {i} has {heads[i]} heads, expected {'0' if i in layout.no_attn else 'some'}"
                         for i in range(n_new) if (heads[i] == 0) != (i in layout.no_attn)]
            problems += [f"layer {i} has FFN width {ffn[i]}" for i in range(n_new) if (ffn[i] == 0) != (i in layout.no_ffn)]
        expected = expected_tensors(src, layout)
        by_name = {t.name: t for t in src.tensors}
        got = {t.name: t for t in written.tensors}
        if set(got) != set(expected):
            problems.append(f"{len(set(expected) - set(got))} tensor(s) missing, {len(set(got) - set(expected))} "
                            "unexpected")
        def as_source(n: str, t) -> bool:  # the source's tensor, type and bytes
            return t.tensor_type == by_name[expected[n]].tensor_type and np.array_equal(t.data, by_name[expected[n]].data)

        if weights is None or adapter is not None:
            differing = [n for n, t in got.items() if n in expected and not as_source(n, t)]
            what = "differ from the source"
        else:
            differing = [n for n, t in got.items() if n in expected and not (
                within_rounding(np.asarray(t.data), t.tensor_type, weights.array(expected[n]))
                if expected[n] in weights else as_source(n, t))]  # rope_freqs: the source's
            what = f"are not the model's weights within {gguf_type} rounding"
        if differing:
            problems.append(f"{len(differing)} tensor(s) {what}, e.g. {differing[0]}")
        entry = {"ok": not problems, "problems": problems, "tensors": len(got), "layers": n_new}
        if gguf_type == "source":
            entry["requantised"] = sum(1 for n, t in got.items() if n in expected and not as_source(n, t))
            entry["kept"] = (f"the model's own weights: {entry['requantised']} tensor(s) re-quantised within their "
                             "type's rounding, the others the source's bytes")
        elif weights is not None and adapter is None:
            entry["kept"] = f"the model's own weights within {gguf_type} rounding"
    except Exception as exc:  # an unreadable file is a verdict, not a crash
        entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    loaders["gguf reader (structure, bytes)"] = entry
    if adapter is not None:
        names = expected_tensors(gguf_reader(source_path), layout)
        try:
            check = check_lora_adapter(adapter, path, weights, names)
        except Exception as exc:
            check = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        loaders["LoRA adapter (structure, base + update)"] = check
    if layout.arch != "deci":
        if adapter is not None:
            reference = adapted_copy(model, layout.source_arch, adapter, source_path, names)
        elif weights is None or gguf_type == "f32":
            reference = model
        else:
            reference = quantised_copy(model, gguf_type, weights)
        check = _logits_check(path, reference, plan, tokenizer, adapter=adapter,
                              layers=len(layout.kept_layers), arch=layout.arch)
        if reference is not model:
            check["rounding_kl"] = _rounding_kl(model, reference, plan, tokenizer)
        loaders["transformers from_pretrained(gguf_file=...)" + (" + adapter" if adapter else "")] = check
    if check_tokenizer:  # transformers reads no 'deci' file: then the dense file the tokenizer keys were copied from
        loaders["tokenizer from the file"] = _tokenizer_check(path if layout.arch != "deci" else source_path, tokenizer)
    ok = all(r.get("ok") for r in loaders.values())
    return {"ok": ok, "loaders": loaders, "runtime": "llama.cpp" if layout.arch == "deci" else "llama.cpp, transformers"}


def _logits_check(path: Path, model: nn.Module, plan: DropPlan, tokenizer, *, adapter: Path | None = None,
                  layers: int = 0, arch: str = "llama") -> dict:
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    atol = _default_atol(dtype)
    ids = _fixed_input(tokenizer, model.config.vocab_size)
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if isinstance(t, int)), 0)
    try:
        with torch.inference_mode(), preview_plan(model, plan):
            reference = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()
        with preview_plan(model, plan):
            reference_tokens = _greedy(model, ids.to(next(model.parameters()).device), pad_id).cpu()
        config = load_config(str(path))  # with the file's RoPE scaling, which transformers does not read
        reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=config,
                                                        dtype=dtype).eval()
        if adapter is not None:  # added to the reloaded weights as llama.cpp adds it to its matmuls
            apply_lora_adapter(reloaded, arch, layers, adapter)
        with torch.inference_mode():
            logits = reloaded(input_ids=ids).logits.float()
        diff = float((logits - reference).abs().max()) if logits.shape == reference.shape else float("inf")
        same = bool(torch.equal(_greedy(reloaded, ids, pad_id), reference_tokens))
        return {"ok": diff <= atol and same, "max_abs_diff": diff, "atol": atol, "generation_matches": same}
    except Exception as exc:
        logger.warning("Reloading %s with transformers failed: %s", path, exc)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _tokenizer_check(path: Path, tokenizer) -> dict:
    from transformers import AutoTokenizer

    text = _FIXED_TEXT + " In 2024, 1234 + 5678 = 6912.\n\tDone!"
    try:
        reloaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        want, got = tokenizer(text)["input_ids"], reloaded(text)["input_ids"]
        return {"ok": want == got, "tokens": len(want), "same_ids": want == got}
    except Exception as exc:
        logger.warning("Reading the tokenizer of %s failed: %s", path, exc)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _rounding_kl(model: nn.Module, rounded: nn.Module, plan: DropPlan, tokenizer) -> float:
    """KL(model || model with rounded weights) per token on the fixed input: what the file's type costs."""
    ids = _fixed_input(tokenizer, model.config.vocab_size)
    with torch.inference_mode(), preview_plan(model, plan), preview_plan(rounded, plan):
        exact = model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu().log_softmax(-1)
        approx = rounded(input_ids=ids.to(next(rounded.parameters()).device)).logits.float().cpu().log_softmax(-1)
    return max(float((exact.exp() * (exact - approx)).sum(-1).mean()), 0.0)  # a KL: float noise can dip below 0


def gguf_verdict(verification: dict) -> str:
    """One line: PASSED/FAILED, and what each check found."""
    if verification.get("skipped"):
        return "Verification SKIPPED: the file was not read back after writing."
    parts = []
    for name, r in verification["loaders"].items():
        if "error" in r:
            parts.append(f"{name}: FAILED ({r['error']})")
        elif "same_ids" in r:
            parts.append(f"{name}: " + (f"ok ({r['tokens']} tokens of a fixed text, the same ids)" if r["ok"]
                                        else "FAILED (a fixed text encodes to other ids)"))
        elif "problems" in r and "rank" in r:  # a LoRA adapter
            parts.append(f"{name}: " + (f"ok ({r['tensors']} tensors, rank {r['rank']}, base + product off the "
                                        f"healed weights by {r['max_error']:.1e} of the heal's update)" if r["ok"]
                                        else "FAILED (" + "; ".join(r["problems"][:3]) + ")"))
        elif "problems" in r:
            kept = r.get("kept", "kept tensors byte-identical to the source")
            parts.append(f"{name}: " + (f"ok ({r['tensors']} tensors, {r['layers']} layers, {kept})" if r["ok"]
                                        else "FAILED (" + "; ".join(r["problems"][:3]) + ")"))
        else:
            rounding = (f", against the model rounded as the file stores it (the rounding costs "
                        f"KL {r['rounding_kl']:.2e} nats/token)" if "rounding_kl" in r else "")
            parts.append(f"{name}: {'ok' if r['ok'] else 'FAILED'} (max |logit diff| {r['max_abs_diff']:.2e}, "
                         f"generation {'identical' if r['generation_matches'] else 'DIFFERENT'}{rounding})")
    return f"Verification {'PASSED' if verification['ok'] else 'FAILED'}: " + "; ".join(parts)
