"""Checks of a drop plan against the dense model: quality, size, speed and generations.

Every check runs the dense model and the pruned one in the same call: the pruned model is the
dense model under :func:`~entrodrop.prune.preview_plan` (same weights, the dropped blocks really
skipped), or a physically pruned model passed as ``pruned_model``. Quality on held-out windows:

* perplexity of dense and pruned (next-token cross-entropy, exp of the token mean);
* mean KL(dense || pruned) of the next-token distributions, in nats per token;
* top-1 agreement: share of positions whose argmax token is the same.

Long checks are generators of :class:`~entrodrop.progress.ProgressEvent` (``done``/``total`` plus the
partial result); ``compare``, ``measure_speed`` and ``generate_side_by_side`` run them to the end for
callers that only want the answer.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .costs import count_parameters, flops_share_removed, plan_parameter_counts, speedup_from_share
from .devices import input_device
from .distributed import World, concat_across, shard, sum_across, world
from .plan import DropPlan
from .progress import ProgressEvent, run_to_end
from .prune import preview_plan

logger = logging.getLogger(__name__)


@dataclass
class QualityReport:
    """Dense vs pruned on held-out windows (running values while the check is in progress)."""

    num_windows: int
    num_tokens: int  # predicted positions counted
    dense_nll: float  # mean next-token cross-entropy, nats
    pruned_nll: float
    kl_mean: float  # mean KL(dense || pruned) per position, nats
    top1_agreement: float  # share of positions with the same argmax
    dense_params: int
    pruned_params: int
    dense_bytes: int
    pruned_bytes: int
    plan: dict = field(default_factory=dict)
    complete: bool = False
    window_nll: list[float] = field(default_factory=list)  # pruned mean cross-entropy of each window read, nats

    @property
    def dense_perplexity(self) -> float:
        return _safe_exp(self.dense_nll)

    @property
    def pruned_perplexity(self) -> float:
        return _safe_exp(self.pruned_nll)

    @property
    def perplexity_ratio(self) -> float:
        return self.pruned_perplexity / self.dense_perplexity if self.dense_perplexity else float("nan")

    @property
    def params_removed(self) -> int:
        return self.dense_params - self.pruned_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dense_perplexity=self.dense_perplexity, pruned_perplexity=self.pruned_perplexity,
                 perplexity_ratio=self.perplexity_ratio, params_removed=self.params_removed)
        return d


@dataclass
class SpeedReport:
    """Prefill latency and decode throughput, dense and pruned measured alternately in one run."""

    device: str
    dtype: str
    prefill_tokens: int
    decode_tokens: int
    repeats: int
    dense_prefill_s: float  # median seconds for one forward over the prompt
    pruned_prefill_s: float
    dense_decode_tps: float  # median generated tokens per second (one token per step, KV cache)
    pruned_decode_tps: float
    ideal_flops_removed: float  # share of forward FLOPs the plan removes (costs.flops_share_removed)
    plan: dict = field(default_factory=dict)

    @property
    def prefill_speedup(self) -> float:
        return self.dense_prefill_s / self.pruned_prefill_s if self.pruned_prefill_s else float("nan")

    @property
    def decode_speedup(self) -> float:
        return self.pruned_decode_tps / self.dense_decode_tps if self.dense_decode_tps else float("nan")

    @property
    def ideal_speedup(self) -> float:
        return speedup_from_share(self.ideal_flops_removed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_speedup=self.prefill_speedup, decode_speedup=self.decode_speedup,
                 ideal_speedup=self.ideal_speedup)
        return d


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] == 0:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"Checks need a (samples, seq_len) tensor of token ids, got {shape}.")
    if windows.shape[1] < 2:
        raise ValueError("Windows need at least 2 tokens: one to read and one to predict.")
    return windows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits for every position but the last, float32: (B, T-1, V)."""
    return model(input_ids=ids, use_cache=False).logits[:, :-1].float()


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each of ``ids[:, 1:]`` under ``logits`` (B, T-1, V): a (B, T-1) tensor."""
    targets = ids[:, 1:].to(logits.device)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``ids[:, 1:]`` under ``logits`` (B, T-1, V)."""
    return token_nll(logits, ids).sum()


