"""Step 3, choose: the automatic selection of a criterion, ticks the user may change, and the views
that explain them (block table, plan summary, where the criteria disagree). Step 2's per-block view
follows the choice, so both describe the same blocks.

The default criterion, ``recommended`` (ours), measures the model: it runs as a model job (turns on the
shared model, progress in the summary, Stop keeps the blocks chosen so far). Criteria that read the
scores alone answer at once."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from .. import plots, report
from ..arch import BLOCK_KINDS, kind_label
from ..checks import load_windows
from ..costs import summarize_plan
from ..criteria import DEFAULT_CRITERION, criterion_estimator, get_criterion, model_criteria, ranked_criteria
from ..search import SELECTION_WINDOWS, iter_select
from ..select import plan_from_ticks, select_blocks
from . import tradeoff
from .state import (
    Session,
    error,
    keep_errors,
    model_events,
    model_job,
    need_scores,
    sharing_note,
    user_errors,
    verdict_for,
)

DEFAULT_ESTIMATOR = "default"  # the estimator dropdown's "the criterion's own" (knn for entrodrop)
_STAGE_WORDS = {"ablation": "dropping each block alone", "recommend": "greedy search",
                "compare": "comparing the greedy plan with every criterion's plan"}


class ChooseTab:
    """Step 3's components."""

    criterion: gr.Radio
    kind: gr.Radio
    count: gr.Slider
    sel_est: gr.Dropdown
    protect: gr.Dropdown
    boundary: gr.Textbox
    auto_btn: gr.Button
    stop_btn: gr.Button
    ticks: gr.CheckboxGroup
    summary: gr.Markdown
    choose_plot: gr.Plot
    table: gr.Dataframe
    disagree_md: gr.Markdown
    disagree_table: gr.Dataframe
    rank_plot: gr.Plot
    tradeoff: tradeoff.TradeoffTab


