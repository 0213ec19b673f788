"""Step 2, calibrate: choose the text (and see what it holds before starting), stream the entropy and
per-block curves after every batch with the time left, stop keeping what was measured; the curve
without massive-activation tokens is shown for teaching, the all-token one a toggle away, with a
token-norm panel that shows the sink. Each finished calibration is kept for the compare and claims
panels (:mod:`.compare`)."""

from __future__ import annotations

import time

import gradio as gr

from .. import plots, report
from ..arch import BLOCK_KINDS, kind_label
from ..calibrate import EstimatorSettings
from ..compare import trend_curve
from ..criteria import resolve_estimator
from ..data import BUNDLED_DATASETS, load_corpus, window_capacity
from ..estimators import ENTROPY_ESTIMATORS
from ..workflow import start_calibration
from . import compare
from .access import UploadGate
from .limits import check_calibration, check_text, whole_number
from .sources import data_source_args
from .state import (
    MODEL_CACHE,
    Session,
    error,
    keep_errors,
    model_events,
    model_job,
    sharing_note,
    user_errors,
    waiting_for_model,
)

MAX_BINS = 1000  # bucket histograms cost hidden size x bins per stream: far more adds nothing but memory
SEQ_STEP, SEQ_MIN = 32, 32  # the window-length slider's step and minimum: offered lengths are on it
HISTORY_AT = (1, 2, 4, 8, 16)  # batches whose running means stay drawn, faintly, while calibration runs
CURVES = [("without massive-activation tokens (teaching)", "sink-free"), ("all tokens (the method's scores)",
                                                                          "all-token")]


class CalibrateTab:
    """Step 2's components; the per-block view (``view_kind``, ``view_est``, ``blocks_plot``,
    ``explainer``) is also written by step 3, which keeps it on the blocks being chosen."""

    source: gr.Radio
    upload: gr.File
    hub_name: gr.Textbox
    column: gr.Textbox
    text: gr.Textbox
    samples: gr.Slider
    seq_len: gr.Slider
    fit_info: gr.Markdown
    fit_btn: gr.Button
    estimators: gr.CheckboxGroup
    bins: gr.Number
    knn_k: gr.Number
    seed: gr.Number
    start_btn: gr.Button
    stop_btn: gr.Button
    calib_status: gr.Markdown
    curve: gr.Radio
    entropy_plot: gr.Plot
    norms_plot: gr.Plot
    view_kind: gr.Radio
    view_est: gr.Dropdown
    blocks_plot: gr.Plot
    explainer: gr.Markdown
    teach: compare.CompareTab