# -- quality ---------------------------------------------------------------------------------------
class _Tally:
    """Running sums of one dense-vs-pruned comparison."""

    def __init__(self) -> None:
        self.dense = self.pruned = self.kl = 0.0
        self.agree = self.tokens = 0
        self.windows: list[float] = []

    def add(self, dense_logp: torch.Tensor, dense_top1: torch.Tensor, dense_nll: float,
            pruned: torch.Tensor, ids: torch.Tensor) -> None:
        pruned = pruned.to(dense_logp.device)  # (B, T-1, V)
        self.dense += dense_nll
        nll = token_nll(pruned, ids)  # (B, T-1)
        self.pruned += float(nll.sum())
        self.windows.extend(nll.mean(dim=1).tolist())
        self.kl += float(F.kl_div(F.log_softmax(pruned, dim=-1), dense_logp, log_target=True, reduction="sum"))
        self.agree += int((pruned.argmax(-1) == dense_top1).sum())
        self.tokens += dense_top1.numel()

    def reduce_across_processes(self) -> None:
        """Sum every process's tallies into each (a data-parallel run); the per-window losses are joined in
        window order."""
        total = sum_across({"nats": torch.tensor([self.dense, self.pruned, self.kl], dtype=torch.float64),
                            "counts": torch.tensor([self.agree, self.tokens], dtype=torch.int64)})
        self.dense, self.pruned, self.kl = total["nats"].tolist()
        self.agree, self.tokens = total["counts"].tolist()
        self.windows = concat_across(self.windows)

    def report(self, done: int, total: int, counts: tuple[int, int, int, int], plan: DropPlan) -> QualityReport:
        n = max(self.tokens, 1)
        return QualityReport(
            num_windows=done, num_tokens=self.tokens, dense_nll=self.dense / n, pruned_nll=self.pruned / n,
            kl_mean=self.kl / n, top1_agreement=self.agree / n,
            dense_params=counts[0], dense_bytes=counts[1], pruned_params=counts[2], pruned_bytes=counts[3],
            plan=plan.to_dict(), complete=done >= total, window_nll=list(self.windows),
        )


def iter_compare_many(
    model: nn.Module,
    plans: Mapping[str, DropPlan],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    pruned_models: Mapping[str, nn.Module] | None = None,
) -> Iterator[ProgressEvent]:
    """Compare several plans with the dense model in ONE pass over ``windows``: each batch runs the
    dense model once, then every plan (under a preview, or the physically pruned model given for
    that name in ``pruned_models``). Events carry ``partial = {name: QualityReport}``."""
    windows = _check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    pruned_models = dict(pruned_models or {})
    device = input_device(model)
    counts = {}
    for name, plan in plans.items():
        if name in pruned_models:
            counts[name] = (*count_parameters(model), *count_parameters(pruned_models[name]))
        else:
            counts[name] = plan_parameter_counts(model, plan)
    tallies = {name: _Tally() for name in plans}
    total = windows.shape[0]
    processes = world()
    mine = _my_windows(total, batch_size, processes)  # all of them when there is one process
    for start in range(mine.start, mine.stop, batch_size):
        # inference mode per batch, never across a yield: grad modes are thread-local (see iter_calibration)
        with torch.inference_mode():
            ids = windows[start : start + batch_size].to(device)
            dense = _logits(model, ids)  # (B, T-1, V)
            dense_logp = F.log_softmax(dense, dim=-1)
            dense_nll = float(next_token_nll(dense, ids))
            dense_top1 = dense.argmax(-1)
            del dense
            for name, plan in plans.items():
                if name in pruned_models:
                    other = pruned_models[name]
                    pruned = _logits(other, ids.to(input_device(other)))
                else:
                    with preview_plan(model, plan):
                        pruned = _logits(model, ids)
                tallies[name].add(dense_logp, dense_top1, dense_nll, pruned, ids)
                del pruned
        done = min(start + batch_size, mine.stop) - mine.start
        yield ProgressEvent("compare", done, len(mine),
                            {name: t.report(done, len(mine), counts[name], plans[name]) for name, t in tallies.items()})
    if processes.size > 1:  # a last event over every process's windows
        for tally in tallies.values():
            tally.reduce_across_processes()
        yield ProgressEvent("compare", total, total,
                            {name: t.report(total, total, counts[name], plans[name]) for name, t in tallies.items()})


