"""ModelCache: a failed load evicts nothing, a model a job uses is never evicted, holds are thread-safe.

A fake loader stands in for ``load_model`` (no weights): hub-style ids resolve without touching
the network, and each fake model reports a fixed memory footprint.
"""

import threading
import time
from types import SimpleNamespace

import pytest

from entrodrop import loading
from entrodrop.cache import ModelCache
from entrodrop.loading import InsufficientMemoryError

MODEL_BYTES = 100


def fake_loaded(spec: str):
    model = SimpleNamespace(get_memory_footprint=lambda: MODEL_BYTES)
    return SimpleNamespace(model=model, spec=spec)


@pytest.fixture
def loads(monkeypatch):
    """Replace load_model: ids containing "missing" fail like an unknown hub id; returns the call log."""
    calls = []

    def load(spec, **_kwargs):
        calls.append(spec)
        if "missing" in spec:
            raise ValueError(f"Could not find model '{spec}' on the Hugging Face Hub")
        return fake_loaded(spec)

    monkeypatch.setattr(loading, "load_model", load)
    return calls


def key(spec):
    return ModelCache.make_key(spec)


def test_failed_load_keeps_the_cached_model(loads):
    cache = ModelCache(max_models=1)
    first = cache.get_or_load("org/a")
    with pytest.raises(ValueError, match="Could not find model 'org/missing'"):
        cache.get_or_load("org/missing")
    assert cache.keys() == [key("org/a")]
    assert cache.get_or_load("org/a") is first and loads == ["org/a", "org/missing"]


def test_successful_load_evicts_the_least_recently_used(loads):
    cache = ModelCache(max_models=2)
    cache.get_or_load("org/a")
    cache.get_or_load("org/b")
    cache.get_or_load("org/a")  # touch: b is now least recently used
    cache.get_or_load("org/c")
    assert cache.keys() == [key("org/a"), key("org/c")]


def test_model_in_use_is_not_evicted(loads, caplog):
    cache = ModelCache(max_models=1)
    with cache.use("org/a") as held:
        assert cache.in_use(key("org/a")) == 1
        with caplog.at_level("WARNING", logger="entrodrop.loading"):
            other = cache.get_or_load("org/b")
        # over the count limit for now: the held model stays, the new one is cached too
        assert set(cache.keys()) == {key("org/a"), key("org/b")}
        assert "in use" in caplog.text
        assert cache.get_or_load("org/a") is held and loads == ["org/a", "org/b"]
    assert cache.in_use(key("org/a")) == 0
    # released and over the limit: b (least recently used, a was touched after it) goes
    assert cache.keys() == [key("org/a")]
    assert other is not held


def test_byte_budget_respects_models_in_use(loads):
    cache = ModelCache(max_models=5, max_bytes=MODEL_BYTES)  # room for one model
    with cache.use("org/a"), cache.use("org/b"):
        cache.get_or_load("org/c")
        assert len(cache) == 3  # a and b held, c newest: nothing can go
    assert cache.keys() == [key("org/c")]  # released: back under the budget, newest kept


def test_use_holds_nested_and_releases_on_error(loads):
    cache = ModelCache(max_models=1)
    with cache.use("org/a"):
        with cache.use("org/a"):
            assert cache.in_use(key("org/a")) == 2
        assert cache.in_use(key("org/a")) == 1
    with pytest.raises(RuntimeError):
        with cache.use("org/a"):
            raise RuntimeError("job failed")
    assert cache.in_use(key("org/a")) == 0
    cache.get_or_load("org/b")
    assert cache.keys() == [key("org/b")]


def test_failed_use_holds_nothing(loads):
    cache = ModelCache(max_models=1)
    with pytest.raises(ValueError):
        with cache.use("org/missing"):
            pass
    assert cache.in_use(key("org/missing")) == 0 and len(cache) == 0


def test_clear_keeps_models_in_use(loads):
    cache = ModelCache(max_models=3)
    with cache.use("org/a"):
        cache.get_or_load("org/b")
        cache.clear()
        assert cache.keys() == [key("org/a")]
    cache.clear()
    assert len(cache) == 0


def test_out_of_memory_retry_drops_only_idle_models(monkeypatch):
    calls = []

    def load(spec, **_kwargs):
        calls.append(spec)
        if spec == "org/big" and calls.count("org/big") == 1:
            raise InsufficientMemoryError("The model needs about 1 GiB but cpu has only 1 KiB free.")
        return fake_loaded(spec)

    monkeypatch.setattr(loading, "load_model", load)
    cache = ModelCache(max_models=3)
    with cache.use("org/a"):
        cache.get_or_load("org/b")
        cache.get_or_load("org/big")
        assert set(cache.keys()) == {key("org/a"), key("org/big")}  # b idle: dropped for the retry
    assert calls == ["org/a", "org/b", "org/big", "org/big"]


def test_out_of_memory_with_every_model_in_use_raises(monkeypatch):
    def load(spec, **_kwargs):
        if spec == "org/big":
            raise InsufficientMemoryError("The model needs about 1 GiB but cpu has only 1 KiB free.")
        return fake_loaded(spec)

    monkeypatch.setattr(loading, "load_model", load)
    cache = ModelCache(max_models=3)
    with cache.use("org/a"):
        with pytest.raises(InsufficientMemoryError):
            cache.get_or_load("org/big")
        assert cache.keys() == [key("org/a")]


def test_jobs_in_threads_never_lose_their_model(monkeypatch):
    """Many threads each hold one of four models while others load: no held model is ever evicted,
    and every thread's second lookup of its model returns the object it holds (no reload)."""
    def load(spec, **_kwargs):
        time.sleep(0.002)  # widen the race windows
        return fake_loaded(spec)

    monkeypatch.setattr(loading, "load_model", load)
    cache = ModelCache(max_models=1)
    specs = [f"org/m{i}" for i in range(4)]
    errors = []

    def job(i):
        spec = specs[i % len(specs)]
        try:
            for _ in range(20):
                with cache.use(spec) as held:
                    time.sleep(0.001)
                    if key(spec) not in cache or cache.get_or_load(spec) is not held:
                        errors.append(f"{spec} evicted while held")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(cache.in_use(key(s)) == 0 for s in specs)
    assert len(cache) == 1  # every hold released: back within the count limit
