"""Streaming calibration: one forward pass per batch, per-block statistics after every batch.

Memory does not grow with the number of calibration samples: a batch's residual streams are
reduced to scalars (entropies, cosines, an (L+1)^2 angular matrix) and dropped before the
next batch; only running sums are kept (:class:`RunningStats`).

Each of the 2L+1 distinct residual tensors (X_0..X_L, Y_0..Y_{L-1}) is measured once per
estimator; block entropy increases are differences of those numbers:
attn l: H(Y_l) - H(X_l); mlp l: H(X_{l+1}) - H(Y_l); layer l: H(X_{l+1}) - H(X_l).

Massive-activation tokens (attention sinks): per batch, a token whose norm in some stream is
over ``EstimatorSettings.massive_ratio`` times that stream's median token norm is counted for
that stream (:class:`MassiveTokenTracker`) and left out of the batch's *sink-free* entropies,
in every stream, so the sink-free curve compares one token set across layers. The scores of
the method (``entropy_curve``, ``delta_entropy``) keep all tokens, as released; the stage
boundary is found on the sink-free curve. A batch without such tokens is measured once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import BLOCK_KINDS, ArchSpec, get_arch, get_layers
from .capture import capture_residuals
from .devices import input_device
from .estimators import (
    ENTROPY_ESTIMATORS,
    MASSIVE_RATIO,
    angular_distance_matrix,
    angular_from_cosine,
    entropy,
    entropy_with_subset,
    importance_from_cosine,
    norm_ratio_to_median,
    token_cosine,
    unit_tokens,
)
from .progress import ProgressEvent, run_to_end
from .scores import BlockScore, Scores, detect_stage_boundary

logger = logging.getLogger(__name__)


@dataclass
class EstimatorSettings:
    """Which entropy estimators to run and their parameters (defaults from the released code)."""

    estimators: tuple[str, ...] = ("bucket", "knn")
    bins: int = 20  # bucket: histogram bins per dimension
    k: int = 25  # knn: neighbour rank
    alpha: float = 4.0  # renyi: order
    # a token whose norm exceeds this multiple of its stream's median token norm is a massive
    # activation: reported, and left out of the sink-free curves and the stage boundary (not of
    # the method's scores); see estimators.MASSIVE_RATIO for why 20
    massive_ratio: float = MASSIVE_RATIO

    def __post_init__(self) -> None:
        self.estimators = tuple(self.estimators)
        if not self.massive_ratio > 1:
            raise ValueError(
                f"massive_ratio must be above 1 (a multiple of the median token norm), got {self.massive_ratio}."
            )
        if not self.estimators:
            raise ValueError(f"Choose at least one entropy estimator from {', '.join(ENTROPY_ESTIMATORS)}.")
        unknown = [e for e in self.estimators if e not in ENTROPY_ESTIMATORS]
        if unknown:
            raise ValueError(
                f"Unknown entropy estimator(s) {', '.join(unknown)}; choose from {', '.join(ENTROPY_ESTIMATORS)}."
            )


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


def stream_names(num_layers: int) -> list[str]:
    """The 2L+1 residual streams in depth order: X_0, Y_0, X_1, Y_1, ..., Y_{L-1}, X_L."""
    return [f"{kind}_{layer}" for layer in range(num_layers) for kind in ("X", "Y")] + [f"X_{num_layers}"]


def interleave_streams(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(L+1, ...) X values and (L, ...) Y values -> (2L+1, ...) in depth order X_0, Y_0, X_1, ..."""
    out = x.new_empty((x.shape[0] + y.shape[0], *x.shape[1:]))
    out[0::2], out[1::2] = x, y
    return out


MAX_TRACKED = 16  # distinct positions / token ids counted per stream; the rest go under "other"


def _count_into(counts: dict[str, int], keys: torch.Tensor) -> None:
    """Add occurrences of ``keys`` (1-D int tensor) to a dict capped at MAX_TRACKED keys (+ "other")."""
    values, freq = torch.unique(keys, return_counts=True)
    for key, n in zip(values.tolist(), freq.tolist(), strict=True):
        name = str(key)
        if name not in counts and len(counts) - ("other" in counts) >= MAX_TRACKED:
            name = "other"
        counts[name] = counts.get(name, 0) + n


