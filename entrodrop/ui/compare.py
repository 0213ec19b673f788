"""Step 2's teaching panels: the session's kept calibrations overlaid on shared axes (the paper's
Figure 1 for the visitor's own models) and the paper's claims scored on what the session measured.

The calibrations a session keeps (:data:`KEEP_CALIBRATIONS`, newest last) survive loading another
model, so two families can be compared; they are per session (``Session.calibrations``) and
bounded. All numbers come from :mod:`entrodrop.compare` and :mod:`entrodrop.claims`.
"""

from __future__ import annotations

import gradio as gr

from .. import plots
from ..claims import NOT_MEASURED, score_claims
from ..compare import CURVE_CHOICES, compare_curves, compare_figure
from ..estimators import ENTROPY_ESTIMATORS
from ..scores import Scores
from .state import Session, error, user_errors

KEEP_CALIBRATIONS = 4  # per session: enough for two models on two texts, small in memory (no tensors)

# What is missing, said for a visitor of the app (the library's HOW_TO_MEASURE speaks CLI).
IN_THE_APP = {
    "scores": "run a calibration in this step",
    "second_scores": "calibrate the same model again on other text (e.g. gpqa after gsm8k) in this step; the panel "
                     "pairs the current calibration with the latest one of the same model on different text",
    "estimators": "calibrate with both bucket and knn ticked",
    "complete_scores": "let the calibration run to its end in this step (Stop keeps a partial one)",
}


class CompareTab:
    """The compare and claims panels (inside step 2)."""

    kept: gr.CheckboxGroup
    estimator: gr.Dropdown
    which: gr.Radio
    compare_btn: gr.Button
    compare_status: gr.Markdown
    compare_plot: gr.Plot
    claims_btn: gr.Button
    claims: gr.Markdown


def create_ui() -> CompareTab:
    """Lay out the two panels (inside the current column)."""
    tab = CompareTab()
    with gr.Accordion("Compare calibrations (two models or two texts on shared axes)", open=False,
                      elem_id="compare-panel"):
        gr.Markdown(f"This session keeps its last {KEEP_CALIBRATIONS} calibrations, across model loads. Pick two or "
                    "more: depth is drawn as l / L and entropy per dimension (nats / d), so models of different "
                    "depth and width share the axes; diamonds mark each stage boundary.")
        tab.kept = gr.CheckboxGroup([], label="Kept calibrations", elem_id="compare-kept")
        with gr.Row():
            tab.estimator = gr.Dropdown(list(ENTROPY_ESTIMATORS), value="bucket", label="Estimator",
                                        elem_id="compare-estimator")
            tab.which = gr.Radio([("without massive tokens", "auto"), ("all tokens", "all-token")], value="auto",
                                 label="Curve", elem_id="compare-which")
        tab.compare_btn = gr.Button("Compare", elem_id="compare-btn")
        tab.compare_status = gr.Markdown("", elem_id="compare-status")
        tab.compare_plot = gr.Plot(plots.empty_figure("Keep two calibrations, then press Compare."),
                                   label="Entropy across depth", elem_id="compare-plot")
    with gr.Accordion("The paper's claims on this model", open=False, elem_id="claims-panel"):
        tab.claims_btn = gr.Button("Score the claims from this session's measurements", elem_id="claims-btn")
        tab.claims = gr.Markdown("*Calibrate, then press the button: each claim is scored only from what was "
                                 "measured here.*", elem_id="claims")
    return tab


def calibration_label(number: int, scores: Scores) -> str:
    calib = scores.calibration or {}
    status = "" if scores.complete else f", stopped at {scores.batches_done}/{scores.batches_total}"
    return (f"#{number} {scores.model} · {calib.get('data', '?')} · {calib.get('samples', '?')}×"
            f"{calib.get('seq_len', '?')} tokens · {', '.join(scores.estimators)}{status}")


def keep_calibration(session: Session, scores: Scores) -> gr.update:
    """Keep a finished (or stopped) calibration in the session, dropping the oldest past the bound;
    returns the update of the kept list (the two newest ticked)."""
    number = (session.calibrations[-1][0] + 1) if session.calibrations else 1
    session.calibrations.append((number, calibration_label(number, scores), scores))
    del session.calibrations[:-KEEP_CALIBRATIONS]
    labels = [label for _, label, _ in session.calibrations]
    return gr.update(choices=labels, value=labels[-2:])


