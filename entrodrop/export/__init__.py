"""Write a pruned model to a folder that really reloads, and prove it did.

The folder holds safetensors weights without the dropped blocks, ``config.json``, the tokenizer,
``entrodrop.json`` (plan, criterion, per-block scores, calibration settings, checks, package
versions) and a model card ``README.md``. How it reloads:

* only whole layers dropped: plain ``AutoModelForCausalLM.from_pretrained(DIR)`` — the config's
  layer count and per-layer fields describe the smaller model, no remote code;
* attention/MLP sub-blocks dropped: :func:`load_pruned` (``config.entrodrop_dropped`` says which
  modules become weightless stand-ins), or, opt-in, ``from_pretrained(DIR, trust_remote_code=True)``
  through a self-contained ``modeling_entrodrop.py`` written next to the weights.

Every export is verified after writing: reloaded from disk, its logits on a fixed input compared
with the in-memory pruned model, a few tokens generated. The verdict goes into the card and
:attr:`ExportResult.ok`. Writing is atomic.

One module per concept:

* :mod:`.write` — :func:`export_pruned` and :class:`ExportResult`;
* :mod:`.target` — the target folder: :func:`check_target`, atomic write;
* :mod:`.verification` — :func:`verify_export`, the reload proof;
* :mod:`.reload` — :func:`load_pruned` and the generated ``modeling_entrodrop.py``;
* :mod:`.card` — the model card, the verdict line, the reload hint;
* :mod:`.metadata` — ``entrodrop.json``: :class:`ModelSource`, package versions, :func:`jsonable`;
* :mod:`.publish` — :func:`zip_export`, :func:`push_folder_to_hub`;
* :mod:`.gguf_write` — the GGUF writer (kept tensors copied as stored; ``deci`` for attention drops) and
  what it refuses; :mod:`.gguf_tensors` — a model's own weights (a healed model's) in GGUF layout, float or
  Q8_0; :mod:`.gguf_export` — :func:`export_gguf`, the verified GGUF folder for llama.cpp / Ollama.
"""

from .gguf_export import check_gguf_export, export_gguf, gguf_type_for
from .gguf_tensors import GGUF_TYPES, describe_gguf_type, resolve_gguf_type
from .metadata import EXPORT_FORMAT_VERSION, METADATA_FILE, ModelSource, jsonable, package_versions
from .publish import iter_zip_export, push_folder_to_hub, zip_export
from .reload import REMOTE_CODE_FILE, load_pruned, remote_code_source
from .target import TargetNotEmptyError, check_target
from .verification import verify_export
from .write import (
    EXPORT_DTYPES,
    ExportResult,
    default_export_dtype,
    export_dtype_for,
    export_pruned,
    export_size_bytes,
    weights_bytes_in,
)

__all__ = [
    "EXPORT_DTYPES", "EXPORT_FORMAT_VERSION", "GGUF_TYPES", "METADATA_FILE", "REMOTE_CODE_FILE", "ExportResult", "ModelSource",
    "TargetNotEmptyError", "check_gguf_export", "check_target", "describe_gguf_type", "export_gguf", "gguf_type_for", "default_export_dtype", "export_dtype_for", "export_pruned",
    "export_size_bytes", "iter_zip_export", "jsonable", "load_pruned", "package_versions",
    "push_folder_to_hub", "remote_code_source", "resolve_gguf_type", "verify_export", "weights_bytes_in", "zip_export",
]
