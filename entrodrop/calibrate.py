"""Streaming calibration: one forward pass per batch, per-block statistics after every batch.

Memory does not grow with the number of calibration samples: a batch's residual streams are
reduced to scalars (entropies, cosines, an (L+1)^2 angular matrix) and dropped before the
next batch; only running sums are kept (:class:`RunningStats`).

Each of the 2L+1 distinct residual tensors (X_0..X_L, Y_0..Y_{L-1}) is measured once per
estimator; block entropy increases are differences of those numbers:
attn l: H(Y_l) - H(X_l); mlp l: H(X_{l+1}) - H(Y_l); layer l: H(X_{l+1}) - H(X_l).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec, get_arch, get_layers
from .capture import capture_residuals
from .estimators import (
    ENTROPY_ESTIMATORS,
    angular_distance_matrix,
    angular_from_cosine,
    entropy,
    importance_from_cosine,
    token_cosine,
    unit_tokens,
)
from .loading import input_device
from .scores import BlockScore, Scores, detect_stage_boundary

logger = logging.getLogger(__name__)


@dataclass
class EstimatorSettings:
    """Which entropy estimators to run and their parameters (defaults from the released code)."""

    estimators: tuple[str, ...] = ("bucket", "knn")
    bins: int = 20  # bucket: histogram bins per dimension
    k: int = 25  # knn: neighbour rank
    alpha: float = 4.0  # renyi: order

    def __post_init__(self) -> None:
        self.estimators = tuple(self.estimators)
        if not self.estimators:
            raise ValueError(f"Choose at least one entropy estimator from {', '.join(ENTROPY_ESTIMATORS)}.")
        unknown = [e for e in self.estimators if e not in ENTROPY_ESTIMATORS]
        if unknown:
            raise ValueError(
                f"Unknown entropy estimator(s) {', '.join(unknown)}; choose from {', '.join(ENTROPY_ESTIMATORS)}."
            )


@dataclass
class CalibrationEvent:
    """Emitted after every batch. ``scores`` holds the running means so far."""

    batch_index: int  # batches done so far (1-based)
    num_batches: int
    tokens_seen: int
    scores: Scores

    @property
    def done(self) -> bool:
        return self.batch_index >= self.num_batches

    @property
    def fraction(self) -> float:
        return self.batch_index / max(self.num_batches, 1)


@dataclass
class RunningStats:
    """Running sums over batches; O(L^2) memory whatever the number of samples."""

    num_layers: int
    estimators: tuple[str, ...]
    batches: int = 0
    tokens: int = 0
    h_x: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L+1,)
    h_y: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L,)
    cos: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (L,) cosine importance
    ang: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (L,) angular distance
    ang_matrix: torch.Tensor | None = None  # (L+1, L+1)

    def __post_init__(self) -> None:
        L = self.num_layers
        self.h_x = {e: torch.zeros(L + 1, dtype=torch.float64) for e in self.estimators}
        self.h_y = {e: torch.zeros(L, dtype=torch.float64) for e in self.estimators}
        self.cos = {k: torch.zeros(L, dtype=torch.float64) for k in ("attn", "mlp", "layer")}
        self.ang = {k: torch.zeros(L, dtype=torch.float64) for k in ("attn", "mlp", "layer")}
        self.ang_matrix = torch.zeros(L + 1, L + 1, dtype=torch.float64)

    def state_bytes(self) -> int:
        tensors = [*self.h_x.values(), *self.h_y.values(), *self.cos.values(), *self.ang.values(), self.ang_matrix]
        return sum(t.numel() * t.element_size() for t in tensors)

    def add_batch(self, xs: torch.Tensor, ys: torch.Tensor, settings: EstimatorSettings) -> None:
        """Fold one batch in. ``xs``: (L+1, N, d) streams X_0..X_L; ``ys``: (L, N, d) streams Y_l."""
        kw = dict(bins=settings.bins, k=settings.k, alpha=settings.alpha)
        for est in self.estimators:  # each of the 2L+1 distinct streams measured once
            self.h_x[est] += entropy(xs, est, **kw).cpu()
            self.h_y[est] += entropy(ys, est, **kw).cpu()
        unit_x, unit_y = unit_tokens(xs), unit_tokens(ys)  # each stream normalised once
        pairs = {  # (block input, block output), each (L, N, d)
            "attn": (unit_x[:-1], unit_y),
            "mlp": (unit_y, unit_x[1:]),
            "layer": (unit_x[:-1], unit_x[1:]),
        }
        for kind, (block_in, block_out) in pairs.items():
            cos = token_cosine(block_in, block_out, unit=True)  # (L, N)
            self.cos[kind] += importance_from_cosine(cos).cpu()
            self.ang[kind] += angular_from_cosine(cos).cpu()
        self.ang_matrix += angular_distance_matrix(unit_x, unit=True).cpu()
        self.batches += 1
        self.tokens += int(xs.shape[1])

    def to_scores(self, model_name: str, calibration: dict, batches_total: int) -> Scores:
        n = max(self.batches, 1)
        L = self.num_layers
        curve = {e: (self.h_x[e] / n).tolist() for e in self.estimators}
        mid = {e: (self.h_y[e] / n).tolist() for e in self.estimators}
        blocks = []
        for layer in range(L):
            for kind in ("attn", "mlp", "layer"):
                delta = {}
                for e in self.estimators:
                    hx, hy = curve[e], mid[e]
                    delta[e] = {
                        "attn": hy[layer] - hx[layer],
                        "mlp": hx[layer + 1] - hy[layer],
                        "layer": hx[layer + 1] - hx[layer],
                    }[kind]
                blocks.append(
                    BlockScore(
                        layer=layer,
                        kind=kind,
                        delta_entropy=delta,
                        cosine_importance=float(self.cos[kind][layer] / n),
                        angular_distance=float(self.ang[kind][layer] / n),
                    )
                )
        return Scores(
            model=model_name,
            num_layers=L,
            estimators=list(self.estimators),
            entropy_curve=curve,
            mid_entropy=mid,
            stage_boundary={e: detect_stage_boundary(c) for e, c in curve.items()},
            blocks=blocks,
            angular_matrix=(self.ang_matrix / n).tolist(),
            calibration={**calibration, "tokens": self.tokens, "batches": self.batches},
            batches_done=self.batches,
            batches_total=batches_total,
            complete=self.batches >= batches_total,
        )


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


def iter_calibration(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    settings: EstimatorSettings | None = None,
    estimators: Sequence[str] | None = None,
    batch_size: int = 1,
    attention_mask: torch.Tensor | None = None,
    model_name: str | None = None,
    calibration: dict | None = None,
    spec: ArchSpec | None = None,
    skip_first: int = 0,
) -> Iterator[CalibrationEvent]:
    """Run calibration batch by batch, yielding a :class:`CalibrationEvent` after each.

    ``windows`` is a LongTensor (N, T) of token ids; ``attention_mask`` (N, T) marks real tokens
    (padding is excluded from every statistic). Pass ``settings`` for full control or just
    ``estimators`` (names) with the default parameters. Stopping the iteration between batches keeps
    everything computed so far (the last event's ``scores``).
    """
    if settings is None:
        settings = EstimatorSettings(**({"estimators": tuple(estimators)} if estimators else {}))
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
    stats = RunningStats(len(get_layers(model, spec)), settings.estimators)
    name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    calib = {
        **(calibration or {}),
        "samples": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "batch_size": batch_size,
        "bins": settings.bins,
        "k": settings.k,
        "alpha": settings.alpha,
        "skip_first": skip_first,
        # d, so curves of models of different width can be compared per dimension (entrodrop.compare)
        "hidden_size": _hidden_size(model),
    }
    batches_total = (len(windows) + batch_size - 1) // batch_size
    in_device, stats_device = input_device(model), _stats_device(model)
    base = model.base_model  # the decoder without the LM head: logits are not needed
    logger.info("Calibrating %s on %d windows x %d tokens", name, *windows.shape)
    with torch.inference_mode(), capture_residuals(model, spec, device=stats_device) as cap:
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size].to(in_device)
            mask = attention_mask[start : start + batch_size]
            cap.clear()
            base(input_ids=ids, attention_mask=mask.to(in_device).long(), use_cache=False)
            mask = stats_mask[start : start + batch_size]
            if not cap.complete():
                raise RuntimeError("Some residual streams were not captured; the architecture adapter is wrong.")
            mask = mask.to(stats_device)
            xs = _stack_tokens(cap.x, mask)  # (L+1, N, d)
            ys = _stack_tokens(cap.y, mask)  # (L, N, d)
            cap.clear()  # free the batch's activations before the statistics allocate
            stats.add_batch(xs, ys, settings)
            del xs, ys
            yield CalibrationEvent(
                batch_index=stats.batches,
                num_batches=batches_total,
                tokens_seen=stats.tokens,
                scores=stats.to_scores(name, calib, batches_total),
            )


def run_calibration(model: nn.Module, windows: torch.Tensor, **kwargs) -> Scores:
    """Consume :func:`iter_calibration` and return the final scores."""
    last = None
    for event in iter_calibration(model, windows, **kwargs):
        last = event
    assert last is not None
    return last.scores
