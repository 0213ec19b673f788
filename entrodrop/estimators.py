"""Pure tensor functions: entropy estimators and similarity scores of hidden representations.

All take token matrices ``z`` of shape (N, d) — N token vectors of one calibration batch with
padding already removed — and compute in float32/float64 whatever the input dtype. Entropies
are in nats. The formulas are those of the EntroDrop paper (Yang et al., "Entropy-Based Block
Pruning for Efficient Large Language Models", arXiv 2504.03794) and its released scoring code
(SalesforceAIResearch/EntroDrop); ``docs/method.md`` states each one and the choices the paper
leaves open. Names, exactly:

* ``bucket`` — per-dimension equal-width histogram Shannon entropy, summed over dimensions
  (a sum of d marginal entropies, not a joint entropy);
* ``knn`` — the Kozachenko–Leonenko k-nearest-neighbour differential entropy estimator;
* ``renyi`` — a kernel information-potential estimate of order ``alpha`` with a Gaussian kernel
  (Parzen-window style, as in the released code), *not* the matrix-based Rényi functional;
* cosine importance — LLM-Drop / ShortGPT block influence;
* angular distance — mean arccos of token cosines over pi. Between the residual streams of a
  span of whole layers (``angular_distance_matrix``) it is the Gromov et al. baseline; between a
  sub-block's input and output it is our own monotone cousin of cosine importance.

Massive activations: :func:`norm_ratio_to_median` measures how far each token's norm sits above
its stream's median; tokens over :data:`MASSIVE_RATIO` times the median are what calibration
reports as massive-activation tokens (attention sinks) and leaves out of the sink-free curves.
"""

from __future__ import annotations

import math

import torch

ENTROPY_ESTIMATORS = ("bucket", "knn", "renyi")

# A token whose L2 norm exceeds this multiple of its stream's median token norm is a
# massive-activation token (Sun et al. 2024, "Massive activations in LLMs", report 100x and more).
# On SmolLM2-135M (gsm8k, 16 x 256) the first token of a window sits 44x-208x above the median
# from X_12 to X_28; no token of X_0..X_11 exceeds 14x (the largest, at X_3), and only 17 of the
# 4096 tokens (the first of each window, and the second of one) exceed 20x in any stream.
# Calibration leaves a token out of *every* stream once it is massive in one, so the sink's
# fading below 20x in the last two streams (19x, 9x) does not let it back in.
MASSIVE_RATIO = 20.0

# The estimators measure a few streams per pass, as many as keep a pass's largest temporary (about an
# (N, d) or (N, N) float32 array per stream) within these bytes, at least one. On the CPU the passes then
# reuse the memory the pass before freed, where one pass over the 31 streams X_0..X_30 of the bundled
# model would allocate about 18 MB per step at one 256-token window, mapped in afresh page by page each
# time; and knn's N x N distances are held for a pass's streams only, not for all of a call's (31 x N^2 x
# 4 bytes: 0.5 GB at 2048 tokens a batch). On the CPU each stream's bucket and knn entropy is the same bit
# for bit (renyi's float64 mean can be reduced in another order: within an ulp), docs/results.md section 0.
CPU_PASS_BYTES = 4 * 2**20
# On an accelerator, passes only bound memory (every stream of one 256-token window of the bundled model
# fits one pass); unmeasured, no GPU having been lent to this project.
ACCELERATOR_PASS_BYTES = 256 * 2**20


