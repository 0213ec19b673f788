"""Plotly figures of calibration statistics (no gradio; the web app and notebooks share them).

* :func:`entropy_figure` — entropy of X_0..X_L per estimator (one panel each, since their scales
  differ), the stage boundary marked and the compression / expansion stages shaded;
* :func:`blocks_figure` — entropy increase and cosine importance per block, stacked, with
  ticked and protected blocks coloured and named in the legend;
* :func:`norms_figure` — median and largest token norm per stream with the massive-activation
  threshold: where an attention sink appears;
* :func:`rank_figure` — entropy rank against cosine rank per block: where the criteria disagree;
* :func:`tradeoff_figure` — held-out perplexity against expected speed-up (or parameters removed) for
  every criterion at every count, from one sweep;
* :func:`write_figures` — PNG (kaleido) and one self-contained HTML file.

Titles carry the calibration progress ("3/8 batches") so a viewer sees which state is drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .arch import kind_label
from .compare import ALL_TOKENS, SINKFREE, trend_curve
from .criteria import resolve_estimator
from .scores import Scores
from .select import block_ranks

logger = logging.getLogger(__name__)

ESTIMATOR_COLORS = {"bucket": "#1f77b4", "knn": "#9467bd", "renyi": "#8c564b"}
COMPRESSION_FILL = "rgba(31, 119, 180, 0.10)"
EXPANSION_FILL = "rgba(255, 127, 14, 0.10)"
DROP_COLOR = "#d62728"
KEEP_COLOR = "#4c78a8"
PROTECTED_COLOR = "#b0b0b0"


def _progress(scores: Scores) -> str:
    if scores.complete:
        return f"{scores.batches_done} batches"
    return f"{scores.batches_done}/{scores.batches_total} batches"


def empty_figure(message: str = "Start a calibration to draw the curves.") -> go.Figure:
    """A blank figure carrying a message (before the first batch)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14})
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, height=300, template="plotly_white",
                      margin={"l": 20, "r": 20, "t": 40, "b": 20})
    return fig


CURVE_LABELS = {  # what each curve choice is called on the chart
    "sink-free": "without massive-activation tokens",
    "all-token": "all tokens (the method's scores)",
}
BOUNDARY_COLOR = "#555555"
HISTORY_COLOR = "#9e9e9e"


def _legend_key(fig: go.Figure, name: str, *, color: str, symbol: str = "square", dash: str | None = None) -> None:
    """A legend-only entry naming a colour, shading or line drawn as a shape (shapes have no legend)."""
    if dash:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, line={"color": color, "dash": dash},
                                 hoverinfo="skip", legendgroup="key"))
    else:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip", legendgroup="key",
                                 marker={"color": color, "symbol": symbol, "size": 12,
                                         "line": {"width": 1, "color": "#999999"}}))


