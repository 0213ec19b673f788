"""Step 3's trade-off panel: one sweep of every criterion at every count, drawn as perplexity against the
expected speed-up (or the parameters removed); picking a point ticks that plan in step 3.

A visitor picks a plan by these numbers, so they are measured on the **development** part of the text
(:mod:`entrodrop.split`): step 4's check then scores the picked plan on the report part, which the pick
never saw. The measured criteria choose on the calibration part, as everywhere.

The sweep runs the model (development-part checks, and the measured criteria pick on calibration windows), so
it is a model job that takes turns on the shared model; Stop in step 3 ends it."""

from __future__ import annotations

import time

import gradio as gr

from .. import plots
from ..checks import load_windows
from ..criteria import get_criterion, model_criteria, ranked_criteria
from ..plan import DropPlan
from ..search import SELECTION_WINDOWS, windows_read_bound
from ..verify import SweepRow, iter_sweep, tradeoff_points
from .limits import Budget, whole_number
from .state import Session, error, model_events, model_job, need_scores, sharing_note, user_errors

DEFAULT_CRITERIA = ("recommended", "entrodrop", "cosine", "angular")
SWEEP_PART = "development"  # what the sweep scores: never the report part the check reads
DEFAULT_COUNTS = "0,2,4,6,8"
X_AXES = {"expected speed-up": "expected_speedup", "share of parameters removed": "params_removed_share"}


class TradeoffTab:
    """The trade-off panel's components."""

    criteria: gr.CheckboxGroup
    counts: gr.Textbox
    windows: gr.Slider
    x_axis: gr.Radio
    run_btn: gr.Button
    status: gr.Markdown
    plot: gr.Plot
    point: gr.Dropdown
    use_btn: gr.Button


def create_ui() -> TradeoffTab:
    """Lay out the panel (inside step 3, below the choice)."""
    tab = TradeoffTab()
    with gr.Accordion("Trade-off: every criterion at every count, measured on the development part", open=False):
        with gr.Row():
            tab.criteria = gr.CheckboxGroup(
                [(get_criterion(n).label, n) for n in (*model_criteria(), *ranked_criteria())],
                value=list(DEFAULT_CRITERIA), label="Criteria", elem_id="tradeoff-criteria")
            with gr.Column(min_width=220):
                tab.counts = gr.Textbox(DEFAULT_COUNTS, label="Blocks to drop (comma-separated)",
                                        elem_id="tradeoff-counts")
                tab.windows = gr.Slider(1, 16, value=4, step=1, label="Development windows per plan",
                                        elem_id="tradeoff-windows")
                tab.x_axis = gr.Radio(list(X_AXES), value="expected speed-up", label="Savings axis",
                                      elem_id="tradeoff-x")
                tab.run_btn = gr.Button("Run the sweep", variant="primary", elem_id="tradeoff-run")
        tab.status = gr.Markdown("*One sweep scores every criterion at every count on the **development** part of "
                                 "the calibration text (granularity and protection as set above), never on the "
                                 "report part step 4 checks on, so the check of a picked point stays an honest test.*",
                                 elem_id="tradeoff-status")
        tab.plot = gr.Plot(plots.empty_figure("Run the sweep to draw the trade-off."), elem_id="tradeoff-plot")
        with gr.Row():
            tab.point = gr.Dropdown([], label="Pick a point", elem_id="tradeoff-point", scale=3)
            tab.use_btn = gr.Button("Tick this plan in step 3", elem_id="tradeoff-use", scale=1)
    return tab


def parse_counts(text: str, num_layers: int) -> list[int]:
    """The counts field: whole numbers from 0 to L-1, refused otherwise."""
    try:
        counts = sorted({int(c) for c in str(text or "").split(",") if c.strip()})
    except ValueError:
        raise error(f"Blocks to drop takes comma-separated whole numbers such as {DEFAULT_COUNTS}.") from None
    if not counts or counts[0] < 0 or counts[-1] >= num_layers:
        raise error(f"Blocks to drop must be whole numbers from 0 to {num_layers - 1}, e.g. {DEFAULT_COUNTS}.")
    return counts


def _point_label(point: dict) -> str:
    return (f"{point['criterion']}, {point['count']} blocks: perplexity {point['pruned_perplexity']:.4g}, "
            f"×{point['expected_speedup']:.2f} expected")