def iter_compare(
    model: nn.Module,
    plan: DropPlan,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    pruned_model: nn.Module | None = None,
) -> Iterator[ProgressEvent]:
    """Dense vs pruned quality, one event (``partial`` = running :class:`QualityReport`) per batch.

    The pruned model is ``model`` under a preview of ``plan``, or ``pruned_model`` when given
    (a physically pruned copy: its figures must match the preview's)."""
    others = {"plan": pruned_model} if pruned_model is not None else None
    for event in iter_compare_many(model, {"plan": plan}, windows, batch_size=batch_size, pruned_models=others):
        yield ProgressEvent(event.stage, event.done, event.total, event.partial["plan"])


def compare(model: nn.Module, plan: DropPlan, windows: torch.Tensor, *, batch_size: int = 1,
            pruned_model: nn.Module | None = None) -> QualityReport:
    """Run :func:`iter_compare` to its end and return the final :class:`QualityReport`."""
    return run_to_end(iter_compare(model, plan, windows, batch_size=batch_size, pruned_model=pruned_model))


def _my_windows(num_windows: int, batch_size: int, processes: World) -> range:
    """The windows this process reads: a contiguous share of whole batches (every window in one process)."""
    batches = shard((num_windows + batch_size - 1) // batch_size, processes)
    return range(batches.start * batch_size, min(batches.stop * batch_size, num_windows))


def window_losses(model: nn.Module, windows: torch.Tensor, plan: DropPlan | None = None, *,
                  batch_size: int = 1) -> list[float]:
    """Mean next-token cross-entropy (nats) of ``model`` on each window, under a preview of ``plan``.

    Under a multi-process launch each process reads its share of the windows and every process gets the
    whole list, in window order (:mod:`entrodrop.distributed`)."""
    windows = _check_windows(windows)
    device = input_device(model)
    mine = _my_windows(windows.shape[0], batch_size, world())
    losses: list[float] = []
    with torch.inference_mode(), (preview_plan(model, plan) if plan is not None else nullcontext()):
        for start in range(mine.start, mine.stop, batch_size):
            ids = windows[start : min(start + batch_size, mine.stop)].to(device)
            losses.extend(token_nll(_logits(model, ids).float(), ids).mean(dim=1).tolist())
    return concat_across(losses)


def paired_difference(losses: Sequence[float], others: Sequence[float]) -> tuple[float, float]:
    """Mean of ``losses[i] - others[i]`` over windows read by both, and its standard error (the spread of
    the per-window differences over the square root of their number; ``nan`` with fewer than 2 windows).

    Two plans read on the same windows share each window's difficulty, so their paired difference is far
    less noisy than either mean: this is the error to judge "plan A loses less than plan B" by."""
    if len(losses) != len(others):
        raise ValueError(f"Paired losses need the same windows: got {len(losses)} and {len(others)} values.")
    diffs = [a - b for a, b in zip(losses, others, strict=True)]
    if not diffs:
        return float("nan"), float("nan")
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))


def gap_verdict(mean: float, error: float) -> str:
    """``"lower"`` or ``"higher"`` when a paired difference (:func:`paired_difference`) is more than 2 standard
    errors from zero, else ``"noise"`` (also when there is no error estimate)."""
    if math.isnan(error) or abs(mean) <= 2 * error:
        return "noise"
    return "lower" if mean < 0 else "higher"