def entropy_figure(scores: Scores, estimators: Iterable[str] | None = None,
                   stage_boundary: Mapping[str, int] | None = None, *, curve: str = "sink-free",
                   history: Mapping[str, Sequence[tuple[int, Sequence[float]]]] | None = None) -> go.Figure:
    """Entropy H(X_l), l = 0..L, one panel per estimator (stacked, since their scales differ); H(Y_l)
    (after attention) at l + 0.5 as hollow markers.

    ``curve``: ``"sink-free"`` (default, for teaching: massive-activation tokens left out, when the
    calibration recorded them) or ``"all-token"`` (what the method's scores use); the trace names say
    which. The stage boundary (of the drawn curve, or ``stage_boundary[estimator]``) is a dashed line;
    layers before it (compression) and after it (expansion) are shaded; the legend names both.
    ``history`` ({estimator: [(batches, curve), ...]}) draws earlier running means faintly, so the
    first batches visibly move the curve."""
    if curve not in CURVE_LABELS:
        raise ValueError(f"curve must be one of {', '.join(CURVE_LABELS)}, got {curve!r}.")
    ests = [e for e in (estimators or scores.estimators) if e in scores.entropy_curve]
    L = scores.num_layers
    fig = make_subplots(rows=len(ests), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[f"{e} estimator" for e in ests])
    drawn_kinds = set()
    for row, est in enumerate(ests, 1):
        color = ESTIMATOR_COLORS.get(est, "#333333")
        values, kind, detected = trend_curve(scores, est, "auto" if curve == SINKFREE else ALL_TOKENS)
        drawn_kinds.add(kind)
        mid = scores.sinkfree_mid(est) if kind == SINKFREE else (scores.mid_entropy.get(est) or [])
        for batches, old in (history or {}).get(est, ()):
            if len(old) == L + 1:
                fig.add_trace(go.Scatter(
                    x=list(range(L + 1)), y=list(old), mode="lines", name=f"running mean after {batches} "
                    f"batch{'es' if batches > 1 else ''}", line={"color": HISTORY_COLOR, "width": 1, "dash": "dot"},
                    opacity=0.6, legendgroup="history", showlegend=row == 1, hoverinfo="skip"), row=row, col=1)
        fig.add_trace(go.Scatter(
            x=list(range(L + 1)), y=values, mode="lines+markers", name=f"H(X_l), {est}, {CURVE_LABELS[kind]}",
            line={"color": color},
            hovertemplate="X_%{x} (entering layer %{x}): H = %{y:.2f} nats<extra>" + est + "</extra>",
        ), row=row, col=1)
        if mid:
            fig.add_trace(go.Scatter(
                x=[i + 0.5 for i in range(len(mid))], y=mid, mode="markers",
                name=f"H(Y_l) after attention (hollow), {est}",
                marker={"color": color, "symbol": "circle-open", "size": 6}, opacity=0.7,
                customdata=list(range(len(mid))),
                hovertemplate="Y_%{customdata} (after attention of layer %{customdata}): H = %{y:.2f} nats"
                              "<extra>" + est + "</extra>",
            ), row=row, col=1)
        boundary = (stage_boundary or {}).get(est, detected)
        if boundary is not None:
            if boundary > 0:
                fig.add_vrect(x0=0, x1=boundary, fillcolor=COMPRESSION_FILL, line_width=0, layer="below", row=row, col=1)
            if boundary < L:
                fig.add_vrect(x0=boundary, x1=L, fillcolor=EXPANSION_FILL, line_width=0, layer="below", row=row, col=1)
            fig.add_vline(x=boundary, line_dash="dash", line_color=BOUNDARY_COLOR, row=row, col=1)
            fig.add_annotation(x=boundary, y=1, yref=f"y{'' if row == 1 else row} domain", text=f"boundary X_{boundary}",
                               showarrow=False, xanchor="left", yanchor="top", font={"size": 11}, row=row, col=1)
        fig.update_yaxes(title_text="nats", row=row, col=1)
    _legend_key(fig, "compression stage (shaded blue)", color=COMPRESSION_FILL.replace("0.10", "0.35"))
    _legend_key(fig, "expansion stage (shaded orange)", color=EXPANSION_FILL.replace("0.10", "0.35"))
    _legend_key(fig, "stage boundary", color=BOUNDARY_COLOR, dash="dash")
    fig.update_xaxes(title_text="layer index l (X_l enters layer l)", row=len(ests), col=1)
    fig.update_xaxes(nticks=12)  # thinned labels stay readable on a phone
    height = max(380, 260 * len(ests) + 120)
    plot_height = height - 90 - 170  # minus the top and bottom margins
    which = CURVE_LABELS[SINKFREE] if drawn_kinds == {SINKFREE} else CURVE_LABELS[ALL_TOKENS]
    fig.update_layout(
        title={"text": f"Entropy per layer — {scores.model}, {_progress(scores)}<br><sup>{which};<br>"
                       f"{_running(scores)}</sup>", "font": {"size": 14}},
        height=height, template="plotly_white", hovermode="closest",
        # below the x-axis title, whatever the number of panels
        legend={"orientation": "h", "yanchor": "top", "y": -70 / plot_height, "x": 0, "font": {"size": 11}},
        margin={"l": 60, "r": 20, "t": 90, "b": 170},
    )
    return fig


def _running(scores: Scores) -> str:
    """Says that every value is a running mean, and over how many batches."""
    n = scores.batches_done
    if scores.complete:
        return f"means over all {n} batches"
    return f"running means over {n} of {scores.batches_total} batches — still moving"


