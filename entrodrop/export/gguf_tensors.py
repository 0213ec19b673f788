"""A model's own weights as GGUF tensors: what a GGUF export writes when the source file's stored tensors are
not the weights to ship (a healed model, a converted checkpoint), in a float type or quantised by the ``gguf``
package's own quantiser: Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0 (32-value blocks; gguf has no K-quant quantiser), or
each tensor in the type the source file stores it in (``source``: the tensors a heal left unchanged are
copied as stored, the others re-quantised).

llama.cpp keeps two tensors in another layout than transformers does (read in its converter; checked in
tests/test_gguf_export.py against both bundled files, where the de-quantised model written back this way
equals each file's own tensors de-quantised, exactly):

* Llama family (``llama``, and ``deci`` files made from it): the rows of ``attn_q`` and ``attn_k`` are
  permuted within each head from transformers' rotate-half order to the interleaved pairs llama.cpp rotates;
* Gemma 3: RMSNorm weights are stored as ``1 + w`` (transformers' Gemma norm scales by ``1 + w``, llama.cpp's
  by the stored weight).

Other architectures are refused (:func:`check_float_arch`): a layout not checked here could load and compute
something else. 1-D tensors (norms) are written in float32, as llama.cpp's converter does; the block types need
rows whose length is a multiple of 32, and a tensor whose rows are not is written in float16.

:func:`quantised_copy` gives the in-memory model with every weight rounded as the file holds it, which is
what the written file must reproduce (to float32 rounding) when reloaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..gguf import gguf_reader

GGUF_TYPES: dict[str, str] = {
    "auto": "Gemma 3: f16. Others: as stored for a GGUF-loaded model as dropped; after a linear heal, source; "
            "after a LoRA heal, q8_0; from safetensors, q8_0",
    "stored": "the source's tensors copied as stored (same quantisation, byte for byte)",
    "source": "the model's own weights in the source file's types: tensors it shares with the source copied as "
              "stored, the others re-quantised in their source type (q8_0 where gguf has no quantiser: K-quants)",
    "adapter": "after a LoRA heal: the source's tensors copied as stored, and the heal as a llama.cpp LoRA adapter "
               "file beside them (its low-rank factors in float16)",
    "q8_0": "8-bit blocks by gguf's quantiser (about 1.06 bytes per weight)",
    "q5_1": "5-bit blocks with a minimum (0.75 bytes per weight)",
    "q5_0": "5-bit blocks (0.69 bytes per weight)",
    "q4_1": "4-bit blocks with a minimum (0.625 bytes per weight)",
    "q4_0": "4-bit blocks (0.56 bytes per weight)",
    "f16": "float16 (2 bytes per weight)",
    "bf16": "bfloat16 (2 bytes per weight)",
    "f32": "float32 (4 bytes per weight; the weights exactly)",
}
FLOAT_ARCHS = ("llama", "gemma3")  # layouts checked against real files (module docstring)
# auto by the config's model_type, whatever the source: llama.cpp's quantised arithmetic moves a pruned Gemma 3
# 9-15x as far from itself as the dense model (its stored Q4_K_M copy and Q8_0), and runs its f16 file as it
# is (docs/results.md section 7, "Gemma 3 in llama.cpp")
_AUTO_BY_MODEL = {"gemma3_text": "f16", "gemma3": "f16"}  # the text model, and its multimodal parent
_BLOCK = 32  # values per block of every block type written here


@dataclass(frozen=True)
class _Blocks:
    """How a 32-value block type rounds (ggml's reference quantisers, as gguf's ``quants`` implements them):
    ``levels`` steps of one scale d, stored in float16, from a float16 minimum (``affine``) or around zero;
    ``clip``: the value opposite the block's largest magnitude can land one step off (Q4_0, Q5_0: d = max / -8
    or -16, and the top level is cut), so the bound is a whole step there, half a step otherwise."""

    levels: int
    affine: bool
    clip: bool


def _block_types() -> dict:
    from gguf import GGMLQuantizationType as T

    return {T.Q8_0: _Blocks(127, False, False), T.Q5_1: _Blocks(31, True, False), T.Q5_0: _Blocks(16, False, True),
            T.Q4_1: _Blocks(15, True, False), T.Q4_0: _Blocks(8, False, True)}


def _writable(qtype) -> bool:
    """Whether gguf's quantiser writes ``qtype`` (and :func:`within_rounding` bounds it)."""
    from gguf import GGMLQuantizationType as T

    return qtype in (T.F32, T.F16, T.BF16) or qtype in _block_types()


