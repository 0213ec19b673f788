"""A LoRA heal as a llama.cpp LoRA adapter: the pruned file keeps the source's tensors as stored, and a second,
small GGUF file holds the heal as low-rank factors that llama.cpp adds as it runs (``llama-cli --lora``,
Ollama's ``ADAPTER``): GGUF type ``adapter``.

Why: LoRA moves every matrix of the kept blocks by less than a 4-bit step, so the healed weights re-quantised
in the source's types lose the heal (docs/results.md section 7: 80% of the lost nats won back becomes 9%), and
Q8_0 keeps it at x1.46 the size. The heal trained on the source's weights as de-quantised, which the stored
bytes are exactly, so the stored base plus the adapter is the healed model, whatever the source's quantisation.

Each changed matrix's update (the healed weight minus the source tensor de-quantised, in llama.cpp's layout)
has the heal's rank: an SVD factors it as ``lora_b`` (out x rank) times ``lora_a`` (rank x in), the singular
values split evenly between them, written in float16 (as llama.cpp's own LoRA converter writes them by
default; the rounding moves the update by about 1e-3 of itself, where Q8_0 moves the whole weight by about
that much). ``adapter.lora.alpha`` is the rank, so llama.cpp's scale (alpha / rank) is 1. A heal that changed
anything else (a norm, or a matrix by more than that rank) is refused: the adapter could not carry it.

The format, read in llama.cpp's ``llama-adapter.cpp``: ``general.type`` "adapter", ``general.architecture``
the base file's, ``adapter.type`` "lora", ``adapter.lora.alpha`` (float32); tensors ``<base name>.lora_a``
(ggml ``ne`` [in, rank]) and ``<base name>.lora_b`` (``ne`` [rank, out]), each pair matching a base tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..gguf import gguf_reader
from .gguf_tensors import ModelTensors, dequantized

_MAX_ERROR = 1e-4  # relative (Frobenius) error of the factored update: float rounding, not a lost direction
_MAX_WRITTEN_ERROR = 1e-2  # the same once the factors are float16, as written


@dataclass
class LoraFactors:
    """One matrix's update as ``b @ a``, and how far that is from the update (relative Frobenius error)."""

    a: np.ndarray  # (rank, in), float32
    b: np.ndarray  # (out, rank), float32
    error: float


def check_adapter_heal(method: str | None) -> None:
    """Refuse GGUF type ``adapter`` for a model not healed by LoRA (``method``: the heal's, None if not healed)."""
    if method != "lora":
        raise ValueError("GGUF type 'adapter' writes a LoRA heal as a llama.cpp LoRA adapter beside the stored "
                         "source tensors; " + (f"this model was healed by the {method} method, whose maps change a "
                                               "few matrices at full rank: choose 'source' (or auto)."
                                               if method else "this model is not healed: choose 'stored' (or auto)."))


def heal_rank(heal: dict | None) -> int:
    """The LoRA rank of a heal record (ValueError for a heal the adapter cannot carry)."""
    check_adapter_heal(heal["method"] if heal else None)
    return int(heal["settings"]["rank"])


def lora_factors(tensors: ModelTensors, rank: int, kept) -> dict[str, LoraFactors]:
    """Each tensor of ``kept`` (the source's names: the dense layout) that the heal changed, factored at ``rank``.

    ValueError where a change is not a matrix of that rank (module docstring)."""
    out = {}
    for name in tensors.names():
        if name not in kept or not tensors.in_source(name) or tensors.unchanged(name):
            continue
        healed = tensors.array(name)
        update = healed - tensors.source_array(name).reshape(healed.shape)
        if update.ndim != 2:
            raise ValueError(f"The heal changed {name}, which is not a matrix, so a LoRA adapter cannot carry it: "
                             "choose GGUF type q8_0.")
        u, s, vt = torch.linalg.svd(torch.from_numpy(update).double(), full_matrices=False)
        root = s[:rank].sqrt()
        b, a = (u[:, :rank] * root).float(), (root[:, None] * vt[:rank]).float()
        norm = float(np.linalg.norm(update))
        error = float(np.linalg.norm(update - (b @ a).numpy()) / norm) if norm else 0.0
        if error > _MAX_ERROR:
            raise ValueError(f"The heal changed {name} by more than a rank-{rank} update (relative error "
                             f"{error:.1e} at that rank), so a LoRA adapter cannot carry it: choose GGUF type q8_0.")
        out[name] = LoraFactors(a.numpy(), b.numpy(), error)
    if not out:
        raise ValueError("The healed model's weights equal the source's: there is no update for an adapter. Export "
                         "with GGUF type 'stored'.")
    return out


