"""Running statistics of calibration: per-batch entropies, cosines and angular distances of the residual
streams folded into sums whose size does not depend on the number of samples (:class:`RunningStats`),
and the massive-activation (attention sink) report beside them (:class:`MassiveTokenTracker`).

Each of the 2L+1 distinct residual tensors (X_0..X_L, Y_0..Y_{L-1}) is measured once per
estimator; block entropy increases are differences of those numbers:
attn l: H(Y_l) - H(X_l); mlp l: H(X_{l+1}) - H(Y_l); layer l: H(X_{l+1}) - H(X_l).

Sums and counts, never means, are kept, so the statistics of several processes of a data-parallel run
add up to one process's over all batches (:meth:`RunningStats.reduce_across_processes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .arch import BLOCK_KINDS
from .distributed import concat_across, max_across, sum_across
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


def _merge_into(counts: dict[str, int], other: dict[str, int]) -> None:
    """Add another tracker's capped counts to ``counts``, under the same cap (see :func:`_count_into`)."""
    for name, n in other.items():
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

    def reduce_across_processes(self) -> None:
        """Fold in the trackers of the other processes of a data-parallel run (every process calls it):
        counts and sums summed, largest values kept, position and id counts merged in rank order (the
        single-process order; where more than MAX_TRACKED keys occur, which ones land under "other" can
        differ from a single process's)."""
        tallies = torch.tensor([self.batches, self.excluded_tokens, self.fallback_batches], dtype=torch.int64)
        sums = sum_across({"count": self.count, "median_norm_sum": self.median_norm_sum, "tallies": tallies})
        maxes = max_across({"max_ratio": self.max_ratio, "max_norm": self.max_norm})
        self.count, self.median_norm_sum = sums["count"], sums["median_norm_sum"]
        self.batches, self.excluded_tokens, self.fallback_batches = sums["tallies"].tolist()
        self.max_ratio, self.max_norm = maxes["max_ratio"], maxes["max_norm"]
        parts = concat_across([(self.positions, self.token_ids)])
        self.positions, self.token_ids = [{} for _ in self.positions], [{} for _ in self.token_ids]
        for positions, token_ids in parts:
            for mine, theirs in zip((*self.positions, *self.token_ids), (*positions, *token_ids), strict=True):
                _merge_into(mine, theirs)

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

    def reduce_across_processes(self) -> None:
        """Sum the running sums and counts of every process of a data-parallel run into each (every process
        calls it). Sums, never means, so processes that saw different numbers of tokens weigh right; the
        result equals one process's over all batches up to the order of float64 additions."""
        sums = {"batches_tokens": torch.tensor([self.batches, self.tokens], dtype=torch.int64),
                "ang_matrix": self.ang_matrix, "ang_matrix_last": self.ang_matrix_last}
        groups = {"h_x": self.h_x, "h_y": self.h_y, "h_x_sinkfree": self.h_x_sinkfree,
                  "h_y_sinkfree": self.h_y_sinkfree, "cos": self.cos, "ang": self.ang}
        sums.update({f"{group}/{key}": t for group, d in groups.items() for key, t in d.items()})
        total = sum_across(sums)
        self.batches, self.tokens = total["batches_tokens"].tolist()
        self.ang_matrix, self.ang_matrix_last = total["ang_matrix"], total["ang_matrix_last"]
        for group, d in groups.items():
            for key in d:
                d[key] = total[f"{group}/{key}"]
        self.massive.reduce_across_processes()

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
