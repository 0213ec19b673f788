"""Step 4, check: dense vs pruned on report windows (perplexity, KL, top-1, latency) and side-by-side
generations. The pruned model is a reversible preview of the shared model, never a copy.

Every finished check ends with a verdict (:func:`entrodrop.checks.verdict`, thresholds shown) and stays
in the session's history (table, plot, two picked side by side); a failed check leaves it as it was."""

from __future__ import annotations

import dataclasses
import time
from html import escape

import gradio as gr
import pandas as pd

from .. import plots
from ..checks import Verdict, checks_frame, history_frame, iter_checks, plan_key, side_by_side_frame
from ..progress import run_to_end, time_left
from .limits import check_check, check_generation, check_text, whole_number
from .state import (
    Session,
    error,
    keep_errors,
    model_events,
    model_job,
    plan_to_run,
    sharing_note,
    user_errors,
    waiting_for_model,
)

# status line per stage of iter_checks
_STAGE_WORDS = {"compare": "Quality: window", "speed": "Timing: round", "generate": "Generating: prompt"}


class CheckTab:
    """Step 4's components."""

    check_windows: gr.Slider
    check_seq: gr.Slider
    check_speed: gr.Checkbox
    prefill: gr.Slider
    decode: gr.Slider
    check_btn: gr.Button
    check_status: gr.Markdown
    verdict: gr.Markdown
    check_table: gr.Dataframe
    history_table: gr.Dataframe
    history_plot: gr.Plot
    compare_a: gr.Dropdown
    compare_b: gr.Dropdown
    compare_table: gr.Dataframe
    prompt: gr.Textbox
    max_new: gr.Slider
    gen_btn: gr.Button
    gen_dense: gr.Textbox
    gen_pruned: gr.Textbox


def create_ui() -> CheckTab:
    """Lay out step 4 inside the current tab."""
    tab = CheckTab()
    gr.Markdown("Dense vs pruned on the **report** part of the calibration text: no calibration, selection or "
                "trade-off sweep reads it, so what it shows was not tuned on. The pruned "
                "model is a reversible preview: the dropped blocks are skipped in the shared model for the "
                "duration of the check, then restored; nothing is copied or changed.")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            tab.check_windows = gr.Slider(1, 64, value=8, step=1, label="Report windows",
                                          elem_id="check-windows")
            tab.check_seq = gr.Slider(16, 2048, value=256, step=16, label="Tokens per window",
                                      elem_id="check-seqlen")
            tab.check_speed = gr.Checkbox(True, label="Measure latency", elem_id="check-speed")
            tab.prefill = gr.Slider(16, 2048, value=256, step=16, label="Prefill tokens", elem_id="check-prefill")
            tab.decode = gr.Slider(1, 128, value=16, step=1, label="Decode tokens", elem_id="check-decode")
            tab.check_btn = gr.Button("Run check", variant="primary", elem_id="check-btn")
        with gr.Column(scale=2):
            tab.check_status = gr.Markdown("", elem_id="check-status")
            tab.verdict = gr.Markdown("", elem_id="check-verdict")
            tab.check_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="check-table")
    gr.Markdown("**Checks so far** — every check of this session stays here (a failed one changes nothing); "
                "pick two to compare them measure by measure, generations included.")
    with gr.Row():
        with gr.Column(scale=3):
            tab.history_table = gr.Dataframe(history_frame([]), interactive=False, elem_id="check-history",
                                             wrap=True)
        with gr.Column(scale=2, min_width=260):
            tab.history_plot = gr.Plot(plots.check_history_figure([]), elem_id="check-history-plot",
                                       show_label=False)
    with gr.Row():
        tab.compare_a = gr.Dropdown([], value=None, label="Compare check", elem_id="check-compare-a")
        tab.compare_b = gr.Dropdown([], value=None, label="with check", elem_id="check-compare-b")
    tab.compare_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="check-compare", wrap=True)
    gr.Markdown("**Generate** — the check generates from this prompt too; the button below re-runs only the "
                "generation.")
    with gr.Row():
        tab.prompt = gr.Textbox("What is 12 + 30? Explain briefly.", lines=2, label="Prompt", scale=3,
                                elem_id="prompt")
        tab.max_new = gr.Slider(4, 256, value=40, step=1, label="New tokens", scale=1, elem_id="max-new")
        tab.gen_btn = gr.Button("Generate with both", elem_id="generate-btn", scale=1)
    with gr.Row():
        tab.gen_dense = gr.Textbox(label="Dense model", lines=6, interactive=False, elem_id="gen-dense")
        tab.gen_pruned = gr.Textbox(label="Pruned model", lines=6, interactive=False, elem_id="gen-pruned")

    return tab


