"""Where the app writes: one private folder per session, export names that are never paths, a bound on
the total on disk, and a janitor that removes what sessions leave behind.

* Session folders live under :func:`sessions_root` (``ENTRODROP_WORK_DIR``, default
  ``<gradio upload folder>/entrodrop-sessions``): inside gradio's own cache, so the zips and score
  files the app offers are served from there without a second copy. Folder names are 128 random
  bits: a file in one session cannot be named by another.
* A visitor names an export (:func:`export_name`); it is written to ``<session>/exports/<name>``,
  so overwrite replaces only that session's own export.
* :func:`check_disk_budget` refuses an export that would take the total under the root past
  ``ENTRODROP_MAX_EXPORT_GB``.
* :func:`remove_stale` (run by :func:`start_janitor` every few minutes) removes session folders
  unused for ``ENTRODROP_SESSION_TTL_MIN`` minutes, unless a job is writing into them; the session
  itself removes its folder when gradio deletes its state.
* :data:`SESSION_STORE` keeps each browser's computed results (calibration, plan, check history) for a
  page reload, keyed by a random token that only that browser holds (:func:`new_browser_token`),
  bounded in entries, bytes per entry and age (``ENTRODROP_RESTORE_SESSIONS``, the session TTL).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

SESSION_PREFIX = "session-"
MAX_NAME_CHARS = 80
DEFAULTS = {"ENTRODROP_SESSION_TTL_MIN": 60.0, "ENTRODROP_MAX_EXPORT_GB": 20.0, "ENTRODROP_RESTORE_SESSIONS": 200.0,
            "ENTRODROP_RESTORE_MB": 8.0}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BUSY: Counter[Path] = Counter()  # session folder -> jobs writing into it now
_BUSY_LOCK = threading.Lock()
_JANITOR: dict = {"thread": None, "wake": threading.Event()}


def _setting(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else DEFAULTS[name]
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number; the server's operator must fix it.") from exc


def session_ttl_s() -> float:
    """Seconds a session folder may stay unused (``ENTRODROP_SESSION_TTL_MIN``, default 60 minutes)."""
    return max(_setting("ENTRODROP_SESSION_TTL_MIN"), 0.0) * 60


def max_export_bytes() -> int:
    """Total bytes all session folders may hold (``ENTRODROP_MAX_EXPORT_GB``, default 20 GB)."""
    return int(_setting("ENTRODROP_MAX_EXPORT_GB") * 2**30)


def sessions_root() -> Path:
    """The folder holding every session folder (``ENTRODROP_WORK_DIR``, else inside gradio's upload folder)."""
    from gradio.utils import get_upload_folder

    root = os.environ.get("ENTRODROP_WORK_DIR", "").strip()
    return Path(root).expanduser().absolute() if root else Path(get_upload_folder()) / "entrodrop-sessions"


def new_session_folder() -> Path:
    """A fresh, unguessable, private session folder."""
    root = sessions_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{SESSION_PREFIX}{secrets.token_hex(16)}"
    folder.mkdir(mode=0o700)
    return folder


def touch(folder: Path) -> None:
    """Mark ``folder`` as used now (the janitor ages folders by this)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def in_sessions_root(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in some session's folder (another visitor's, perhaps)."""
    try:
        Path(path).resolve().relative_to(sessions_root().resolve())
        return True
    except ValueError:
        return False


def export_name(text: str | None, default: str) -> str:
    """The export's folder name: ``text`` (a name, never a path), else ``default``.

    ValueError for a path (``/``, ``\\``, ``..``, ``~``), a hidden name, characters other than letters,
    digits, ``.``, ``_`` and ``-``, or more than :data:`MAX_NAME_CHARS` characters."""
    name = (text or "").strip() or default
    where = "The export is saved in this session's own folder, under the name you give."
    if "/" in name or "\\" in name or name.startswith("~") or ".." in name:
        raise ValueError(f"The export name '{name}' looks like a path; give a name only, e.g. 'my-model-pruned'. "
                         f"{where}")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"The export name is {len(name)} characters long; use at most {MAX_NAME_CHARS}.")
    if not _NAME.fullmatch(name):
        raise ValueError(f"The export name '{name}' may only hold letters, digits, '.', '_' and '-', and must start "
                         f"with a letter or digit, e.g. 'my-model-pruned'. {where}")
    return name


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def check_disk_budget(needed_bytes: int, replacing: Path | None = None) -> None:
    """Refuse a write of ``needed_bytes`` that would take the sessions' total past ``ENTRODROP_MAX_EXPORT_GB``.

    ``replacing`` (an export being overwritten) does not count: it is removed when the new one lands."""
    limit = max_export_bytes()
    used = folder_bytes(sessions_root())
    if replacing is not None and replacing.exists():
        used -= folder_bytes(replacing)
    if used + needed_bytes > limit:
        raise ValueError(
            f"The server's export space is full: this export needs about {needed_bytes / 2**30:.2f} GB, and "
            f"{used / 2**30:.2f} of the {limit / 2**30:.2f} GB allowed (ENTRODROP_MAX_EXPORT_GB) are in use. "
            "Try again later (unused exports are removed after "
            f"{session_ttl_s() / 60:g} minutes), or export with the `entrodrop prune` command on your own machine."
        )


