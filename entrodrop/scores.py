"""Per-block statistics of one calibration run, and their JSON form.

JSON names (stable; other tools read them): ``model``, ``num_layers``, ``entropy_curve``
{estimator: L+1 floats, H(X_0..X_L)}, ``mid_entropy`` {estimator: L floats, H(Y_0..Y_{L-1})},
``stage_boundary`` {estimator: int}, ``blocks`` (list of {``layer``, ``kind``,
``delta_entropy`` {estimator: float}, ``cosine_importance``, ``angular_distance``}),
``angular_matrix`` (L+1 x L+1, mean over all tokens), ``angular_matrix_last`` (L+1 x L+1, the last
token of each window only, as Gromov et al. measure it; empty in files written before it existed), ``calibration`` {``data``, ``samples``, ``seq_len``, ``seed``,
``tokens``, ``massive_ratio``, ...}, ``batches_done``, ``batches_total``, ``complete``.

``entropy_curve``, ``mid_entropy`` and every ``delta_entropy`` use all tokens, as the released
method does. Massive-activation tokens (attention sinks, whose norm is over ``massive_ratio``
times their stream's median token norm) can dominate them, so calibration also writes:

* ``entropy_curve_sinkfree`` {estimator: L+1 floats} and ``mid_entropy_sinkfree``
  {estimator: L floats}: the same entropies over the tokens that are massive in *no* stream of
  their batch (one token set for all streams of a batch, so differences along the curve compare
  like with like). Equal to the all-token curves when no batch had a massive token.
* ``stage_boundary`` is found on the sink-free curve (:func:`detect_stage_boundary`).
* ``massive_tokens``: ``threshold`` (the multiple of the median), ``streams`` (one entry per
  stream in depth order X_0, Y_0, X_1, ..., X_L: ``stream``, ``count`` (token occurrences over
  the threshold, summed over batches), ``max_ratio`` (largest norm / median seen),
  ``median_norm`` (mean over batches of the median token norm), ``max_norm``, ``positions``
  {position in the window: count} and ``token_ids`` {token id: count}, each capped at
  ``max_tracked`` keys with the rest under ``"other"``), ``first_layer`` / ``first_stream`` (the
  shallowest stream holding one, or null), ``excluded_tokens`` (tokens left out of the
  sink-free curves, summed over batches), ``fallback_batches`` (batches where leaving them out
  would leave too few tokens to estimate, so their sink-free values are the all-token ones).

Files written before these keys existed still load: the sink-free curves fall back to the
all-token ones, and the stage boundary is recomputed from them with the current rule.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arch import BLOCK_KINDS

SCORES_FORMAT_VERSION = 1


@dataclass
class BlockScore:
    layer: int
    kind: str  # attn | mlp | layer
    delta_entropy: dict[str, float]  # estimator -> mean over batches of H(out) - H(in)
    cosine_importance: float  # 1 - mean cos(in, out)
    angular_distance: float  # mean arccos(cos(in, out)) / pi


BOUNDARY_PATIENCE = 3  # layers after a minimum that must stay above it for it to count
BOUNDARY_MIN_RISE = 0.01  # ... and the rise they must reach, as a fraction of the curve's range


def detect_stage_boundary(
    curve: list[float], patience: int = BOUNDARY_PATIENCE, min_rise: float = BOUNDARY_MIN_RISE
) -> int:
    """Index l of X_l where the *initial* decline of the entropy curve ends: its first sustained local minimum.

    X_l is a sustained minimum when the curve reached it without rising (``curve[l] <=
    curve[l-1]``), none of the next ``patience`` values falls below it, and the highest of them
    rises above it by at least ``min_rise`` times the curve's range (max - min). A bump while
    the curve falls therefore does not end the decline (the values after it dip lower again),
    and a flat stretch of noise does not either (it never rises by the margin); a later, deeper
    valley does not move the boundary: the paper's compression stage is the first decline, not
    the global minimum. Near the end, the window shrinks to the values that remain.

    Layers 0..boundary-1 form the compression stage, the rest the expansion stage. Returns 0
    when the curve rises from the start (or is flat) and len(curve)-1 when it never stops falling.
    Calibration applies it to the sink-free curve (massive-activation tokens left out), which
    an attention sink cannot collapse mid-network.
    """
    n = len(curve)
    if n == 0:
        raise ValueError("Cannot find a stage boundary on an empty entropy curve.")
    if patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}.")
    margin = min_rise * (max(curve) - min(curve))
    for i in range(n - 1):
        if i > 0 and curve[i] > curve[i - 1]:
            continue  # still climbing out of an earlier dip: not a minimum
        after = curve[i + 1 : i + 1 + patience]
        if min(after) >= curve[i] and max(after) - curve[i] >= margin:
            return i
    return n - 1


@dataclass
class Scores:
    """Everything calibration measured; running means while calibration is in progress."""

    model: str
    num_layers: int
    estimators: list[str]
    entropy_curve: dict[str, list[float]]
    mid_entropy: dict[str, list[float]]
    stage_boundary: dict[str, int]
    blocks: list[BlockScore]
    angular_matrix: list[list[float]]
    calibration: dict = field(default_factory=dict)
    batches_done: int = 0
    batches_total: int = 0
    complete: bool = False
    # all-token curves without the massive-activation tokens (see the module docstring); empty
    # means "none measured" and :meth:`sinkfree_curve` falls back to the all-token curve
    entropy_curve_sinkfree: dict[str, list[float]] = field(default_factory=dict)
    mid_entropy_sinkfree: dict[str, list[float]] = field(default_factory=dict)
    massive_tokens: dict = field(default_factory=dict)
    angular_matrix_last: list[list[float]] = field(default_factory=list)  # last token of each window only
    format_version: int = SCORES_FORMAT_VERSION

    def sinkfree_curve(self, estimator: str) -> list[float]:
        """H(X_0..X_L) without massive-activation tokens; the all-token curve for older files."""
        curve = self.entropy_curve_sinkfree.get(estimator)
        return curve if curve is not None else self.entropy_curve[estimator]

    def sinkfree_mid(self, estimator: str) -> list[float]:
        """H(Y_0..Y_{L-1}) without massive-activation tokens; the all-token values for older files."""
        mid = self.mid_entropy_sinkfree.get(estimator)
        return mid if mid is not None else self.mid_entropy.get(estimator, [])

    def block(self, layer: int, kind: str) -> BlockScore:
        for b in self.blocks:
            if b.layer == layer and b.kind == kind:
                return b
        raise KeyError(f"No {kind} block at layer {layer}.")

    def blocks_of(self, kind: str) -> list[BlockScore]:
        if kind not in BLOCK_KINDS:
            raise ValueError(f"Unknown block kind {kind!r}; use one of {', '.join(BLOCK_KINDS)}.")
        return sorted((b for b in self.blocks if b.kind == kind), key=lambda b: b.layer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scores:
        missing = [k for k in ("model", "num_layers", "entropy_curve", "blocks") if k not in data]
        if missing:
            raise ValueError(
                f"This is not an EntroDrop scores file: missing {', '.join(missing)}. "
                "Write one with `entrodrop scan MODEL --json FILE`."
            )
        blocks = [
            BlockScore(
                layer=int(b["layer"]),
                kind=b["kind"],
                delta_entropy={k: float(v) for k, v in b.get("delta_entropy", {}).items()},
                cosine_importance=float(b.get("cosine_importance", float("nan"))),
                angular_distance=float(b.get("angular_distance", float("nan"))),
            )
            for b in data["blocks"]
        ]
        curve = {k: [float(x) for x in v] for k, v in data["entropy_curve"].items()}
        sinkfree = {k: [float(x) for x in v] for k, v in data.get("entropy_curve_sinkfree", {}).items()}
        # a file without the sink-free curve predates the first-sustained-minimum rule: its stored
        # boundary is the retired global minimum, so it is recomputed (on the all-token curve)
        stored_boundary = {k: int(v) for k, v in data.get("stage_boundary", {}).items()} if sinkfree else {}
        return cls(
            model=data["model"],
            num_layers=int(data["num_layers"]),
            estimators=list(data.get("estimators", list(curve))),
            entropy_curve=curve,
            mid_entropy={k: [float(x) for x in v] for k, v in data.get("mid_entropy", {}).items()},
            stage_boundary=stored_boundary
            or {k: detect_stage_boundary(sinkfree.get(k, v)) for k, v in curve.items()},
            blocks=blocks,
            angular_matrix=data.get("angular_matrix", []),
            calibration=data.get("calibration", {}),
            batches_done=int(data.get("batches_done", 0)),
            batches_total=int(data.get("batches_total", 0)),
            complete=bool(data.get("complete", True)),
            entropy_curve_sinkfree=sinkfree,
            mid_entropy_sinkfree={k: [float(x) for x in v] for k, v in data.get("mid_entropy_sinkfree", {}).items()},
            massive_tokens=data.get("massive_tokens", {}),
            angular_matrix_last=data.get("angular_matrix_last", []),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"Scores file {p} does not exist. Write one with `entrodrop scan MODEL --json {p}`.")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"Scores file {p} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)
