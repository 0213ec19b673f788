"""What both heal methods share: the settings, the progress and result types, the input and memory
checks, the student copy and the KL they train and validate on (:mod:`entrodrop.heal` runs them)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import available_memory_bytes, format_bytes, input_device
from ..plan import DropPlan
from ..prune import check_plan, preview_plan, prune_model

logger = logging.getLogger(__name__)

HEAL_METHODS = ("linear", "lora")
LORA_TARGETS = ("all", "attn", "mlp")  # which linear layers of the kept blocks get an adapter
LORA_LOSSES = ("kl", "kl+ce")
TEACHER_MODES = ("recompute", "cache")
MEMORY_HEADROOM = 0.9  # refuse to start when the estimate needs more than this share of free memory


@dataclass(frozen=True)
class HealSettings:
    """How to heal. The defaults were placed by ``benchmarks/bench_heal.py`` on development windows
    (docs/results.md, section 6)."""

    method: str = "lora"
    train_windows: int = 32  # calibration windows taught on
    val_windows: int = 4  # calibration windows after them: the validation slice (never taught on)
    # lora
    rank: int = 16
    alpha: float | None = None  # LoRA scale numerator; None: 2 x rank
    targets: str = "all"  # every linear layer of the kept blocks ("attn" or "mlp" for one kind only)
    lr: float = 1e-3
    steps: int = 60  # at most; on 2 CPU cores SmolLM2 takes 26-36 steps of 4 x 256 tokens in 5 minutes
    max_seconds: float | None = 300.0  # stop after this much wall time (the best state so far is kept); None: steps
    batch_windows: int = 4  # windows per training step
    loss: str = "kl"  # "kl": KL(dense || student); "kl+ce": plus the next-token loss
    teacher: str = "recompute"  # dense logits recomputed every step, or "cache"d once in bfloat16
    validate_every: int = 5  # steps between validations
    seed: int = 0
    # linear
    ridge: float = 0.1  # pull towards no change, relative to the Gram matrix's mean diagonal (results.md, section 6)
    massive_ratio: float = 20.0  # tokens over this multiple of the median norm are left out of the fit

    def check(self) -> None:
        """ValueError naming the first setting out of range."""
        if self.method not in HEAL_METHODS:
            raise ValueError(f"Unknown heal method {self.method!r}; choose {' or '.join(HEAL_METHODS)}.")
        whole = {"train_windows": 1, "val_windows": 1, "rank": 1, "steps": 1, "batch_windows": 1, "validate_every": 1}
        for name, minimum in whole.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be a whole number of at least {minimum}, got {value!r}.")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"Unknown LoRA targets {self.targets!r}; choose from {', '.join(LORA_TARGETS)}.")
        if self.loss not in LORA_LOSSES:
            raise ValueError(f"Unknown heal loss {self.loss!r}; choose from {', '.join(LORA_LOSSES)}.")
        if self.teacher not in TEACHER_MODES:
            raise ValueError(f"Unknown teacher mode {self.teacher!r}; choose from {', '.join(TEACHER_MODES)}.")
        for name in ("lr", "ridge"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive (or None for no time limit), got {self.max_seconds!r}.")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HealProgress:
    """Where a running heal stands (``partial`` of its events before the last)."""

    method: str
    step: int
    steps: int
    train_loss: float | None  # the last step's loss (nats per token), None for the linear fit
    val_kl: float | None  # KL(dense || student) on the validation slice at the last validation
    best_val_kl: float
    best_step: int
    elapsed_s: float
    seconds_left: float | None
    history: list[dict] = field(default_factory=list)  # {step, train_loss, val_kl, seconds}
    # the student as it trains (lora: adapters not merged yet), to be read under preview_plan and never
    # changed: a benchmark scores it on held-out text between steps (the UI only shows numbers)
    model: nn.Module | None = field(default=None, repr=False)


@dataclass
class HealResult:
    """A healed copy of the model for ``plan`` (dense layout, changed weights) and what the heal measured."""

    method: str
    plan: DropPlan
    model: nn.Module  # the healed copy: read it through preview_plan(model, plan), or take pruned()
    settings: dict
    history: list[dict]  # {step, train_loss, val_kl, seconds}; step 0 is the unhealed pruned model
    val_kl_before: float  # KL(dense || pruned) on the validation slice before healing
    val_kl_after: float  # the same for the state kept
    best_step: int
    steps_done: int
    seconds: float
    stopped: bool  # ended early by a stop or the time budget (the best state so far is kept)
    train_windows: int
    val_windows: int
    seq_len: int
    notes: list[str] = field(default_factory=list)
    data: dict | None = None  # where the windows came from (the caller says: data, part, seed)

    def pruned(self) -> nn.Module:
        """A new copy of the healed model with the plan's blocks physically removed (hold it while needed)."""
        pruned = prune_model(self.model, self.plan)
        pruned.eval()
        return pruned

    def summary(self) -> str:
        """One line: method, what it taught on, how long, validation KL before and after."""
        what = (f"{self.steps_done} step(s)" if self.method == "lora" else "one closed-form fit per span")
        stop = " (stopped early; best state kept)" if self.stopped else ""
        return (f"{self.method} heal: {what} on {self.train_windows} calibration windows of {self.seq_len} tokens "
                f"in {self.seconds:.0f} s{stop}; validation KL(dense || pruned) {self.val_kl_before:.4f} -> "
                f"{self.val_kl_after:.4f} nats on {self.val_windows} other calibration windows")

    def to_dict(self) -> dict:
        """Everything but the model (what an export's ``entrodrop.json`` keeps)."""
        return {"method": self.method, "plan": self.plan.to_dict(), "settings": self.settings, "history": self.history,
                "val_kl_before": self.val_kl_before, "val_kl_after": self.val_kl_after, "best_step": self.best_step,
                "steps_done": self.steps_done, "seconds": self.seconds, "stopped": self.stopped,
                "train_windows": self.train_windows, "val_windows": self.val_windows, "seq_len": self.seq_len,
                "notes": list(self.notes), "data": self.data, "summary": self.summary()}