def describe_gguf_type(gguf_type: str) -> str:
    """A few words for what a file written in ``gguf_type`` holds (after :func:`resolve_gguf_type`)."""
    return {"stored": "the source's quantisation",
            "source": "the source's types (tensors the heal changed re-quantised)",
            "adapter": "the source's quantisation with the heal as a LoRA adapter"}.get(gguf_type, gguf_type)


def resolve_gguf_type(gguf_type: str, *, heal: str | None, gguf_source: bool, model_type: str | None = None) -> str:
    """``gguf_type`` with ``auto`` decided for a model healed by the method ``heal`` (None: not healed).

    From a GGUF source: the source's bytes where they are the weights; after a linear heal, the source's own
    types (its maps change a few matrices by a lot, and re-quantising them keeps the heal: 48% and 70% of the
    lost nats won back against 49% and 73% in float, at the unhealed file's size); after a LoRA heal, Q8_0
    (its update moves every matrix by less than a 4-bit step, and re-quantising erases it: 84% -> 9%).
    Without a GGUF source, Q8_0. Before all that, by ``model_type`` (the config's): float16 for Gemma 3, from any
    source, healed or not; llama.cpp runs its pruned models' quantised files (the stored Q4_K_M copy, Q8_0) 9-15x
    as far from the model as the dense files, and the float16 ones as the model runs. Measured on the
    development part, docs/results.md section 7."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF tensor type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    if gguf_type != "auto":
        return gguf_type
    if model_type in _AUTO_BY_MODEL:
        return _AUTO_BY_MODEL[model_type]
    if not gguf_source:
        return "q8_0"
    return {None: "stored", "linear": "source"}.get(heal, "q8_0")


def check_float_arch(arch: str) -> None:
    """Refuse writing a model's own weights for an architecture whose GGUF layout is not checked here."""
    if arch not in FLOAT_ARCHS:
        raise ValueError(f"Writing new weights into a '{arch}' GGUF is not supported (supported: "
                         f"{', '.join(FLOAT_ARCHS)}): its tensor layout in llama.cpp is not checked here, and a wrong "
                         "one loads and computes something else. Export the source's tensors as stored "
                         "(gguf type 'stored', not for a healed model), or export safetensors.")


def ggml_type(gguf_type: str, shape: tuple[int, ...], stored=None):
    """The ``GGMLQuantizationType`` one tensor of ``shape`` is written in for ``gguf_type`` (``source``: the
    type ``stored`` in the source file, or Q8_0 where gguf cannot write that type). 1-D tensors are float32;
    rows that are not whole 32-value blocks are float16."""
    from gguf import GGMLQuantizationType as T

    if gguf_type == "source":
        if stored is None:
            raise ValueError("GGUF type 'source' needs the source file's tensor type.")
        qtype = stored if _writable(stored) else T.Q8_0
    else:
        qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q5_1": T.Q5_1, "q5_0": T.Q5_0,
                 "q4_1": T.Q4_1, "q4_0": T.Q4_0}[gguf_type]
    if len(shape) < 2:
        return T.F32
    if qtype in _block_types() and shape[-1] % _BLOCK:
        return T.F16
    return qtype


def file_type(gguf_type: str):
    """``general.file_type`` for a file written in ``gguf_type`` (llama.cpp shows it as the file's type;
    ``source`` keeps the source file's own)."""
    from gguf import LlamaFileType as F

    return {"q8_0": F.MOSTLY_Q8_0, "q5_1": F.MOSTLY_Q5_1, "q5_0": F.MOSTLY_Q5_0, "q4_1": F.MOSTLY_Q4_1,
            "q4_0": F.MOSTLY_Q4_0, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "f32": F.ALL_F32}[gguf_type]