class TradeoffHandlers:
    """Run the sweep, redraw on a new axis, and hand a picked plan to step 3."""

    def __init__(self, tab: TradeoffTab, choose_handlers):
        self.tab, self.choose = tab, choose_handlers

    def _figure(self, session: Session, x_axis: str, picked: str | None = None):
        points = session.tradeoff
        highlight = None
        if picked and "|" in picked:
            name, count = picked.rsplit("|", 1)
            highlight = (name, int(count))
        dense = points[0]["dense_perplexity"] if points else None
        return plots.tradeoff_figure(points, x=X_AXES.get(x_axis, "expected_speedup"), dense_perplexity=dense,
                                     highlight=highlight)

    @user_errors
    def run(self, session: Session, criteria, counts, windows, x_axis):
        """Sweep the chosen criteria and counts; the plot fills in when the last plan is scored."""
        scores = need_scores(session)
        if session.data is None or session.costs is None:
            raise error("Run a calibration in step 2 first: the sweep reads its text.")
        criteria = [c for c in (criteria or []) if isinstance(c, str)]
        if not criteria:
            raise error("Tick at least one criterion to sweep.")
        for name in criteria:
            get_criterion(name)
        counts = parse_counts(counts, scores.num_layers)
        windows = whole_number(windows, "Development windows per plan")
        seq_len = int(scores.calibration.get("seq_len", 0))
        seed = int(scores.calibration.get("seed", 0) or 0)
        Budget("ENTRODROP_MAX_SWEEP_TOKENS", len(criteria) * len(counts) * windows * seq_len,
               f"{len(criteria)} criteria x {len(counts)} counts x {windows} windows x {seq_len} tokens").check()
        if "recommended" in criteria:
            searched = sum(windows_read_bound(scores.num_layers, n) for n in counts if n)
            Budget("ENTRODROP_MAX_SEARCH_TOKENS", searched * seq_len,
                   f"recommended at counts {', '.join(str(n) for n in counts if n)}: at most {searched} calibration "
                   f"windows x {seq_len} tokens").check()
        session.stop_requested = False
        started = time.monotonic()
        with model_job(session) as (loaded, job):
            scored, _ = job.call(load_windows, loaded.tokenizer, session.data, num_samples=windows, seq_len=seq_len,
                                 seed=seed, part=SWEEP_PART, config=loaded.model.config)
            measured = any(get_criterion(c).needs_model for c in criteria)
            selection = job.call(load_windows, loaded.tokenizer, session.data, num_samples=SELECTION_WINDOWS,
                                 seq_len=seq_len, seed=seed, part="calibration",
                                 config=loaded.model.config)[0] if measured else None
            events = job.steps(iter_sweep(loaded.model, scores, scored, criteria=criteria, kind=session.kind,
                                          counts=counts, protect=None if session.protect == "default" else session.protect,
                                          selection_windows=selection))
            rows: list[SweepRow] = []
            try:
                for event in events:
                    if session.stop_requested:
                        yield {self.tab.status: "⏹ Stopped: the sweep scores nothing until it finishes; run it again."}
                        return
                    if isinstance(event.partial, list):
                        rows = event.partial
                    yield {self.tab.status: f"⏳ Sweep: {event.stage} {event.done}/{event.total} · "
                                            f"{time.monotonic() - started:.0f} s{sharing_note(job)}"}
            finally:
                events.close()
        session.tradeoff = tradeoff_points(rows, session.costs)
        choices = [(_point_label(p), f"{p['criterion']}|{p['count']}")
                   for p in sorted(session.tradeoff, key=lambda p: (p["count"], p["pruned_perplexity"]))]
        best = min((p for p in session.tradeoff if p["count"]), key=lambda p: p["pruned_perplexity"] /
                   max(p["expected_speedup"], 1e-9), default=None)
        yield {self.tab.status: f"✓ {len(rows)} plans scored on {scored.shape[0]} windows of {seq_len} tokens of the "
                                f"**{SWEEP_PART}** part (dense perplexity {rows[0].dense_perplexity:.4g}) in "
                                f"{time.monotonic() - started:.0f} s; the measured criteria chose on the calibration "
                                "part. Pick a point to tick its blocks; step 4 checks it on the report part, which "
                                "no point was chosen on.",
               self.tab.plot: self._figure(session, x_axis),
               self.tab.point: gr.update(choices=choices, value=f"{best['criterion']}|{best['count']}" if best else None)}

    @user_errors
    def redraw(self, session: Session, x_axis, picked):
        """A new savings axis or a new pick: redraw without measuring."""
        if not session.tradeoff:
            return plots.empty_figure("Run the sweep to draw the trade-off.")
        return self._figure(session, x_axis, picked)

    @user_errors
    def use(self, session: Session, picked):
        """Tick the picked plan in step 3 (its criterion, granularity and count become the choice)."""
        scores = need_scores(session)
        match = [p for p in session.tradeoff if f"{p['criterion']}|{p['count']}" == picked]
        if not match:
            raise error("Pick a point of the sweep first.")
        plan = DropPlan.from_dict(match[0]["plan"])
        if plan.num_layers != scores.num_layers:
            raise error("That sweep was for another calibration: run it again.")
        session.auto_plan = plan
        session.ticked = set(plan.layers_of(session.kind))
        session.count = len(session.ticked)
        view = self.choose._choose_view(session)
        view[self.choose.tab.count] = gr.update(value=session.count)
        return view


def create_event_handlers(session: gr.State, tab: TradeoffTab, choose_handlers) -> None:
    """Wire the panel; picking a plan updates step 3 through ``choose_handlers``' outputs."""
    handlers = TradeoffHandlers(tab, choose_handlers)
    tab.run_btn.click(handlers.run, [session, tab.criteria, tab.counts, tab.windows, tab.x_axis],
                      [tab.status, tab.plot, tab.point], api_name="tradeoff", show_progress_on=[tab.status],
                      **model_events())
    light = {"concurrency_limit": None}
    for trigger in (tab.x_axis.input, tab.point.input):
        trigger(handlers.redraw, [session, tab.x_axis, tab.point], [tab.plot], api_visibility="private", **light)
    outputs = [*choose_handlers.outputs()]
    tab.use_btn.click(handlers.use, [session, tab.point], outputs, api_name="use_tradeoff_point", **light)
