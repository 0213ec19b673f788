"""Fair turns on the shared model, so one visitor's long job never starves another's short one.

Calibration hooks and the reversible preview act on the one shared model object, so two batches
must never run on it at once. Jobs therefore take a *turn* per batch (:meth:`ModelJob.steps`) or per
call (:meth:`ModelJob.call`) and give it back in between. Whoever has used the model least so far
(seconds of model time, "least attained service") goes next, oldest request first on a tie: a short
job that arrives while a long calibration runs waits for at most the batch in progress, then runs
its own batches ahead of the long job's.

Why between batches is safe: every evaluation generator applies its preview inside one batch, and
a calibration's capture hooks, which stay registered between its batches, only record (they never
change outputs) and are cleared before its own next batch.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class ModelTurns:
    """A lock on the shared model handed out by least model time used (see the module docstring)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: list[tuple[float, int]] = []  # heap of (model seconds used, arrival)
        self._arrivals = itertools.count()
        self._jobs = 0

    def job(self) -> ModelJob:
        """A new job; its turns are ordered against every other job's."""
        return ModelJob(self)

    @property
    def active_jobs(self) -> int:
        """Jobs started and not yet finished (see :meth:`ModelJob.__enter__`)."""
        with self._cond:
            return self._jobs

    @property
    def waiting(self) -> int:
        """Turns being waited for right now."""
        with self._cond:
            return len(self._waiting)

    @contextmanager
    def turn(self, job: ModelJob) -> Iterator[None]:
        """Hold the model alone for one step of ``job``; its time counts against the job."""
        with self._cond:
            ticket = (job.model_seconds, next(self._arrivals))
            heapq.heappush(self._waiting, ticket)
            try:
                while self._busy or self._waiting[0] != ticket:
                    self._cond.wait()
            except BaseException:
                self._waiting.remove(ticket)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._busy = True
        started = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                job.model_seconds += time.monotonic() - started
                job.turns_taken += 1
                self._busy = False
                self._cond.notify_all()


class ModelJob:
    """One request's use of the shared model: ``with turns.job() as job:``, then :meth:`steps` or :meth:`call`."""

    def __init__(self, turns: ModelTurns):
        self._turns = turns
        self.model_seconds = 0.0
        self.turns_taken = 0

    def __enter__(self) -> ModelJob:
        with self._turns._cond:
            self._turns._jobs += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._turns._cond:
            self._turns._jobs -= 1

    def others(self) -> int:
        """Other jobs sharing the model now."""
        return max(self._turns.active_jobs - 1, 0)

    def call(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` in one turn."""
        with self._turns.turn(self):
            return fn(*args, **kwargs)

    def steps(self, events: Iterable) -> Iterator:
        """The items of ``events`` (a library event generator), each computed in its own turn.

        Closing this generator closes ``events`` too (a calibration removes its hooks)."""
        iterator = iter(events)
        try:
            while True:
                with self._turns.turn(self):
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with self._turns.turn(self):  # removing hooks touches the shared model too
                    close()


MODEL_TURNS = ModelTurns()
