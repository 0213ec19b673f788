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
        sinkfree = _curves(data.get("entropy_curve_sinkfree", {}), "entropy_curve_sinkfree", L + 1)
        mid_sinkfree = _curves(data.get("mid_entropy_sinkfree", {}), "mid_entropy_sinkfree", L)
        angular_last = data.get("angular_matrix_last", [])
        if not isinstance(angular_last, list) or not all(
                isinstance(row, list) and all(_is_number(x) for x in row) for row in angular_last):
            raise ValueError("Field 'angular_matrix_last' of the scores file must be a list of lists of numbers.")
        massive = data.get("massive_tokens", {})
        if not isinstance(massive, dict):
            raise ValueError(f"Field 'massive_tokens' of the scores file must be an object, got {massive!r:.80}.")
        if not sinkfree:
            # a file without the sink-free curve predates the first-sustained-minimum rule: its stored
            # boundary is the retired global minimum, so it is recomputed (on the all-token curve)
            boundary = {}
        return cls(
            model=model,
            num_layers=L,
            estimators=list(estimators),
            entropy_curve=curve,
            mid_entropy=mid,
            stage_boundary=boundary or {k: detect_stage_boundary(sinkfree.get(k, v)) for k, v in curve.items()},
            blocks=blocks,
            angular_matrix=angular,
            calibration=calibration,
            batches_done=_whole(data.get("batches_done", 0), "batches_done", minimum=0),
            batches_total=_whole(data.get("batches_total", 0), "batches_total", minimum=0),
            complete=complete,
            entropy_curve_sinkfree=sinkfree,
            mid_entropy_sinkfree=mid_sinkfree,
            massive_tokens=massive,
            angular_matrix_last=angular_last,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        return load_json_file(path, "Scores file", cls.from_dict,
                              hint=f"Write one with `entrodrop scan MODEL --json {path}`.")
