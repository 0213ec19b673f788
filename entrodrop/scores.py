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
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arch import BLOCK_KINDS
from .jsonfile import load_json_file

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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"Field '{name}' of the scores file must be text, got {value!r}.")
    return value


def _whole(value, name: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"Field '{name}' of the scores file must be a whole number, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"Field '{name}' of the scores file must be {bound}, got {value}.")
    return value


def _finite(value, name: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"Field '{name}' of the scores file must be a finite number, got {value!r}.")
    return float(value)


def _curves(value, name: str, length: int) -> dict[str, list[float]]:
    if not isinstance(value, dict):
        raise ValueError(f"Field '{name}' of the scores file must be an object {{estimator: numbers}}, got {value!r}.")
    curves = {}
    for est, values in value.items():
        if not isinstance(values, list) or len(values) != length:
            raise ValueError(f"Field '{name}.{est}' of the scores file must be a list of {length} numbers "
                             f"(one per stream), got {values!r:.80}.")
        curves[est] = [_finite(x, f"{name}.{est}") for x in values]
    return curves


def _blocks(value, num_layers: int, estimators: list[str]) -> list[BlockScore]:
    if not isinstance(value, list):
        raise ValueError(f"Field 'blocks' of the scores file must be a list, got {value!r:.80}.")
    blocks, seen = [], set()
    for i, b in enumerate(value):
        where = f"blocks[{i}]"
        if not isinstance(b, dict):
            raise ValueError(f"Field '{where}' of the scores file must be an object, got {b!r:.80}.")
        for key in ("layer", "kind"):
            if key not in b:
                raise ValueError(f"Field '{where}' of the scores file has no '{key}'.")
        layer = _whole(b["layer"], f"{where}.layer", minimum=0, maximum=num_layers - 1)
        kind = b["kind"]
        if kind not in BLOCK_KINDS:
            raise ValueError(f"Field '{where}.kind' of the scores file must be one of {', '.join(BLOCK_KINDS)}, "
                             f"got {kind!r}.")
        if (layer, kind) in seen:
            raise ValueError(f"Field 'blocks' of the scores file lists the {kind} block of layer {layer} twice.")
        seen.add((layer, kind))
        delta = b.get("delta_entropy", {})
        if not isinstance(delta, dict) or sorted(delta) != sorted(estimators):
            raise ValueError(f"Field '{where}.delta_entropy' of the scores file must give a number for each of "
                             f"{', '.join(estimators)}, got {delta!r:.80}.")
        blocks.append(BlockScore(
            layer=layer,
            kind=kind,
            delta_entropy={k: _finite(v, f"{where}.delta_entropy.{k}") for k, v in delta.items()},
            cosine_importance=_finite(b.get("cosine_importance"), f"{where}.cosine_importance"),
            angular_distance=_finite(b.get("angular_distance"), f"{where}.angular_distance"),
        ))
    absent = [(layer, kind) for kind in BLOCK_KINDS for layer in range(num_layers) if (layer, kind) not in seen]
    if absent:
        layer, kind = absent[0]
        raise ValueError(f"Field 'blocks' of the scores file has no {kind} block for layer {layer} ({len(absent)} "
                         f"block(s) missing); every layer needs its {', '.join(BLOCK_KINDS)} blocks.")
    return blocks


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
        """Scores from their JSON form, every field checked: ValueError naming the first wrong field."""
        if not isinstance(data, dict):
            raise ValueError(f"This is not an EntroDrop scores file: it holds a JSON {type(data).__name__}, not an "
                             "object. Write one with `entrodrop scan MODEL --json FILE`.")
        missing = [k for k in ("model", "num_layers", "entropy_curve", "blocks") if k not in data]
        if missing:
            raise ValueError(
                f"This is not an EntroDrop scores file: missing {', '.join(missing)}. "
                "Write one with `entrodrop scan MODEL --json FILE`."
            )
        model = _text(data["model"], "model")
        L = _whole(data["num_layers"], "num_layers", minimum=1)
        curve = _curves(data["entropy_curve"], "entropy_curve", L + 1)
        if not curve:
            raise ValueError("Field 'entropy_curve' of the scores file is empty; it needs one curve per estimator.")
        estimators = data.get("estimators", list(curve))
        if not isinstance(estimators, list) or not all(isinstance(e, str) for e in estimators) or \
                sorted(set(estimators)) != sorted(curve):
            raise ValueError(f"Field 'estimators' of the scores file must list the estimators of 'entropy_curve' "
                             f"({', '.join(curve)}), got {estimators!r}.")
        mid = _curves(data.get("mid_entropy", {}), "mid_entropy", L)
        boundary = data.get("stage_boundary", {})
        if not isinstance(boundary, dict):
            raise ValueError(f"Field 'stage_boundary' of the scores file must be an object, got {boundary!r}.")
        boundary = {_text(k, "stage_boundary"): _whole(v, f"stage_boundary.{k}", minimum=0, maximum=L)
                    for k, v in boundary.items()}
        blocks = _blocks(data["blocks"], L, estimators)
        angular = data.get("angular_matrix", [])
        if not isinstance(angular, list) or not all(isinstance(row, list) and all(_is_number(x) for x in row)
                                                    for row in angular):
            raise ValueError("Field 'angular_matrix' of the scores file must be a list of lists of numbers.")
        calibration = data.get("calibration", {})
        if not isinstance(calibration, dict):
            raise ValueError(f"Field 'calibration' of the scores file must be an object, got {calibration!r}.")
        complete = data.get("complete", True)
        if not isinstance(complete, bool):
            raise ValueError(f"Field 'complete' of the scores file must be true or false, got {complete!r}.")
        return cls(
            model=model,
            num_layers=L,
            estimators=list(estimators),
            entropy_curve=curve,
            mid_entropy=mid,
            stage_boundary=boundary or {k: detect_stage_boundary(v) for k, v in curve.items()},
            blocks=blocks,
            angular_matrix=angular,
            calibration=calibration,
            batches_done=_whole(data.get("batches_done", 0), "batches_done", minimum=0),
            batches_total=_whole(data.get("batches_total", 0), "batches_total", minimum=0),
            complete=complete,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        return load_json_file(path, "Scores file", cls.from_dict,
                              hint=f"Write one with `entrodrop scan MODEL --json {path}`.")
