"""Step 5, heal: win back what the ticked plan costs, on a copy of the model, with a live loss curve; then
the check of the healed model beside the check of the plan as dropped, in step 4's history.

The heal reads calibration windows only (:mod:`entrodrop.heal`); the checks read the report part. It is
a model job: every step takes its turn on the shared model, which it only reads (the teacher), so other
visitors are served between steps; the healed copy is this session's own (:mod:`.healed`). Stop ends
the heal after its current step and keeps the best state so far."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from .. import plots
from ..checks import iter_checks, load_windows, plan_key
from ..heal import LORA_LOSSES, LORA_TARGETS, HealProgress, HealResult, HealSettings, heal_record, iter_heal
from ..progress import time_left
from .export import plan_note as export_plan_note
from .healed import HEALED
from .limits import check_check, check_heal, limit, whole_number
from .state import (
    Session,
    error,
    keep_errors,
    model_events,
    model_job,
    need_scores,
    plan_to_run,
    sharing_note,
    user_errors,
    waiting_for_model,
)

METHODS = [("LoRA distillation (minutes; trains adapters on the kept blocks, merged afterwards)", "lora"),
           ("linear map (training-free: one least-squares fit per removed span, folded into the kept weights; "
            "it can make text unlike the calibration text worse)", "linear")]
VAL_WINDOWS = 4  # calibration windows after the training ones: the validation slice
CHECK_WINDOWS = 8  # report windows of the before/after check
DEFAULTS = HealSettings()  # the library's defaults (benchmarked) are the page's


class HealTab:
    """Step 5's components."""

    page: gr.Tab  # the step's tab (set by the app): selecting it refreshes plan_note
    plan_note: gr.Markdown
    method: gr.Radio
    steps: gr.Slider
    minutes: gr.Number
    rank: gr.Dropdown
    lr: gr.Number
    targets: gr.Radio
    loss: gr.Radio
    windows: gr.Slider
    start_btn: gr.Button
    stop_btn: gr.Button
    status: gr.Markdown
    curve: gr.Plot
    result: gr.Markdown
    table: gr.Dataframe


def create_ui() -> HealTab:
    """Lay out step 5 inside the current tab."""
    tab = HealTab()
    gr.Markdown("Win back what dropping the ticked blocks costs. The heal works on a **copy** of the model (the "
                "shared model is only read) and reads only **calibration** windows; the check that follows reads "
                "the report part, which no choice and no heal has seen.")
    tab.plan_note = gr.Markdown("", elem_id="heal-plan")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.method = gr.Radio(METHODS, value="lora", label="Method", elem_id="heal-method")
            most_steps, most_rank = limit("ENTRODROP_MAX_HEAL_STEPS"), limit("ENTRODROP_MAX_HEAL_RANK")
            tab.steps = gr.Slider(1, most_steps, value=min(DEFAULTS.steps, most_steps), step=1, label="Steps (LoRA)",
                                  elem_id="heal-steps")
            tab.minutes = gr.Number(min(DEFAULTS.max_seconds / 60, limit("ENTRODROP_MAX_HEAL_MINUTES")), minimum=0.1,
                                    label="At most minutes",
                                    elem_id="heal-minutes")
            ranks = [r for r in (4, 8, 16, 32, 64) if r <= most_rank] or [most_rank]
            tab.rank = gr.Dropdown(ranks, value=DEFAULTS.rank if DEFAULTS.rank in ranks else ranks[-1], label="LoRA rank",
                                   elem_id="heal-rank")
            with gr.Accordion("Advanced", open=False):
                tab.lr = gr.Number(DEFAULTS.lr, label="learning rate", elem_id="heal-lr")
                tab.targets = gr.Radio(list(LORA_TARGETS), value="all", label="adapters on", elem_id="heal-targets")
                tab.loss = gr.Radio(list(LORA_LOSSES), value="kl", label="loss", elem_id="heal-loss")
                tab.windows = gr.Slider(4, 64, value=DEFAULTS.train_windows, step=1, label="calibration windows taught on",
                                        elem_id="heal-windows")
            with gr.Row():
                tab.start_btn = gr.Button("Heal", variant="primary", elem_id="heal-btn")
                tab.stop_btn = gr.Button("Stop", variant="stop", elem_id="heal-stop-btn")
            tab.status = gr.Markdown("", elem_id="heal-status")
        with gr.Column(scale=2):
            tab.curve = gr.Plot(plots.empty_figure("The loss curve appears when the heal starts."), elem_id="heal-curve",
                                show_label=False)
            tab.result = gr.Markdown("", elem_id="heal-result")
            tab.table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="heal-table")
    return tab