def verdict_markdown(verdict: Verdict | None, number: int | None = None) -> str:
    """The verdict, coloured by level, with the thresholds it applied."""
    if verdict is None:
        return ""
    head = f"Check #{number}: " if number else ""
    return (f'<div class="verdict verdict-{verdict.level}"><b>{escape(head)}{escape(verdict.text)}</b><br>'
            f'<small>Thresholds — {escape(verdict.thresholds)}.</small></div>')


def history_updates(tab: CheckTab, session: Session) -> dict:
    """The history table, plot and the two pickers (the last two checks picked), and their comparison."""
    records = session.history
    choices = [(r.title(), str(r.number)) for r in records]
    a = str(records[-2].number) if len(records) > 1 else None
    b = str(records[-1].number) if records else None
    return {tab.history_table: history_frame(records), tab.history_plot: plots.check_history_figure(records),
            tab.compare_a: gr.update(choices=choices, value=a), tab.compare_b: gr.update(choices=choices, value=b),
            tab.compare_table: compare_frame(session, a, b)}


def compare_frame(session: Session, a, b) -> pd.DataFrame:
    """Checks ``a`` and ``b`` (numbers; anything else picks nothing) side by side."""
    by_number = {r.number: r for r in session.history}
    try:
        first, second = by_number.get(int(a)), by_number.get(int(b))
    except (TypeError, ValueError):
        return pd.DataFrame()
    if first is None or second is None:
        return pd.DataFrame()
    return side_by_side_frame(first, second)


