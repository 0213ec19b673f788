"""Progress of long work: one event type, and one way to run a generator of them to its end.

Calibration, checks (compare, speed, generations), loss-verified selection and sweeps are all
generators of :class:`ProgressEvent`: ``done`` of ``total`` units of one ``stage``, and the result
so far in ``partial``. A front end draws a bar or a plot from each event; a caller that only wants
the answer calls :func:`run_to_end`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

E = TypeVar("E", bound="ProgressEvent")
_NO_DEFAULT = object()


@dataclass
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` are finished; ``partial`` is the result so far.

    Stages: ``calibrate`` (batches), ``read`` (held-out text), ``compare`` (windows), ``speed``
    (timing rounds), ``generate`` (prompts), ``select`` (loss evaluations or plans) and ``sweep``."""

    stage: str
    done: int
    total: int
    partial: object = None

    @property
    def fraction(self) -> float:
        """Share of the stage done, 0..1 (1 for a stage with nothing to do)."""
        return self.done / self.total if self.total else 1.0

    @property
    def finished(self) -> bool:
        """True once every unit of the stage is done."""
        return self.done >= self.total


def last_event(events: Iterable[E]) -> E | None:
    """Run ``events`` to its end and return the last event (None when it yielded nothing)."""
    last = None
    for last in events:  # noqa: B007 - the loop variable is the answer
        pass
    return last


def run_to_end(events: Iterable[ProgressEvent], default: object = _NO_DEFAULT):
    """Run ``events`` to its end and return the last event's ``partial`` (the final result).

    When the generator yields nothing, return ``default``, or raise a ValueError without one."""
    last = last_event(events)
    if last is None:
        if default is _NO_DEFAULT:
            raise ValueError("The work finished without a single progress event, so there is no result.")
        return default
    return last.partial


def time_left(elapsed_s: float, fraction: float) -> str:
    """ "about 12 s left" from the time spent and the share done (linear), "" before anything is done."""
    if fraction <= 0 or elapsed_s <= 0:
        return ""
    left = elapsed_s * (1 - min(fraction, 1.0)) / fraction
    if left < 1:
        return "almost done"
    return f"about {left:.0f} s left" if left < 120 else f"about {left / 60:.0f} min left"
