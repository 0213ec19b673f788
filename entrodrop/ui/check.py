"""Step 4, check: dense vs pruned on held-out windows (perplexity, KL, top-1, latency) and side-by-side
generations. The pruned model is a reversible preview of the shared model, never a copy."""

from __future__ import annotations

import dataclasses

import gradio as gr
import pandas as pd

from ..checks import checks_frame, iter_checks
from ..progress import run_to_end
from .limits import check_check, check_generation, check_text, whole_number
from .state import Session, error, model_events, model_job, plan_to_run, sharing_note, user_errors

_STAGE_WORDS = {"compare": "Quality: window", "speed": "Timing: round"}  # status line per stage of iter_checks


class CheckTab:
    """Step 4's components."""

    check_windows: gr.Slider
    check_seq: gr.Slider
    check_speed: gr.Checkbox
    prefill: gr.Slider
    decode: gr.Slider
    check_btn: gr.Button
    check_status: gr.Markdown
    check_table: gr.Dataframe
    prompt: gr.Textbox
    max_new: gr.Slider
    gen_btn: gr.Button
    gen_dense: gr.Textbox
    gen_pruned: gr.Textbox


def create_ui() -> CheckTab:
    """Lay out step 4 inside the current tab."""
    tab = CheckTab()
    gr.Markdown("Dense vs pruned on the **held-out** part of the calibration text (never scored on). The pruned "
                "model is a reversible preview: the dropped blocks are skipped in the shared model for the "
                "duration of the check, then restored; nothing is copied or changed.")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            tab.check_windows = gr.Slider(1, 64, value=8, step=1, label="Held-out windows",
                                          elem_id="check-windows")
            tab.check_seq = gr.Slider(16, 2048, value=256, step=16, label="Tokens per window",
                                      elem_id="check-seqlen")
            tab.check_speed = gr.Checkbox(True, label="Measure latency", elem_id="check-speed")
            tab.prefill = gr.Slider(16, 2048, value=256, step=16, label="Prefill tokens", elem_id="check-prefill")
            tab.decode = gr.Slider(1, 128, value=16, step=1, label="Decode tokens", elem_id="check-decode")
            tab.check_btn = gr.Button("Run check", variant="primary", elem_id="check-btn")
        with gr.Column(scale=2):
            tab.check_status = gr.Markdown("", elem_id="check-status")
            tab.check_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="check-table")
    with gr.Row():
        tab.prompt = gr.Textbox("What is 12 + 30? Explain briefly.", lines=2, label="Prompt", scale=3,
                                elem_id="prompt")
        tab.max_new = gr.Slider(4, 256, value=40, step=1, label="New tokens", scale=1, elem_id="max-new")
        tab.gen_btn = gr.Button("Generate with both", elem_id="generate-btn", scale=1)
    with gr.Row():
        tab.gen_dense = gr.Textbox(label="Dense model", lines=6, interactive=False, elem_id="gen-dense")
        tab.gen_pruned = gr.Textbox(label="Pruned model", lines=6, interactive=False, elem_id="gen-pruned")

    return tab


class CheckHandlers:
    """The quality/latency check and the generations; both run in the model group."""

    def __init__(self, check_tab: CheckTab):
        self.tab = check_tab

    @user_errors
    def run_check(self, session: Session, n_windows, seq_len, measure_speed, prefill, decode):
        """Dense vs pruned on held-out windows, then latency; the shared model is only previewed."""
        n_windows = whole_number(n_windows, "Held-out windows")
        seq_len = whole_number(seq_len, "Tokens per window", minimum=2)
        measure_speed = bool(measure_speed)
        prefill = whole_number(prefill, "Prefill tokens") if measure_speed else 0
        decode = whole_number(decode, "Decode tokens") if measure_speed else 0
        check_check(n_windows, seq_len, prefill=prefill, decode=decode)
        plan = plan_to_run(session)
        if session.data is None:
            raise error("No calibration text known: run a calibration in step 2 first.")
        yield {self.tab.check_status: "▶ Reading the held-out text…", self.tab.check_table: pd.DataFrame()}
        with model_job(session) as (loaded, job):
            result = None
            for event in job.steps(iter_checks(loaded.model, plan, loaded.tokenizer, data=session.data,
                                               eval_samples=n_windows, seq_len=seq_len, speed=bool(measure_speed),
                                               prefill_tokens=prefill, decode_tokens=decode, repeats=2, warmup=1)):
                result = event.partial
                if event.stage in _STAGE_WORDS:
                    yield {self.tab.check_status: f"▶ {_STAGE_WORDS[event.stage]} {event.done}/{event.total}"
                                                  f"{sharing_note(job)}",
                           self.tab.check_table: checks_frame(result)}
        # the generations of the generate button are kept with the new measurements
        session.checks = dataclasses.replace(result, generations=session.checks.generations)
        timed = result.speed is not None
        yield {self.tab.check_status: f"✓ Checked {plan.describe()} on {result.quality.num_windows} held-out windows"
                                  f"{' and timed it' if timed else ''}. The dense model is unchanged.",
               self.tab.check_table: checks_frame(result)}

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
        row = generations[0]
        pruned = row.pruned + ("\n\n(identical to the dense model)" if row.same else "")
        return row.dense, pruned


def create_event_handlers(session: gr.State, check_tab: CheckTab) -> None:
    """Wire step 4."""
    tab = check_tab
    handlers = CheckHandlers(check_tab)
    model = model_events()
    tab.check_btn.click(handlers.run_check, [session, tab.check_windows, tab.check_seq, tab.check_speed, tab.prefill,
                                             tab.decode], [tab.check_status, tab.check_table],
                        api_name="run_check", show_progress_on=[tab.check_status], **model)
    tab.gen_btn.click(handlers.generate, [session, tab.prompt, tab.max_new], [tab.gen_dense, tab.gen_pruned],
                      api_name="generate", show_progress_on=[tab.gen_pruned], **model)