class CheckHandlers:
    """The quality/latency check and the generations; both run in the model group."""

    def __init__(self, check_tab: CheckTab):
        self.tab = check_tab

    @user_errors
    def run_check(self, session: Session, n_windows, seq_len, measure_speed, prefill, decode, prompt=None,
                  max_new=None):
        """Dense vs pruned on report windows, then latency and a generation from ``prompt``; the shared
        model is only previewed. Ends with a verdict and a new row in the session's history."""
        n_windows = whole_number(n_windows, "Report windows")
        seq_len = whole_number(seq_len, "Tokens per window", minimum=2)
        measure_speed = bool(measure_speed)
        prefill = whole_number(prefill, "Prefill tokens") if measure_speed else 0
        decode = whole_number(decode, "Decode tokens") if measure_speed else 0
        check_check(n_windows, seq_len, prefill=prefill, decode=decode)
        prompts: list[str] = []
        if isinstance(prompt, str) and prompt.strip():
            check_text(prompt)
            max_new = whole_number(max_new if max_new not in (None, "") else 40, "New tokens")
            check_generation(max_new)
            prompts = [prompt]
        plan = plan_to_run(session)
        if session.data is None:
            raise error("No calibration text known: run a calibration in step 2 first.")
        for note in waiting_for_model(session):
            yield {self.tab.check_status: note}
        yield {self.tab.check_status: "▶ Reading the report part of the text…", self.tab.verdict: ""}
        with model_job(session) as (loaded, job):
            result = None
            stage, stage_started = None, time.monotonic()
            for event in job.steps(iter_checks(loaded.model, plan, loaded.tokenizer, data=session.data,
                                               eval_samples=n_windows, seq_len=seq_len, speed=bool(measure_speed),
                                               prefill_tokens=prefill, decode_tokens=decode, repeats=2, warmup=1,
                                               prompts=prompts, max_new_tokens=max_new or 0)):
                result = event.partial
                if event.stage != stage:
                    stage, stage_started = event.stage, time.monotonic()
                if event.stage in _STAGE_WORDS:
                    left = time_left(time.monotonic() - stage_started, event.fraction)
                    yield {self.tab.check_status: f"▶ {_STAGE_WORDS[event.stage]} {event.done}/{event.total}"
                                                  f"{' · ' + left if left else ''}{sharing_note(job)}",
                           self.tab.check_table: checks_frame(result)}
        session.checks = result
        record = session.add_check(plan, result)
        timed = result.speed is not None
        updates = {self.tab.check_status: f"✓ Check #{record.number}: {plan.describe()} on "
                                          f"{result.quality.num_windows} windows of the report part"
                                          f"{' and timed it' if timed else ''}. The dense model is unchanged.",
                   self.tab.verdict: verdict_markdown(record.verdict, record.number),
                   self.tab.check_table: checks_frame(result)}
        if result.generations:
            row = result.generations[0]
            updates[self.tab.gen_dense] = row.dense
            updates[self.tab.gen_pruned] = row.pruned + ("\n\n(identical to the dense model)" if row.same else "")
        yield {**updates, **history_updates(self.tab, session)}

    @user_errors
    def generate(self, session: Session, prompt: str, max_new: int):
        """Greedy generations from the dense model and the previewed pruned model."""
        max_new = whole_number(max_new, "New tokens")
        check_generation(max_new)
        plan = plan_to_run(session)
        if not isinstance(prompt, str) or not prompt.strip():
            raise error("The prompt is empty: type a prompt.")
        check_text(prompt)
        with model_job(session) as (loaded, job):
            generations = run_to_end(job.steps(iter_checks(loaded.model, plan, loaded.tokenizer, prompts=[prompt],
                                                           max_new_tokens=max_new))).generations
        session.checks.generations = generations
        last = session.history[-1] if session.history else None
        if last is not None and last.key == plan_key(plan):  # the latest check of this plan shows them too
            last.result = dataclasses.replace(last.result, generations=generations)
        row = generations[0]
        pruned = row.pruned + ("\n\n(identical to the dense model)" if row.same else "")
        return row.dense, pruned


def create_event_handlers(session: gr.State, check_tab: CheckTab) -> None:
    """Wire step 4."""
    tab = check_tab
    handlers = CheckHandlers(check_tab)
    model = model_events()
    checking = tab.check_btn.click(
        handlers.run_check,
        [session, tab.check_windows, tab.check_seq, tab.check_speed, tab.prefill, tab.decode, tab.prompt, tab.max_new],
        [tab.check_status, tab.verdict, tab.check_table, tab.gen_dense, tab.gen_pruned, tab.history_table,
         tab.history_plot, tab.compare_a, tab.compare_b, tab.compare_table],
        api_name="run_check", show_progress_on=[tab.check_status], **model)
    keep_errors(checking, session, tab.check_status)
    generating = tab.gen_btn.click(handlers.generate, [session, tab.prompt, tab.max_new],
                                   [tab.gen_dense, tab.gen_pruned], api_name="generate",
                                   show_progress_on=[tab.gen_pruned], **model)
    keep_errors(generating, session, tab.check_status)
    tab.compare_a.input(compare_frame, [session, tab.compare_a, tab.compare_b], [tab.compare_table],
                        api_name="compare_checks", concurrency_limit=None)
    tab.compare_b.input(compare_frame, [session, tab.compare_a, tab.compare_b], [tab.compare_table],
                        api_visibility="private", concurrency_limit=None)