def norms_figure(scores: Scores) -> go.Figure:
    """Token norms per residual stream (X_0, Y_0, X_1, ... X_L): the median token's and the largest
    token's norm, log scale, and the massive-activation threshold (a multiple of the median). A sink
    shows as the largest norm jumping far above the threshold from some layer on."""
    found = getattr(scores, "massive_tokens", None) or {}
    streams = found.get("streams") or []
    if not streams:
        return empty_figure("This calibration recorded no token norms (calibrate again to see them).")
    threshold = float(found.get("threshold") or 0)
    x = [i / 2 for i in range(len(streams))]  # X_l at l, Y_l at l + 0.5
    names = [s["stream"] for s in streams]
    median = [s["median_norm"] for s in streams]
    largest = [s["max_norm"] for s in streams]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=median, mode="lines+markers", name="median token norm", text=names,
                             line={"color": KEEP_COLOR}, marker={"size": 4},
                             hovertemplate="%{text}: median norm %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=largest, mode="lines+markers", name="largest token norm", text=names,
                             line={"color": DROP_COLOR}, marker={"size": 4},
                             customdata=[[s["max_ratio"], s["count"]] for s in streams],
                             hovertemplate="%{text}: largest norm %{y:.4g} (x%{customdata[0]:.0f} the median; "
                                           "%{customdata[1]} tokens over the threshold)<extra></extra>"))
    if threshold:
        fig.add_trace(go.Scatter(x=x, y=[threshold * m for m in median], mode="lines",
                                 name=f"threshold: {threshold:g} x median", hoverinfo="skip",
                                 line={"color": BOUNDARY_COLOR, "dash": "dash", "width": 1}))
    first = found.get("first_stream")
    if first in names:
        fig.add_vline(x=x[names.index(first)], line={"color": DROP_COLOR, "dash": "dot", "width": 1})
        fig.add_annotation(x=x[names.index(first)], y=1, yref="paper", text=f"first massive token: {first}",
                           showarrow=False, xanchor="left", yanchor="top", font={"size": 11})
    fig.update_layout(
        title={"text": f"Token norms per layer — {scores.model}<br><sup>a massive-activation token (attention "
                       "sink)<br>sits far above the dashed threshold</sup>", "font": {"size": 14}},
        height=320, template="plotly_white", yaxis_type="log", yaxis_title="token norm (log)",
        xaxis_title="layer (X_l at l, Y_l at l + ½)", xaxis={"nticks": 12},
        legend={"orientation": "h", "yanchor": "top", "y": -0.3, "x": 0, "font": {"size": 11}},
        margin={"l": 60, "r": 20, "t": 70, "b": 100},
    )
    return fig


def _status(layer: int, ticked: set[int], protected: Mapping[int, str]) -> str:
    if layer in ticked:
        return "drop" + (" (protected!)" if layer in protected else "")
    if layer in protected:
        return f"protected: {protected[layer]}"
    return "keep"


def blocks_figure(scores: Scores, kind: str = "attn", estimator: str | None = None, *,
                  ticked: Iterable[int] = (), protected: Mapping[int, str] | None = None,
                  criterion: str | None = None) -> go.Figure:
    """Entropy increase (top) and cosine importance (bottom) of every block of ``kind``, stacked so
    both stay readable on a narrow screen.

    Ticked blocks are red, protected ones grey, the rest blue; the legend names the three colours
    and the title which criterion made the ticks (``criterion``). Hover shows the value, its rank
    (1 = dropped first by that criterion) and the block's status."""
    est = resolve_estimator(scores, estimator)
    ticked = set(ticked)
    protected = protected or {}
    blocks = scores.blocks_of(kind)
    layers = [b.layer for b in blocks]
    colors = [DROP_COLOR if i in ticked else PROTECTED_COLOR if i in protected else KEEP_COLOR for i in layers]
    status = [_status(i, ticked, protected) for i in layers]
    label = kind_label(kind, attributive=True)
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.25,
                        subplot_titles=(f"Entropy increase ΔH ({est})", "Cosine importance 1 − cos(in, out)"))
    panels = (  # (row, values, ranks, trace name, hover text for the value, what rank 1 means)
        (1, [b.delta_entropy[est] for b in blocks], block_ranks(scores, "entrodrop", kind, estimator=est),
         "entropy increase", "ΔH = %{y:.4g} nats", "adds least"),
        (2, [b.cosine_importance for b in blocks], block_ranks(scores, "cosine", kind),
         "cosine importance", "1 − cos = %{y:.4g}", "changes least"),
    )
    for row, values, ranks, name, value_text, first in panels:
        fig.add_trace(go.Bar(
            x=layers, y=values, marker_color=colors, name=name, showlegend=False,
            customdata=[[ranks[i], s] for i, s in zip(layers, status, strict=True)],
            hovertemplate=f"layer %{{x}}: {value_text}<br>rank %{{customdata[0]}} (1 = {first})"
                          "<br>%{customdata[1]}<extra></extra>",
        ), row=row, col=1)
    by = f" by {criterion}" if criterion else ""
    _legend_key(fig, "kept (blue)", color=KEEP_COLOR)
    _legend_key(fig, f"ticked to drop{by} (red)", color=DROP_COLOR)
    _legend_key(fig, "protected (grey)", color=PROTECTED_COLOR)
    fig.update_xaxes(title_text="layer", dtick=max(1, len(layers) // 12))
    fig.update_yaxes(title_text="nats", row=1, col=1)
    n_drop = len(ticked & set(layers))
    suffix = f"<br><sup>{n_drop} ticked to drop{by}</sup>" if n_drop else ""
    fig.update_layout(
        title={"text": f"Per {label} block — {_progress(scores)}{suffix}", "font": {"size": 14}},
        height=520, template="plotly_white", showlegend=True, bargap=0.15,
        legend={"orientation": "h", "yanchor": "top", "y": -0.14, "x": 0, "font": {"size": 11}},
        margin={"l": 60, "r": 20, "t": 70, "b": 90},
    )
    return fig


def rank_figure(scores: Scores, kind: str = "attn", estimator: str | None = None, *,
                ticked: Iterable[int] = ()) -> go.Figure:
    """Each block's rank by entropy increase (x) against its rank by cosine importance (y).

    On the diagonal both criteria agree; far from it they disagree. Rank 1 is dropped first."""
    est = resolve_estimator(scores, estimator)
    ticked = set(ticked)
    blocks = scores.blocks_of(kind)
    rank_dh = block_ranks(scores, "entrodrop", kind, estimator=est)
    rank_cos = block_ranks(scores, "cosine", kind)
    layers = [b.layer for b in blocks]
    n = len(layers)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[1, n], y=[1, n], mode="lines", line={"dash": "dot", "color": "#999999"},
                             hoverinfo="skip", showlegend=False))
    fig.add_trace(go.Scatter(
        x=[rank_dh[i] for i in layers], y=[rank_cos[i] for i in layers], mode="markers+text",
        text=[str(i) for i in layers], textposition="top center",
        marker={"size": 9, "color": [DROP_COLOR if i in ticked else KEEP_COLOR for i in layers]},
        hovertemplate="layer %{text}<br>entropy rank %{x}<br>cosine rank %{y}<extra></extra>", showlegend=False,
    ))
    fig.update_xaxes(title_text=f"rank by entropy increase ({est}); 1 = dropped first", range=[0, n + 1])
    fig.update_yaxes(title_text="rank by cosine importance", range=[0, n + 1])
    fig.update_layout(title=f"Where the criteria disagree — {kind_label(kind, attributive=True)} blocks", height=420,
                      template="plotly_white", margin={"l": 60, "r": 20, "t": 60, "b": 50})
    return fig


