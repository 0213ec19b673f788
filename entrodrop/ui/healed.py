"""The healed models of the app's sessions: process-wide, bounded in number, each reachable only by its
session's own random key.

A heal makes a copy of the model (:mod:`entrodrop.heal`), so healed models are memory the operator
bounds: at most ``ENTRODROP_HEALED_MODELS`` are kept for all sessions together; keeping one more drops
the one kept longest ago (its session is told when it next needs it). A session holds only the key of
its entry, so no visitor can reach another's healed model, and a session's end removes its entry.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from .limits import limit


class HealedStore:
    """Key -> (plan key, HealResult, record) for the sessions' healed models, oldest first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, plan_key: str, result, record: dict, replacing: str | None = None) -> str:
        """Keep a healed model (dropping the session's previous one and, over the limit, the oldest); its key."""
        key = secrets.token_hex(16)
        with self._lock:
            if replacing:
                self._entries.pop(replacing, None)
            self._entries[key] = (plan_key, result, record)
            while len(self._entries) > max(limit("ENTRODROP_HEALED_MODELS"), 1):
                self._entries.popitem(last=False)
        return key

    def get(self, key: str | None) -> tuple | None:
        """(plan key, HealResult, record) under ``key``, or None (never healed, removed, or evicted)."""
        if not key:
            return None
        with self._lock:
            return self._entries.get(key)

    def discard(self, key: str | None) -> None:
        if key:
            with self._lock:
                self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


HEALED = HealedStore()