@contextmanager
def busy(folder: Path) -> Iterator[Path]:
    """Keep the janitor away from ``folder`` while a job writes into it."""
    with _BUSY_LOCK:
        _BUSY[folder] += 1
    touch(folder)
    try:
        yield folder
    finally:
        touch(folder)
        with _BUSY_LOCK:
            _BUSY[folder] -= 1
            if _BUSY[folder] <= 0:
                del _BUSY[folder]


def remove_session_folder(folder: Path | None) -> None:
    """Remove one session folder and everything in it."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(now: float | None = None, ttl_s: float | None = None) -> list[Path]:
    """Remove the session folders unused for ``ttl_s`` seconds (default :func:`session_ttl_s`); returns them."""
    root = sessions_root()
    ttl_s = session_ttl_s() if ttl_s is None else ttl_s
    now = time.time() if now is None else now
    removed = []
    try:
        folders = [p for p in root.iterdir() if p.name.startswith(SESSION_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for folder in folders:
        with _BUSY_LOCK:
            if _BUSY.get(folder):
                continue
        try:
            age = now - folder.stat().st_mtime
        except OSError:
            continue
        if age > ttl_s:
            remove_session_folder(folder)
            removed.append(folder)
    if removed:
        logger.info("Removed %d session folder(s) unused for %.0f s.", len(removed), ttl_s)
    return removed


def start_janitor() -> threading.Thread:
    """Start (once per process) the thread that runs :func:`remove_stale` every TTL/4 (between 0.5 s and
    5 minutes), so a folder goes at most 1.25 x TTL after its last use. Called again, it wakes the
    thread to re-read the TTL."""
    thread, wake = _JANITOR["thread"], _JANITOR["wake"]
    if thread is not None and thread.is_alive():
        wake.set()
        return thread

    def work():
        while True:
            wake.wait(min(max(session_ttl_s() / 4, 0.5), 300.0))
            wake.clear()
            try:
                remove_stale()
            except Exception:  # the janitor must outlive a bad moment on the disk
                logger.exception("Removing stale session folders failed")

    thread = threading.Thread(target=work, name="entrodrop-janitor", daemon=True)
    _JANITOR["thread"] = thread
    thread.start()
    return thread


# -- what survives a page reload -------------------------------------------------------------------
_TOKEN = re.compile(r"[0-9a-f]{32}")


def new_browser_token() -> str:
    """128 random bits naming one browser's kept results (stored, encrypted, in that browser only)."""
    return secrets.token_hex(16)


def valid_token(token) -> bool:
    """True for a token of the shape :func:`new_browser_token` makes (a browser sends it: untrusted)."""
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


class SessionStore:
    """Token -> pickled snapshot of a session's results, in this process's memory.

    Bounded: at most ``ENTRODROP_RESTORE_SESSIONS`` entries (the least recently saved go first), none
    over ``ENTRODROP_RESTORE_MB`` (a larger one is not kept), none older than the session TTL. Only
    the server pickles and unpickles; the browser holds nothing but its token."""

    def __init__(self):
        self._entries: dict[str, tuple[float, bytes]] = {}  # token -> (saved at, monotonic; pickle)
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        ttl = session_ttl_s()
        for token in [t for t, (at, _) in self._entries.items() if now - at > ttl]:
            del self._entries[token]
        excess = len(self._entries) - max(int(_setting("ENTRODROP_RESTORE_SESSIONS")), 0)
        for token in list(self._entries)[:max(excess, 0)]:  # dicts keep insertion order: oldest first
            del self._entries[token]

    def put(self, token: str, snapshot: dict) -> bool:
        """Keep ``snapshot`` under ``token``; False (and the old one dropped) when it is too large."""
        if not valid_token(token):
            return False
        data = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._entries.pop(token, None)
            if len(data) > _setting("ENTRODROP_RESTORE_MB") * 2**20:
                logger.info("Session snapshot of %d bytes is over the limit: not kept for reloads.", len(data))
                return False
            now = time.monotonic()
            self._entries[token] = (now, data)
            self._prune(now)
        return True

    def get(self, token) -> dict | None:
        """The snapshot kept under ``token`` (None for an unknown, expired or malformed token)."""
        if not valid_token(token):
            return None
        with self._lock:
            self._prune(time.monotonic())
            entry = self._entries.get(token)
        return pickle.loads(entry[1]) if entry else None

    def __len__(self) -> int:
        return len(self._entries)


SESSION_STORE = SessionStore()