CRITERION_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#1f77b4", "#ff7f0e", "#17becf", "#7f7f7f")


def tradeoff_figure(rows: Sequence[Mapping], *, x: str = "expected_speedup", dense_perplexity: float | None = None,
                    highlight: tuple[str, int] | None = None) -> go.Figure:
    """Held-out perplexity against what a plan saves, one line per criterion, one point per count.

    ``rows``: mappings with ``criterion``, ``count``, ``pruned_perplexity`` and the ``x`` value
    (``expected_speedup`` or ``params_removed_share``), e.g. sweep rows joined with plan summaries.
    Each point's ``customdata`` is (criterion, count), so a click picks that plan. Perplexity is on a
    log axis: broken plans sit orders of magnitude above usable ones."""
    x_title = {"expected_speedup": "expected speed-up (FLOPs, x)",
               "params_removed_share": "share of parameters removed"}.get(x, x)
    fig = go.Figure()
    names = list(dict.fromkeys(r["criterion"] for r in rows))
    for i, name in enumerate(names):
        pts = sorted((r for r in rows if r["criterion"] == name), key=lambda r: r["count"])
        fig.add_trace(go.Scatter(
            x=[r[x] for r in pts], y=[r["pruned_perplexity"] for r in pts], mode="lines+markers", name=name,
            line={"color": CRITERION_COLORS[i % len(CRITERION_COLORS)]},
            customdata=[[name, r["count"]] for r in pts],
            hovertemplate="%{customdata[0]}, %{customdata[1]} blocks<br>perplexity %{y:.4g}<br>"
                          + x_title + " %{x:.3g}<extra></extra>"))
    if dense_perplexity is not None:
        fig.add_hline(y=dense_perplexity, line={"dash": "dot", "color": "#555"},
                      annotation_text=f"dense {dense_perplexity:.3g}", annotation_position="bottom right")
    if highlight is not None:
        chosen = [r for r in rows if (r["criterion"], r["count"]) == tuple(highlight)]
        if chosen:
            fig.add_trace(go.Scatter(x=[chosen[0][x]], y=[chosen[0]["pruned_perplexity"]], mode="markers",
                                     name="picked", marker={"size": 16, "symbol": "circle-open", "color": "black",
                                                            "line": {"width": 2}}, hoverinfo="skip"))
    fig.update_layout(template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      title="Held-out perplexity against savings: lower right is better",
                      xaxis_title=x_title, yaxis_title="held-out perplexity (log)", yaxis_type="log",
                      legend={"orientation": "h", "y": -0.2})
    return fig