def kept_choices(session: Session) -> gr.update:
    """The kept list as the session has it now (a new page or a reload)."""
    labels = [label for _, label, _ in session.calibrations]
    return gr.update(choices=labels, value=labels[-2:])


def _second_calibration(session: Session, scores: Scores) -> Scores | None:
    """The latest kept calibration of the same model on different text (claim 3), if any."""
    data = (scores.calibration or {}).get("data")
    for _, _, other in reversed(session.calibrations):
        if other.model == scores.model and (other.calibration or {}).get("data") != data \
                and other.num_layers == scores.num_layers:
            return other
    return None


def claims_markdown(session: Session, estimator: str | None) -> str:
    """The five claims as a visitor reads them: verdict, numbers, and how to measure what is missing."""
    scores = session.scores
    if scores is None:
        return "**No calibration yet.** Run one in this step; each claim is scored only from measurements."
    est = estimator if estimator in scores.entropy_curve else scores.estimators[0]
    report = score_claims(scores, second_scores=_second_calibration(session, scores), estimator=est)
    lines = [f"**{report.model}**, {est} estimator. Verdicts use fixed thresholds (see `entrodrop.claims`); "
             "nothing is scored without data.", "", "| # | claim | verdict |", "|---|---|---|"]
    lines += [f"| {c.number} | {c.claim} | **{c.verdict}** |" for c in report.claims]
    for c in report.claims:
        lines += ["", f"**{c.number}. {c.claim}** — *{c.verdict}*. {c.summary}"]
        if c.verdict == NOT_MEASURED or c.missing:
            for key, hint in zip(c.missing, c.how_to_measure, strict=True):
                app = IN_THE_APP.get(key)
                lines.append(f"- To measure: {app + '; or ' if app else ''}{hint}.")
    return "\n".join(lines)


class CompareHandlers:
    def __init__(self, tab: CompareTab):
        self.tab = tab

    @user_errors
    def compare(self, session: Session, chosen, estimator, which):
        """Overlay the chosen kept calibrations; a refusal (too few, different estimators or settings)
        is written on the panel, and the last drawn comparison stays."""
        if estimator not in ENTROPY_ESTIMATORS:
            raise error(f"Unknown estimator {estimator!r}; choose from {', '.join(ENTROPY_ESTIMATORS)}.")
        if which not in CURVE_CHOICES:
            raise error(f"Unknown curve {which!r}; choose from {', '.join(CURVE_CHOICES)}.")
        kept = {label: scores for _, label, scores in session.calibrations}
        chosen = [c for c in (chosen or []) if isinstance(c, str)]
        unknown = [c for c in chosen if c not in kept]
        if unknown:
            raise error(f"{unknown[0]!r} is not one of this session's kept calibrations; pick from the list.")
        try:
            series = compare_curves({c: kept[c] for c in chosen}, estimator=estimator, which=which)
        except (ValueError, TypeError) as exc:
            return f"⚠ Cannot compare: {exc}", gr.skip()
        notes = []
        for s in series:
            found = s.massive_tokens or {}
            sink = (f"{found.get('excluded_tokens', 0):,} massive token(s) left out from layer {found['first_layer']}"
                    if found.get("first_layer") is not None and s.curve_kind == "sink-free" else "no token left out")
            notes.append(f"- **{s.label}**: L = {s.num_layers}, d = {s.hidden_size}, {s.curve_kind} curve, stage "
                         f"boundary X_{s.boundary} (depth {s.boundary_depth:.2f}); {sink}.")
        return "\n".join(notes), compare_figure(series)

    @user_errors
    def claims(self, session: Session, estimator):
        return claims_markdown(session, estimator if isinstance(estimator, str) else None)


def create_event_handlers(session: gr.State, tab: CompareTab, view_est: gr.Dropdown) -> None:
    """Wire the panels; claims use the estimator step 2's per-block view shows."""
    handlers = CompareHandlers(tab)
    light = {"concurrency_limit": None}
    tab.compare_btn.click(handlers.compare, [session, tab.kept, tab.estimator, tab.which],
                          [tab.compare_status, tab.compare_plot], api_name="compare", **light)
    tab.claims_btn.click(handlers.claims, [session, view_est], [tab.claims], api_name="claims", **light)
