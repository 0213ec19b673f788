"""A model's own weights as GGUF tensors: what a GGUF export writes when the source file's stored tensors are
not the weights to ship (a healed model), in a float type or re-quantised to Q8_0 by the ``gguf`` package's
own quantiser.

llama.cpp keeps two tensors in another layout than transformers does (read in its converter; checked in
tests/test_gguf_export.py against both bundled files, where the de-quantised model written back this way
equals each file's own tensors de-quantised, exactly):

* Llama family (``llama``, and ``deci`` files made from it): the rows of ``attn_q`` and ``attn_k`` are
  permuted within each head from transformers' rotate-half order to the interleaved pairs llama.cpp rotates;
* Gemma 3: RMSNorm weights are stored as ``1 + w`` (transformers' Gemma norm scales by ``1 + w``, llama.cpp's
  by the stored weight).

Other architectures are refused (:func:`check_float_arch`): a layout not checked here could load and compute
something else. 1-D tensors (norms) are written in float32, as llama.cpp's converter does; Q8_0 needs rows
whose length is a multiple of its 32-value block, and a tensor whose rows are not is written in float16.

:func:`quantised_copy` gives the in-memory model with every weight rounded as the file holds it, which is
what the written file must reproduce (to float32 rounding) when reloaded.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

GGUF_TYPES: dict[str, str] = {
    "auto": "as stored for a GGUF-loaded model as dropped; q8_0 for a healed one or a safetensors source",
    "stored": "the source's tensors copied as stored (same quantisation, byte for byte)",
    "q8_0": "8-bit blocks by gguf's quantiser (about 1.06 bytes per weight)",
    "f16": "float16 (2 bytes per weight)",
    "bf16": "bfloat16 (2 bytes per weight)",
    "f32": "float32 (4 bytes per weight; the weights exactly)",
}
FLOAT_ARCHS = ("llama", "gemma3")  # layouts checked against real files (module docstring)
_Q8_BLOCK = 32


def resolve_gguf_type(gguf_type: str, *, healed: bool, gguf_source: bool) -> str:
    """``gguf_type`` with ``auto`` decided: the source's bytes where they are the weights, else q8_0."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF tensor type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    if gguf_type == "auto":
        return "stored" if gguf_source and not healed else "q8_0"
    return gguf_type


def check_float_arch(arch: str) -> None:
    """Refuse writing a model's own weights for an architecture whose GGUF layout is not checked here."""
    if arch not in FLOAT_ARCHS:
        raise ValueError(f"Writing new weights into a '{arch}' GGUF is not supported (supported: "
                         f"{', '.join(FLOAT_ARCHS)}): its tensor layout in llama.cpp is not checked here, and a wrong "
                         "one loads and computes something else. Export the source's tensors as stored "
                         "(gguf type 'stored', not for a healed model), or export safetensors.")


def ggml_type(gguf_type: str, shape: tuple[int, ...]):
    """The ``GGMLQuantizationType`` one tensor of ``shape`` is written in for ``gguf_type``."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or gguf_type == "f32":
        return T.F32
    if gguf_type == "q8_0":
        return T.Q8_0 if shape[-1] % _Q8_BLOCK == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[gguf_type]


def file_type(gguf_type: str):
    """``general.file_type`` for a file written in ``gguf_type`` (llama.cpp shows it as the file's type)."""
    from gguf import LlamaFileType

    return {"q8_0": LlamaFileType.MOSTLY_Q8_0, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "f32": LlamaFileType.ALL_F32}[gguf_type]


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


class ModelTensors:
    """The tensors of ``model`` (transformers names and layout) by GGUF name, in GGUF layout.

    ``arch`` is the GGUF architecture of the source file (``llama`` for a ``deci`` export) and ``num_layers``
    the model's layer count: names keep the model's layer indexes (``blk.N`` of the dense layout)."""

    def __init__(self, model: nn.Module, arch: str, num_layers: int):
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

    def __contains__(self, gguf_name: str) -> bool:
        return gguf_name in self._hf_name

    def names(self) -> list[str]:
        """Every GGUF tensor name the model has a weight for, in the model's order."""
        return list(self._hf_name)

    def array(self, gguf_name: str) -> np.ndarray:
        """The tensor named ``gguf_name``, float32, in llama.cpp's layout (module docstring)."""
        if gguf_name not in self._hf_name:
            raise KeyError(f"The model has no weight for the GGUF tensor {gguf_name!r}.")
        w = self._params[self._hf_name[gguf_name]].detach().to("cpu", torch.float32).numpy()
        if self.arch == "llama" and ".attn_q." in gguf_name:
            w = _permute_heads(w, self.config.num_attention_heads)
        elif self.arch == "llama" and ".attn_k." in gguf_name:
            w = _permute_heads(w, getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)
        elif self.arch == "gemma3" and gguf_name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        return w

    def encoded(self, gguf_name: str, gguf_type: str) -> tuple[np.ndarray, object]:
        """(stored data, GGMLQuantizationType) of ``gguf_name`` written in ``gguf_type``."""
        w = self.array(gguf_name)
        qtype = ggml_type(gguf_type, w.shape)
        return encode(w, qtype), qtype


def quantised_copy(model: nn.Module, gguf_type: str) -> nn.Module:
    """A copy of ``model`` whose weights are rounded as a ``gguf_type`` file stores them (float32 weights).

    Q8_0 and the float types round row by row, so rounding in transformers' layout gives the values of the
    file's layout (the Llama row permutation only reorders rows; Gemma's ``1 + w`` norms stay float32)."""
    rounded = copy.deepcopy(model).float()
    with torch.no_grad():
        for param in rounded.parameters():
            w = param.detach().cpu().numpy()
            param.copy_(torch.from_numpy(round_trip(w, ggml_type(gguf_type, w.shape))))
    return rounded


def within_rounding(stored: np.ndarray, qtype, expected: np.ndarray) -> bool:
    """Whether ``stored`` (a written tensor's data, ``qtype``) de-quantises to ``expected`` within the rounding
    ``qtype`` allows, so a tensor written from another weight, or to another name, fails.

    Bounds: float32 exact; float16 and bfloat16 half a unit in the last place (2^-11, 2^-8 relative); Q8_0
    half a step of its block's scale (largest |value| / 127) plus 127 times the scale's own float16 rounding
    (2^-11 relative, or 2^-25 where the scale is a float16 subnormal)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    got = dequantize(stored, qtype).reshape(expected.shape).astype(np.float32)
    want = np.asarray(expected, dtype=np.float32)
    if qtype == T.F32:
        return bool(np.array_equal(got, want))
    if qtype in (T.F16, T.BF16):
        rel = 2.0 ** -11 if qtype == T.F16 else 2.0 ** -8
        return bool(np.all(np.abs(got - want) <= np.float32(rel * 1.001) * np.abs(want) + np.float32(6e-8)))
    if qtype == T.Q8_0:
        blocks = want.reshape(-1, _Q8_BLOCK)
        step = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        # the scale is stored in float16: relative error 2^-11, or 2^-25 absolute where it is subnormal
        slack = np.maximum(step * np.float32(2.0 ** -11), np.float32(2.0 ** -25)) * np.float32(127)
        err = np.abs(got.reshape(-1, _Q8_BLOCK) - blocks)
        return bool(np.all(err <= np.float32(0.501) * step + slack + np.float32(1e-9)))
    raise ValueError(f"No rounding bound for {qtype.name}.")