def write_figures(figures: Mapping[str, go.Figure], folder: str | Path, *, png: bool = True,
                  html_name: str = "plots.html") -> list[Path]:
    """Write each figure as ``NAME.png`` (kaleido) and all of them into one self-contained HTML file.

    Returns the written paths. PNG needs kaleido and a Chrome/Chromium; without them a ValueError
    says so (the HTML is written first, so it is always there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    html_path = folder / html_name
    parts = []
    for i, (name, fig) in enumerate(figures.items()):
        # plotly.js is embedded once, in the first figure, so the file works offline
        parts.append(f"<h2>{name}</h2>\n" + fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    html_path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>EntroDrop plots</title></head>"
                         "<body>\n" + "\n".join(parts) + "\n</body></html>", encoding="utf-8")
    written = [html_path]
    if png and figures:
        import plotly.io as pio

        paths = [folder / f"{name}.png" for name in figures]
        try:
            pio.write_images(list(figures.values()), paths, format="png", width=1100, scale=1)
        except Exception as exc:  # kaleido missing, no Chrome, or Chrome failed to start
            raise ValueError(f"Could not write PNG images ({type(exc).__name__}: {exc}). PNG export needs the kaleido "
                             "package and Chrome or Chromium; the interactive HTML was written.") from exc
        written += paths
    return written


VERDICT_COLORS = {"usable": "#2a9d4b", "degraded": "#e0a100", "damaged": "#c62828"}


def check_history_figure(records: Sequence) -> go.Figure:
    """A session's checks (:class:`~entrodrop.checks.CheckRecord`): perplexity ratio to dense against blocks
    dropped, one point per check labelled with its number, coloured by verdict (legend names each)."""
    fig = go.Figure()
    for level, color in VERDICT_COLORS.items():
        pts = [r for r in records if r.verdict is not None and r.verdict.level == level]
        if not pts:
            continue
        fig.add_trace(go.Scatter(
            x=[len(r.plan.blocks) for r in pts], y=[r.result.quality.perplexity_ratio for r in pts],
            mode="markers+text", name=level, text=[f"#{r.number}" for r in pts], textposition="top center",
            marker={"size": 11, "color": color},
            customdata=[[r.number, r.plan.criterion] for r in pts],
            hovertemplate="#%{customdata[0]} %{customdata[1]}, %{x} blocks<br>perplexity ×%{y:.3g}<extra></extra>"))
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "#555"}, annotation_text="dense",
                  annotation_position="bottom right")
    fig.update_layout(template="plotly_white", height=300, margin={"l": 55, "r": 15, "t": 40, "b": 45},
                      title={"text": "Checks so far: perplexity vs dense", "font": {"size": 14}},
                      xaxis_title="blocks dropped", yaxis_title="perplexity ÷ dense (log)", yaxis_type="log",
                      legend={"orientation": "h", "y": -0.3, "title": {"text": "verdict"}})
    return fig


def heal_figure(history: Sequence[Mapping], *, method: str = "lora", best_step: int | None = None) -> go.Figure:
    """A heal as it runs: the training loss per step and the validation KL where it was measured (nats per
    token, step 0 being the model as dropped), the kept step marked."""
    fig = go.Figure()
    train = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    val = [(h["step"], h["val_kl"]) for h in history if h.get("val_kl") is not None]
    if train:
        fig.add_trace(go.Scatter(x=[s for s, _ in train], y=[v for _, v in train], mode="lines", name="training loss",
                                 line={"color": "#9aa5b1"}))
    if val:
        fig.add_trace(go.Scatter(x=[s for s, _ in val], y=[v for _, v in val], mode="lines+markers",
                                 name="validation KL (dense ‖ model)", line={"color": "#1f77b4"}))
    if best_step is not None and val:
        kept = [v for s, v in val if s == best_step]
        if kept:
            fig.add_trace(go.Scatter(x=[best_step], y=kept, mode="markers", name="kept",
                                     marker={"size": 13, "color": "#2a9d4b", "symbol": "star"}))
    fig.update_layout(template="plotly_white", height=300, margin={"l": 55, "r": 15, "t": 40, "b": 45},
                      title={"text": f"{method} heal: nats per token on calibration windows", "font": {"size": 14}},
                      xaxis_title="step (0: as dropped)", yaxis_title="nats per token",
                      legend={"orientation": "h", "y": -0.3})
    return fig