def encode(array: np.ndarray, qtype) -> np.ndarray:
    """``array`` (float32) in ``qtype``'s stored form (bytes for the quantised types)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def round_trip(array: np.ndarray, qtype) -> np.ndarray:
    """``array`` as a reader of ``encode(array, qtype)`` sees it (float32)."""
    from gguf.quants import dequantize

    return dequantize(encode(array, qtype), qtype).reshape(array.shape).astype(np.float32)


def _permute_heads(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half rows -> llama.cpp's interleaved pairs, within each of ``heads`` heads."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensor) -> np.ndarray:
    """A GGUF reader's tensor as float32 values in its logical shape (rows, columns: ggml's ``ne`` reversed)."""
    from gguf.quants import dequantize

    return dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(tuple(reversed([int(n) for n in tensor.shape])))


def _unpermute_heads(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`_permute_heads`: llama.cpp's interleaved pairs -> transformers' rotate-half rows."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class ModelTensors:
    """The tensors of ``model`` (transformers names and layout) by GGUF name, in GGUF layout.

    ``arch`` is the GGUF architecture of the source file (``llama`` for a ``deci`` export) and ``num_layers``
    the model's layer count: names keep the model's layer indexes (``blk.N`` of the dense layout). ``source``
    (a GGUF file or its reader) is the file the model came from: GGUF type ``source`` writes each tensor in
    that file's type, and copies the stored bytes of a tensor the model still has unchanged."""

    def __init__(self, model: nn.Module, arch: str, num_layers: int, source=None):
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        check_float_arch(arch)
        self.arch = arch
        self.config = model.config
        key = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
        names = get_tensor_name_map(key, num_layers)
        self._params = dict(model.state_dict(keep_vars=False))
        self._hf_name: dict[str, str] = {}
        for hf_name in self._params:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None:
                self._hf_name.setdefault(gguf_name, hf_name)  # tied lm_head: the embedding comes first
        self._gguf_name = {h: g for g, h in self._hf_name.items()}
        reader = gguf_reader(source) if isinstance(source, (str, Path)) else source
        self._stored = {t.name: t for t in reader.tensors} if reader is not None else {}
        self._unchanged: dict[str, bool] = {}

    def __contains__(self, gguf_name: str) -> bool:
        return gguf_name in self._hf_name

    def names(self) -> list[str]:
        """Every GGUF tensor name the model has a weight for, in the model's order."""
        return list(self._hf_name)

    def hf_name(self, gguf_name: str) -> str:
        """The model's name (transformers') for the GGUF tensor ``gguf_name``."""
        return self._hf_name[gguf_name]

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of the model's weight ``hf_name`` (None where GGUF has none)."""
        return self._gguf_name.get(hf_name)

    def in_source(self, gguf_name: str | None) -> bool:
        """Whether the source file has a tensor ``gguf_name``."""
        return gguf_name in self._stored

    def _heads(self, gguf_name: str) -> int | None:
        """The head count whose rows llama.cpp permutes in ``gguf_name`` (None: not permuted)."""
        if self.arch == "llama" and ".attn_q." in gguf_name:
            return self.config.num_attention_heads
        if self.arch == "llama" and ".attn_k." in gguf_name:
            return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        return None

    def array(self, gguf_name: str) -> np.ndarray:
        """The tensor named ``gguf_name``, float32, in llama.cpp's layout (module docstring)."""
        if gguf_name not in self._hf_name:
            raise KeyError(f"The model has no weight for the GGUF tensor {gguf_name!r}.")
        w = self._params[self._hf_name[gguf_name]].detach().to("cpu", torch.float32).numpy()
        if (heads := self._heads(gguf_name)) is not None:
            w = _permute_heads(w, heads)
        elif self.arch == "gemma3" and gguf_name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        return w

    def add_update(self, gguf_name: str, update: np.ndarray) -> None:
        """Add ``update`` (a change of the matrix ``gguf_name``, in llama.cpp's layout) to the model's weight."""
        if (heads := self._heads(gguf_name)) is not None:
            update = _unpermute_heads(update, heads)
        param = self._params[self._hf_name[gguf_name]]
        param.add_(torch.from_numpy(np.ascontiguousarray(update)).to(param.device, param.dtype))

    def source_array(self, gguf_name: str) -> np.ndarray | None:
        """The source file's tensor ``gguf_name`` de-quantised (float32, llama.cpp's layout); None if it has none."""
        stored = self._stored.get(gguf_name)
        return None if stored is None else dequantized(stored)

    def unchanged(self, gguf_name: str) -> bool:
        """Whether the source file's tensor de-quantises to the model's weight exactly (so its bytes are it)."""
        if gguf_name not in self._unchanged:
            stored, w = self.source_array(gguf_name), self.array(gguf_name)
            self._unchanged[gguf_name] = stored is not None and np.array_equal(stored.reshape(w.shape), w)
        return self._unchanged[gguf_name]

    def written_type(self, gguf_name: str, gguf_type: str):
        """The type ``gguf_name`` is written in for ``gguf_type``; None where its stored bytes are copied."""
        stored = self._stored.get(gguf_name)
        if gguf_type == "source":
            if stored is None:
                raise ValueError(f"GGUF type 'source' writes tensors in the source file's types, and the source has "
                                 f"no {gguf_name!r}: choose a type such as q8_0.")
            if self.unchanged(gguf_name):
                return None
        return ggml_type(gguf_type, tuple(self._params[self._hf_name[gguf_name]].shape),
                         None if stored is None else stored.tensor_type)

    def encoded(self, gguf_name: str, gguf_type: str) -> tuple[np.ndarray, object]:
        """(stored data, GGMLQuantizationType) of ``gguf_name`` written in ``gguf_type``."""
        qtype = self.written_type(gguf_name, gguf_type)
        if qtype is None:
            stored = self._stored[gguf_name]
            return np.asarray(stored.data), stored.tensor_type
        return encode(self.array(gguf_name), qtype), qtype


