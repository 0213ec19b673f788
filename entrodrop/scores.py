"""Per-block statistics of one calibration run, and their JSON form.

JSON names (stable; other tools read them): ``model``, ``num_layers``, ``entropy_curve``
{estimator: L+1 floats, H(X_0..X_L)}, ``mid_entropy`` {estimator: L floats, H(Y_0..Y_{L-1})},
``stage_boundary`` {estimator: int}, ``blocks`` (list of {``layer``, ``kind``,
``delta_entropy`` {estimator: float}, ``cosine_importance``, ``angular_distance``}),
``angular_matrix`` (L+1 x L+1), ``calibration`` {``data``, ``samples``, ``seq_len``, ``seed``,
``tokens``, ...}, ``batches_done``, ``batches_total``, ``complete``.
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


def detect_stage_boundary(curve: list[float], window: int = 3) -> int:
    """Index l of X_l where the entropy curve stops falling and starts rising.

    The curve is smoothed with a centred moving average (edges replicated) so a single noisy
    layer cannot create a spurious minimum; the boundary is the raw minimum within ``window``
    of the smoothed minimum (smoothing locates the valley, the raw curve pins its floor). Layers 0..boundary-1 form the compression stage, the rest the expansion stage.
    Returns 0 when the curve only rises and len(curve)-1 when it only falls.
    """
    n = len(curve)
    if n == 0:
        raise ValueError("Cannot find a stage boundary on an empty entropy curve.")
    half = max(window // 2, 0)
    smoothed = []
    for i in range(n):
        lo, hi = i - half, i + half
        vals = [curve[min(max(j, 0), n - 1)] for j in range(lo, hi + 1)]
        smoothed.append(sum(vals) / len(vals))
    centre = min(range(n), key=lambda i: (smoothed[i], i))
    near = range(max(centre - half, 0), min(centre + half, n - 1) + 1)
    return min(near, key=lambda i: (curve[i], i))


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
    format_version: int = SCORES_FORMAT_VERSION

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
        return cls(
            model=data["model"],
            num_layers=int(data["num_layers"]),
            estimators=list(data.get("estimators", list(curve))),
            entropy_curve=curve,
            mid_entropy={k: [float(x) for x in v] for k, v in data.get("mid_entropy", {}).items()},
            stage_boundary={k: int(v) for k, v in data.get("stage_boundary", {}).items()}
            or {k: detect_stage_boundary(v) for k, v in curve.items()},
            blocks=blocks,
            angular_matrix=data.get("angular_matrix", []),
            calibration=data.get("calibration", {}),
            batches_done=int(data.get("batches_done", 0)),
            batches_total=int(data.get("batches_total", 0)),
            complete=bool(data.get("complete", True)),
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