def write_lora_adapter(path: Path, arch: str, factors: dict[str, LoraFactors], rank: int, provenance: dict) -> None:
    """Write ``factors`` (by the base file's tensor names) as a llama.cpp LoRA adapter for an ``arch`` base."""
    from gguf import GGUFType, GGUFWriter, Keys

    from .gguf_write import PROVENANCE_PREFIX, _add_provenance

    writer = GGUFWriter(str(path), arch, use_temp_file=False)
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(rank))  # llama.cpp scales by alpha / rank: 1
    for key, value in provenance.items():
        _add_provenance(writer, PROVENANCE_PREFIX + key, value)
    for name, f in factors.items():
        writer.add_tensor(f"{name}.lora_a", f.a.astype(np.float16))
        writer.add_tensor(f"{name}.lora_b", f.b.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_lora_adapter(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(metadata, base tensor name -> (a, b)) of an adapter file; a tensor without its pair is left out."""
    reader = gguf_reader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".lora_")
        parts.setdefault(base, {})[part] = np.asarray(t.data, dtype=np.float32)
    return meta, {n: (p["a"], p["b"]) for n, p in parts.items() if set(p) == {"a", "b"}}


def _scale(meta: dict, pairs: dict) -> float:
    """llama.cpp's scale of an adapter's products at strength 1: alpha / rank, or 1 without alpha."""
    alpha = float(meta.get("adapter.lora.alpha") or 0)
    return alpha / next(iter(pairs.values()))[0].shape[0] if alpha and pairs else 1.0


def check_lora_adapter(path: Path, base_path: Path, tensors: ModelTensors, source_names: dict[str, str]) -> dict:
    """Read the adapter back against its base file and the healed model (``tensors``, dense layout; ``source_names``
    maps the base file's names to the source's): what llama.cpp checks when it loads an adapter (type, architecture,
    names, shapes), that every changed tensor has its update, and that base + ``b @ a`` is the healed weight."""
    meta, pairs = read_lora_adapter(path)
    reader = gguf_reader(base_path)
    base, base_arch = {t.name: t for t in reader.tensors}, reader.fields["general.architecture"].contents()
    problems = []
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        problems.append(f"not a LoRA adapter (general.type {meta.get('general.type')!r})")
    if meta.get("general.architecture") != base_arch:
        problems.append(f"architecture {meta.get('general.architecture')!r}, the base file's is {base_arch!r}")
    rank = {a.shape[0] for a, _ in pairs.values()}
    scale = _scale(meta, pairs)
    changed = {n for n, s in source_names.items() if tensors.in_source(s) and s in tensors and not tensors.unchanged(s)}
    if set(pairs) != changed:
        problems.append(f"{len(changed - set(pairs))} changed tensor(s) without an update, "
                        f"{len(set(pairs) - changed)} update(s) of unchanged or unknown tensors")
    worst = 0.0
    for name, (a, b) in pairs.items():
        if name not in base or name not in changed:
            continue
        out_dim, in_dim = (int(n) for n in reversed(list(base[name].shape)))
        if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
            problems.append(f"{name}: lora_a {a.shape} and lora_b {b.shape} do not fit the base's ({out_dim}, {in_dim})")
            continue
        stored = dequantized(base[name])
        want = tensors.array(source_names[name])
        error = float(np.linalg.norm(stored + scale * (b @ a) - want) / max(np.linalg.norm(want - stored), 1e-30))
        worst = max(worst, error)
    if worst > _MAX_WRITTEN_ERROR:
        problems.append(f"base + update is off the healed weights by up to {worst:.1e} of the update")
    return {"ok": not problems, "problems": problems, "tensors": 2 * len(pairs), "rank": max(rank) if rank else 0,
            "max_error": worst, "bytes": path.stat().st_size}


def apply_lora_adapter(model, arch: str, num_layers: int, path: Path) -> None:
    """Add the adapter's updates to ``model`` (a model loaded from the adapter's base file), as llama.cpp does."""
    meta, pairs = read_lora_adapter(path)
    scale = _scale(meta, pairs)
    tensors = ModelTensors(model, arch, num_layers)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            tensors.add_update(name, scale * (b @ a))


def adapted_copy(model, arch: str, path: Path, source_path: Path, source_names: dict[str, str]):
    """A copy of ``model`` (the healed model, dense layout) with each adapted matrix as llama.cpp computes it from
    the files: the source's tensor de-quantised plus the adapter's product of float16 factors. What the base with
    the adapter must reproduce; its distance from ``model`` is what writing the factors in float16 costs."""
    rounded = copy.deepcopy(model)
    tensors = ModelTensors(rounded, arch, model.config.num_hidden_layers, source=source_path)
    meta, pairs = read_lora_adapter(path)
    scale = _scale(meta, pairs)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            src = source_names[name]
            now = tensors.array(src)
            tensors.add_update(src, tensors.source_array(src).reshape(now.shape) + scale * (b @ a) - now)
    return rounded
