"""The export's target folder: checked before any heavy work, written atomically.

Everything goes into a hidden temp folder next to the target (same filesystem, so the final rename
is atomic) and is renamed into place at the end; any failure removes it and leaves an old target
as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TargetNotEmptyError(ValueError):
    """The target folder holds files and ``overwrite`` was not given.

    A ValueError whose ``path`` lets each front end say how to overwrite in its own words."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is not empty. Pass overwrite=True to replace it, or choose an empty folder.")
        self.path = path


def check_target(out_dir, overwrite: bool = False, needed_bytes: int = 0) -> Path:
    """Check the target before any heavy work: refuse a non-empty folder without ``overwrite``
    (:class:`TargetNotEmptyError`), an unwritable location (PermissionError) and, when ``needed_bytes``
    is given, too little free space (OSError ENOSPC). Returns the absolute target path."""
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is a file; choose a folder path for the export.")
    try:
        busy = target.is_dir() and any(target.iterdir())
    except OSError as exc:
        raise OSError(exc.errno, f"Cannot read the export folder {target} ({exc.strerror or exc}); choose a folder "
                                 "you can write to.") from exc
    if busy and not overwrite:
        raise TargetNotEmptyError(target)
    parent = target.parent
    for above in (parent, *parent.parents):  # "out.txt/sub": a file where a folder must be
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{above} is a file, so {target} cannot be created inside it; choose a folder path "
                                 "for the export.")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"Cannot create {parent} ({exc.strerror or exc}); choose a folder you can "
                                 "write to.") from exc
    if not os.access(parent, os.W_OK | os.X_OK) or (target.is_dir() and not os.access(target, os.W_OK | os.X_OK)):
        raise PermissionError(errno.EACCES, f"Cannot write to {parent}: permission denied. Choose a folder you can "
                                            "write to.")
    probe = parent / f".{target.name}.probe-{uuid.uuid4().hex[:8]}"
    try:  # access() says yes to root everywhere, and pseudo file systems (/proc, /sys) refuse anyway
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise OSError(exc.errno, f"Cannot write to {parent} ({exc.strerror or exc}); choose a folder you can "
                                 "write to.") from exc
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"Not enough disk space for the export in {parent}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free. Free some space or choose another folder.",
        )
    return target


def commit_folder(tmp: Path, target: Path) -> None:
    """Move the finished temp folder to ``target``; an old target is swapped out, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)



@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temp folder that becomes ``target`` when the block finishes without error.

    Any failure removes the temp folder; an OSError comes back as one that says so (errno ENOSPC
    kept for a full disk)."""
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        yield tmp
        commit_folder(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"Disk full while writing the pruned model to {target}; the partial files "
                                        "were removed. Free some space or choose another folder.") from exc
        raise OSError(exc.errno, f"Could not write the pruned model to {target} ({exc}); the partial files were "
                                 "removed.") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
