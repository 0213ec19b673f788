"""What a visitor may make the server read: files they uploaded here, the bundled models, hub ids.

Every endpoint argument that could name a server path goes through this module:

* **uploads** (:class:`UploadGate`): a file source is read only when its path, symlinks followed,
  is a file that *this server's upload route received* (gradio records each one in
  ``Blocks.upload_file_set``) and lies in gradio's upload folder outside every session folder. Gradio
  stores an upload under the SHA-256 of its content, so naming another visitor's upload needs its
  content already. Anything else gets :data:`NOT_AN_UPLOAD`, one message whether the path exists,
  is a folder, a symlink out of the folder or someone's export;
* **the model field** (:func:`check_model_spec`): bundled aliases and Hugging Face Hub ids only,
  unless the operator sets ``ENTRODROP_ALLOW_LOCAL_MODELS=1``; every refusal, and every hub miss,
  reads :func:`model_refusal`, so no answer tells whether a server path exists;
* hub *data set* names are checked by the library (``load_corpus(..., hub_only=True)``), which answers
  a name that exists on disk exactly as it answers a name the hub does not have.

The command line is for a machine's own user and reads any path it is given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..bundled import BUNDLED_MODELS
from ..loading import ModelNotFoundError, looks_like_hub_id
from . import storage

logger = logging.getLogger(__name__)

ALLOW_LOCAL_MODELS = "ENTRODROP_ALLOW_LOCAL_MODELS"
NOT_AN_UPLOAD = ("That file is not one uploaded to this page. Upload a .txt, .md, .jsonl, .json, .csv, .tsv or "
                 ".parquet file with the upload field, or pick a bundled set.")


def local_models_allowed() -> bool:
    """Whether the operator lets the model field take local folders and .gguf paths (read per request)."""
    return os.environ.get(ALLOW_LOCAL_MODELS, "").strip().lower() in ("1", "true", "yes")


def model_refusal(spec: str) -> str:
    """The one answer to every model the public model field will not load, whatever the reason."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    return (f"Could not load '{shown}': this server loads its bundled models ({', '.join(BUNDLED_MODELS)}) and "
            "Hugging Face Hub ids such as HuggingFaceTB/SmolLM2-360M, and this is neither one it has nor one the hub "
            "gave it. Check the id, or pick a bundled model.")


def check_model_spec(spec: str) -> None:
    """Refuse, with :func:`model_refusal`, a model field the public app must not load: anything but a bundled
    alias or a hub-shaped id, and hub-shaped ids that name something on this server's disk (transformers
    would read that instead of asking the hub). With ``ENTRODROP_ALLOW_LOCAL_MODELS=1`` everything passes."""
    if local_models_allowed():
        return
    text = (spec or "").strip()
    if text.lower() in BUNDLED_MODELS:
        return
    # lexists, not exists: a dangling symlink of that name would still be read by transformers
    if not looks_like_hub_id(text) or os.path.lexists(text) or os.path.lexists(os.path.expanduser(text)):
        raise ValueError(model_refusal(text))


def public_model_error(spec: str, exc: Exception) -> Exception:
    """``exc`` as a visitor of a public app sees it: a hub miss reads like every other refusal."""
    if isinstance(exc, ModelNotFoundError) and not local_models_allowed():
        logger.info("Model %r not loaded: %s", spec, exc)
        return ValueError(model_refusal(spec))
    return exc


class UploadGate:
    """Accepts the paths of files this server's upload route received; refuses every other path alike.

    Made before the app's ``gr.Blocks`` and attached to it once built (:meth:`attach`); until then it
    refuses everything."""

    def __init__(self) -> None:
        self._blocks = None

    def attach(self, blocks) -> None:
        self._blocks = blocks

    def _received(self) -> set[Path]:
        received = getattr(self._blocks, "upload_file_set", None) or set()
        paths = set()
        for name in list(received):
            try:
                paths.add(Path(name).resolve(strict=True))
            except OSError:  # removed by gradio's cache cleaning since
                continue
        return paths

    def check(self, path) -> str:
        """The resolved path of an upload this server received, else ValueError(:data:`NOT_AN_UPLOAD`)."""
        from gradio.utils import get_upload_folder

        try:
            resolved = Path(str(path)).resolve(strict=True)
            resolved.relative_to(Path(get_upload_folder()).resolve())
            if not resolved.is_file() or storage.in_sessions_root(resolved) or resolved not in self._received():
                raise ValueError
        except (OSError, ValueError, RuntimeError, TypeError):  # RuntimeError: a symlink loop
            raise ValueError(NOT_AN_UPLOAD) from None
        return str(resolved)
