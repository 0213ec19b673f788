"""Streaming calibration: one forward pass per batch, per-block statistics after every batch.

Memory does not grow with the number of calibration samples: a batch's residual streams are
reduced to scalars (entropies, cosines, an (L+1)^2 angular matrix) and dropped before the
next batch; only running sums are kept (:class:`~entrodrop.stats.RunningStats`, which says what is
measured). The statistics can run on a second thread beside the next forward (``overlap``), and under a
multi-process launch each process calibrates its share of the batches (:mod:`entrodrop.distributed`).

Massive-activation tokens (attention sinks): per batch, a token whose norm in some stream is
over ``EstimatorSettings.massive_ratio`` times that stream's median token norm is counted for
that stream (:class:`MassiveTokenTracker`) and left out of the batch's *sink-free* entropies,
in every stream, so the sink-free curve compares one token set across layers. The scores of
the method (``entropy_curve``, ``delta_entropy``) keep all tokens, as released; the stage
boundary is found on the sink-free curve. A batch without such tokens is measured once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .arch import ArchSpec, get_arch, get_layers
from .capture import capture_residuals
from .devices import input_device
from .distributed import shard, world
from .progress import ProgressEvent, run_to_end
from .scores import Scores
from .stats import MAX_TRACKED, EstimatorSettings, MassiveTokenTracker, RunningStats, stream_names

__all__ = ["MAX_TRACKED", "CalibrationEvent", "EstimatorSettings", "MassiveTokenTracker", "RunningStats",
           "iter_calibration", "run_calibration", "spare_cores", "stream_names"]

logger = logging.getLogger(__name__)


@dataclass(init=False)
class CalibrationEvent(ProgressEvent):
    """A :class:`~entrodrop.progress.ProgressEvent` of stage ``calibrate``, emitted after every batch:
    ``total`` batches, ``partial`` the running :class:`Scores`, plus the tokens measured so far."""

    tokens_seen: int = 0

    def __init__(self, done: int, total: int, tokens_seen: int, scores: Scores):
        super().__init__("calibrate", done, total, scores)
        self.tokens_seen = tokens_seen

    @property
    def scores(self) -> Scores:
        """The running means so far (the event's ``partial``)."""
        return self.partial


def _stats_device(model: nn.Module) -> torch.device:
    """Statistics run where the model computes: the first CUDA device if any, else CPU."""
    devices = {p.device for p in model.parameters() if p.device.type not in ("meta",)}
    cuda = sorted((d for d in devices if d.type == "cuda"), key=lambda d: d.index or 0)
    return cuda[0] if cuda else torch.device("cpu")


def _hidden_size(model: nn.Module) -> int | None:
    """d of the residual stream from the config (text part of multimodal configs), None if it says nothing."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None)
    return int(d) if isinstance(d, int) else None


def _stack_tokens(streams: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """S tensors (B, T, d) -> (S, N, d), keeping the real (non-padding) tokens only.

    One copy (the stack); the mask selects only when some token is excluded."""
    stacked = torch.stack(streams).flatten(1, 2)  # (S, B*T, d)
    return stacked if bool(mask.all()) else stacked[:, mask.reshape(-1)]


@dataclass
class _Batch:
    """One batch's residual streams (real tokens only) and what the massive-token report needs of it."""

    xs: torch.Tensor  # (L+1, N, d)
    ys: torch.Tensor  # (L, N, d)
    positions: torch.Tensor  # (N,) position of each token in its window
    token_ids: torch.Tensor  # (N,)
    last_token: torch.Tensor  # (N,) bool: the last real token of its window


def _captured_batches(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, attention_mask: torch.Tensor,
                      stats_mask: torch.Tensor, starts: range, batch_size: int,
                      stats_device: torch.device) -> Iterator[_Batch]:
    """The forward pass of each batch starting at ``starts``, through the decoder without the LM head
    (logits are not needed), with the capture hooks on; one :class:`_Batch` per forward."""
    in_device = input_device(model)
    base = model.base_model
    with capture_residuals(model, spec, device=stats_device) as cap:
        for start in starts:
            # inference mode is entered per batch, never held across a yield: grad modes are thread-local and
            # the app resumes this generator on whichever worker thread is free (a mode left on would leak)
            with torch.inference_mode():
                ids = windows[start : start + batch_size]
                mask = attention_mask[start : start + batch_size]
                cap.clear()
                base(input_ids=ids.to(in_device), attention_mask=mask.to(in_device).long(), use_cache=False)
                if not cap.complete():
                    raise RuntimeError("Some residual streams were not captured; the architecture adapter is wrong.")
                mask = stats_mask[start : start + batch_size]
                flat = mask.reshape(-1)  # (B*T,) on the CPU, like the windows
                positions = torch.arange(mask.shape[1]).expand_as(mask).reshape(-1)[flat]  # (N,)
                # the last real token of each window: Gromov et al.'s angular distance reads only that one
                last_pos = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # (B,)
                last_token = (torch.arange(mask.shape[1]) == last_pos[:, None]).reshape(-1)[flat]  # (N,)
                on_stats = mask.to(stats_device)
                batch = _Batch(xs=_stack_tokens(cap.x, on_stats), ys=_stack_tokens(cap.y, on_stats),
                               positions=positions, token_ids=ids.reshape(-1)[flat], last_token=last_token)
                cap.clear()  # free the batch's activations before the statistics allocate
            yield batch


def _fold(stats: RunningStats, batch: _Batch, settings: EstimatorSettings) -> None:
    """Add one batch to the running statistics (on whichever thread runs it: inference mode is per thread)."""
    with torch.inference_mode():
        stats.add_batch(batch.xs, batch.ys, settings, positions=batch.positions, token_ids=batch.token_ids,
                        last_token=batch.last_token)


def spare_cores() -> bool:
    """True when torch's CPU threads leave as many cores idle as they use, so statistics on a second
    thread run beside the next forward instead of competing with it (``overlap=None`` decides by this)."""
    return torch.get_num_threads() * 2 <= len(os.sched_getaffinity(0))


@contextmanager
def _statistics_thread(enabled: bool) -> Iterator[ThreadPoolExecutor | None]:
    """One worker thread for the statistics when ``enabled`` (None otherwise); joined on the way out."""
    if not enabled:
        yield None
        return
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrodrop-statistics")
    try:
        yield worker
    finally:
        worker.shutdown(wait=True)


def iter_calibration(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    settings: EstimatorSettings | None = None,
    batch_size: int = 1,
    attention_mask: torch.Tensor | None = None,
    model_name: str | None = None,
    calibration: dict | None = None,
    spec: ArchSpec | None = None,
    skip_first: int = 0,
    overlap: bool | None = None,
) -> Iterator[CalibrationEvent]:
    """Run calibration batch by batch, yielding a :class:`CalibrationEvent` after each.

    ``windows`` is a LongTensor (N, T) of token ids; ``attention_mask`` (N, T) marks real tokens
    (padding is excluded from every statistic). ``settings`` chooses the estimators, their
    parameters and the massive-activation threshold (default :class:`EstimatorSettings`).
    Stopping the iteration between batches keeps everything computed so far (the last event's
    ``scores``).

    ``overlap=True`` computes each batch's statistics on a second thread while the next batch's forward
    runs (the scores are the same, bitwise: one thread adds the batches in order; an event comes one
    forward later; at most two batches' streams are alive). ``None`` turns it on where torch leaves
    cores idle (:func:`spare_cores`) and the statistics run on the CPU; on a CPU whose cores the forward
    already uses, the two threads compete and overlap is slower (docs/results.md section 0).

    Under a multi-process launch (:mod:`entrodrop.distributed`) each process calibrates its own share of
    the batches; its events report that share, and a last event carries every process's statistics summed
    (every process must run to the end: the sum waits for all of them).
    """
    settings = settings if settings is not None else EstimatorSettings()
    if not isinstance(settings, EstimatorSettings):
        raise TypeError(
            f"settings must be an EstimatorSettings, got {type(settings).__name__}; "
            "for estimator names use settings=EstimatorSettings(estimators=(...))."
        )
    spec = spec or get_arch(model)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"Calibration needs a (samples, seq_len) tensor of token ids, got shape {tuple(windows.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(windows, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    if skip_first < 0 or skip_first >= windows.shape[1]:
        raise ValueError(f"skip_first must be between 0 and seq_len - 1 ({windows.shape[1] - 1}), got {skip_first}.")
    stats_mask = attention_mask.clone()
    stats_mask[:, :skip_first] = False
    if "knn" in settings.estimators:
        fewest = min(int(stats_mask[i : i + batch_size].sum()) for i in range(0, len(windows), batch_size))
        if fewest <= settings.k:
            raise ValueError(
                f"knn entropy with k={settings.k} needs more than {settings.k} tokens per batch, but a batch has "
                f"{fewest}. Use a longer sequence length, a larger batch, or drop the knn estimator."
            )
    stats = RunningStats(len(get_layers(model, spec)), settings.estimators, massive_ratio=settings.massive_ratio)
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    calib = {
        **(calibration or {}),
        "samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "batch_size": batch_size,
        "bins": settings.bins,
        "k": settings.k,
        "alpha": settings.alpha,
        "massive_ratio": settings.massive_ratio,
        "skip_first": skip_first,
        # d, so curves of models of different width can be compared per dimension (entrodrop.compare)
        "hidden_size": _hidden_size(model),
    }
    batches_total = (len(windows) + batch_size - 1) // batch_size
    processes = world()
    mine = shard(batches_total, processes)  # every batch when there is one process
    stats_device = _stats_device(model)
    if overlap is None:
        overlap = stats_device.type == "cpu" and spare_cores()
    logger.info("Calibrating %s on %d windows x %d tokens%s", name, *windows.shape,
                f" (batches {mine.start}-{mine.stop - 1} of {batches_total} in process {processes.rank})"
                if processes.size > 1 else "")

    def event(total: int) -> CalibrationEvent:
        return CalibrationEvent(done=stats.batches, total=total, tokens_seen=stats.tokens,
                                scores=stats.to_scores(name, calib, total))

    starts = range(mine.start * batch_size, mine.stop * batch_size, batch_size)
    batches = _captured_batches(model, spec, windows, attention_mask, stats_mask, starts, batch_size, stats_device)
    with closing(batches), _statistics_thread(overlap) as worker:  # closing: hooks off even when stopped early
        pending = None
        for batch in batches:  # with a worker, this forward runs while it adds the batch before
            if worker is None:
                _fold(stats, batch, settings)
                yield event(len(mine))
                continue
            if pending is not None:
                pending.result()
                yield event(len(mine))
            pending = worker.submit(_fold, stats, batch, settings)
            del batch
        if pending is not None:
            pending.result()
            yield event(len(mine))
    if processes.size > 1:
        stats.reduce_across_processes()
        yield event(batches_total)


def run_calibration(model: nn.Module, windows: torch.Tensor, **kwargs) -> Scores:
    """Run :func:`iter_calibration` to its end and return the final scores."""
    return run_to_end(iter_calibration(model, windows, **kwargs))
