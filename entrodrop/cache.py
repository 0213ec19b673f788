"""The process-wide cache of loaded models: an LRU bounded by count and memory, with holds for running jobs.

The web app shares one :class:`ModelCache` between all users (``entrodrop.ui.state``); loading
itself is :func:`entrodrop.loading.load_model`.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import loading
from .devices import parse_device, parse_dtype
from .loading import DEFAULT_MODEL, InsufficientMemoryError, LoadedModel, resolve_model_spec

logger = logging.getLogger(__name__)


class ModelCache:
    """Process-wide LRU of loaded models, bounded by count and by an estimated memory budget.

    Thread-safe. Concurrent requests for the same key wait for one load; different keys load
    in parallel. The web app shares one cache across users, so keys hold every load option
    that changes the result: (spec, dtype, device, device_map).

    Eviction rules, so one visitor never pulls a model from under another:

    * a model is evicted only *after* a new one loaded: a load that fails (unknown id, bad
      file) leaves the cache as it was. The price is that, for a moment, one model more than
      ``max_models`` is in memory; the memory check in :func:`~entrodrop.loading.load_model` still refuses a load
      that would not fit, and only then are idle models dropped to make room before one retry;
    * a model held through :meth:`use` (a running job) is never evicted. When every candidate is
      held, the cache keeps them all and logs a warning: ``max_models`` / ``max_bytes`` are then
      exceeded until the jobs end, and the surplus is evicted when the last hold is released;
    * the most recently used model is never evicted, even when it alone is over ``max_bytes``.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None):
        if max_models < 1:
            raise ValueError("max_models must be at least 1.")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._holds: dict[tuple, int] = {}  # key -> number of running jobs holding it
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    @staticmethod
    def make_key(spec: str, dtype="auto", device="auto", device_map=None) -> tuple:
        """Normalised key: "SmolLM2" and "smollm2", "auto" and the device it picks, map the same."""
        resolved = resolve_model_spec(spec)
        target = parse_device(device)
        if isinstance(device_map, dict):
            device_map = json.dumps(device_map, sort_keys=True, default=str)
        return (resolved.kind, resolved.path, resolved.gguf_file, str(parse_dtype(dtype, target)), str(target), device_map)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[tuple]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    def in_use(self, key: tuple) -> int:
        """How many running jobs hold the model of ``key`` (see :meth:`use`)."""
        with self._lock:
            return self._holds.get(key, 0)

    def get_or_load(self, spec: str = DEFAULT_MODEL, **kwargs) -> LoadedModel:
        """The cached model for these options, loading it (see :func:`~entrodrop.loading.load_model`) if needed.

        The model is not held: a job that runs on it for a while should use :meth:`use` instead,
        or the model may be evicted (and later loaded a second time) while the job still runs."""
        return self._get_or_load(spec, hold=False, **kwargs)[1]

    @contextmanager
    def use(self, spec: str = DEFAULT_MODEL, **kwargs) -> Iterator[LoadedModel]:
        """Hold the model for these options (loading it if needed) for the duration of a ``with`` block.

        A held model is never evicted; holds nest and are counted, and the hold ends even when the
        block raises. Getting and holding are one step, so the model cannot be evicted between them::

            with cache.use(spec, dtype="auto", device="auto") as loaded:
                for event in calibrate(loaded, windows):
                    ...
        """
        key, loaded = self._get_or_load(spec, hold=True, **kwargs)
        try:
            yield loaded
        finally:
            self._release(key)

    def _get_or_load(self, spec: str, *, hold: bool, **kwargs) -> tuple[tuple, LoadedModel]:
        key = self.make_key(spec, kwargs.get("dtype", "auto"), kwargs.get("device", "auto"), kwargs.get("device_map"))
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    if hold:
                        self._holds[key] = self._holds.get(key, 0) + 1
                    return key, self._models[key]
            try:
                loaded = loading.load_model(spec, **kwargs)
            except InsufficientMemoryError:
                # Every cheap check passed (spec, config, architecture): only room is missing.
                if not self._drop_idle():
                    raise
                logger.info("Not enough free memory; dropped the idle cached models and retrying.")
                loaded = loading.load_model(spec, **kwargs)
            with self._lock:
                self._models[key] = loaded
                if hold:
                    self._holds[key] = self._holds.get(key, 0) + 1
                evicted = self._evict()
            if evicted:
                _release_memory()
            return key, loaded

    def _release(self, key: tuple) -> None:
        with self._lock:
            count = self._holds.get(key, 0) - 1
            assert count >= 0, f"release without a hold on {key}"
            if count:
                self._holds[key] = count
                return
            del self._holds[key]
            # the cache may have grown past its limits while this model was held
            evicted = self._evict()
        if evicted:
            _release_memory()

    def clear(self) -> None:
        """Drop every cached model that no running job holds, and release their memory."""
        self._drop_idle()

    def _drop_idle(self) -> bool:
        """Drop every model not held by a job; whether anything was dropped."""
        with self._lock:
            idle = [k for k in self._models if not self._holds.get(k)]
            for key in idle:
                del self._models[key]
            kept = len(self._models)
        if kept:
            logger.info("Kept %d cached model(s) that running jobs use.", kept)
        if idle:
            _release_memory()
        return bool(idle)

    def _evict(self) -> bool:
        """Drop least-recently-used idle models beyond the count and byte limits. Holds _lock.

        Never drops a held model or the most recently used one; whether anything was dropped."""
        evicted = False
        while True:
            over_count = len(self._models) > self.max_models
            over_bytes = self.max_bytes is not None and sum(_model_bytes(m) for m in self._models.values()) > self.max_bytes
            if not (over_count or over_bytes):
                return evicted
            newest = next(reversed(self._models))
            candidates = [k for k in self._models if k != newest and not self._holds.get(k)]
            if not candidates:
                if len(self._models) > 1:
                    logger.warning(
                        "Model cache over its limits (%d models, max %d; byte budget %s): the models are in use "
                        "by running jobs, so none is evicted until they finish.",
                        len(self._models), self.max_models, "exceeded" if over_bytes else "kept",
                    )
                return evicted
            logger.info("Evicting %s from the model cache.", candidates[0][1])
            del self._models[candidates[0]]
            evicted = True


def _model_bytes(loaded: LoadedModel) -> int:
    return int(loaded.model.get_memory_footprint())


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