def mean_loss(model: nn.Module, windows: torch.Tensor, plan: DropPlan | None = None, *, batch_size: int = 1) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``windows``, under a preview of ``plan``
    (every window has the same length, so this is the mean of :func:`window_losses`)."""
    losses = window_losses(model, windows, plan, batch_size=batch_size)
    return sum(losses) / len(losses)


# -- speed -----------------------------------------------------------------------------------------
def time_prefill_and_decode(model: nn.Module, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(seconds for the prefill forward, decode tokens per second with the KV cache)."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - t0
    return prefill, decode_tokens / decode if decode > 0 else float("inf")


def iter_measure_speed(
    model: nn.Module,
    plan: DropPlan,
    tokenizer=None,
    *,
    prefill_tokens: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    pruned_model: nn.Module | None = None,
) -> Iterator[ProgressEvent]:
    """Time dense and pruned alternately (warm-up rounds discarded); the last event's ``partial`` is
    the :class:`SpeedReport` with medians over ``repeats`` rounds. The pruned model is ``model`` under a
    preview of ``plan``, or ``pruned_model`` (a physically pruned copy, e.g. a healed one) when given."""
    if repeats < 1 or prefill_tokens < 1 or decode_tokens < 1:
        raise ValueError("repeats, prefill_tokens and decode_tokens must all be at least 1.")
    config = model.config
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and prefill_tokens + decode_tokens + 1 > max_positions:
        prefill_tokens = max(1, max_positions - decode_tokens - 1)
        logger.info("Prefill length capped at %d tokens by max_position_embeddings=%d", prefill_tokens, max_positions)
    vocab = min(len(tokenizer) if tokenizer is not None else config.vocab_size, config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    device = input_device(model)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=generator).to(device)
    rounds = warmup + repeats
    dense_runs: list[tuple[float, float]] = []
    pruned_runs: list[tuple[float, float]] = []
    for r in range(rounds):
        with torch.inference_mode():  # per round, never across a yield (grad modes are thread-local)
            dense = time_prefill_and_decode(model, ids, decode_tokens)
            if pruned_model is not None:
                pruned = time_prefill_and_decode(pruned_model, ids.to(input_device(pruned_model)), decode_tokens)
            else:
                with preview_plan(model, plan):
                    pruned = time_prefill_and_decode(model, ids, decode_tokens)
        if r >= warmup:
            dense_runs.append(dense)
            pruned_runs.append(pruned)
        yield ProgressEvent("speed", r + 1, rounds, None)
    dtype = next(model.parameters()).dtype
    report = SpeedReport(
        device=str(device), dtype=str(dtype).replace("torch.", ""), prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens, repeats=repeats,
        dense_prefill_s=statistics.median(p for p, _ in dense_runs),
        pruned_prefill_s=statistics.median(p for p, _ in pruned_runs),
        dense_decode_tps=statistics.median(t for _, t in dense_runs),
        pruned_decode_tps=statistics.median(t for _, t in pruned_runs),
        ideal_flops_removed=flops_share_removed(model, plan, prefill_tokens),
        plan=plan.to_dict(),
    )
    yield ProgressEvent("speed", rounds, rounds, report)


def measure_speed(model: nn.Module, plan: DropPlan, tokenizer=None, *, prefill_tokens: int = 512,
                  decode_tokens: int = 32, repeats: int = 3, warmup: int = 1, seed: int = 0) -> SpeedReport:
    """Run :func:`iter_measure_speed` to its end and return the :class:`SpeedReport`."""
    return run_to_end(iter_measure_speed(model, plan, tokenizer, prefill_tokens=prefill_tokens,
                                         decode_tokens=decode_tokens, repeats=repeats, warmup=warmup, seed=seed))


# -- generations -----------------------------------------------------------------------------------
def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) ids of ``prompt``, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def greedy_generate(model: nn.Module, tokenizer, ids: torch.Tensor, max_new_tokens: int, *,
                    pad_token_id: int | None = None, min_new_tokens: int | None = None) -> torch.Tensor:
    """Greedy continuation of ``ids`` (1, T): the new token ids only.

    The pad id defaults to the tokenizer's pad (else eos) token; ``min_new_tokens`` forces a fixed
    length (export verification compares token for token)."""
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = ids.to(input_device(model))
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_token_id, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].cpu()


def iter_side_by_side(
    model: nn.Module,
    plan: DropPlan,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    pruned_model: nn.Module | None = None,
) -> Iterator[ProgressEvent]:
    """Greedy generations, dense and pruned, one prompt at a time; ``partial`` is the list so far of
    ``{"prompt", "dense", "pruned", "same"}``."""
    rows: list[dict] = []
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt)
        dense = greedy_generate(model, tokenizer, ids, max_new_tokens)
        if pruned_model is not None:
            pruned = greedy_generate(pruned_model, tokenizer, ids, max_new_tokens)
        else:
            with preview_plan(model, plan):
                pruned = greedy_generate(model, tokenizer, ids, max_new_tokens)
        rows.append({
            "prompt": prompt,
            "dense": tokenizer.decode(dense, skip_special_tokens=True),
            "pruned": tokenizer.decode(pruned, skip_special_tokens=True),
            "same": torch.equal(dense, pruned),
        })
        yield ProgressEvent("generate", i + 1, len(prompts), list(rows))


def generate_side_by_side(model: nn.Module, plan: DropPlan, tokenizer, prompts: Sequence[str], *,
                          max_new_tokens: int = 48, pruned_model: nn.Module | None = None) -> list[dict]:
    """Run :func:`iter_side_by_side` to its end and return its rows (none for no prompts)."""
    return run_to_end(iter_side_by_side(model, plan, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        pruned_model=pruned_model), default=[])