def create_ui() -> ChooseTab:
    """Lay out step 3 inside the current tab."""
    tab = ChooseTab()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.criterion = gr.Radio(
               [(get_criterion(name).label, name) for name in (*model_criteria(), *ranked_criteria())],
               value=DEFAULT_CRITERION, label="Criterion", elem_id="criterion",
               info="recommended and ablation (ours) measure the model on calibration windows; the others "
                    "read the calibration scores")
            tab.kind = gr.Radio([(kind_label(k), k) for k in BLOCK_KINDS], value="attn",
                                label="Granularity", elem_id="granularity")
            tab.count = gr.Slider(0, 64, value=8, step=1, label="Blocks to drop", elem_id="drop-count")
            tab.sel_est = gr.Dropdown([("criterion's own (knn for entrodrop)", DEFAULT_ESTIMATOR), "bucket", "knn"],
                                      value=DEFAULT_ESTIMATOR, label="Entropy estimator", elem_id="sel-estimator")
            tab.protect = gr.Dropdown(
               [("criterion's default", "default"), ("stage: compression stage + last layer", "stage"),
                ("released code: layers 0, 1, L-1", "released"), ("none", "none")],
               value="default", label="Protection", elem_id="protection")
            tab.boundary = gr.Textbox("", label="Stage boundary X_b (blank: the detected one)",
                                      placeholder="detected", elem_id="stage-boundary")
            with gr.Row():
                tab.auto_btn = gr.Button("Automatic selection", variant="primary", elem_id="auto-btn")
                tab.stop_btn = gr.Button("Stop the search", variant="stop", elem_id="choose-stop-btn")
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
    tab.tradeoff = tradeoff.create_ui()

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
            verdict = verdict_for(session, plan)
            if verdict is not None:  # these blocks were checked in step 4: say what the check found
                mark = "⚠ **Damaged**" if verdict.damaged else "Checked"
                summary = f"{mark} in step 4: {verdict.text} ({verdict.thresholds}).\n\n" + summary
        except ValueError as exc:
            summary = f"⚠ {exc}"
        if protected:
            summary += f"\n\n**Protected** under '{session.protection()}': {report.describe_protection(protected)}."
        if not scores.complete:
            summary += (f"\n\n*Scores from a stopped calibration ({scores.batches_done} of {scores.batches_total} "
                        "batches).*")
        auto = session.auto_plan
        measured = ({auto.criterion: [b.layer for b in auto.blocks]}
                    if auto is not None and get_criterion(auto.criterion).needs_model else None)
        disagreement = report.criteria_disagreement(scores, session.kind, min(session.count, L), est, measured)
        criterion = session.auto_plan.criterion if session.auto_plan is not None else None
        blocks_fig = plots.blocks_figure(scores, session.kind, est, ticked=session.ticked, protected=protected,
                                         criterion=criterion)
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

    def _settings(self, session: Session, criterion, kind, count, estimator, protect, boundary) -> None:
        """Store a selection's settings in the session; refuse what cannot be chosen before any work."""
        scores = need_scores(session)
        record = get_criterion(criterion)  # an unknown name from an API client is refused here
        record.check_kind(kind)
        if kind not in BLOCK_KINDS:
            raise error(f"Unknown granularity {kind!r}; choose one of {', '.join(BLOCK_KINDS)}.")
        session.criterion, session.kind, session.protect = criterion, kind, protect
        chosen = None if estimator in (None, "", DEFAULT_ESTIMATOR) else estimator
        # the estimator the plots and the entropy ranking use: the named one, else the criterion's own
        session.estimator = criterion_estimator(criterion if record.uses_estimator else "entrodrop", scores, chosen)
        session.stage_boundary = parse_boundary(boundary, scores.num_layers)
        try:
            session.count = int(count or 0)
        except (TypeError, ValueError):
            raise error(f"Blocks to drop must be a whole number, got {count!r}.") from None
        if session.count < 0:
            raise error(f"Blocks to drop must be 0 or more, got {session.count}.")

    def _adopt(self, session: Session, plan) -> None:
        session.auto_plan = plan
        session.ticked = {b.layer for b in plan.blocks}

    def _auto_select(self, session: Session):
        """Generator of views: the criterion's plan (at once, or step by step while it measures)."""
        scores = session.scores
        record = get_criterion(session.criterion)
        if not record.needs_model:
            self._adopt(session, select_blocks(scores, session.criterion, session.kind, count=session.count,
                                               estimator=session.estimator, protect=session.protection(),
                                               stage_boundary=session.stage_boundary))
            yield self._choose_view(session)
            return
        if session.data is None:
            raise error("The measured criteria read calibration text: run a calibration in step 2 first.")
        seq_len = int(scores.calibration.get("seq_len", 0))
        seed = int(scores.calibration.get("seed", 0) or 0)
        session.stop_requested = False
        started = time.monotonic()
        with model_job(session) as (loaded, job):
            windows, _ = job.call(load_windows, loaded.tokenizer, session.data, num_samples=SELECTION_WINDOWS,
                                  seq_len=seq_len, seed=seed, part="calibration", config=loaded.model.config)
            events = job.steps(iter_select(loaded.model, scores, windows, criterion=session.criterion,
                                           kind=session.kind, count=session.count, estimator=session.estimator,
                                           protect=session.protection()))
            try:
                for event in events:
                    if event.partial is not None:  # a block was chosen: show the plan so far
                        self._adopt(session, event.partial)
                        view = self._choose_view(session)
                    else:
                        view = {}
                    if session.stop_requested:
                        break
                    elapsed = time.monotonic() - started
                    note = (f"⏳ **Measuring {record.name}**: {_STAGE_WORDS.get(event.stage, event.stage)} "
                            f"{event.done}/{event.total} loss evaluations on up to {windows.shape[0]} calibration "
                            f"windows · {elapsed:.0f} s{sharing_note(job)}. Stop keeps the blocks chosen so far.")
                    if session.auto_plan is not None and view:
                        view[self.tab.summary] = note + "\n\n" + view[self.tab.summary]
                    else:
                        view[self.tab.summary] = note
                    yield view
            finally:
                events.close()
        if session.auto_plan is None or session.auto_plan.criterion != session.criterion:
            raise error("The search was stopped before it chose a block; start it again to measure.")
        view = self._choose_view(session)
        if session.stop_requested and not session.auto_plan.meta.get("complete", True):
            view[self.tab.summary] = (f"⏹ Stopped: kept the {len(session.auto_plan.blocks)} blocks chosen so far "
                                      f"(of {session.count}).\n\n" + view[self.tab.summary])
        yield view

    @user_errors
    def select(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """Automatic selection: tick the blocks the criterion would drop (measuring the model for ours)."""
        self._settings(session, criterion, kind, count, estimator, protect, boundary)
        session.auto_plan = None
        for view in self._auto_select(session):
            view[self.tab.sel_est] = gr.update(choices=self._estimator_choices(session), value=estimator or DEFAULT_ESTIMATOR)
            yield view

    @user_errors
    def choose_after_calibration(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """After a calibration (finished or stopped): fill step 3 with the automatic selection."""
        scores = session.scores
        if scores is None:
            return
        try:
            parse_boundary(boundary, scores.num_layers)
        except gr.Error:  # a boundary typed for another model: use the detected one
            boundary = ""
        session.criterion, session.protect = criterion, protect
        eligible = scores.num_layers - len(session.protected())
        count = min(int(count or 0), max(eligible, 0))
        self._settings(session, criterion, kind, count, estimator, protect, boundary)
        session.auto_plan = None
        for view in self._auto_select(session):
            view[self.tab.count] = gr.update(maximum=scores.num_layers, value=count)
            view[self.tab.sel_est] = gr.update(choices=self._estimator_choices(session), value=estimator or DEFAULT_ESTIMATOR)
            yield view

    @staticmethod
    def _estimator_choices(session: Session) -> list:
        return [("criterion's own (knn for entrodrop)", DEFAULT_ESTIMATOR), *session.scores.estimators]

    @staticmethod
    def stop(session: Session) -> str:
        """Ask a running search to stop after the loss evaluation in progress."""
        session.stop_requested = True
        return "⏹ Stopping after the current measurement…"

    @user_errors
    def set_ticks(self, session: Session, ticks):
        """The user ticked or unticked blocks: update the plan summary, table and plots."""
        scores = need_scores(session)
        try:
            ticked = {int(t) for t in (ticks or [])}
        except (TypeError, ValueError):
            raise error("Ticks must be layer numbers.") from None
        session.ticked = ticked
        plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)  # drops everything -> error
        view = self._choose_view(session, with_ticks=False)
        return view[self.tab.table], view[self.tab.summary], view[self.tab.choose_plot], view[self.tab.rank_plot], view[self.calibrate.blocks_plot]


def create_event_handlers(session: gr.State, choose_tab: ChooseTab, calibrate_tab, calibrating) -> None:
    """Wire step 3; ``calibrating`` (step 2's calibration event) is followed by the automatic choice."""
    tab = choose_tab
    handlers = ChooseHandlers(choose_tab, calibrate_tab)
    light = {"concurrency_limit": None}
    # a selection may measure the model (the default criterion does), so it queues as a model job
    model = {**model_events(), "trigger_mode": "always_last"}
    calibrating.then(handlers.choose_after_calibration, [session, *handlers.inputs()], handlers.outputs(),
                     api_visibility="private", show_progress="hidden", **model)
    selecting = tab.auto_btn.click(handlers.select, [session, *handlers.inputs()], handlers.outputs(),
                                   api_name="select", show_progress_on=[tab.summary], **model)
    keep_errors(selecting, session, tab.summary)  # status area: the error stays until the next action
    for trigger in (tab.criterion.input, tab.kind.input, tab.count.release, tab.sel_est.input,
                    tab.protect.input, tab.boundary.submit, tab.boundary.blur):
        trigger(handlers.select, [session, *handlers.inputs()], handlers.outputs(), api_visibility="private",
                show_progress_on=[tab.summary], **model)
    tab.stop_btn.click(handlers.stop, [session], [tab.summary], api_name="stop_search", **light)
    # each event carries the whole tick list, so only the latest matters: quick clicks never finish out of order
    tab.ticks.input(handlers.set_ticks, [session, tab.ticks],
                    [tab.table, tab.summary, tab.choose_plot, tab.rank_plot, calibrate_tab.blocks_plot],
                    api_name="set_ticks", show_progress_on=[tab.summary], trigger_mode="always_last", **light)
    tradeoff.create_event_handlers(session, tab.tradeoff, handlers)
