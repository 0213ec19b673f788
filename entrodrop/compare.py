"""Entropy curves of several calibrations on shared axes: the paper's Figure 1 for the user's models.

Two models of different depth and width only share axes once both are normalised: depth as
``layer / L`` (0 = embeddings, 1 = the last block's output) and entropy per dimension (nats / d, d the
hidden size). :func:`compare_curves` builds those series (refusing calibrations whose entropies are
not comparable: different estimators or estimator settings); :func:`compare_figure` overlays them
with each stage boundary marked.

:func:`trend_curve` is the one place that picks the curve a reader should see: the sink-free curve
when calibration recorded one (massive-activation tokens left out), else the all-token curve, each
with its own stage boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .scores import Scores, detect_stage_boundary

SINKFREE = "sink-free"
ALL_TOKENS = "all-token"
CURVE_CHOICES = ("auto", SINKFREE, ALL_TOKENS)

# The estimator setting that changes the scale of each estimator's entropy (bucket: log(bins) bounds it;
# knn: the log k term; renyi: the order). Curves with different settings do not share a y axis.
_SCALE_SETTINGS = {"bucket": "bins", "knn": "k", "renyi": "alpha"}

SERIES_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def trend_curve(scores: Scores, estimator: str, which: str = "auto") -> tuple[list[float], str, int]:
    """(curve H(X_0..X_L), which curve it is, its stage boundary) for ``estimator``.

    ``which``: ``"auto"`` (sink-free when recorded, else all-token), ``"sink-free"`` or ``"all-token"``.
    The stored ``stage_boundary`` belongs to the sink-free curve when there is one (calibration computes
    it there); the all-token curve of such scores gets its boundary from the same rule."""
    if which not in CURVE_CHOICES:
        raise ValueError(f"which must be one of {', '.join(CURVE_CHOICES)}, got {which!r}.")
    if estimator not in scores.entropy_curve:
        raise ValueError(f"The calibration of {scores.model} has no {estimator!r} curve (it has "
                         f"{', '.join(scores.entropy_curve)}). Calibrate with that estimator or choose another.")
    sinkfree = (getattr(scores, "entropy_curve_sinkfree", None) or {}).get(estimator)
    if which == SINKFREE and not sinkfree:
        raise ValueError(f"The calibration of {scores.model} has no sink-free {estimator} curve; use which='all-token' "
                         "or calibrate again with a version that records it.")
    use_sinkfree = bool(sinkfree) and which != ALL_TOKENS
    curve = list(sinkfree if use_sinkfree else scores.entropy_curve[estimator])
    stored = scores.stage_boundary.get(estimator)
    if (use_sinkfree or not sinkfree) and stored is not None and 0 <= stored < len(curve):
        boundary = stored
    else:
        boundary = detect_stage_boundary(curve)
    return curve, SINKFREE if use_sinkfree else ALL_TOKENS, boundary


@dataclass
class CurveSeries:
    """One calibration's curve on the normalised axes."""

    label: str
    model: str
    data: str
    estimator: str
    curve_kind: str  # "sink-free" | "all-token"
    num_layers: int
    hidden_size: int
    relative_depth: list[float]  # l / L for l = 0..L
    entropy_per_dim: list[float]  # H(X_l) / d, nats per dimension
    boundary: int  # stage boundary, a layer index l of X_l
    massive_tokens: dict = field(default_factory=dict)  # summary, when calibration detected them

    @property
    def boundary_depth(self) -> float:
        return self.boundary / self.num_layers

    def to_dict(self) -> dict:
        return {**asdict(self), "boundary_depth": self.boundary_depth}


def _hidden_size(scores: Scores, given: Mapping[str, int] | None, label: str) -> int:
    d = (given or {}).get(label) or (given or {}).get(scores.model) or (scores.calibration or {}).get("hidden_size")
    if not d:
        raise ValueError(f"The hidden size of {label} is unknown (its scores do not record it). Pass "
                         f"hidden_sizes={{'{label}': d}}, e.g. from the model's config.hidden_size.")
    return int(d)


def _massive_summary(scores: Scores) -> dict:
    found = getattr(scores, "massive_tokens", None) or {}
    streams = found.get("streams") or []
    if not found:
        return {}
    return {"threshold": found.get("threshold"), "first_layer": found.get("first_layer"),
            "streams": len(streams), "max_ratio": max((s.get("max_ratio", 0) for s in streams), default=None),
            "excluded_tokens": found.get("excluded_tokens")}


def _settings(scores: Scores, estimator: str):
    key = _SCALE_SETTINGS.get(estimator)
    return (scores.calibration or {}).get(key) if key else None