def quantised_copy(model: nn.Module, gguf_type: str, tensors: ModelTensors | None = None) -> nn.Module:
    """A copy of ``model`` whose weights are rounded as a ``gguf_type`` file stores them (float32 weights).

    The block types and the float types round row by row, so rounding in transformers' layout gives the values
    of the file's layout (the Llama row permutation only reorders rows; Gemma's ``1 + w`` norms stay float32).
    ``source`` needs ``tensors`` (with the source file), which says each weight's type, or that it is copied
    as stored (then the file holds the weight exactly)."""
    if gguf_type == "source" and tensors is None:
        raise ValueError("Rounding as GGUF type 'source' needs the model's tensors with their source file.")
    rounded = copy.deepcopy(model).float()
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            w = param.detach().cpu().numpy()
            if gguf_type == "source":
                gguf_name = tensors.gguf_name(name)
                qtype = tensors.written_type(gguf_name, gguf_type) if tensors.in_source(gguf_name) else None
            else:
                qtype = ggml_type(gguf_type, w.shape)
            if qtype is not None:
                param.copy_(torch.from_numpy(round_trip(w, qtype)))
    return rounded


def _f16_error(value: np.ndarray) -> np.ndarray:
    """How far storing ``value`` in float16 can move it: 2^-11 relative, or 2^-25 where it is subnormal."""
    return np.maximum(np.abs(value) * np.float32(2.0 ** -11), np.float32(2.0 ** -25))


def within_rounding(stored: np.ndarray, qtype, expected: np.ndarray) -> bool:
    """Whether ``stored`` (a written tensor's data, ``qtype``) de-quantises to ``expected`` within the rounding
    ``qtype`` allows, so a tensor written from another weight, or to another name, fails.

    Bounds: a tensor that de-quantises to ``expected`` exactly passes in any type (bytes copied as stored);
    float32 must be exact; float16 and bfloat16 half a unit in the last place (2^-11, 2^-8 relative); a block
    type (:class:`_Blocks`) half a step of its block's scale (a whole step where the top level is clipped), plus
    the scale's float16 rounding times the number of levels and, for the types with a minimum, the minimum's."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    got = dequantize(stored, qtype).reshape(expected.shape).astype(np.float32)
    want = np.asarray(expected, dtype=np.float32)
    if np.array_equal(got, want):
        return True
    if qtype == T.F32:
        return False
    if qtype in (T.F16, T.BF16):
        rel = 2.0 ** -11 if qtype == T.F16 else 2.0 ** -8
        return bool(np.all(np.abs(got - want) <= np.float32(rel * 1.001) * np.abs(want) + np.float32(6e-8)))
    spec = _block_types().get(qtype)
    if spec is None:
        raise ValueError(f"No rounding bound for {qtype.name}.")
    blocks = want.reshape(-1, _BLOCK)
    if spec.affine:
        low = blocks.min(axis=1, keepdims=True)
        step = (blocks.max(axis=1, keepdims=True) - low) / np.float32(spec.levels)
        slack = _f16_error(step) * np.float32(spec.levels) + _f16_error(low)
    else:
        step = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(spec.levels)
        slack = _f16_error(step) * np.float32(spec.levels)
    err = np.abs(got.reshape(-1, _BLOCK) - blocks)
    return bool(np.all(err <= np.float32(1.001 if spec.clip else 0.501) * step + slack + np.float32(1e-9)))
