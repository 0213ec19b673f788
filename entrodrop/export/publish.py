"""Publishing an export: a zip for download, or an upload to the Hugging Face Hub."""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..progress import ProgressEvent, run_to_end
from .metadata import METADATA_FILE

ZIP_CHUNK = 8 * 2**20  # bytes copied between two progress events


def iter_zip_export(out_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> Iterator[ProgressEvent]:
    """Zip an export folder (for download), streaming stage ``zip`` events of ``done`` of ``total`` bytes;
    the last event's ``partial`` is the ``.zip`` path (next to the folder by default).

    Entries are stored, not deflated: safetensors weights do not compress, and deflating them
    costs about a minute of CPU for a 135M model. Written under a temporary name, then renamed,
    so a stopped or failed zip leaves nothing behind."""
    folder = Path(out_dir).expanduser().absolute()
    if not (folder / METADATA_FILE).is_file():  # safetensors and GGUF exports both write it
        raise ValueError(f"{folder} is not an export folder (no {METADATA_FILE}).")
    dest = Path(dest).expanduser().absolute() if dest is not None else folder.parent / f"{folder.name}.zip"
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    done = 0
    yield ProgressEvent("zip", 0, total)
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for path in files:
                info = zipfile.ZipInfo.from_file(path, arcname=str(Path(folder.name) / path.relative_to(folder)))
                info.compress_type = zipfile.ZIP_STORED
                with open(path, "rb") as src, archive.open(info, "w", force_zip64=True) as out:
                    while chunk := src.read(ZIP_CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        yield ProgressEvent("zip", done, total)
        os.replace(partial, dest)
    except BaseException:  # GeneratorExit too: a consumer that stops early leaves no partial file
        if partial.exists():
            partial.unlink()
        raise
    yield ProgressEvent("zip", total, total, dest)


def zip_export(out_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Zip an export folder; returns the ``.zip`` path (see :func:`iter_zip_export`)."""
    return run_to_end(iter_zip_export(out_dir, dest))


def push_folder_to_hub(folder: str | Path, repo_id: str, token: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo URL.

    Raises ValueError with what to do for a missing token or repo id, an unreachable hub
    (offline) or a refused token."""
    folder = Path(folder)
    repo_id = (repo_id or "").strip()
    token = (token or "").strip()
    if not (folder / METADATA_FILE).is_file():
        raise ValueError(f"Export the pruned model first, then push it ({folder} has no {METADATA_FILE}).")
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError("Give a repository id such as your-name/smollm2-pruned.")
    if not token:
        raise ValueError("Give a Hugging Face access token with write permission (huggingface.co/settings/tokens).")
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise ValueError("Pushing needs the huggingface_hub package: pip install huggingface_hub.") from exc
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload EntroDrop pruned model")
    except Exception as exc:  # offline mode, connection errors, HTTP 401/403...
        text = f"{type(exc).__name__}: {exc}"
        lowered = text.lower()
        if any(w in lowered for w in ("offline", "connect", "resolve", "timed out", "timeout", "network", "unreachable")):
            raise ValueError(f"Could not reach the Hugging Face Hub ({text}). Check the network, or download the zip "
                             "and upload it yourself.") from exc
        if any(w in lowered for w in ("401", "403", "unauthorized", "forbidden", "token")):
            raise ValueError(f"The Hub refused the token ({text}). Use a token with write permission.") from exc
        raise ValueError(f"Pushing to the Hub failed ({text}).") from exc
    return str(getattr(url, "url", url))