def create_ui() -> CalibrateTab:
    """Lay out step 2 inside the current tab."""
    tab = CalibrateTab()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.source = gr.Radio(
               [(f"{name} (bundled)", name) for name in BUNDLED_DATASETS]
               + [("upload a file", "file"), ("Hub data set", "hub"), ("paste text", "text")],
               value="gsm8k", label="Calibration text", elem_id="data-source")
            tab.upload = gr.File(label="Text file (.txt, .jsonl, .csv, .parquet)", visible=False,
                                 file_types=[".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet"],
                                 elem_id="data-upload")
            tab.hub_name = gr.Textbox("", label="Hub data set (NAME or NAME:CONFIG)", visible=False,
                                      placeholder="wikitext:wikitext-2-raw-v1", elem_id="data-hub")
            tab.column = gr.Textbox("", label="Text column (tables and hub sets; blank: 'text')", visible=False,
                                    elem_id="data-column")
            tab.text = gr.Textbox("", label="Pasted text (blank lines separate documents)", lines=6, visible=False,
                                  elem_id="data-text")
            tab.samples = gr.Slider(1, 256, value=32, step=1, label="Samples (windows)", elem_id="calib-samples")
            tab.seq_len = gr.Slider(32, 2048, value=256, step=32, label="Tokens per window",
                                    elem_id="calib-seqlen")
            tab.fit_info = gr.Markdown("", elem_id="text-fit")
            tab.fit_btn = gr.Button("Use the length that fits", visible=False, size="sm", elem_id="fit-btn")
            tab.estimators = gr.CheckboxGroup(list(ENTROPY_ESTIMATORS), value=["bucket", "knn"],
                                              label="Entropy estimators", elem_id="calib-estimators")
            with gr.Accordion("Advanced", open=False):
                tab.bins = gr.Number(20, precision=0, minimum=2, label="bucket: bins per dimension")
                tab.knn_k = gr.Number(25, precision=0, minimum=1, label="knn: neighbour rank k")
                tab.seed = gr.Number(0, precision=0, label="seed (which windows)")
            with gr.Row():
                tab.start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                tab.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
            tab.calib_status = gr.Markdown("", elem_id="calib-status")
        with gr.Column(scale=3):
            tab.curve = gr.Radio(CURVES, value="sink-free", label="Entropy curve", elem_id="curve-kind")
            tab.entropy_plot = gr.Plot(plots.empty_figure(), label="Entropy per layer", elem_id="entropy-plot")
            tab.norms_plot = gr.Plot(plots.empty_figure("Token norms per layer appear after the first batch."),
                                     label="Token norms per layer (where the sink appears)", elem_id="norms-plot")
            with gr.Row():
                tab.view_kind = gr.Radio([(kind_label(k), k) for k in BLOCK_KINDS],
                                         value="attn", label="Blocks", elem_id="view-kind")
                tab.view_est = gr.Dropdown(["bucket", "knn"], value="bucket", label="Estimator for ΔH",
                                           elem_id="view-estimator")
            tab.blocks_plot = gr.Plot(plots.empty_figure(), label="Per block", elem_id="blocks-plot")
            tab.teach = compare.create_ui()
        with gr.Column(scale=2, min_width=280):
            tab.explainer = gr.Markdown(report.explain_scores(None), elem_id="explainer")

    return tab


def calibration_data(source: str, *, upload=None, hub_name=None, column=None, text=None,
                     uploads: UploadGate | None = None) -> dict:
    """``load_corpus`` arguments for the data a visitor chose, checked as untrusted: a hub name is only
    ever a hub name (``hub_only``), a file only one this server's upload route received (``uploads``; none
    given: no file is), pasted text bounded."""
    data = data_source_args(source, upload=upload, hub_name=hub_name, column=column, text=text)
    if source == "hub":
        data["hub_only"] = True
    elif source == "file":
        data["source"] = (uploads or UploadGate()).check(data["source"])
    elif source == "text":
        check_text(text)
    return data


def show_source(choice: str):
    """Show the inputs the chosen text source needs (file, hub name, column, pasted text)."""
    return (gr.update(visible=choice == "file"), gr.update(visible=choice == "hub"),
            gr.update(visible=choice in ("file", "hub")), gr.update(visible=choice == "text"))


def _history(snapshots: list, curve: str) -> dict:
    """{estimator: [(batches, running-mean curve), ...]} of the kept snapshots, for the faint lines."""
    which = "auto" if curve == "sink-free" else "all-token"
    return {est: [(snap.batches_done, trend_curve(snap, est, which)[0]) for snap in snapshots]
            for est in (snapshots[-1].estimators if snapshots else ())}


def _time_left(done: int, total: int, elapsed: float) -> str:
    if done >= total or done == 0:
        return ""
    left = elapsed / done * (total - done)
    return f" · about {left:.0f} s left" if left < 120 else f" · about {left / 60:.1f} min left"


