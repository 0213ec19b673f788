"""Reading the JSON files people hand to EntroDrop (scores, plans): every failure a ValueError naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def load_json_file(path: str | Path, what: str, from_dict: Callable[[object], T], hint: str = "") -> T:
    """``from_dict`` of the JSON in ``path``; ValueError "``what`` PATH ..." for a missing file, text that
    is not UTF-8 or not JSON, and for what ``from_dict`` refuses. ``hint`` follows a missing-file message."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {p} does not exist.{' ' + hint if hint else ''}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {p} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{what} {p} is nested too deeply.") from exc
    try:
        return from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{what} {p}: {exc}") from exc