def compare_curves(
    calibrations: Sequence[Scores] | Mapping[str, Scores],
    *,
    estimator: str = "bucket",
    which: str = "auto",
    hidden_sizes: Mapping[str, int] | None = None,
) -> list[CurveSeries]:
    """Normalised curves of two or more calibrations, ready to overlay.

    ``calibrations``: Scores, or ``{label: Scores}`` (labels default to "model, data"). All must have
    ``estimator`` with the same scale setting (bins / k / alpha): entropies of different estimators or
    settings are different quantities. ``hidden_sizes`` ({label or model: d}) is needed only for scores
    that do not record ``calibration["hidden_size"]``."""
    items = list(calibrations.items()) if isinstance(calibrations, Mapping) else [
        (f"{s.model}, {(s.calibration or {}).get('data', '?')}", s) for s in calibrations]
    if len(items) < 2:
        raise ValueError(f"Comparing needs two or more calibrations, got {len(items)}.")
    for label, s in items:
        if not isinstance(s, Scores):
            raise TypeError(f"{label}: expected Scores (from calibration or Scores.load), got {type(s).__name__}.")
    lacking = [label for label, s in items if estimator not in s.entropy_curve]
    if lacking:
        have = {label: ", ".join(s.entropy_curve) for label, s in items}
        raise ValueError(f"Cannot compare: {', '.join(lacking)} has no {estimator} curve (estimators: "
                         f"{'; '.join(f'{k}: {v}' for k, v in have.items())}). Entropies of different estimators "
                         "are different quantities; compare calibrations that share an estimator.")
    settings = {label: _settings(s, estimator) for label, s in items}
    known = {v for v in settings.values() if v is not None}
    if len(known) > 1:
        raise ValueError(f"Cannot compare {estimator} curves with different {_SCALE_SETTINGS[estimator]} "
                         f"({', '.join(f'{k}: {v}' for k, v in settings.items())}): their entropies are on "
                         "different scales. Calibrate with the same setting.")
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two calibrations share the label {labels!r}; pass them as {{label: scores}}.")
    series = []
    for label, s in items:
        curve, kind, boundary = trend_curve(s, estimator, which)
        d = _hidden_size(s, hidden_sizes, label)
        L = len(curve) - 1
        series.append(CurveSeries(
            label=label, model=s.model, data=str((s.calibration or {}).get("data", "?")), estimator=estimator,
            curve_kind=kind, num_layers=L, hidden_size=d,
            relative_depth=[layer / L for layer in range(L + 1)],
            entropy_per_dim=[h / d for h in curve],
            boundary=boundary, massive_tokens=_massive_summary(s),
        ))
    return series


def compare_figure(series: Sequence[CurveSeries], title: str | None = None):
    """Overlay of :func:`compare_curves` series: relative depth vs entropy per dimension, each stage
    boundary a dotted line and a diamond on its curve in the series' colour."""
    import plotly.graph_objects as go

    if not series:
        raise ValueError("Nothing to compare: pass the series from compare_curves.")
    fig = go.Figure()
    for i, s in enumerate(series):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        name = f"{s.label} ({s.curve_kind}, L={s.num_layers}, d={s.hidden_size})"
        fig.add_trace(go.Scatter(
            x=s.relative_depth, y=s.entropy_per_dim, mode="lines+markers", name=name, line={"color": color},
            marker={"size": 5}, customdata=list(range(s.num_layers + 1)), legendgroup=s.label,
            hovertemplate="X_%{customdata} (depth %{x:.2f}): %{y:.4f} nats/dim<extra>" + s.label + "</extra>",
        ))
        fig.add_trace(go.Scatter(
            x=[s.boundary_depth], y=[s.entropy_per_dim[s.boundary]], mode="markers", legendgroup=s.label,
            name=f"stage boundary X_{s.boundary}", showlegend=False,
            marker={"symbol": "diamond", "size": 12, "color": color, "line": {"width": 1, "color": "black"}},
            hovertemplate=f"{s.label}: stage boundary at X_{s.boundary} (depth {s.boundary_depth:.2f})<extra></extra>",
        ))
        fig.add_vline(x=s.boundary_depth, line={"color": color, "dash": "dot", "width": 1})
    est = series[0].estimator
    fig.update_layout(
        title=title or f"Entropy across depth, {est} estimator (diamonds: stage boundaries)",
        xaxis_title="relative depth l / L (0: embeddings, 1: last block's output)",
        yaxis_title="entropy per dimension H(X_l) / d (nats)",
        template="plotly_white", height=420, legend={"orientation": "h", "y": -0.25},
        margin={"l": 60, "r": 20, "t": 50, "b": 100},
    )
    return fig
