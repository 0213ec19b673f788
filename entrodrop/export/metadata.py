"""What an export says about itself in ``entrodrop.json``: the model's source, package versions, and
the JSON form of everything else (reports, tensors, paths)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..gguf import quant_method

EXPORT_FORMAT_VERSION = 1
METADATA_FILE = "entrodrop.json"


@dataclass(frozen=True)
class ModelSource:
    """Where the dense model came from; every field optional (a bare model names itself from its config)."""

    name: str | None = None
    source: str | None = None  # "bundled" | "local" | "gguf" | "hub", as loading.LoadedModel says
    gguf_file: str | None = None  # the GGUF file the de-quantised weights came from

    @classmethod
    def of(cls, loaded) -> ModelSource:
        """The source of a :class:`~entrodrop.loading.LoadedModel`."""
        return cls(name=loaded.name, source=loaded.source, gguf_file=loaded.gguf_file)

    def is_gguf(self, model: nn.Module) -> bool:
        """Whether the weights are de-quantised GGUF (said by the source or by the model's config)."""
        return self.source == "gguf" or bool(self.gguf_file) or quant_method(model.config) == "gguf"


def package_versions() -> dict:
    """Versions of entrodrop, torch, transformers, python (and safetensors if installed)."""
    import transformers

    try:
        from importlib.metadata import version

        entrodrop_version = version("entrodrop")
    except Exception:  # not installed as a distribution (running from a checkout)
        entrodrop_version = "unknown"
    versions = {"entrodrop": entrodrop_version, "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import safetensors

        versions["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return versions


def jsonable(obj):
    """``obj`` as plain JSON types: ``to_dict()`` for reports, lists for tensors, strings for the rest."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
