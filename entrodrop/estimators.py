"""Pure tensor functions: entropy estimators and similarity scores of hidden representations.

All take token matrices ``z`` of shape (N, d) — N token vectors of one calibration batch with
padding already removed — and compute in float32/float64 whatever the input dtype. Entropies
are in nats. Formulas follow DESIGN.md section 1 (EntroDrop paper and released code).
"""

from __future__ import annotations

import math

import torch

ENTROPY_ESTIMATORS = ("bucket", "knn", "renyi")


def bucket_entropy(z: torch.Tensor, bins: int = 20) -> torch.Tensor:
    """Sum over dimensions of the Shannon entropy of a per-dimension equal-width histogram.

    ``z``: (..., N, d); returns (...,) float64. Each dimension gets ``bins`` bins between its own
    min and max over the N tokens; a constant dimension has entropy 0. Upper bound d*log(bins).
    Leading dimensions are independent problems, computed in one vectorised pass.
    """
    if bins < 2:
        raise ValueError(f"bucket entropy needs at least 2 bins, got {bins}.")
    z = z.float()
    *lead, n, d = z.shape
    z = z.reshape(-1, n, d)  # (S, N, d)
    lo, hi = torch.aminmax(z, dim=1, keepdim=True)  # (S, 1, d) each
    span = hi - lo
    scale = torch.where(span > 0, bins / span, torch.zeros_like(span))  # (S, 1, d)
    bin_of = torch.addcmul(-lo * scale, z, scale).clamp_(0, bins - 1).to(torch.int32)  # (S, N, d)
    # one bincount over ids unique per (stream, dimension, bin); int32 halves the memory traffic
    bin_of += (torch.arange(z.shape[0] * d, dtype=torch.int32, device=z.device) * bins).view(-1, 1, d)
    counts = torch.bincount(bin_of.view(-1), minlength=z.shape[0] * d * bins).view(-1, d, bins).float()
    p = counts / n
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=(1, 2))  # (S,)
    return h.double().reshape(lead)


def knn_entropy(z: torch.Tensor, k: int = 25) -> torch.Tensor:
    """Kozachenko–Leonenko k-nearest-neighbour differential entropy estimate.

    ``z``: (..., N, d); returns (...,) float64.
    H = d * mean_i log(r_i + 1e-10) + (d/2) log(pi) - lgamma(d/2 + 1) + log N - log k, with r_i
    the distance from token i to its k-th nearest neighbour (self excluded).
    """
    z = z.float()
    *lead, n, d = z.shape
    if n <= k:
        raise ValueError(
            f"knn entropy with k={k} needs more than {k} tokens per batch, got {n}. "
            "Use a longer sequence length, a larger batch, or a smaller k."
        )
    z = z.reshape(-1, n, d)  # (S, N, d)
    sq = (z * z).sum(-1)  # (S, N)
    # squared distances through one batched matmul: |a|^2 + |b|^2 - 2 a.b
    d2 = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), z, z.transpose(1, 2), alpha=-2)  # (S, N, N)
    d2.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    r = d2.topk(k, dim=2, largest=False).values[..., -1].clamp_min(0).sqrt().double()  # (S, N)
    const = d / 2 * math.log(math.pi) - math.lgamma(d / 2 + 1) + math.log(n) - math.log(k)
    h = d * torch.log(r + 1e-10).mean(dim=1) + const  # (S,)
    return h.reshape(lead)


def renyi_entropy(z: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """Matrix-based Rényi entropy of order ``alpha`` with a Gaussian kernel on standardised tokens.

    ``z``: (..., N, d); returns (...,) float64.
    H = 1/(1-alpha) * log mean(K^(alpha-1)), K = exp(-D^2 / (2 sigma^2)), sigma = median pairwise
    distance (off-diagonal).
    """
    if alpha == 1:
        raise ValueError("renyi entropy needs alpha != 1 (alpha = 1 is the Shannon limit).")
    z = z.float()
    *lead, n, d = z.shape
    z = z.reshape(-1, n, d)  # (S, N, d)
    z = (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, keepdim=True).clamp_min(1e-6)
    d2 = torch.cdist(z, z).pow(2)  # (S, N, N)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z.device)
    sigma2 = d2[:, off_diag].sqrt().median(dim=1).values.pow(2).clamp_min(1e-12)  # (S,)
    kernel = torch.exp(-d2 / (2 * sigma2.view(-1, 1, 1))).double()  # (S, N, N)
    h = torch.log(kernel.pow(alpha - 1).mean(dim=(1, 2))) / (1 - alpha)  # (S,)
    return h.reshape(lead)


def entropy(z: torch.Tensor, estimator: str, *, bins: int = 20, k: int = 25, alpha: float = 4.0) -> torch.Tensor:
    """Dispatch to one estimator by name."""
    if estimator == "bucket":
        return bucket_entropy(z, bins)
    if estimator == "knn":
        return knn_entropy(z, k)
    if estimator == "renyi":
        return renyi_entropy(z, alpha)
    raise ValueError(f"Unknown entropy estimator {estimator!r}; choose from {', '.join(ENTROPY_ESTIMATORS)}.")


def unit_tokens(z: torch.Tensor) -> torch.Tensor:
    """Token vectors scaled to unit length (float32), (..., N, d) -> (..., N, d).

    Normalise each stream once and reuse it for every cosine it takes part in."""
    return torch.nn.functional.normalize(z.float(), dim=-1, eps=1e-8)


def token_cosine(a: torch.Tensor, b: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """Cosine similarity of matching token vectors: (..., N, d) x (..., N, d) -> (..., N).

    ``unit=True`` says both inputs are already unit vectors (from :func:`unit_tokens`)."""
    if not unit:
        a, b = unit_tokens(a), unit_tokens(b)
    return (a * b).sum(dim=-1).clamp_(-1.0, 1.0)


def importance_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    """1 - mean over tokens of per-token cosines, (..., N) -> (...,) float64."""
    return 1 - cos.double().mean(dim=-1)


def angular_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of arccos(cos) / pi, (..., N) -> (...,) float64 in [0, 1]."""
    return (torch.arccos(cos.double().clamp(-1.0, 1.0)) / math.pi).mean(dim=-1)


def cosine_importance(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """LLM-Drop / ShortGPT block influence: 1 - mean over tokens of cos(in, out); (..., N, d) -> (...,).

    0 means the block leaves every token's direction unchanged.
    """
    return importance_from_cosine(token_cosine(x_in, x_out))


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gromov et al.: mean over tokens of arccos(cos(a, b)) / pi, in [0, 1]; (..., N, d) -> (...,)."""
    return angular_from_cosine(token_cosine(a, b))


def angular_distance_matrix(streams: torch.Tensor, *, unit: bool = False) -> torch.Tensor:
    """Angular distances between every pair of residual streams.

    ``streams`` has shape (S, N, d): S residual streams (X_0..X_L) over the same N tokens
    (``unit=True``: already unit vectors). Returns (S, S) float64 with entry [i, j] = mean over
    tokens of arccos(cos(X_i, X_j)) / pi.
    """
    u = streams if unit else unit_tokens(streams)  # (S, N, d)
    cos = torch.einsum("snd,tnd->stn", u, u)  # (S, S, N)
    return angular_from_cosine(cos)  # (S, S)