def plan_note(session: Session) -> str:
    """What Heal will work on: the ticked plan, and a healed model already kept for it."""
    try:
        plan = plan_to_run(session)
    except gr.Error as exc:
        return f"*{exc.message}*"
    kept = HEALED.get(session.healed_key)
    note = f"**To heal:** {plan.describe()} ({plan.criterion})."
    if kept is not None and kept[0] == plan_key(plan):
        note += f" A healed model of these blocks is kept: {kept[1].summary()}. Step 6 can export it."
    return note


def comparison_frame(before, after) -> pd.DataFrame:
    """Dense, dropped and healed, measure by measure (quality on the same report windows)."""
    rows = [("perplexity", f"{before.dense_perplexity:.4g}", f"{before.pruned_perplexity:.4g}",
             f"{after.pruned_perplexity:.4g}"),
            ("KL(dense ‖ model), nats/token", "0", f"{before.kl_mean:.3g}", f"{after.kl_mean:.3g}"),
            ("top-1 agreement with dense", "100%", f"{100 * before.top1_agreement:.1f}%",
             f"{100 * after.top1_agreement:.1f}%")]
    return pd.DataFrame(rows, columns=["measure", "dense", "dropped", "healed"])


class HealHandlers:
    """The heal, its stop, and the before/after check that follows it."""

    def __init__(self, tab: HealTab, check_tab, history_updates, export_note: gr.Markdown):
        self.tab, self.check, self.history_updates = tab, check_tab, history_updates
        self.export_note = export_note  # step 6's note on what it will write, told of the healed model

    def _settings(self, method, steps, minutes, rank, lr, targets, loss, windows) -> HealSettings:
        if method not in ("lora", "linear"):
            raise error("Choose the heal method: lora or linear.")
        steps = whole_number(steps, "Steps")
        rank = whole_number(rank, "LoRA rank")
        windows = whole_number(windows, "Calibration windows taught on", minimum=2)
        try:
            minutes, lr = float(minutes), float(lr)
        except (TypeError, ValueError):
            raise error("Minutes and the learning rate must be numbers.") from None
        if not minutes > 0:
            raise error("At most minutes must be above 0.")
        settings = HealSettings(method=method, steps=steps, max_seconds=minutes * 60, rank=rank, lr=lr,
                                targets=targets if targets in LORA_TARGETS else "",
                                loss=loss if loss in LORA_LOSSES else "", train_windows=windows,
                                val_windows=VAL_WINDOWS)
        settings.check()
        return settings

    @user_errors
    def heal(self, session: Session, method, steps, minutes, rank, lr, targets, loss, windows, prompt=None):
        """Heal the ticked plan on a copy of the model, streaming the loss curve; then check the dropped and
        the healed model on the same report windows and keep both checks in step 4's history."""
        settings = self._settings(method, steps, minutes, rank, lr, targets, loss, windows)
        scores = need_scores(session)
        plan = plan_to_run(session)
        if session.data is None:
            raise error("No calibration text known: run a calibration in step 2 first.")
        seq_len = int(scores.calibration.get("seq_len", 0))
        seed = int(scores.calibration.get("seed", 0) or 0)
        check_heal(settings.steps if method == "lora" else 1, settings.max_seconds / 60, settings.rank,
                   settings.train_windows, seq_len)
        check_check(CHECK_WINDOWS, seq_len)
        session.stop_requested = False
        for note in waiting_for_model(session):
            yield {self.tab.status: note}
        started = time.monotonic()
        result = None
        with model_job(session) as (loaded, job):
            windows_, described = job.call(load_windows, loaded.tokenizer, session.data,
                                           num_samples=settings.train_windows + settings.val_windows, seq_len=seq_len,
                                           seed=seed, part="calibration", config=loaded.model.config)
            yield {self.tab.status: f"▶ Healing {plan.describe()} with {method} on {windows_.shape[0]} calibration "
                                    f"windows{sharing_note(job)}…", self.tab.result: "", self.tab.table: pd.DataFrame()}
            events = job.steps(iter_heal(loaded.model, plan, windows_, settings,
                                         should_stop=lambda: session.stop_requested, data=described))
            try:
                for event in events:
                    if isinstance(event.partial, HealResult):
                        result = event.partial
                    elif isinstance(event.partial, HealProgress):
                        yield self._progress(event, event.partial, started, job)
            finally:
                events.close()
            yield {self.tab.status: f"▶ {result.summary()}. Checking the dropped and the healed model on "
                                    f"{CHECK_WINDOWS} report windows…",
                   self.tab.curve: plots.heal_figure(result.history, method=method, best_step=result.best_step)}
            prompts = [prompt] if isinstance(prompt, str) and prompt.strip() else []
            pruned = result.pruned()
            checks = {}
            for name, other in (("dropped", None), ("healed", pruned)):
                checks[name] = job.call(_run_checks, loaded, plan, session.data, seq_len, seed, prompts, other)
            del pruned
        before, after = checks["dropped"], checks["healed"]
        record = heal_record(result, before.quality, after.quality,
                             checked_on=f"{CHECK_WINDOWS} windows of the report part of {session.data['source']}")
        session.healed_key = HEALED.put(plan_key(plan), result, {**record, "checks": after.to_dict()},
                                        replacing=session.healed_key)
        label = f"{method}, {result.steps_done} step(s)" if method == "lora" else "linear"
        first = session.add_check(plan, before)
        second = session.add_check(plan, after, healed=label)
        won = record.get("recovered")
        summary = (f"**{result.summary()}.**" + "".join(f"\n\n- Note: {n}." for n in result.notes)
                   + (f"\n\nOn the report windows: **{100 * won:.0f}% ± {100 * record['recovered_error']:.0f}% of the "
                      "lost nats won back** (paired over the windows); checks "
                      f"#{first.number} (dropped) and #{second.number} (healed) are side by side in step 4."
                      if won is not None and won == won else ""))
        history = self.history_updates(self.check, session)
        history[self.check.compare_a] = gr.update(choices=history[self.check.compare_a]["choices"],
                                                  value=str(first.number))
        history[self.check.compare_table] = _side_by_side(session, first.number, second.number)
        yield {self.tab.status: f"✓ Healed in {time.monotonic() - started:.0f} s. Step 6 exports the healed model.",
               self.tab.result: summary, self.tab.table: comparison_frame(before.quality, after.quality),
               self.tab.plan_note: plan_note(session), self.export_note: export_plan_note(session), **history}

    def _progress(self, event, progress: HealProgress, started: float, job) -> dict:
        elapsed = time.monotonic() - started
        left = (f"about {progress.seconds_left:.0f} s left" if progress.seconds_left is not None
                else time_left(elapsed, event.fraction))
        loss = f" · loss {progress.train_loss:.4f}" if progress.train_loss is not None else ""
        val = f" · validation KL {progress.val_kl:.4f} (best {progress.best_val_kl:.4f} at step {progress.best_step})" \
            if progress.val_kl is not None else ""
        updates = {self.tab.status: f"▶ {progress.method} step {progress.step}/{progress.steps}{loss}{val} · "
                                    f"{elapsed:.0f} s{' · ' + left if left else ''}{sharing_note(job)}. Stop keeps "
                                    "the best state so far."}
        if progress.history:
            updates[self.tab.curve] = plots.heal_figure(progress.history, method=progress.method,
                                                        best_step=progress.best_step)
        return updates

    @staticmethod
    def stop(session: Session):
        session.stop_requested = True
        return "■ Stopping after the current step (the best state so far is kept)…"


