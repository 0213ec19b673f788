"""Step 3, choose: the automatic selection of a criterion, ticks the user may change, and the views
that explain them (block table, plan summary, where the criteria disagree). Step 2's per-block view
follows the choice, so both describe the same blocks."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from .. import plots, report
from ..arch import BLOCK_KINDS, kind_label
from ..costs import summarize_plan
from ..criteria import get_criterion, ranked_criteria, resolve_estimator
from ..select import plan_from_ticks, select_blocks
from .state import Session, error, keep_errors, need_scores, user_errors


class ChooseTab:
    """Step 3's components."""

    criterion: gr.Radio
    kind: gr.Radio
    count: gr.Slider
    sel_est: gr.Dropdown
    protect: gr.Dropdown
    boundary: gr.Textbox
    auto_btn: gr.Button
    ticks: gr.CheckboxGroup
    summary: gr.Markdown
    choose_plot: gr.Plot
    table: gr.Dataframe
    disagree_md: gr.Markdown
    disagree_table: gr.Dataframe
    rank_plot: gr.Plot


def create_ui() -> ChooseTab:
    """Lay out step 3 inside the current tab."""
    tab = ChooseTab()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.criterion = gr.Radio(
               [(get_criterion(name).label, name) for name in ranked_criteria()], value="entrodrop",
               label="Criterion", elem_id="criterion")
            tab.kind = gr.Radio([(kind_label(k), k) for k in BLOCK_KINDS], value="attn",
                                label="Granularity", elem_id="granularity")
            tab.count = gr.Slider(0, 64, value=8, step=1, label="Blocks to drop", elem_id="drop-count")
            tab.sel_est = gr.Dropdown(["bucket", "knn"], value="bucket", label="Estimator (entrodrop)",
                                      elem_id="sel-estimator")
            tab.protect = gr.Dropdown(
               [("criterion's default", "default"), ("stage: compression stage + last layer", "stage"),
                ("released code: layers 0, 1, L-1", "released"), ("none", "none")],
               value="default", label="Protection", elem_id="protection")
            tab.boundary = gr.Textbox("", label="Stage boundary X_b (blank: the detected one)",
                                      placeholder="detected", elem_id="stage-boundary")
            tab.auto_btn = gr.Button("Automatic selection", variant="primary", elem_id="auto-btn")
        with gr.Column(scale=3):
            tab.ticks = gr.CheckboxGroup([], value=[], label="Blocks to drop (protected ones are marked; you may still tick them)",
                                         elem_id="drop-blocks")
            tab.summary = gr.Markdown("*Calibrate first (step 2).*", elem_id="plan-summary")
            tab.choose_plot = gr.Plot(plots.empty_figure("Calibrate first (step 2)."), label="Scores and ticks",
                                      elem_id="choose-plot")
    tab.table = gr.Dataframe(pd.DataFrame(), label="Blocks: scores and rank per criterion (1 = dropped first)",
                             interactive=False, elem_id="block-table", max_height=420)
    with gr.Accordion("Where the criteria disagree", open=True):
        with gr.Row():
            with gr.Column():
                tab.disagree_md = gr.Markdown("", elem_id="disagree-md")
                tab.disagree_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="disagree-table")
            tab.rank_plot = gr.Plot(plots.empty_figure("Calibrate first (step 2)."), label="Rank against rank",
                                    elem_id="rank-plot")

    return tab


def parse_boundary(text, num_layers: int) -> int | None:
    """The stage-boundary field: blank for the detected boundary, else a whole number 0..L."""
    text = str(text if text is not None else "").strip()
    if not text or text.lower() == "detected":
        return None
    try:
        value = int(text.removeprefix("X_"))
    except ValueError:
        value = -1
    if not 0 <= value <= num_layers:
        raise error(f"The stage boundary must be a whole number from 0 to {num_layers} (the index of X_b); "
                     "leave it blank to use the detected one.")
    return value