def _fit_text(cap, samples: int, seq_len: int) -> tuple[str, int | None]:
    """What the text holds at ``seq_len``, in words, and the length to offer when it does not fit."""
    head = (f"At {seq_len} tokens per window this text holds **{cap.calibration_windows}** calibration "
            f"window(s) ({cap.calibration_tokens:,} tokens; calibration and selection read them), "
            f"**{cap.development_windows}** development window(s) ({cap.development_tokens:,} tokens; the trade-off "
            f"sweep scores on them) and **{cap.report_windows}** report window(s) ({cap.report_tokens:,} tokens; "
            "step 4 checks on them, and nothing is chosen on them).")
    try:
        cap.check(samples, step=SEQ_STEP, minimum=SEQ_MIN)
    except ValueError as exc:
        return f"⚠ {head} {str(exc).split(': ', 1)[1]}", cap.fitting_seq_len(samples, step=SEQ_STEP, minimum=SEQ_MIN)
    return f"✓ {head}", None


class CalibrateHandlers:
    """Calibration, Stop and the per-block view; a calibration also sets step 4's window length."""

    def __init__(self, calibrate_tab: CalibrateTab, check_tab, uploads: UploadGate | None = None):
        self.tab, self.check = calibrate_tab, check_tab
        self.uploads = uploads or UploadGate()  # none given: no file is an upload

    def _curves(self, session: Session, view_kind: str, view_est: str | None, history: list | None = None) -> dict:
        scores = session.scores
        est = resolve_estimator(scores, view_est)
        same_kind = view_kind == session.kind
        ticked = session.ticked if same_kind else ()
        return {
            self.tab.entropy_plot: plots.entropy_figure(scores, curve=session.curve,
                                                        history=_history(history or [], session.curve)),
            self.tab.norms_plot: plots.norms_figure(scores),
            self.tab.blocks_plot: plots.blocks_figure(scores, view_kind, est, ticked=ticked,
                                                      protected=session.protected() if same_kind else None,
                                                      criterion=session.criterion if ticked else None),
            self.tab.explainer: report.explain_scores(scores, view_kind, est, protect=session.entrodrop_protection(),
                                                      stage_boundary=session.stage_boundary,
                                                      count=session.count or None),
        }

    @user_errors
    def fit(self, session: Session, source, upload, hub_name, column, text, samples, seq_len):
        """Before calibrating: how many windows of the chosen length the chosen text holds (calibration and
        development and report parts), and the length that fits when it does not. Reads the text, never the model."""
        hidden = gr.update(visible=False)
        try:
            samples = whole_number(samples, "Samples (windows)")
            seq_len = whole_number(seq_len, "Tokens per window", minimum=2)
        except ValueError as exc:
            return f"⚠ {exc}", hidden
        if source == "hub":
            return "A hub data set is read, and its windows counted, when you press Start.", hidden
        if not session.model_spec:
            return "", hidden
        key = MODEL_CACHE.make_key(session.model_spec, session.dtype, session.device)
        if key not in MODEL_CACHE:  # never load a model just to count tokens
            return "", hidden
        try:
            data = calibration_data(source, upload=upload, hub_name=hub_name, column=column, text=text,
                                    uploads=self.uploads)
            cap = window_capacity(MODEL_CACHE.get_or_load(session.model_spec, dtype=session.dtype,
                                                          device=session.device).tokenizer,
                                  load_corpus(**data), seq_len)
        except ValueError as exc:
            return f"⚠ {exc}", hidden
        message, fit = _fit_text(cap, samples, seq_len)
        return message, (gr.update(visible=True, value=f"Use {fit} tokens per window") if fit else hidden)

    @user_errors
    def use_fit(self, session: Session, source, upload, hub_name, column, text, samples, seq_len):
        """Set the window length to the one the text fits (recomputed here, never taken from the client)."""
        message, button = self.fit(session, source, upload, hub_name, column, text, samples, seq_len)
        label = button.get("value") if isinstance(button, dict) else None
        if not label:
            return gr.skip(), message, button
        fit = int(label.split()[1])
        message, button = self.fit(session, source, upload, hub_name, column, text, samples, fit)
        return fit, message, button

    @user_errors
    def calibrate(self, session: Session, source, upload, hub_name, column, text, samples, seq_len, estimators,
                  bins, knn_k, seed, view_kind, view_est):
        """Stream calibration: new curves after every batch; Stop keeps what was measured."""
        session.stop_requested = False
        samples = whole_number(samples, "Samples (windows)")
        seq_len = whole_number(seq_len, "Tokens per window", minimum=2)
        check_calibration(samples, seq_len)  # before any text is read
        data = calibration_data(source, upload=upload, hub_name=hub_name, column=column, text=text,
                                uploads=self.uploads)
        if not estimators:
            raise error("Tick at least one entropy estimator (bucket, knn or renyi).")
        unknown = [e for e in estimators if e not in ENTROPY_ESTIMATORS]
        if unknown:
            raise error(f"Unknown entropy estimator {unknown[0]!r}; choose from {', '.join(ENTROPY_ESTIMATORS)}.")
        bins = whole_number(bins if bins not in (None, "") else 20, "bucket: bins per dimension", minimum=2)
        if bins > MAX_BINS:
            raise error(f"bucket: bins per dimension must be at most {MAX_BINS}, got {bins}.")
        knn_k = whole_number(knn_k if knn_k not in (None, "") else 25, "knn: neighbour rank k")
        seed = whole_number(seed if seed not in (None, "") else 0, "seed", minimum=0)
        settings = EstimatorSettings(estimators=tuple(estimators), bins=bins, k=knn_k)
        for note in waiting_for_model(session):  # shared loading state: Start waits for the launch model
            yield {self.tab.calib_status: note}
        yield {self.tab.calib_status: "▶ Reading the calibration text…"}
        with model_job(session) as (loaded, job):
            def prepare():
                # never fewer windows than asked, and always a disjoint report part for step 4
                window_capacity(loaded.tokenizer, load_corpus(**data), seq_len).check(
                    samples, step=SEQ_STEP, minimum=min(SEQ_MIN, seq_len))
                return start_calibration(loaded, data, samples=samples, seq_len=seq_len, seed=seed,
                                         settings=settings, costs=True)

            # the text is read and the per-block costs measured in a turn of the model's own, where no
            # preview can be active
            run = job.call(prepare)
            events, costs = job.steps(run.events), run.costs
            session.view_kind = view_kind
            session.view_est = resolve_estimator(settings.estimators, view_est)
            yield {self.tab.calib_status: f"▶ Calibrating on {len(run.windows)} windows of {seq_len} tokens from "
                                          f"{run.data_name}{sharing_note(job)}…",
                   self.tab.view_est: gr.update(choices=list(settings.estimators), value=session.view_est),
                   self.check.check_seq: gr.update(value=seq_len)}
            started = time.monotonic()
            stopped = False
            history: list = []  # running-mean snapshots at HISTORY_AT batches, drawn faintly
            try:
                for event in events:
                    if event.done == 1:  # the settings worked: the previous results give way
                        session.reset_results()
                        session.data, session.costs = data, costs
                        session.estimator = settings.estimators[0]
                    session.scores = event.scores
                    elapsed = time.monotonic() - started
                    status = (f"▶ Batch {event.done}/{event.total} · {event.tokens_seen:,} tokens · "
                              f"{elapsed:.1f} s{_time_left(event.done, event.total, elapsed)}{sharing_note(job)}. "
                              f"The curves are running means over the batches so far; dotted grey lines are "
                              f"earlier means.")
                    # the view radio may change while this runs: draw what the session shows now
                    yield {self.tab.calib_status: status,
                           **self._curves(session, session.view_kind, session.view_est, history)}
                    if event.done in HISTORY_AT:
                        history = [*history, event.scores][-3:]
                    if session.stop_requested:
                        stopped = not event.finished
                        break
            finally:
                events.close()  # removes the hooks even if the client went away mid-run
        scores = session.scores
        elapsed = time.monotonic() - started
        if stopped:
            done = (f"■ Stopped after {scores.batches_done} of {scores.batches_total} batches "
                    f"({elapsed:.1f} s). The partial results below are usable; next: step 3, Choose.")
        else:
            done = (f"✓ Done: {scores.batches_done} batches, {scores.calibration.get('tokens', 0):,} tokens in "
                    f"{elapsed:.1f} s. Next: step 3, Choose.")
        kept = compare.keep_calibration(session, scores) if scores is not None else gr.skip()
        yield {self.tab.calib_status: done, self.tab.teach.kept: kept,
               **self._curves(session, session.view_kind, session.view_est)}

    @staticmethod
    def stop(session: Session):
        session.stop_requested = True
        return "■ Stopping after the current batch…"

    @user_errors
    def redraw(self, session: Session, view_kind: str, view_est: str):
        session.view_kind, session.view_est = view_kind, view_est
        if session.scores is None:
            return gr.skip(), gr.skip()
        curves = self._curves(session, view_kind, view_est)
        return curves[self.tab.blocks_plot], curves[self.tab.explainer]

    @user_errors
    def redraw_entropy(self, session: Session, curve: str):
        """The entropy chart with the chosen curve (sink-free or all tokens)."""
        if curve not in dict((v, k) for k, v in CURVES):
            raise error(f"Unknown curve {curve!r}; choose sink-free or all-token.")
        session.curve = curve
        if session.scores is None:
            return gr.skip()
        return plots.entropy_figure(session.scores, curve=curve)