def _run_checks(loaded, plan, data, seq_len, seed, prompts, pruned_model):
    from ..progress import run_to_end

    return run_to_end(iter_checks(loaded.model, plan, loaded.tokenizer, data=data, eval_samples=CHECK_WINDOWS,
                                  seq_len=seq_len, seed=seed, prompts=prompts, max_new_tokens=32 if prompts else 0,
                                  pruned_model=pruned_model))


def _side_by_side(session: Session, a: int, b: int):
    from .check import compare_frame

    return compare_frame(session, a, b)


def create_event_handlers(session: gr.State, tab: HealTab, check_tab, history_updates,
                          export_note: gr.Markdown) -> None:
    """Wire step 5; ``history_updates`` (step 4's) redraws the check history the heal adds to, and
    ``export_note`` (step 6's plan note) learns of the healed model as soon as the heal ends."""
    handlers = HealHandlers(tab, check_tab, history_updates, export_note)
    outputs = [tab.status, tab.curve, tab.result, tab.table, tab.plan_note, check_tab.history_table,
               check_tab.history_plot, check_tab.compare_a, check_tab.compare_b, check_tab.compare_table, export_note]
    healing = tab.start_btn.click(
        handlers.heal, [session, tab.method, tab.steps, tab.minutes, tab.rank, tab.lr, tab.targets, tab.loss,
                        tab.windows, check_tab.prompt], outputs, api_name="heal", show_progress_on=[tab.status],
        **model_events())
    keep_errors(healing, session, tab.status)
    tab.stop_btn.click(handlers.stop, [session], [tab.status], api_name="stop_heal", concurrency_limit=None)
    if getattr(tab, "page", None) is not None:
        tab.page.select(plan_note, [session], [tab.plan_note], api_visibility="private", concurrency_limit=None)