class ChooseHandlers:
    """Automatic selection (also right after a calibration) and hand ticks."""

    def __init__(self, choose_tab: ChooseTab, calibrate_tab):
        self.tab, self.calibrate = choose_tab, calibrate_tab

    def inputs(self) -> list:
        """The selection settings, in the order of the ``select`` API's inputs (after the session)."""
        return [self.tab.criterion, self.tab.kind, self.tab.count, self.tab.sel_est, self.tab.protect, self.tab.boundary]

    def outputs(self) -> list:
        """What a selection writes, in the order of the ``select`` API's outputs."""
        return [self.tab.count, self.tab.sel_est, self.tab.ticks, self.tab.table, self.tab.summary, self.tab.choose_plot,
                self.tab.disagree_md, self.tab.disagree_table, self.tab.rank_plot, self.calibrate.blocks_plot,
                self.calibrate.explainer, self.calibrate.view_kind, self.calibrate.view_est]

    def _choose_view(self, session: Session, with_ticks: bool = True) -> dict:
        scores = session.scores
        est = session.estimator
        protected = session.protected()
        L = scores.num_layers
        choices = [(f"{i} (protected)" if i in protected else str(i), i) for i in range(L)]
        try:
            plan = plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
            summary = report.plan_summary_markdown(plan, summarize_plan(plan, session.costs), protected)
        except ValueError as exc:
            summary = f"⚠ {exc}"
        if protected:
            summary += f"\n\n**Protected** under '{session.protection()}': {report.describe_protection(protected)}."
        if not scores.complete:
            summary += (f"\n\n*Scores from a stopped calibration ({scores.batches_done} of {scores.batches_total} "
                        "batches).*")
        disagreement = report.criteria_disagreement(scores, session.kind, min(session.count, L), est)
        blocks_fig = plots.blocks_figure(scores, session.kind, est, ticked=session.ticked, protected=protected)
        view = {
            self.tab.table: report.block_table(scores, session.kind, est, ticked=session.ticked, protected=protected),
            self.tab.summary: summary,
            self.tab.choose_plot: blocks_fig,
            self.tab.disagree_md: disagreement.markdown(),
            self.tab.disagree_table: disagreement.table,
            self.tab.rank_plot: plots.rank_figure(scores, session.kind, est, ticked=session.ticked),
            self.calibrate.explainer: report.explain_scores(scores, session.kind, est, protect=session.entrodrop_protection(),
                                                  stage_boundary=session.stage_boundary, count=session.count),
            self.calibrate.blocks_plot: blocks_fig,
            # step 2's view follows the choice, so its plot and explainer describe the same blocks
            self.calibrate.view_kind: session.kind,
            self.calibrate.view_est: gr.update(choices=list(scores.estimators), value=est),
        }
        session.view_kind, session.view_est = session.kind, est
        if with_ticks:
            view[self.tab.ticks] = gr.update(choices=choices, value=sorted(session.ticked))
        return view

    def _auto_select(self, session: Session, criterion, kind, count, estimator, protect, boundary) -> dict:
        scores = need_scores(session)
        session.criterion, session.kind, session.protect = criterion, kind, protect
        session.estimator = resolve_estimator(scores, estimator)
        session.stage_boundary = parse_boundary(boundary, scores.num_layers)
        session.count = int(count or 0)
        plan = select_blocks(scores, criterion, kind, count=session.count, estimator=session.estimator,
                             protect=session.protection(), stage_boundary=session.stage_boundary)
        session.auto_plan = plan
        session.ticked = {b.layer for b in plan.blocks}
        return self._choose_view(session)

    @user_errors
    def select(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """Automatic selection: tick the blocks the criterion would drop."""
        view = self._auto_select(session, criterion, kind, count, estimator, protect, boundary)
        view[self.tab.sel_est] = gr.update(choices=list(session.scores.estimators), value=session.estimator)
        return view

    @user_errors
    def choose_after_calibration(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """After a calibration (finished or stopped): fill step 3 with the automatic selection."""
        scores = session.scores
        if scores is None:
            return {}
        estimator = resolve_estimator(scores, estimator)
        session.protect, session.criterion, session.estimator = protect, criterion, estimator
        try:
            session.stage_boundary = parse_boundary(boundary, scores.num_layers)
        except gr.Error:  # a boundary typed for another model: use the detected one
            session.stage_boundary = None
        eligible = scores.num_layers - len(session.protected())
        count = min(int(count or 0), max(eligible, 0))
        view = self._auto_select(session, criterion, kind, count, estimator, protect, session.stage_boundary)
        view[self.tab.count] = gr.update(maximum=scores.num_layers, value=count)
        view[self.tab.sel_est] = gr.update(choices=list(scores.estimators), value=estimator)
        return view

    @user_errors
    def set_ticks(self, session: Session, ticks):
        """The user ticked or unticked blocks: update the plan summary, table and plots."""
        scores = need_scores(session)
        session.ticked = {int(t) for t in (ticks or [])}
        plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)  # drops everything -> error
        view = self._choose_view(session, with_ticks=False)
        return view[self.tab.table], view[self.tab.summary], view[self.tab.choose_plot], view[self.tab.rank_plot], view[self.calibrate.blocks_plot]


def create_event_handlers(session: gr.State, choose_tab: ChooseTab, calibrate_tab, calibrating) -> None:
    """Wire step 3; ``calibrating`` (step 2's calibration event) is followed by the automatic choice."""
    tab = choose_tab
    handlers = ChooseHandlers(choose_tab, calibrate_tab)
    light = {"concurrency_limit": None}
    calibrating.then(handlers.choose_after_calibration, [session, *handlers.inputs()], handlers.outputs(),
                     api_visibility="private", show_progress="hidden", **light)
    selecting = tab.auto_btn.click(handlers.select, [session, *handlers.inputs()], handlers.outputs(),
                                   api_name="select", show_progress_on=[tab.summary], **light)
    keep_errors(selecting, session, tab.summary)  # status area: the error stays until the next action
    for trigger in (tab.criterion.input, tab.kind.input, tab.count.release, tab.sel_est.input,
                    tab.protect.input, tab.boundary.submit, tab.boundary.blur):
        trigger(handlers.select, [session, *handlers.inputs()], handlers.outputs(), api_visibility="private",
                show_progress_on=[tab.summary], **light)
    tab.ticks.input(handlers.set_ticks, [session, tab.ticks],
                    [tab.table, tab.summary, tab.choose_plot, tab.rank_plot, calibrate_tab.blocks_plot],
                    api_name="set_ticks", show_progress_on=[tab.summary], **light)
