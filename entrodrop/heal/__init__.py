"""Heal: win back what a drop plan costs, on a copy of the model, taught on calibration windows only.

Two methods, one entry point (:func:`iter_heal`):

* ``linear`` (training-free; ours, after ReplaceMe, Shopkhoev et al. 2025): for every run of removed
  residual writers (a span of whole layers, or of sub-blocks), a d x d map T is fitted by ridge least
  squares in float64 so that the residual term of the kept writer just before the span, mapped by T,
  lands where the dense model's stream is after the span; T is folded into that writer's output
  projection (``o_proj`` / ``down_proj``), so the healed model has the architecture of the pruned one
  (:mod:`.linear`);
* ``lora`` (distillation): a peft LoRA on the linear layers of the kept blocks, trained to match the dense
  model's next-token distribution (KL(dense || student), what step 4 reports), optionally plus the
  next-token loss, then merged with ``merge_and_unload()`` so no peft is needed afterwards (:mod:`.lora`).

Both work on a deep copy of the model (the dense model, shared in the app, is only read, and is bitwise
unchanged after any heal, finished, stopped or failed) and keep its shape: the healed copy is the dense
model's layout with changed weights, read through the plan's preview, and :meth:`HealResult.pruned`
(or ``export_pruned(result.model, ..., plan)``) removes the dropped blocks physically. Both read only the
windows they are given: pass calibration windows; the first ``train_windows`` teach, the next
``val_windows`` (a calibration-side validation slice, never taught on) tell the best state, which is what
a stop keeps. Events: stage ``heal``, ``partial`` a :class:`HealProgress` while it runs and the
:class:`HealResult` at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..plan import DropPlan
from ..progress import ProgressEvent, run_to_end
from .core import (
    HEAL_METHODS,
    LORA_LOSSES,
    LORA_TARGETS,
    TEACHER_MODES,
    HealProgress,
    HealResult,
    HealSettings,
    check_common,
    check_heal_memory,
    heal_memory_bytes,
    heal_record,
    recovered_fraction,
    split_windows,
)
from .linear import check_linear, iter_linear
from .lora import iter_lora


def check_heal(model: nn.Module, plan: DropPlan, settings: HealSettings) -> None:
    """Refuse, before any work, what cannot be healed: a bad setting, no plan, a plan that drops nothing or was
    made for another model, or a method this architecture cannot take (the linear heal on Gemma)."""
    check_common(model, plan, settings)
    if settings.method == "linear":
        check_linear(model, plan)


def iter_heal(model: nn.Module, plan: DropPlan, windows: torch.Tensor, settings: HealSettings | None = None, *,
              should_stop: Callable[[], bool] | None = None, data: dict | None = None,
              check_memory: bool = True) -> Iterator[ProgressEvent]:
    """Heal ``plan`` on a copy of ``model`` with ``settings`` (default :class:`HealSettings`), reading only
    ``windows`` (pass calibration windows); the last event's ``partial`` is the :class:`HealResult`.

    ``should_stop`` is asked between steps: when it answers True, the heal ends with the best state so far.
    Everything that can be refused is refused before any work (:func:`check_heal`, and the memory estimate
    of :func:`check_heal_memory` when ``check_memory``). ``data`` (where the windows came from) goes into
    the result for the model card."""
    settings = settings or HealSettings()
    check_heal(model, plan, settings)
    train, val = split_windows(windows, settings)
    if check_memory:
        check_heal_memory(model, settings, int(windows.shape[1]), plan)
    stop = should_stop or (lambda: False)
    started = time.monotonic()
    if settings.method == "linear":
        events = iter_linear(model, plan, train, val, settings)
    else:
        events = iter_lora(model, plan, train, val, settings, stop)
    for event in events:
        if isinstance(event.partial, HealResult):
            event.partial.data = data
            event.partial.seconds = time.monotonic() - started
        yield event


def heal(model: nn.Module, plan: DropPlan, windows: torch.Tensor, settings: HealSettings | None = None,
         **kwargs) -> HealResult:
    """Run :func:`iter_heal` to its end and return the :class:`HealResult`."""
    return run_to_end(iter_heal(model, plan, windows, settings, **kwargs))


__all__ = ["HEAL_METHODS", "LORA_LOSSES", "LORA_TARGETS", "TEACHER_MODES", "HealProgress", "HealResult", "HealSettings",
           "check_heal", "check_heal_memory", "heal", "heal_memory_bytes", "heal_record", "iter_heal", "recovered_fraction",
           "split_windows"]