# -- inputs ----------------------------------------------------------------------------------------
def split_windows(windows: torch.Tensor, settings: HealSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) windows: the first ``train_windows``, then the next ``val_windows``. Given fewer
    windows than both ask for, a fifth of them (at least one) validates and the rest teach; ValueError when
    there are not enough for one of each."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"Healing reads calibration windows: pass a (windows, seq_len) tensor of token ids with "
                         f"windows of 2 tokens or more, got {shape}.")
    n = int(windows.shape[0])
    if n < 2:
        raise ValueError(f"Healing needs at least 2 calibration windows (one to teach on, one to validate on), got "
                         f"{n}. Give more windows, e.g. train_windows + val_windows = "
                         f"{settings.train_windows + settings.val_windows}.")
    wanted = settings.train_windows + settings.val_windows
    val = settings.val_windows if n >= wanted else min(settings.val_windows, max(1, n // 5))  # short: a fifth
    train = min(settings.train_windows, n - val)
    if train < settings.train_windows:
        logger.warning("Healing on %d training windows (asked for %d): %d were given.", train,
                       settings.train_windows, n)
    return windows[:train], windows[train:train + val]


def check_common(model: nn.Module, plan: DropPlan, settings: HealSettings) -> None:
    """Refuse, before any work, what no method can heal: a bad setting, no plan, a plan that drops nothing or
    was made for another model."""
    if not isinstance(settings, HealSettings):
        raise TypeError(f"settings must be a HealSettings, got {type(settings).__name__}.")
    settings.check()
    if plan is None:
        raise ValueError("No plan to heal: choose the blocks to drop first (a DropPlan).")
    check_plan(model, plan)  # TypeError for a non-plan, ValueError for a plan of another model
    if not plan.blocks:
        raise ValueError("The plan drops nothing, so there is nothing to heal: drop some blocks first.")


def heal_memory_bytes(model: nn.Module, settings: HealSettings, seq_len: int, plan: DropPlan | None = None) -> int:
    """An upper estimate of the memory a heal adds to the loaded model: the student copy; for linear the one
    forward over every training window at once (its activations, and per span the dense target, the two
    streams around the writer and the fit's float64 copies; at most one span per dropped block of ``plan``,
    one per layer without it); for lora the logits of teacher and student with their gradient, the
    activations kept for the backward pass, the adapters with their optimiser state, and the cached teacher
    log-probs when asked for."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    validation = settings.val_windows * seq_len * vocab * 4  # the slice's dense log-probs (ValidationSlice)
    student = params + (validation if validation <= TEACHER_CACHE_BYTES else 0)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    if settings.method == "linear":
        tokens = settings.train_windows * seq_len
        spans = len(plan.blocks) if plan is not None else layers
        inner = int(getattr(model.config, "intermediate_size", 0) or 4 * hidden)
        heads = int(getattr(model.config, "num_attention_heads", 0) or 1)
        forward = tokens * (3 * inner + 10 * hidden) * 4 + settings.train_windows * heads * seq_len ** 2 * 4
        return student + forward + spans * tokens * hidden * (3 * 4 + 2 * 8)
    tokens = settings.batch_windows * seq_len
    logits = 5 * tokens * vocab * 4  # teacher log-probs, student logits, log-softmax and its gradient, slack
    activations = 24 * tokens * hidden * layers * 4  # what autograd keeps per layer (attention, MLP, norms)
    adapters = 4 * settings.rank * 2 * hidden * 7 * layers * 4  # A and B, grads, two Adam moments
    cache = settings.train_windows * seq_len * vocab * 2 if settings.teacher == "cache" else 0
    return student + logits + activations + adapters + cache


def check_heal_memory(model: nn.Module, settings: HealSettings, seq_len: int, plan: DropPlan | None = None) -> int:
    """The estimate of :func:`heal_memory_bytes`; ValueError when it would not fit in the free memory."""
    needed = heal_memory_bytes(model, settings, seq_len, plan)
    device = input_device(model)
    free = available_memory_bytes(device)
    if needed > MEMORY_HEADROOM * free and settings.method == "linear":
        raise ValueError(
            f"The linear heal reads all {settings.train_windows} training windows in one forward and would need about "
            f"{format_bytes(needed)} on {device.type} (a copy of the model, that forward, and the streams each fit "
            f"reads) but only {format_bytes(free)} is free, and at most {MEMORY_HEADROOM:.0%} of it is used. Use "
            f"fewer training windows (train_windows={max(1, settings.train_windows // 2)}), shorter windows, or a "
            "smaller model.")
    if needed > MEMORY_HEADROOM * free:
        raise ValueError(
            f"Healing would need about {format_bytes(needed)} on {device.type} (a copy of the model for the student, "
            f"next to the dense teacher, plus what training keeps) but only {format_bytes(free)} is free, and at most "
            f"{MEMORY_HEADROOM:.0%} of it is used. Use fewer windows per step (batch_windows="
            f"{max(1, settings.batch_windows // 2)}), teacher='recompute', the linear method, or a smaller model.")
    return needed


# -- shared by both methods -----------------------------------------------------------------------
def student_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` for the student: eval mode, no gradient anywhere until a method asks."""
    import copy

    student = copy.deepcopy(model)
    student.eval()
    student.requires_grad_(False)
    return student


def kl_per_token(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per position, nats: (B, T-1, V) log-probs and logits -> scalar."""
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    per_position = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # (B, T-1)
    return per_position.mean()


def teacher_logp(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The dense model's next-token log-probs, float32: (B, T-1, V). Never builds a graph."""
    with torch.no_grad():
        return F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)


TEACHER_CACHE_BYTES = 512 * 2**20  # the validation slice's dense log-probs are kept when they take at most this


class ValidationSlice:
    """The validation windows and the dense model's log-probs on them: computed once and kept when they fit
    in :data:`TEACHER_CACHE_BYTES` (the same float32 numbers every time), else recomputed at each use."""

    def __init__(self, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 2):
        self.teacher, self.windows, self.batch_size = teacher, windows, batch_size
        vocab = int(getattr(teacher.config, "vocab_size", 0) or 0)
        size = windows.shape[0] * (windows.shape[1] - 1) * vocab * 4
        self._targets = list(self._each_target()) if 0 < size <= TEACHER_CACHE_BYTES else None

    def _each_target(self):
        device = input_device(self.teacher)
        for start in range(0, self.windows.shape[0], self.batch_size):
            yield teacher_logp(self.teacher, self.windows[start:start + self.batch_size].to(device))

    def kl(self, student: nn.Module, plan: DropPlan) -> float:
        """Mean KL(dense || student under the plan) per position on the slice."""
        total, count = 0.0, 0
        targets = self._targets if self._targets is not None else self._each_target()
        for start, target in zip(range(0, self.windows.shape[0], self.batch_size), targets, strict=True):
            ids = self.windows[start:start + self.batch_size].to(input_device(student))
            with torch.no_grad(), preview_plan(student, plan):
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            total += float(kl_per_token(target, logits.to(target.device))) * target.shape[0] * target.shape[1]
            count += target.shape[0] * target.shape[1]
        return total / count


def validation_kl(teacher: nn.Module, student: nn.Module, plan: DropPlan, windows: torch.Tensor,
                  batch_size: int = 2) -> float:
    """Mean KL(dense || student under the plan) per position on ``windows`` (the validation slice), once."""
    return ValidationSlice(teacher, windows, batch_size).kl(student, plan)




# -- what a heal won back --------------------------------------------------------------------------
def recovered_fraction(before, after) -> tuple[float, float]:
    """Share of the lost nats a heal won back on the same windows, ``(ln ppl_pruned - ln ppl_healed) /
    (ln ppl_pruned - ln ppl_dense)``, and its standard error: the paired error of the per-window gain over
    the loss of the drop (the drop's own loss is taken as known). ``before`` / ``after`` are the
    :class:`~entrodrop.evaluate.QualityReport` of the dropped and of the healed model."""
    from ..evaluate import paired_difference

    lost = before.pruned_nll - before.dense_nll
    if not lost > 0:
        return float("nan"), float("nan")
    won = before.pruned_nll - after.pruned_nll
    error = float("nan")
    if before.window_nll and len(before.window_nll) == len(after.window_nll):
        _, error = paired_difference(before.window_nll, after.window_nll)
    return won / lost, error / lost


def heal_record(result: HealResult, before=None, after=None, checked_on: str = "") -> dict:
    """What an export keeps of a heal: the result (no model), and the checks of the dropped and the healed
    model on the same windows with the share of lost nats won back."""
    record = result.to_dict()
    if before is not None and after is not None:
        recovered, error = recovered_fraction(before, after)
        record.update(before=before.to_dict(), after=after.to_dict(), recovered=recovered, recovered_error=error,
                      checked_on=checked_on)
    return record
