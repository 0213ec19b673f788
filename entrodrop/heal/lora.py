"""The LoRA heal: distil the dense model into the pruned one through low-rank adapters on the kept blocks.

The student is a copy of the model read through the plan's preview (the dropped blocks skipped), with a
peft LoRA adapter on every linear layer of the kept attention and MLP sub-blocks (``targets``: all, or
one kind). Each step reads ``batch_windows`` training windows; the loss is the mean KL(dense || student)
of the next-token distributions per position (what step 4 reports), plus the student's next-token loss
with ``loss="kl+ce"``. The dense teacher's log-probs are recomputed every step (no memory) or cached once
in bfloat16 (``teacher="cache"``). Every ``validate_every`` steps the KL on the validation slice is
measured, and the adapters of the best validation so far are kept: a stop, the time budget or a later
worse step never loses them. At the end the kept adapters are merged with ``merge_and_unload()``, so
the healed model is a plain transformers model again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_arch, get_layers
from ..devices import input_device
from ..plan import DropPlan
from ..progress import ProgressEvent
from ..prune import preview_plan
from .core import (
    HealProgress,
    HealResult,
    HealSettings,
    ValidationSlice,
    kl_per_token,
    student_copy,
    teacher_logp,
)

logger = logging.getLogger(__name__)


def lora_targets(model: nn.Module, plan: DropPlan, targets: str = "all") -> list[str]:
    """Full names of the linear layers that get an adapter: those of the kept sub-blocks of ``targets``."""
    from transformers.pytorch_utils import Conv1D

    spec = get_arch(model)
    prefix = spec.layers
    dropped = {(b.layer, kind) for b in plan.blocks for kind in (("attn", "mlp") if b.kind == "layer" else (b.kind,))}
    kinds = ("attn", "mlp") if targets == "all" else (targets,)
    names = []
    for idx, layer in enumerate(get_layers(model, spec)):
        for kind in kinds:
            if (idx, kind) in dropped:
                continue
            for part in (spec.attn if kind == "attn" else spec.mlp):
                owner = layer.get_submodule(part)
                for name, module in owner.named_modules():
                    if isinstance(module, (nn.Linear, Conv1D)):
                        names.append(f"{prefix}.{idx}.{part}" + (f".{name}" if name else ""))
    if not names:
        raise ValueError(f"No linear layer is left in the kept {' and '.join(kinds)} blocks to adapt; heal with "
                         "targets='all'.")
    return names


def _batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Window indexes, ``size`` at a time, through a new shuffle of the ``n`` windows each epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - size + 1 if n >= size else 1, size):
            yield order[start:start + size]


def iter_lora(model: nn.Module, plan: DropPlan, train: torch.Tensor, val: torch.Tensor, settings: HealSettings,
              should_stop: Callable[[], bool]) -> Iterator[ProgressEvent]:
    """Train, validate and merge (see the module docstring); the last event carries the :class:`HealResult`."""
    from peft import LoraConfig, get_peft_model

    started = time.monotonic()
    device = input_device(model)
    student = student_copy(model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, bias="none",
                        target_modules=lora_targets(student, plan, settings.targets))
    torch.manual_seed(settings.seed)  # the adapters' A matrices (B starts at zero: the unhealed model)
    adapted = get_peft_model(student, config)  # adapters injected into ``student`` itself
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    cached = None
    if settings.teacher == "cache":
        cached = [teacher_logp(model, train[i:i + 1].to(device)).to(torch.bfloat16) for i in range(train.shape[0])]

    def adapter_state() -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}

    validation = ValidationSlice(model, val)  # the dense log-probs on it, once
    before = validation.kl(student, plan)
    best = (before, 0, adapter_state())
    history = [{"step": 0, "train_loss": None, "val_kl": before, "seconds": 0.0}]
    batches = _batches(train.shape[0], min(settings.batch_windows, train.shape[0]), settings.seed)
    stopped, step, val_kl, loss_value = False, 0, before, None
    while step < settings.steps:
        step += 1
        picked = next(batches)
        ids = train[picked].to(device)
        if cached is not None:
            target = torch.cat([cached[i] for i in picked]).float()
        else:
            target = teacher_logp(model, ids)  # (B, T-1, V)
        with torch.enable_grad(), preview_plan(student, plan):  # grad modes are per thread: set in the step
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = kl_per_token(target, logits)
            if settings.loss == "kl+ce":
                loss = loss + F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss_value = float(loss.detach())
        del logits, loss, target
        elapsed = time.monotonic() - started
        out_of_time = settings.max_seconds is not None and elapsed >= settings.max_seconds
        stopped = should_stop() or out_of_time
        last = step == settings.steps or stopped
        if step % settings.validate_every == 0 or last:
            val_kl = validation.kl(student, plan)
            if val_kl < best[0]:
                best = (val_kl, step, adapter_state())
        history.append({"step": step, "train_loss": loss_value,
                        "val_kl": val_kl if step % settings.validate_every == 0 or last else None,
                        "seconds": time.monotonic() - started})
        per_step = (time.monotonic() - started) / step
        left = per_step * (settings.steps - step)
        if settings.max_seconds is not None:
            left = min(left, max(settings.max_seconds - (time.monotonic() - started), 0.0))
        yield ProgressEvent("heal", step, settings.steps,
                            HealProgress("lora", step, settings.steps, loss_value, val_kl, best[0], best[1],
                                         time.monotonic() - started, left, list(history), model=student))
        if stopped:
            break
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name in best[2]:
                p.copy_(best[2][name])
    merged = adapted.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    after = validation.kl(merged, plan)
    notes = [] if best[1] else ["no step lowered the validation KL: the unhealed weights were kept"]
    logger.info("lora heal: %d steps, validation KL %.4f -> %.4f (best at step %d)", step, before, after, best[1])
    result = HealResult("lora", plan, merged, settings.to_dict(), history, before, after, best_step=best[1],
                        steps_done=step, seconds=0.0, stopped=stopped and step < settings.steps,
                        train_windows=int(train.shape[0]), val_windows=int(val.shape[0]),
                        seq_len=int(train.shape[1]), notes=notes)
    yield ProgressEvent("heal", settings.steps, settings.steps, result)
