"""Publishing an export: a zip for download, or an upload to the Hugging Face Hub."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path


def zip_export(out_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Zip an export folder (for download); returns the ``.zip`` path, next to the folder by default.

    Entries are stored, not deflated: safetensors weights do not compress, and deflating them
    costs about a minute of CPU for a 135M model. Written under a temporary name, then renamed."""
    folder = Path(out_dir).expanduser().absolute()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an export folder (no config.json).")
    dest = Path(dest).expanduser().absolute() if dest is not None else folder.parent / f"{folder.name}.zip"
    partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
            for path in sorted(folder.rglob("*")):
                archive.write(path, arcname=str(Path(folder.name) / path.relative_to(folder)))
        os.replace(partial, dest)
    except BaseException:
        if partial.exists():
            partial.unlink()
        raise
    return dest


def push_folder_to_hub(folder: str | Path, repo_id: str, token: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo URL.

    Raises ValueError with what to do for a missing token or repo id, an unreachable hub
    (offline) or a refused token."""
    folder = Path(folder)
    repo_id = (repo_id or "").strip()
    token = (token or "").strip()
    if not (folder / "config.json").is_file():
        raise ValueError(f"Export the pruned model first, then push it ({folder} has no config.json).")
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