@dataclass
class MassiveTokenTracker:
    """Running report of massive-activation tokens per stream; bounded memory whatever the samples.

    Per stream (depth order, see :func:`stream_names`): occurrences over the threshold, the
    largest norm / median ratio, the summed median norm and largest norm (a norm-per-layer
    panel), and capped dicts of the window positions and token ids that were massive.
    """

    num_layers: int
    threshold: float = MASSIVE_RATIO
    batches: int = 0
    excluded_tokens: int = 0  # tokens left out of the sink-free entropies, over all batches
    fallback_batches: int = 0  # batches whose sink-free values had to be the all-token ones
    count: torch.Tensor | None = None  # (2L+1,) int64
    max_ratio: torch.Tensor | None = None  # (2L+1,) float64
    median_norm_sum: torch.Tensor | None = None  # (2L+1,) float64
    max_norm: torch.Tensor | None = None  # (2L+1,) float64
    positions: list[dict[str, int]] = field(default_factory=list)
    token_ids: list[dict[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        S = 2 * self.num_layers + 1
        self.count = torch.zeros(S, dtype=torch.int64)
        self.max_ratio = torch.zeros(S, dtype=torch.float64)
        self.median_norm_sum = torch.zeros(S, dtype=torch.float64)
        self.max_norm = torch.zeros(S, dtype=torch.float64)
        self.positions = [{} for _ in range(S)]
        self.token_ids = [{} for _ in range(S)]

    def add_batch(
        self, norms: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fold one batch in; return the (N,) bool mask of tokens massive in *any* stream.

        ``norms``: (2L+1, N) token norms in depth order; ``positions``: (N,) position of each
        token within its window; ``token_ids``: (N,) ids, or None when unknown.
        """
        ratio = norm_ratio_to_median(norms)  # (S, N)
        median = norms.median(dim=1).values  # (S,) for the norm-per-layer panel
        massive = ratio > self.threshold  # (S, N)
        self.count += massive.sum(dim=1).cpu()
        self.max_ratio = torch.maximum(self.max_ratio, ratio.amax(dim=1).double().cpu())
        self.median_norm_sum += median.double().cpu()
        self.max_norm = torch.maximum(self.max_norm, norms.amax(dim=1).double().cpu())
        self.batches += 1
        for stream in massive.any(dim=1).nonzero().flatten().tolist():  # usually none, or a few
            hit = massive[stream].cpu()  # (N,)
            _count_into(self.positions[stream], positions[hit])
            if token_ids is not None:
                _count_into(self.token_ids[stream], token_ids[hit])
        return massive.any(dim=0)  # (N,)

    def state_bytes(self) -> int:
        tensors = [self.count, self.max_ratio, self.median_norm_sum, self.max_norm]
        keys = sum(len(d) for d in (*self.positions, *self.token_ids))
        return sum(t.numel() * t.element_size() for t in tensors) + keys * 16

    def report(self) -> dict:
        """The ``massive_tokens`` entry of the scores JSON (see :mod:`entrodrop.scores`)."""
        names = stream_names(self.num_layers)
        n = max(self.batches, 1)
        first = next((i for i, c in enumerate(self.count.tolist()) if c > 0), None)
        return {
            "threshold": float(self.threshold),
            "max_tracked": MAX_TRACKED,
            "streams": [
                {
                    "stream": names[i],
                    "count": int(self.count[i]),
                    "max_ratio": float(self.max_ratio[i]),
                    "median_norm": float(self.median_norm_sum[i] / n),
                    "max_norm": float(self.max_norm[i]),
                    "positions": dict(self.positions[i]),
                    "token_ids": dict(self.token_ids[i]),
                }
                for i in range(len(names))
            ],
            "first_stream": names[first] if first is not None else None,
            "first_layer": first // 2 if first is not None else None,  # X_l and Y_l both belong to layer l
            "excluded_tokens": self.excluded_tokens,
            "fallback_batches": self.fallback_batches,
        }


@dataclass
class RunningStats:
    """Running sums over batches; O(L^2) memory whatever the number of samples."""

    num_layers: int
    estimators: tuple[str, ...]
    batches: int = 0
    tokens: int = 0
    h_x: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L+1,)
    h_y: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L,)
    h_x_sinkfree: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L+1,), massive tokens out
    h_y_sinkfree: dict[str, torch.Tensor] = field(default_factory=dict)  # estimator -> (L,), massive tokens out
    cos: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (L,) cosine importance
    ang: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (L,) angular distance
    ang_matrix: torch.Tensor | None = None  # (L+1, L+1), all tokens
    ang_matrix_last: torch.Tensor | None = None  # (L+1, L+1), the last token of each window
    massive_ratio: float = MASSIVE_RATIO
    massive: MassiveTokenTracker | None = None

    def __post_init__(self) -> None:
        L = self.num_layers
        self.h_x = {e: torch.zeros(L + 1, dtype=torch.float64) for e in self.estimators}
        self.h_y = {e: torch.zeros(L, dtype=torch.float64) for e in self.estimators}
        self.h_x_sinkfree = {e: torch.zeros(L + 1, dtype=torch.float64) for e in self.estimators}
        self.h_y_sinkfree = {e: torch.zeros(L, dtype=torch.float64) for e in self.estimators}
        self.cos = {k: torch.zeros(L, dtype=torch.float64) for k in BLOCK_KINDS}
        self.ang = {k: torch.zeros(L, dtype=torch.float64) for k in BLOCK_KINDS}
        self.ang_matrix = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.ang_matrix_last = torch.zeros(L + 1, L + 1, dtype=torch.float64)
        self.massive = MassiveTokenTracker(L, self.massive_ratio)

    def state_bytes(self) -> int:
        tensors = [*self.h_x.values(), *self.h_y.values(), *self.h_x_sinkfree.values(), *self.h_y_sinkfree.values(),
                   *self.cos.values(), *self.ang.values(), self.ang_matrix, self.ang_matrix_last]
        return sum(t.numel() * t.element_size() for t in tensors) + self.massive.state_bytes()

    def add_batch(
        self,
        xs: torch.Tensor,
        ys: torch.Tensor,
        settings: EstimatorSettings,
        *,
        positions: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        last_token: torch.Tensor | None = None,
    ) -> None:
        """Fold one batch in. ``xs``: (L+1, N, d) streams X_0..X_L; ``ys``: (L, N, d) streams Y_l.

        ``positions`` / ``token_ids`` (N,) say where each token sits in its window and which id it
        is, for the massive-token report (positions default to 0..N-1, ids to unknown).
        ``last_token`` (N,) bool marks the last real token of each window (default: the last of the N).
        """
        kw = dict(bins=settings.bins, k=settings.k, alpha=settings.alpha)
        n_tokens = xs.shape[1]
        norms = interleave_streams(xs.norm(dim=-1), ys.norm(dim=-1))  # (2L+1, N)
        if positions is None:
            positions = torch.arange(n_tokens)
        exclude = self.massive.add_batch(norms, positions.cpu(), None if token_ids is None else token_ids.cpu())  # (N,)
        n_excluded = int(exclude.sum())
        n_left = n_tokens - n_excluded
        sinkfree = n_excluded > 0 and n_left >= 2 and ("knn" not in self.estimators or n_left > settings.k)
        if n_excluded and not sinkfree:
            self.massive.fallback_batches += 1
            logger.warning("%d of %d tokens of a batch are massive activations; too few would be left, so this "
                           "batch's sink-free entropies keep them.", n_excluded, n_tokens)
        if sinkfree:
            self.massive.excluded_tokens += n_excluded
        keep = ~exclude  # (N,)
        for est in self.estimators:  # each of the 2L+1 distinct streams measured once per token set
            for streams, total, total_free in ((xs, self.h_x, self.h_x_sinkfree), (ys, self.h_y, self.h_y_sinkfree)):
                if sinkfree:
                    h, h_free = entropy_with_subset(streams, est, keep, **kw)
                else:  # no massive token: the sink-free value is the all-token one, not measured twice
                    h = h_free = entropy(streams, est, **kw)
                total[est] += h.cpu()
                total_free[est] += h_free.cpu()
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
        if last_token is None:
            last_token = torch.zeros(n_tokens, dtype=torch.bool)
            last_token[-1] = True
        self.ang_matrix_last += angular_distance_matrix(unit_x[:, last_token.to(unit_x.device)], unit=True).cpu()
        self.batches += 1
        self.tokens += int(n_tokens)

    def to_scores(self, model_name: str, calibration: dict, batches_total: int) -> Scores:
        n = max(self.batches, 1)
        L = self.num_layers
        curve = {e: (self.h_x[e] / n).tolist() for e in self.estimators}
        mid = {e: (self.h_y[e] / n).tolist() for e in self.estimators}
        curve_free = {e: (self.h_x_sinkfree[e] / n).tolist() for e in self.estimators}
        mid_free = {e: (self.h_y_sinkfree[e] / n).tolist() for e in self.estimators}
        blocks = []
        for layer in range(L):
            for kind in BLOCK_KINDS:
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
            stage_boundary={e: detect_stage_boundary(c) for e, c in curve_free.items()},
            blocks=blocks,
            angular_matrix=(self.ang_matrix / n).tolist(),
            angular_matrix_last=(self.ang_matrix_last / n).tolist(),
            calibration={**calibration, "tokens": self.tokens, "batches": self.batches},
            batches_done=self.batches,
            batches_total=batches_total,
            complete=self.batches >= batches_total,
            entropy_curve_sinkfree=curve_free,
            mid_entropy_sinkfree=mid_free,
            massive_tokens=self.massive.report(),
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
    batch_size: int = 1,
    attention_mask: torch.Tensor | None = None,
    model_name: str | None = None,
    calibration: dict | None = None,
    spec: ArchSpec | None = None,
    skip_first: int = 0,
) -> Iterator[CalibrationEvent]:
    """Run calibration batch by batch, yielding a :class:`CalibrationEvent` after each.

    ``windows`` is a LongTensor (N, T) of token ids; ``attention_mask`` (N, T) marks real tokens
    (padding is excluded from every statistic). ``settings`` chooses the estimators, their
    parameters and the massive-activation threshold (default :class:`EstimatorSettings`).
    Stopping the iteration between batches keeps everything computed so far (the last event's
    ``scores``).
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
    in_device, stats_device = input_device(model), _stats_device(model)
    base = model.base_model  # the decoder without the LM head: logits are not needed
    logger.info("Calibrating %s on %d windows x %d tokens", name, *windows.shape)
    # inference mode is entered per batch, never held across a yield: grad modes are thread-local and the
    # app resumes this generator on whichever worker thread is free (a mode left on would leak into it)
    with capture_residuals(model, spec, device=stats_device) as cap:
        for start in range(0, len(windows), batch_size):
            with torch.inference_mode():
                ids = windows[start : start + batch_size].to(in_device)
                mask = attention_mask[start : start + batch_size]
                cap.clear()
                base(input_ids=ids, attention_mask=mask.to(in_device).long(), use_cache=False)
                mask = stats_mask[start : start + batch_size]
                if not cap.complete():
                    raise RuntimeError("Some residual streams were not captured; the architecture adapter is wrong.")
                flat = mask.reshape(-1)  # (B*T,) on the CPU, like the windows
                positions = torch.arange(mask.shape[1]).expand_as(mask).reshape(-1)[flat]  # (N,)
                token_ids = windows[start : start + batch_size].reshape(-1)[flat]  # (N,)
                # the last real token of each window: Gromov et al.'s angular distance reads only that one
                last_pos = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # (B,)
                last_token = (torch.arange(mask.shape[1]) == last_pos[:, None]).reshape(-1)[flat]  # (N,)
                mask = mask.to(stats_device)
                xs = _stack_tokens(cap.x, mask)  # (L+1, N, d)
                ys = _stack_tokens(cap.y, mask)  # (L, N, d)
                cap.clear()  # free the batch's activations before the statistics allocate
                stats.add_batch(xs, ys, settings, positions=positions, token_ids=token_ids, last_token=last_token)
                del xs, ys
                scores = stats.to_scores(name, calib, batches_total)
            yield CalibrationEvent(
                done=stats.batches,
                total=batches_total,
                tokens_seen=stats.tokens,
                scores=scores,
            )


def run_calibration(model: nn.Module, windows: torch.Tensor, **kwargs) -> Scores:
    """Run :func:`iter_calibration` to its end and return the final scores."""
    return run_to_end(iter_calibration(model, windows, **kwargs))