def create_event_handlers(session: gr.State, calibrate_tab: CalibrateTab, check_tab, uploads: UploadGate):
    """Wire step 2 (``uploads``: which files count as this page's uploads); returns the calibration event,
    which step 3 follows with its automatic choice."""
    tab = calibrate_tab
    handlers = CalibrateHandlers(calibrate_tab, check_tab, uploads)
    light = {"concurrency_limit": None}
    tab.source.change(show_source, [tab.source], [tab.upload, tab.hub_name, tab.column, tab.text],
                      api_visibility="private", **light)
    text_inputs = [session, tab.source, tab.upload, tab.hub_name, tab.column, tab.text, tab.samples, tab.seq_len]
    for trigger in (tab.source.change, tab.upload.change, tab.text.blur, tab.column.blur, tab.samples.release,
                    tab.seq_len.release):
        trigger(handlers.fit, text_inputs, [tab.fit_info, tab.fit_btn], api_visibility="private", **light)
    tab.fit_btn.click(handlers.use_fit, text_inputs, [tab.seq_len, tab.fit_info, tab.fit_btn], api_name="fit_text",
                      **light)
    calibrating = tab.start_btn.click(
        handlers.calibrate,
        [session, tab.source, tab.upload, tab.hub_name, tab.column, tab.text, tab.samples, tab.seq_len,
         tab.estimators, tab.bins, tab.knn_k, tab.seed, tab.view_kind, tab.view_est],
        [tab.calib_status, tab.entropy_plot, tab.norms_plot, tab.blocks_plot, tab.explainer, tab.view_est,
         check_tab.check_seq, tab.teach.kept],
        api_name="calibrate", show_progress_on=[tab.calib_status], **model_events())
    keep_errors(calibrating, session, tab.calib_status)  # status area: the error stays until the next action
    tab.stop_btn.click(handlers.stop, [session], [tab.calib_status], api_name="stop", **light)
    for trigger in (tab.view_kind.input, tab.view_est.input):
        trigger(handlers.redraw, [session, tab.view_kind, tab.view_est], [tab.blocks_plot, tab.explainer],
                api_visibility="private", **light)
    tab.curve.input(handlers.redraw_entropy, [session, tab.curve], [tab.entropy_plot], api_name="show_curve", **light)
    compare.create_event_handlers(session, tab.teach, tab.view_est)
    return calibrating