def _streams_per_pass(n: int, d: int, device: torch.device) -> int:
    budget = CPU_PASS_BYTES if device.type == "cpu" else ACCELERATOR_PASS_BYTES
    return max(1, budget // (4 * max(n, 1) * max(n, d, 1)))


def _in_passes(measure, *streams: torch.Tensor):
    """Apply ``measure`` to the streams of ``streams`` (each (..., N, d), the same leading shape) a few at a
    time (see :data:`CPU_PASS_BYTES`). ``measure`` takes (s, N, d) tensors and returns a tensor (s, ...) or a
    tuple of them; the passes' results are joined and shaped (lead..., ...)."""
    *lead, n, d = streams[0].shape
    count = math.prod(lead)
    flat = [z.reshape(count, n, d) for z in streams]
    step = _streams_per_pass(n, d, flat[0].device)
    # no streams still make one (empty) call, so that measure's own checks run
    parts = [measure(*(z[i : i + step] for z in flat)) for i in range(0, max(count, 1), step)]

    def join(pieces: list[torch.Tensor]) -> torch.Tensor:
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.reshape((*lead, *out.shape[1:]))

    if isinstance(parts[0], tuple):
        return tuple(join([p[j] for p in parts]) for j in range(len(parts[0])))
    return join(parts)


def bucket_entropy(z: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Sum over dimensions of the Shannon entropy of a per-dimension equal-width histogram.

    ``z``: (..., N, d); returns (...,) float64. Each dimension gets ``bins`` bins between its own
    min and max over the N tokens; a constant dimension has entropy 0. Upper bound d*log(bins).
    Leading dimensions are independent problems, computed a few at a time (see :data:`CPU_PASS_BYTES`).

    The min-max range makes it fragile to outliers: one massive-activation token stretches the
    range of its large dimensions and packs every other token into one bin there, which is why
    calibration also reports a curve without such tokens (see :data:`MASSIVE_RATIO`).
    """
    if bins < 2:
        raise ValueError(f"bucket entropy needs at least 2 bins, got {bins}.")
    return _in_passes(lambda part: _bucket_entropies(part, bins), z)


def _bucket_entropies(z: torch.Tensor, bins: int) -> torch.Tensor:
    """:func:`bucket_entropy` of each stream of ``z`` (S, N, d); returns (S,) float64."""
    z = z.float()
    n, d = z.shape[1:]
    # amin and amax apart: over the token axis (not the last) torch's fused aminmax is 4x slower here
    lo, hi = z.amin(dim=1, keepdim=True), z.amax(dim=1, keepdim=True)  # (S, 1, d) each
    span = hi - lo
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))  # (S, 1, d)
    bin_of = torch.addcmul(-lo * scale, z, scale).clamp_(0, bins - 1).to(torch.int32)  # (S, N, d)
    # one bincount over ids unique per (stream, dimension, bin); int32 halves the memory traffic
    bin_of += (torch.arange(z.shape[0] * d, dtype=torch.int32, device=z.device) * bins).view(-1, 1, d)
    counts = torch.bincount(bin_of.view(-1), minlength=z.shape[0] * d * bins).view(-1, d, bins).float()
    p = counts / n
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=(1, 2))  # (S,)
    return h.double()


def knn_entropy(z: torch.Tensor, k: int = 25) -> torch.Tensor:
    """Kozachenko–Leonenko k-nearest-neighbour differential entropy estimate.

    ``z``: (..., N, d); returns (...,) float64.
    H = d * mean_i log(r_i + 1e-10) + (d/2) log(pi) - lgamma(d/2 + 1) + log N - log k, with r_i
    the distance from token i to its k-th nearest neighbour (self excluded), as in the released
    scorer.

    One change from the released code, and only where it degenerates: a token whose k-th
    neighbour is an exact copy of it (the same vector repeated more than k times, as a frequent
    token id does at X_0, the embeddings) has r_i = 0, and its term d * log(1e-10) (-13,263 nats
    at d = 576) swamps the mean: H(X_0) = -3870 on such a window against about -430 on others.
    Such tokens sit on an atom of the empirical distribution, where a differential entropy has no
    finite value, so they are left out of the mean; N (the sample the density estimate
    k / (N V r^d) of the remaining tokens is taken from) still counts them. Zero radius is
    decided on the exact vectors, not on the matmul distance, whose float32 rounding can leave a
    small positive value for identical vectors. On a window without such repeats the result is
    exactly the released formula's. If every token is such a copy, the released value is
    returned (there is no continuous part to measure).
    """
    return _knn_entropies(z, k)[0]


def _knn_entropies(z: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL entropy of all N tokens and, when ``keep`` (N,) bool on ``z``'s device is given, of the kept tokens alone."""
    n = z.shape[-2]
    n_keep = n if keep is None else int(keep.sum())
    if min(n, n_keep) <= k:
        raise ValueError(
            f"knn entropy with k={k} needs more than {k} tokens per batch, got {min(n, n_keep)}. "
            "Use a longer sequence length, a larger batch, or a smaller k."
        )
    if keep is None:
        return _in_passes(lambda part: _knn_pass(part, k, None, 0)[0], z), None
    return _in_passes(lambda part: _knn_pass(part, k, keep, n - n_keep), z)


def _knn_pass(
    z: torch.Tensor, k: int, keep: torch.Tensor | None, m: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_knn_entropies` of the streams of ``z`` (S, N, d): (S,) for all tokens and (S,) or None for the
    kept ones, ``m`` tokens being left out.

    One distance matrix and one neighbour search serve both: the search asks for k + m
    neighbours, so every kept token's k-th *kept* neighbour is among them.
    """
    z = z.float()
    n = z.shape[1]
    sq = (z * z).sum(-1)  # (S, N)
    # squared distances through one batched matmul: |a|^2 + |b|^2 - 2 a.b
    d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), z, z.transpose(1, 2), alpha=-2)  # (S, N, N)
    d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    near_d2, near_idx = d2.topk(k + m, dim=2, largest=False)  # (S, N, k+m) each, ascending
    del d2
    rows = torch.arange(n, device=z.device)
    h_all = _kl_from_kth(z, sq, near_d2[..., k - 1], near_idx[..., k - 1], rows, k)
    if keep is None:
        return h_all, None
    kept_nb = keep[near_idx]  # (S, N, k+m) which neighbours are kept tokens
    # the k-th kept neighbour: the first slot where the running count of kept neighbours reaches k
    slot = ((kept_nb.cumsum(dim=2) == k) & kept_nb).int().argmax(dim=2, keepdim=True)  # (S, N, 1)
    kth_d2 = near_d2.gather(2, slot).squeeze(2)[:, keep]  # (S, N')
    kth_idx = near_idx.gather(2, slot).squeeze(2)[:, keep]  # (S, N')
    return h_all, _kl_from_kth(z, sq, kth_d2, kth_idx, rows[keep], k)


def _kl_from_kth(
    z: torch.Tensor, sq: torch.Tensor, kth_d2: torch.Tensor, kth_idx: torch.Tensor, rows: torch.Tensor, k: int
) -> torch.Tensor:
    """The KL formula over the tokens ``rows`` (N',) of ``z`` (S, N, d), given each one's squared
    distance (S, N') to its k-th neighbour and that neighbour's index (S, N'); returns (S,)."""
    d = z.shape[-1]
    n = rows.numel()
    r = kth_d2.clamp_min(0).sqrt().double()  # (S, N')
    log_r = torch.log(r + 1e-10)  # (S, N')
    # zero radius: only a distance within float32 rounding of 0 can be one; confirm on the vectors
    copy_of_kth = torch.zeros_like(kth_d2, dtype=torch.bool)  # (S, N')
    s_i, n_i = (kth_d2 <= 1e-3 * sq[:, rows]).nonzero(as_tuple=True)
    if s_i.numel():
        copy_of_kth[s_i, n_i] = (z[s_i, rows[n_i]] == z[s_i, kth_idx[s_i, n_i]]).all(dim=-1)
    kept = (~copy_of_kth).double()  # (S, N')
    mean_kept = (log_r * kept).sum(dim=1) / kept.sum(dim=1).clamp_min(1)  # (S,)
    # rows without zero-radius tokens (and rows of nothing else) keep the released mean exactly
    use_kept = copy_of_kth.any(dim=1) & ~copy_of_kth.all(dim=1)  # (S,)
    mean_log_r = torch.where(use_kept, mean_kept, log_r.mean(dim=1))  # (S,)
    const = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) + math.log(n) - math.log(k)
    return d * mean_log_r + const  # (S,)


def renyi_entropy(z: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Kernel information-potential entropy of order ``alpha`` with a Gaussian kernel (released code's "renyi").

    ``z``: (..., N, d); returns (...,) float64.
    Each dimension is standardised over the N tokens; then
    H = 1/(1-alpha) * log mean_{i,j} K_ij^(alpha-1), K_ij = exp(-D_ij^2 / (2 sigma^2)), where D is
    the Euclidean distance between standardised tokens and sigma is the median of the
    off-diagonal pairwise distances of the batch (a fresh bandwidth per stream and batch). It is a
    Parzen-window (information-potential) estimate of Rényi's entropy of order alpha; note that
    powering the kernel by alpha-1 narrows its bandwidth to sigma / sqrt(alpha-1). It is *not* the
    matrix-based Rényi functional (Sanchez Giraldo et al.), which takes the eigenvalues of the
    normalised Gram matrix; the name "renyi" is kept because the released code uses it.
    """
    if alpha == 1:
        raise ValueError("renyi entropy needs alpha != 1 (alpha = 1 is the Shannon limit).")
    return _in_passes(lambda part: _renyi_entropies(part, alpha), z)


def _renyi_entropies(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`renyi_entropy` of each stream of ``z`` (S, N, d); returns (S,) float64."""
    z = z.float()
    n = z.shape[1]
    z = (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, keepdim=True).clamp_min(1e-6)
    d2 = torch.cdist(z, z).pow(2)  # (S, N, N)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)
    sigma2 = d2[:, off_diag].sqrt().median(dim=1).values.pow(2).clamp_min(1e-12)  # (S,)
    kernel = torch.exp(-d2 / (2 * sigma2.view(-1, 1, 1))).double()  # (S, N, N)
    return torch.log(kernel.pow(alpha - 1).mean(dim=(1, 2))) / (1 - alpha)  # (S,)


def _check_estimator(name: str) -> None:
    if name not in ENTROPY_ESTIMATORS:
        raise ValueError(f"Unknown entropy estimator {name!r}; choose from {', '.join(ENTROPY_ESTIMATORS)}.")


def entropy(z: torch.Tensor, estimator: str, *, bins: int = 20, k: int = 25, alpha: float = 4.0) -> torch.Tensor:
    """Dispatch to one estimator by name."""
    _check_estimator(estimator)
    if estimator == "bucket":
        return bucket_entropy(z, bins)
    if estimator == "knn":
        return knn_entropy(z, k)
    return renyi_entropy(z, alpha)


def entropy_with_subset(
    z: torch.Tensor, estimator: str, keep: torch.Tensor, *, bins: int = 20, k: int = 25, alpha: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy of all N tokens and of the tokens ``keep`` (N,) bool marks: (..., N, d) -> two (...,).

    The same as ``entropy(z, ...)`` and ``entropy(z[..., keep, :], ...)``; knn shares one
    distance matrix and one neighbour search between the two (bucket ranges and the renyi
    bandwidth depend on the token set, so those are measured twice, pass by pass).
    """
    _check_estimator(estimator)
    keep = torch.as_tensor(keep, device=z.device)
    if estimator == "knn":
        return _knn_entropies(z, k, keep)
    kw = dict(bins=bins, k=k, alpha=alpha)
    return _in_passes(lambda part: (entropy(part, estimator, **kw), entropy(part[:, keep], estimator, **kw)), z)


def unit_tokens(z: torch.Tensor) -> torch.Tensor:
    """Token vectors scaled to unit length (float32), (..., N, d) -> (..., N, d).

    Normalise each stream once and reuse it for every cosine it takes part in."""
    return torch.nn.functional.normalize(z.float(), dim=-1, eps=1e-8)


def token_cosine(a: torch.Tensor, b: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """Cosine similarity of matching token vectors: (..., N, d) x (..., N, d) -> (..., N).

    ``unit=True`` says both inputs are already unit vectors (from :func:`unit_tokens`)."""
    if not unit:
        a, b = unit_tokens(a), unit_tokens(b)
    a, b = torch.broadcast_tensors(a, b)
    if a.dim() < 2:  # one token
        return (a * b).sum(dim=-1).clamp_(-1.0, 1.0)
    return _in_passes(lambda pa, pb: (pa * pb).sum(dim=-1), a, b).clamp_(-1.0, 1.0)


def importance_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    """1 - mean over tokens of per-token cosines, (..., N) -> (...,) float64."""
    return 1 - cos.double().mean(dim=-1)


def angular_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of arccos(cos) / pi, (..., N) -> (...,) float64 in [0, 1].

    A monotone function of each token's cosine, so for one block it ranks much like cosine
    importance (they differ only through the mean over tokens)."""
    return (torch.arccos(cos.double().clamp(-1.0, 1.0)) / math.pi).mean(dim=-1)


def cosine_importance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """LLM-Drop / ShortGPT block influence: 1 - mean over tokens of cos(in, out); (..., N, d) -> (...,).

    0 means the block leaves every token's direction unchanged.
    """
    return importance_from_cosine(token_cosine(x_in, x_out))


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of arccos(cos(a, b)) / pi, in [0, 1]; (..., N, d) -> (...,).

    Between X_start and X_{start+n} (whole layers) this is the angular distance of Gromov et al.
    ("The Unreasonable Ineffectiveness of the Deeper Layers"), averaged over all tokens where
    they take the last token. Between a sub-block's input and output (attention X_l -> Y_l, MLP
    Y_l -> X_{l+1}) it is *not* their baseline: it is a monotone cousin of cosine importance."""
    return angular_from_cosine(token_cosine(a, b))


def angular_distance_matrix(streams: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """Angular distances between every pair of residual streams (the Gromov et al. span baseline).

    ``streams`` has shape (S, N, d): S residual streams (X_0..X_L) over the same N tokens
    (``unit=True``: already unit vectors). Returns (S, S) float64 with entry [i, j] = mean over
    tokens of arccos(cos(X_i, X_j)) / pi: the distance Gromov et al. minimise over spans
    [i, j) of whole layers (they use the last token only; this averages over all tokens).
    """
    u = streams if unit else unit_tokens(streams)  # (S, N, d)
    cos = torch.einsum("snd,tnd->stn", u, u)  # (S, S, N)
    return angular_from_cosine(cos)  # (S, S)


def norm_ratio_to_median(norms: torch.Tensor) -> torch.Tensor:
    """Token norms over the median token norm of their stream: (..., N) -> (..., N), same dtype.

    ``norms`` are the L2 norms of a stream's N tokens (``z.norm(dim=-1)``). Massive-activation
    tokens (attention sinks) are the ones far above 1; compare with :data:`MASSIVE_RATIO`. An
    all-zero stream gives ratios of 0, never NaN.
    """
    median = norms.median(dim=-1, keepdim=True).values  # (..., 1)
    return norms / median.clamp_min(torch.finfo(norms.dtype).tiny)
