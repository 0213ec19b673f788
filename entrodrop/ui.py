"""EntroDrop Studio, the Gradio web app: layout and thin handlers over the library.

This is the only module that imports gradio. Five steps, one tab each: load a model, calibrate
(curves stream after every batch), choose the blocks to drop, check dense vs pruned, export.

Sharing: the loaded models live in one process-wide :class:`~entrodrop.loading.ModelCache`
(bounded by count and memory); everything a user chooses or computes lives in a per-session
:class:`Session` held by ``gr.State``. Events that run a model (calibrate, check, generate,
export) share the concurrency group ``"model"`` with a limit of one: calibration hooks and the
reversible preview both act on the shared model object, so they must never overlap. Everything
else (plots, selection, tables) runs outside the group, so pages stay responsive while a model
is busy.

Errors: handlers are wrapped by :func:`_user_errors`, which turns the library's ValueError /
OSError / TypeError into ``gr.Error`` with the library's message (it says what to do).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from . import plots, report
from .calibrate import EstimatorSettings, iter_calibration
from .data import BUNDLED_DATASETS, load_corpus, make_windows
from .estimators import ENTROPY_ESTIMATORS
from .evaluate import iter_compare, iter_measure_speed, iter_side_by_side
from .export import ModelSource, TargetNotEmptyError, export_pruned, push_folder_to_hub, zip_export
from .loading import BUNDLED_MODELS, DEFAULT_MODEL, ModelCache, format_bytes, model_facts
from .plan import DropPlan
from .scores import Scores
from .select import DEFAULT_PROTECTION, protected_layers, select_blocks

logger = logging.getLogger(__name__)

MODEL_GROUP = "model"  # concurrency_id of every event that runs a model
LOAD_GROUP = "load"
DEFAULT_DROP_SHARE = 0.25  # the paper drops 8 of 32 attention blocks as its mild setting


def _default_cache() -> ModelCache:
    """Two models at most, and no more than half the machine's RAM (``ENTRODROP_CACHE_MODELS``/``_GB``)."""
    import psutil

    max_models = int(os.environ.get("ENTRODROP_CACHE_MODELS", "2"))
    gb = os.environ.get("ENTRODROP_CACHE_GB")
    max_bytes = int(float(gb) * 2**30) if gb else int(psutil.virtual_memory().total * 0.5)
    return ModelCache(max_models=max_models, max_bytes=max_bytes)


MODEL_CACHE = _default_cache()
_FACTS: dict[tuple, dict] = {}  # cache key -> model_facts, computed once right after loading
_FACTS_LOCK = threading.Lock()
_PRELOAD: dict = {"thread": None, "spec": None, "error": None, "started": None}


# -- per-session state -----------------------------------------------------------------------
@dataclass
class Session:
    """Everything one browser session (or API client) has chosen and computed."""

    model_spec: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    model_name: str = ""
    num_layers: int = 0
    data: dict | None = None  # load_corpus kwargs of the last calibration (the check reads its held-out part)
    scores: Scores | None = None
    costs: report.BlockCosts | None = None
    kind: str = "attn"
    criterion: str = "entrodrop"
    estimator: str | None = None
    protect: str = "default"
    stage_boundary: int | None = None
    count: int = 0
    auto_plan: DropPlan | None = None
    ticked: set[int] = field(default_factory=set)
    checks: dict = field(default_factory=dict)
    export_dir: Path | None = None
    workdir: Path | None = None
    view_kind: str = "attn"  # what step 2's per-block plot shows
    view_est: str | None = None
    stop_requested: bool = False  # set by Stop, read by the running calibration between batches
    # gr.State deep-copies the default Session for every new session, so nothing here may hold a lock

    def reset_results(self) -> None:
        """Forget everything computed for the previous model or calibration."""
        self.scores = self.costs = self.auto_plan = None
        self.ticked = set()
        self.checks = {}
        self.export_dir = None

    def work_path(self) -> Path:
        """This session's private folder for exports and files (removed when the session ends)."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="entrodrop-session-"))
        return self.workdir

    def protection(self) -> str:
        return DEFAULT_PROTECTION[self.criterion] if self.protect == "default" else self.protect

    def entrodrop_protection(self) -> str:
        """The protection the explainer describes for EntroDrop's own rule."""
        return DEFAULT_PROTECTION["entrodrop"] if self.protect == "default" else self.protect

    def protected(self) -> dict[int, str]:
        if self.scores is None:
            return {}
        est = self.estimator or self.scores.estimators[0]
        try:
            return protected_layers(self.scores, self.protection(), estimator=est, stage_boundary=self.stage_boundary)
        except ValueError:
            return {}


def _delete_session(session: Session) -> None:
    if isinstance(session, Session) and session.workdir is not None:
        shutil.rmtree(session.workdir, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------------------
def _error(message: str) -> gr.Error:
    """A message for the user (no server-side traceback: it is not a bug)."""
    return gr.Error(message, print_exception=False)


def _user_errors(fn):
    """Turn the library's ValueError/OSError/TypeError into gr.Error (its message says what to do)."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] ..." -> the message itself
            return _error(exc.strerror + (f" ({exc.filename})" if exc.filename else ""))
        if isinstance(exc, (ValueError, OSError, TypeError, KeyError)):
            return _error(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        logger.exception("Unexpected error in %s", fn.__name__)
        return gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The shared model is unchanged; "
                        "try again or reload the page.")

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise convert(exc) from exc

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise convert(exc) from exc

    return wrapper


def _facts_for(key: tuple, loaded) -> dict:
    with _FACTS_LOCK:
        if key not in _FACTS:
            _FACTS[key] = model_facts(loaded)
        return _FACTS[key]


def _loaded(session: Session):
    if not session.model_spec:
        raise _error("No model loaded yet: load one in step 1.")
    return MODEL_CACHE.get_or_load(session.model_spec, dtype=session.dtype, device=session.device)


def _need_scores(session: Session) -> Scores:
    if session.scores is None:
        raise _error("No calibration yet: run one in step 2 first.")
    return session.scores


def _plan_to_run(session: Session) -> DropPlan:
    """The ticked plan, refusing an empty one (nothing to compare) or one that drops everything."""
    scores = _need_scores(session)
    if not session.ticked:
        raise _error("Nothing is ticked: tick at least one block to drop in step 3, or take the automatic selection.")
    try:
        return report.plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
    except ValueError as exc:
        raise _error(f"{exc} Untick some blocks in step 3.") from exc


def start_preload(spec: str = DEFAULT_MODEL, **kwargs) -> threading.Thread:
    """Load ``spec`` into the shared cache in a background thread (called at launch)."""

    def work():
        try:
            key = MODEL_CACHE.make_key(spec, kwargs.get("dtype", "auto"), kwargs.get("device", "auto"))
            _facts_for(key, MODEL_CACHE.get_or_load(spec, **kwargs))
            logger.info("Preloaded %s", spec)
        except Exception as exc:  # shown on the page; the user can load something else
            logger.warning("Preloading %s failed: %s", spec, exc)
            _PRELOAD["error"] = str(exc)

    thread = threading.Thread(target=work, name="entrodrop-preload", daemon=True)
    _PRELOAD.update(thread=thread, spec=spec, error=None, started=time.monotonic())
    thread.start()
    return thread


def _facts_markdown(facts: dict) -> str:
    rows = [
        ("Model", facts["name"]), ("Architecture", f"{facts['architecture']} ({facts['family']})"),
        ("Layers", facts["num_layers"]), ("Hidden size", facts["hidden_size"]),
        ("Parameters", f"{facts['parameters']:,}"), ("Memory", format_bytes(facts["memory_bytes"])),
        ("dtype / device", f"{facts['dtype']} / {facts['device']}"), ("Source", facts["source"]),
    ]
    return "| property | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _parse_boundary(text, num_layers: int) -> int | None:
    """The stage-boundary field: blank for the detected boundary, else a whole number 0..L."""
    text = str(text if text is not None else "").strip()
    if not text or text.lower() == "detected":
        return None
    try:
        value = int(text.removeprefix("X_"))
    except ValueError:
        value = -1
    if not 0 <= value <= num_layers:
        raise _error(f"The stage boundary must be a whole number from 0 to {num_layers} (the index of X_b); "
                     "leave it blank to use the detected one.")
    return value


def _card_for_display(card: str) -> str:
    """The model card with its YAML front matter shown as code (Markdown would run it into the text)."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            return f"```yaml\n{card[4:end]}\n```\n" + card[end + 5:]
    return card


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def _default_count(num_layers: int) -> int:
    return max(1, round(DEFAULT_DROP_SHARE * num_layers)) if num_layers > 1 else 0


def _device_choices() -> list[str]:
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return choices


INTRO = """# EntroDrop Studio
See inside a language model's blocks and drop the ones it does not need. **EntroDrop** (Yang et al., 2025)
measures how much *entropy* each block adds to the hidden representations and drops the blocks that add least;
compare it here with the cosine and angular baselines on **your** model and data, then check and export the result.
"""


class Studio:
    """The Blocks app. Components are attributes; handlers are methods that read/write a :class:`Session`."""

    def __init__(self, default_model: str = DEFAULT_MODEL):
        self.default_model = default_model
        with gr.Blocks(title="EntroDrop Studio", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
            self.session = gr.State(Session(), delete_callback=_delete_session)
            gr.Markdown(INTRO)
            with gr.Tabs():
                with gr.Tab("1 · Model", id="tab-model"):
                    self._model_tab()
                with gr.Tab("2 · Calibrate", id="tab-calibrate"):
                    self._calibrate_tab()
                with gr.Tab("3 · Choose", id="tab-choose"):
                    self._choose_tab()
                with gr.Tab("4 · Check", id="tab-check"):
                    self._check_tab()
                with gr.Tab("5 · Export", id="tab-export"):
                    self._export_tab()
            self._wire()
            demo.load(self.on_page_load, inputs=[self.session], outputs=self._model_outputs(),
                      api_visibility="private", concurrency_limit=None, show_progress="hidden")
        self.demo = demo

    # -- layout --------------------------------------------------------------------------------
    def _model_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=2):
                self.bundled = gr.Dropdown(
                    [(f"{alias} — {text}", alias) for alias, text in BUNDLED_MODELS.items()],
                    value=self.default_model if self.default_model in BUNDLED_MODELS else None,
                    label="Bundled model", elem_id="model-bundled")
                self.model_spec = gr.Textbox(
                    "", label="…or a Hugging Face Hub id, a local model folder, or a .gguf file",
                    placeholder="HuggingFaceTB/SmolLM2-360M  ·  /path/to/folder  ·  /path/to/model.gguf "
                                "(leave empty to use the bundled model)",
                    elem_id="model-spec")
                with gr.Row():
                    self.dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype",
                                             info="auto: float32 on CPU, bfloat16 on GPU", elem_id="model-dtype")
                    self.device = gr.Dropdown(_device_choices(), value="auto", label="device", elem_id="model-device")
                self.load_btn = gr.Button("Load model", variant="primary", elem_id="load-btn")
                self.model_status = gr.Markdown("", elem_id="model-status")
            with gr.Column(scale=1):
                self.facts = gr.Markdown("*No model loaded yet.*", elem_id="model-facts")

    def _calibrate_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                self.source = gr.Radio(
                    [(f"{name} (bundled)", name) for name in BUNDLED_DATASETS]
                    + [("upload a file", "file"), ("Hub data set", "hub"), ("paste text", "text")],
                    value="gsm8k", label="Calibration text", elem_id="data-source")
                self.upload = gr.File(label="Text file (.txt, .jsonl, .csv, .parquet)", visible=False,
                                      file_types=[".txt", ".md", ".jsonl", ".json", ".csv", ".tsv", ".parquet"],
                                      elem_id="data-upload")
                self.hub_name = gr.Textbox("", label="Hub data set (NAME or NAME:CONFIG)", visible=False,
                                           placeholder="wikitext:wikitext-2-raw-v1", elem_id="data-hub")
                self.column = gr.Textbox("", label="Text column (tables and hub sets; blank: 'text')", visible=False,
                                         elem_id="data-column")
                self.text = gr.Textbox("", label="Pasted text (blank lines separate documents)", lines=6, visible=False,
                                       elem_id="data-text")
                self.samples = gr.Slider(1, 256, value=32, step=1, label="Samples (windows)", elem_id="calib-samples")
                self.seq_len = gr.Slider(32, 2048, value=256, step=32, label="Tokens per window",
                                         elem_id="calib-seqlen")
                self.estimators = gr.CheckboxGroup(list(ENTROPY_ESTIMATORS), value=["bucket", "knn"],
                                                   label="Entropy estimators", elem_id="calib-estimators")
                with gr.Accordion("Advanced", open=False):
                    self.bins = gr.Number(20, precision=0, minimum=2, label="bucket: bins per dimension")
                    self.knn_k = gr.Number(25, precision=0, minimum=1, label="knn: neighbour rank k")
                    self.seed = gr.Number(0, precision=0, label="seed (which windows)")
                with gr.Row():
                    self.start_btn = gr.Button("Start", variant="primary", elem_id="start-btn")
                    self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                self.calib_status = gr.Markdown("", elem_id="calib-status")
            with gr.Column(scale=3):
                self.entropy_plot = gr.Plot(plots.empty_figure(), label="Entropy per layer", elem_id="entropy-plot")
                with gr.Row():
                    self.view_kind = gr.Radio([("attention", "attn"), ("MLP", "mlp"), ("whole layer", "layer")],
                                              value="attn", label="Blocks", elem_id="view-kind")
                    self.view_est = gr.Dropdown(["bucket", "knn"], value="bucket", label="Estimator for ΔH",
                                                elem_id="view-estimator")
                self.blocks_plot = gr.Plot(plots.empty_figure(), label="Per block", elem_id="blocks-plot")
            with gr.Column(scale=2, min_width=280):
                self.explainer = gr.Markdown(report.explain_scores(None), elem_id="explainer")

    def _choose_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                self.criterion = gr.Radio(
                    [("entrodrop (entropy increase)", "entrodrop"), ("cosine importance", "cosine"),
                     ("angular distance", "angular")], value="entrodrop", label="Criterion", elem_id="criterion")
                self.kind = gr.Radio([("attention", "attn"), ("MLP", "mlp"), ("whole layer", "layer")], value="attn",
                                     label="Granularity", elem_id="granularity")
                self.count = gr.Slider(0, 64, value=8, step=1, label="Blocks to drop", elem_id="drop-count")
                self.sel_est = gr.Dropdown(["bucket", "knn"], value="bucket", label="Estimator (entrodrop)",
                                           elem_id="sel-estimator")
                self.protect = gr.Dropdown(
                    [("criterion's default", "default"), ("stage: compression stage + last layer", "stage"),
                     ("released code: layers 0, 1, L-1", "released"), ("none", "none")],
                    value="default", label="Protection", elem_id="protection")
                self.boundary = gr.Textbox("", label="Stage boundary X_b (blank: the detected one)",
                                           placeholder="detected", elem_id="stage-boundary")
                self.auto_btn = gr.Button("Automatic selection", variant="primary", elem_id="auto-btn")
            with gr.Column(scale=3):
                self.ticks = gr.CheckboxGroup([], value=[], label="Blocks to drop (protected ones are marked; you may still tick them)",
                                              elem_id="drop-blocks")
                self.summary = gr.Markdown("*Calibrate first (step 2).*", elem_id="plan-summary")
                self.choose_plot = gr.Plot(plots.empty_figure("Calibrate first (step 2)."), label="Scores and ticks",
                                           elem_id="choose-plot")
        self.table = gr.Dataframe(pd.DataFrame(), label="Blocks: scores and rank per criterion (1 = dropped first)",
                                  interactive=False, elem_id="block-table", max_height=420)
        with gr.Accordion("Where the criteria disagree", open=True):
            with gr.Row():
                with gr.Column():
                    self.disagree_md = gr.Markdown("", elem_id="disagree-md")
                    self.disagree_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="disagree-table")
                self.rank_plot = gr.Plot(plots.empty_figure("Calibrate first (step 2)."), label="Rank against rank",
                                         elem_id="rank-plot")

    def _check_tab(self) -> None:
        gr.Markdown("Dense vs pruned on the **held-out** part of the calibration text (never scored on). The pruned "
                    "model is a reversible preview: the dropped blocks are skipped in the shared model for the "
                    "duration of the check, then restored; nothing is copied or changed.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                self.check_windows = gr.Slider(1, 64, value=8, step=1, label="Held-out windows",
                                               elem_id="check-windows")
                self.check_seq = gr.Slider(16, 2048, value=256, step=16, label="Tokens per window",
                                           elem_id="check-seqlen")
                self.check_speed = gr.Checkbox(True, label="Measure latency", elem_id="check-speed")
                self.prefill = gr.Slider(16, 2048, value=256, step=16, label="Prefill tokens", elem_id="check-prefill")
                self.decode = gr.Slider(1, 128, value=16, step=1, label="Decode tokens", elem_id="check-decode")
                self.check_btn = gr.Button("Run check", variant="primary", elem_id="check-btn")
            with gr.Column(scale=2):
                self.check_status = gr.Markdown("", elem_id="check-status")
                self.check_table = gr.Dataframe(pd.DataFrame(), interactive=False, elem_id="check-table")
        with gr.Row():
            self.prompt = gr.Textbox("What is 12 + 30? Explain briefly.", lines=2, label="Prompt", scale=3,
                                     elem_id="prompt")
            self.max_new = gr.Slider(4, 256, value=40, step=1, label="New tokens", scale=1, elem_id="max-new")
            self.gen_btn = gr.Button("Generate with both", elem_id="generate-btn", scale=1)
        with gr.Row():
            self.gen_dense = gr.Textbox(label="Dense model", lines=6, interactive=False, elem_id="gen-dense")
            self.gen_pruned = gr.Textbox(label="Pruned model", lines=6, interactive=False, elem_id="gen-pruned")

    def _export_tab(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                self.out_dir = gr.Textbox("", label="Export folder", elem_id="export-dir",
                                          placeholder="blank: a new folder in this session's temporary space")
                self.overwrite = gr.Checkbox(False, label="Overwrite a non-empty folder", elem_id="export-overwrite")
                self.export_btn = gr.Button("Export and verify", variant="primary", elem_id="export-btn")
                self.export_status = gr.Markdown("", elem_id="export-status")
                self.download = gr.DownloadButton("Download the pruned model (.zip)", value=None, interactive=False,
                                                  elem_id="download-zip")
                gr.Markdown("**Scores and plots**")
                self.files_btn = gr.Button("Prepare scores (CSV, JSON) and plots (PNG, HTML)", elem_id="files-btn")
                self.score_files = gr.File(label="Files", file_count="multiple", interactive=False,
                                           elem_id="score-files")
                gr.Markdown("**Push to the Hugging Face Hub**")
                self.hub_repo = gr.Textbox("", label="Repository id", placeholder="your-name/model-pruned", elem_id="hub-repo")
                self.hub_token = gr.Textbox("", label="Access token (write)", type="password", elem_id="hub-token")
                self.hub_private = gr.Checkbox(True, label="Private repository", elem_id="hub-private")
                self.push_btn = gr.Button("Push", elem_id="push-btn")
                self.hub_status = gr.Markdown("", elem_id="hub-status")
            with gr.Column(scale=2):
                self.card = gr.Markdown("*The model card appears here after the export.*", elem_id="model-card")

    # -- wiring --------------------------------------------------------------------------------
    def _model_outputs(self) -> list:
        return [self.model_status, self.facts, self.count, self.entropy_plot, self.blocks_plot, self.explainer,
                self.calib_status, self.ticks, self.summary, self.table, self.check_status, self.check_table,
                self.export_status, self.card, self.download]

    def _choose_inputs(self) -> list:
        return [self.criterion, self.kind, self.count, self.sel_est, self.protect, self.boundary]

    def _choose_outputs(self) -> list:
        return [self.count, self.sel_est, self.ticks, self.table, self.summary, self.choose_plot, self.disagree_md,
                self.disagree_table, self.rank_plot, self.blocks_plot, self.explainer, self.view_kind, self.view_est]

    def _wire(self) -> None:
        s = self.session
        model = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
        light = {"concurrency_limit": None}
        self.load_btn.click(self.load_model, [s, self.bundled, self.model_spec, self.dtype, self.device],
                            self._model_outputs(), api_name="load_model", concurrency_id=LOAD_GROUP,
                            concurrency_limit=1, show_progress_on=[self.model_status])
        self.source.change(self.show_source, [self.source], [self.upload, self.hub_name, self.column, self.text],
                           api_visibility="private", **light)
        calibrating = self.start_btn.click(
            self.calibrate,
            [s, self.source, self.upload, self.hub_name, self.column, self.text, self.samples, self.seq_len,
             self.estimators, self.bins, self.knn_k, self.seed, self.view_kind, self.view_est],
            [self.calib_status, self.entropy_plot, self.blocks_plot, self.explainer, self.view_est,
             self.check_seq], api_name="calibrate", show_progress_on=[self.calib_status], **model)
        calibrating.then(self.choose_after_calibration, [s, *self._choose_inputs()], self._choose_outputs(),
                         api_visibility="private", show_progress="hidden", **light)
        self.stop_btn.click(self.stop, [s], [self.calib_status], api_name="stop", **light)
        for trigger in (self.view_kind.input, self.view_est.input):
            trigger(self.redraw, [s, self.view_kind, self.view_est], [self.blocks_plot, self.explainer],
                    api_visibility="private", **light)
        self.auto_btn.click(self.select, [s, *self._choose_inputs()], self._choose_outputs(), api_name="select",
                            show_progress_on=[self.summary], **light)
        for trigger in (self.criterion.input, self.kind.input, self.count.release, self.sel_est.input,
                        self.protect.input, self.boundary.submit, self.boundary.blur):
            trigger(self.select, [s, *self._choose_inputs()], self._choose_outputs(), api_visibility="private",
                    show_progress_on=[self.summary], **light)
        self.ticks.input(self.set_ticks, [s, self.ticks],
                         [self.table, self.summary, self.choose_plot, self.rank_plot, self.blocks_plot],
                         api_name="set_ticks", show_progress_on=[self.summary], **light)
        self.check_btn.click(self.run_check, [s, self.check_windows, self.check_seq, self.check_speed, self.prefill,
                                              self.decode], [self.check_status, self.check_table],
                             api_name="run_check", show_progress_on=[self.check_status], **model)
        self.gen_btn.click(self.generate, [s, self.prompt, self.max_new], [self.gen_dense, self.gen_pruned],
                           api_name="generate", show_progress_on=[self.gen_pruned], **model)
        self.export_btn.click(self.export, [s, self.out_dir, self.overwrite],
                              [self.export_status, self.card, self.download], api_name="export",
                              show_progress_on=[self.export_status], **model)
        self.files_btn.click(self.score_files_handler, [s], [self.score_files], api_name="score_files", **light)
        self.push_btn.click(self.push, [s, self.hub_repo, self.hub_token, self.hub_private], [self.hub_status],
                            api_name="push", **light)

    # -- 1. model --------------------------------------------------------------------------------
    def _bind_model(self, session: Session, spec: str, dtype: str, device: str, facts: dict) -> dict:
        session.model_spec, session.dtype, session.device = spec, dtype, device
        session.model_name, session.num_layers = facts["name"], facts["num_layers"]
        session.reset_results()
        L = facts["num_layers"]
        return {
            self.facts: _facts_markdown(facts),
            self.count: gr.update(maximum=L, value=min(_default_count(L), L)),
            self.entropy_plot: plots.empty_figure(f"{facts['name']} is loaded: start a calibration in step 2."),
            self.blocks_plot: plots.empty_figure(),
            self.explainer: report.explain_scores(None),
            self.calib_status: "",
            self.ticks: gr.update(choices=[], value=[]),
            self.summary: "*Calibrate first (step 2).*",
            self.table: pd.DataFrame(),
            self.check_status: "",
            self.check_table: pd.DataFrame(),
            self.export_status: "",
            self.card: "*The model card appears here after the export.*",
            self.download: gr.update(value=None, interactive=False),
        }

    @_user_errors
    def load_model(self, session: Session, bundled: str | None, spec_text: str | None, dtype: str, device: str):
        """Load (or take from the shared cache) the model; streams the loader's progress messages."""
        spec = (spec_text or "").strip() or (bundled or "").strip()
        if not spec:
            raise _error("Choose the bundled model or type a hub id, a local folder or a .gguf path.")
        key = MODEL_CACHE.make_key(spec, dtype, device)  # ValueError for a missing path or bad dtype/device
        messages: queue.Queue[str] = queue.Queue()
        outcome: dict = {}

        def work():
            try:
                outcome["loaded"] = MODEL_CACHE.get_or_load(spec, dtype=dtype, device=device, progress=messages.put)
            except BaseException as exc:  # handed to the request thread below
                outcome["error"] = exc

        started = time.monotonic()
        worker = threading.Thread(target=work, name="entrodrop-load", daemon=True)
        worker.start()
        log: list[str] = []
        waiting = "Loading…" if key not in MODEL_CACHE else "Taking the model from the shared cache…"
        yield {self.model_status: f"▶ {waiting}"}
        while worker.is_alive() or not messages.empty():
            try:
                log.append(messages.get(timeout=0.5))
            except queue.Empty:
                pass
            if not log and _PRELOAD["thread"] is not None and _PRELOAD["thread"].is_alive():
                status = f"▶ Waiting for the model that started loading at launch… {time.monotonic() - started:.0f} s"
            else:
                status = "▶ " + (log[-1] if log else waiting) + f" ({time.monotonic() - started:.0f} s)"
            yield {self.model_status: status}
        if "error" in outcome:
            raise outcome["error"]
        facts = _facts_for(key, outcome["loaded"])
        updates = self._bind_model(session, spec, dtype, device, facts)
        updates[self.model_status] = (f"✓ **{facts['name']}** is ready ({facts['num_layers']} layers, "
                                      f"loaded in {time.monotonic() - started:.0f} s). Next: step 2, Calibrate.")
        yield updates

    def on_page_load(self, session: Session):
        """Bind a new page to the model preloaded at launch, waiting for it if it is still loading."""
        thread, spec = _PRELOAD["thread"], _PRELOAD["spec"]
        if session.model_spec or thread is None:
            yield {}
            return
        while thread.is_alive():
            yield {self.model_status: f"▶ Loading the bundled model {spec} (started at launch, "
                                      f"{time.monotonic() - _PRELOAD['started']:.0f} s)…"}
            thread.join(timeout=1.0)
        if _PRELOAD["error"]:
            yield {self.model_status: f"⚠ The bundled model could not be loaded at launch: {_PRELOAD['error']}"}
            return
        key = MODEL_CACHE.make_key(spec)
        if key not in MODEL_CACHE or session.model_spec:
            yield {self.model_status: "Press **Load model** to start."}
            return
        facts = _facts_for(key, MODEL_CACHE.get_or_load(spec))
        updates = self._bind_model(session, spec, "auto", "auto", facts)
        updates[self.model_status] = f"✓ **{facts['name']}** is loaded and ready. Next: step 2, Calibrate."
        yield updates

    # -- 2. calibrate ------------------------------------------------------------------------------
    @staticmethod
    def show_source(choice: str):
        return (gr.update(visible=choice == "file"), gr.update(visible=choice == "hub"),
                gr.update(visible=choice in ("file", "hub")), gr.update(visible=choice == "text"))

    def _curves(self, session: Session, view_kind: str, view_est: str | None) -> dict:
        scores = session.scores
        est = view_est if view_est in scores.estimators else scores.estimators[0]
        same_kind = view_kind == session.kind
        return {
            self.entropy_plot: plots.entropy_figure(scores),
            self.blocks_plot: plots.blocks_figure(scores, view_kind, est, ticked=session.ticked if same_kind else (),
                                                  protected=session.protected() if same_kind else None),
            self.explainer: report.explain_scores(scores, view_kind, est, protect=session.entrodrop_protection(),
                                                  stage_boundary=session.stage_boundary,
                                                  count=session.count or None),
        }

    @_user_errors
    def calibrate(self, session: Session, source, upload, hub_name, column, text, samples, seq_len, estimators,
                  bins, knn_k, seed, view_kind, view_est):
        """Stream calibration: new curves after every batch; Stop keeps what was measured."""
        session.stop_requested = False
        data = report.data_source_args(source, upload=upload, hub_name=hub_name, column=column, text=text)
        if not estimators:
            raise _error("Tick at least one entropy estimator (bucket, knn or renyi).")
        settings = EstimatorSettings(estimators=tuple(estimators), bins=int(bins or 20), k=int(knn_k or 25))
        seq_len, samples = int(seq_len), int(samples)
        yield {self.calib_status: "▶ Reading the calibration text…"}
        loaded = _loaded(session)
        corpus = load_corpus(**data)
        windows = make_windows(loaded.tokenizer, corpus, num_samples=samples, seq_len=seq_len, seed=int(seed or 0))
        # per-block costs are read from the model here, where no preview can be active (model group)
        costs = report.measure_block_costs(loaded.model, seq_len)
        events = iter_calibration(loaded.model, windows, settings=settings, batch_size=1, model_name=loaded.name,
                                  calibration={"data": corpus.name, "seed": int(seed or 0)}, spec=loaded.arch)
        session.view_kind = view_kind
        session.view_est = view_est if view_est in settings.estimators else settings.estimators[0]
        yield {self.calib_status: f"▶ Calibrating on {len(windows)} windows of {seq_len} tokens from {corpus.name}…",
               self.view_est: gr.update(choices=list(settings.estimators), value=session.view_est),
               self.check_seq: gr.update(value=seq_len)}
        started = time.monotonic()
        stopped = False
        try:
            for event in events:
                if event.batch_index == 1:  # the settings worked: the previous results give way
                    session.reset_results()
                    session.data, session.costs = data, costs
                    session.estimator = settings.estimators[0]
                session.scores = event.scores
                status = (f"▶ Batch {event.batch_index}/{event.num_batches} · {event.tokens_seen:,} tokens · "
                          f"{time.monotonic() - started:.1f} s")
                # the view radio may change while this runs: draw what the session shows now
                yield {self.calib_status: status, **self._curves(session, session.view_kind, session.view_est)}
                if session.stop_requested:
                    stopped = not event.done
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
        yield {self.calib_status: done, **self._curves(session, session.view_kind, session.view_est)}

    @staticmethod
    def stop(session: Session):
        session.stop_requested = True
        return "■ Stopping after the current batch…"

    @_user_errors
    def redraw(self, session: Session, view_kind: str, view_est: str):
        session.view_kind, session.view_est = view_kind, view_est
        if session.scores is None:
            return gr.skip(), gr.skip()
        curves = self._curves(session, view_kind, view_est)
        return curves[self.blocks_plot], curves[self.explainer]

    # -- 3. choose ---------------------------------------------------------------------------------
    def _choose_view(self, session: Session, with_ticks: bool = True) -> dict:
        scores = session.scores
        est = session.estimator
        protected = session.protected()
        L = scores.num_layers
        choices = [(f"{i} (protected)" if i in protected else str(i), i) for i in range(L)]
        try:
            plan = report.plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
            summary = report.plan_summary_markdown(plan, report.summarize_plan(plan, session.costs), protected)
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
            self.table: report.block_table(scores, session.kind, est, ticked=session.ticked, protected=protected),
            self.summary: summary,
            self.choose_plot: blocks_fig,
            self.disagree_md: disagreement.markdown(),
            self.disagree_table: disagreement.table,
            self.rank_plot: plots.rank_figure(scores, session.kind, est, ticked=session.ticked),
            self.explainer: report.explain_scores(scores, session.kind, est, protect=session.entrodrop_protection(),
                                                  stage_boundary=session.stage_boundary, count=session.count),
            self.blocks_plot: blocks_fig,
            # step 2's view follows the choice, so its plot and explainer describe the same blocks
            self.view_kind: session.kind,
            self.view_est: gr.update(choices=list(scores.estimators), value=est),
        }
        session.view_kind, session.view_est = session.kind, est
        if with_ticks:
            view[self.ticks] = gr.update(choices=choices, value=sorted(session.ticked))
        return view

    def _auto_select(self, session: Session, criterion, kind, count, estimator, protect, boundary) -> dict:
        scores = _need_scores(session)
        session.criterion, session.kind, session.protect = criterion, kind, protect
        session.estimator = estimator if estimator in scores.estimators else scores.estimators[0]
        session.stage_boundary = _parse_boundary(boundary, scores.num_layers)
        session.count = int(count or 0)
        plan = select_blocks(scores, criterion, kind, count=session.count, estimator=session.estimator,
                             protect=session.protection(), stage_boundary=session.stage_boundary)
        session.auto_plan = plan
        session.ticked = {b.layer for b in plan.blocks}
        return self._choose_view(session)

    @_user_errors
    def select(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """Automatic selection: tick the blocks the criterion would drop."""
        view = self._auto_select(session, criterion, kind, count, estimator, protect, boundary)
        view[self.sel_est] = gr.update(choices=list(session.scores.estimators), value=session.estimator)
        return view

    @_user_errors
    def choose_after_calibration(self, session: Session, criterion, kind, count, estimator, protect, boundary):
        """After a calibration (finished or stopped): fill step 3 with the automatic selection."""
        scores = session.scores
        if scores is None:
            return {}
        estimator = estimator if estimator in scores.estimators else scores.estimators[0]
        session.protect, session.criterion, session.estimator = protect, criterion, estimator
        try:
            session.stage_boundary = _parse_boundary(boundary, scores.num_layers)
        except gr.Error:  # a boundary typed for another model: use the detected one
            session.stage_boundary = None
        eligible = scores.num_layers - len(session.protected())
        count = min(int(count or 0), max(eligible, 0))
        view = self._auto_select(session, criterion, kind, count, estimator, protect, session.stage_boundary)
        view[self.count] = gr.update(maximum=scores.num_layers, value=count)
        view[self.sel_est] = gr.update(choices=list(scores.estimators), value=estimator)
        return view

    @_user_errors
    def set_ticks(self, session: Session, ticks):
        """The user ticked or unticked blocks: update the plan summary, table and plots."""
        scores = _need_scores(session)
        session.ticked = {int(t) for t in (ticks or [])}
        report.plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)  # drops everything -> error
        view = self._choose_view(session, with_ticks=False)
        return view[self.table], view[self.summary], view[self.choose_plot], view[self.rank_plot], view[self.blocks_plot]

    # -- 4. check ----------------------------------------------------------------------------------
    @_user_errors
    def run_check(self, session: Session, n_windows, seq_len, measure_speed, prefill, decode):
        """Dense vs pruned on held-out windows, then latency; the shared model is only previewed."""
        plan = _plan_to_run(session)
        if session.data is None:
            raise _error("No calibration text known: run a calibration in step 2 first.")
        loaded = _loaded(session)
        yield {self.check_status: "▶ Reading the held-out text…", self.check_table: pd.DataFrame()}
        corpus = load_corpus(**session.data)
        windows = make_windows(loaded.tokenizer, corpus, num_samples=int(n_windows), seq_len=int(seq_len),
                               part="heldout")
        quality = None
        for event in iter_compare(loaded.model, plan, windows):
            quality = event.partial.to_dict()
            yield {self.check_status: f"▶ Quality: window {event.done}/{event.total}",
                   self.check_table: report.check_table(quality)}
        speed = None
        if measure_speed:
            for event in iter_measure_speed(loaded.model, plan, loaded.tokenizer, prefill_tokens=int(prefill),
                                            decode_tokens=int(decode), repeats=2, warmup=1):
                if event.partial is not None:
                    speed = event.partial.to_dict()
                else:
                    yield {self.check_status: f"▶ Timing: round {event.done}/{event.total}"}
        checks = {"quality": quality}
        if speed:
            checks["speed"] = speed
        if "generations" in session.checks:
            checks["generations"] = session.checks["generations"]
        session.checks = checks
        yield {self.check_status: f"✓ Checked {plan.describe()} on {quality['num_windows']} held-out windows"
                                  f"{' and timed it' if speed else ''}. The dense model is unchanged.",
               self.check_table: report.check_table(quality, speed)}

    @_user_errors
    def generate(self, session: Session, prompt: str, max_new: int):
        """Greedy generations from the dense model and the previewed pruned model."""
        plan = _plan_to_run(session)
        if not (prompt or "").strip():
            raise _error("The prompt is empty: type a prompt.")
        loaded = _loaded(session)
        rows = []
        for event in iter_side_by_side(loaded.model, plan, loaded.tokenizer, [prompt], max_new_tokens=int(max_new)):
            rows = event.partial
        session.checks["generations"] = rows
        row = rows[0]
        pruned = row["pruned"] + ("\n\n(identical to the dense model)" if row["same"] else "")
        return row["dense"], pruned

    # -- 5. export ---------------------------------------------------------------------------------
    @_user_errors
    def export(self, session: Session, out_dir: str, overwrite: bool):
        """Write, reload-verify and zip the pruned model; show its card and offer the zip."""
        plan = _plan_to_run(session)
        loaded = _loaded(session)
        name = f"{_slug(session.model_name)}-{plan.criterion}-{len(plan.blocks)}{session.kind}"
        target = Path(out_dir.strip()).expanduser() if (out_dir or "").strip() else session.work_path() / name
        if not target.is_absolute():
            target = session.work_path() / target
        yield {self.export_status: f"▶ Writing {plan.describe()} to {target} and reloading it to verify…",
               self.download: gr.update(value=None, interactive=False)}
        try:
            result = export_pruned(loaded.model, loaded.tokenizer, plan, target, scores=session.scores,
                                   checks=session.checks or None, source=ModelSource.of(loaded),
                                   overwrite=bool(overwrite))
        except TargetNotEmptyError as exc:  # the library says overwrite=True; here it is a tick box
            raise _error(f"The export folder {exc.path} is not empty. Tick 'Overwrite' to replace it, or choose "
                         "an empty or new folder.") from exc
        session.export_dir = result.path
        yield {self.export_status: f"▶ {result.verdict}\n\nZipping…"}
        zip_path = zip_export(result.path, dest=session.work_path() / f"{result.path.name}.zip")
        card = _card_for_display((result.path / "README.md").read_text(encoding="utf-8"))
        icon = "✓" if result.ok else "✗"
        status = (f"{icon} Exported to `{result.path}` ({result.pruned_params:,} of {result.dense_params:,} parameters "
                  f"kept). {result.verdict}\n\nReload with:\n```python\n{result.reload_hint}\n```")
        yield {self.export_status: status, self.card: card,
               self.download: gr.update(value=str(zip_path), interactive=True)}

    @_user_errors
    def score_files_handler(self, session: Session):
        """Scores as CSV and JSON, plots as PNG and one interactive HTML file."""
        scores = _need_scores(session)
        folder = session.work_path() / f"scores-{int(time.time() * 1000)}"
        folder.mkdir(parents=True)
        (folder / "scores.csv").write_text(report.scores_csv(scores), encoding="utf-8")
        scores.save(folder / "scores.json")
        files = [folder / "scores.csv", folder / "scores.json"]
        if session.auto_plan is not None or session.ticked:
            try:
                plan = report.plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
                plan.save(folder / "plan.json")
                files.append(folder / "plan.json")
            except ValueError:
                pass
        est = session.estimator or scores.estimators[0]
        figures = {
            "entropy": plots.entropy_figure(scores),
            "blocks": plots.blocks_figure(scores, session.kind, est, ticked=session.ticked, protected=session.protected()),
            "ranks": plots.rank_figure(scores, session.kind, est, ticked=session.ticked),
        }
        try:
            files += [p for p in plots.write_figures(figures, folder)]
        except ValueError as exc:
            gr.Warning(str(exc))
            files.append(folder / "plots.html")
        return [str(p) for p in files]

    @_user_errors
    def push(self, session: Session, repo_id: str, token: str, private: bool):
        """Upload the last export to the Hub."""
        if session.export_dir is None:
            raise _error("Export the pruned model first (the button above), then push it.")
        url = push_folder_to_hub(session.export_dir, repo_id, token, private=bool(private))
        return f"✓ Pushed to {url}"


CSS = """
#explainer { font-size: 0.92em; }
#model-card { max-height: 720px; overflow-y: auto; }
"""


def build_app(default_model: str = DEFAULT_MODEL) -> gr.Blocks:
    """The EntroDrop Studio Blocks app (queue enabled), not launched."""
    demo = Studio(default_model=default_model).demo
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_style() -> dict:
    """Theme and CSS (launch() arguments in Gradio 6), shared by the app and the tests' screenshots."""
    return {"theme": gr.themes.Soft(), "css": CSS}


def launch(demo: gr.Blocks | None = None, *, preload: str | None = DEFAULT_MODEL, **kwargs):
    """Start loading ``preload`` in the background, then launch ``demo`` (built if None).

    ``server_name`` / ``server_port`` default to GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else
    127.0.0.1:7860. Other keyword arguments go to ``Blocks.launch``."""
    if preload:
        start_preload(preload)
    demo = demo or build_app()
    kwargs.setdefault("server_name", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    kwargs.setdefault("server_port", int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    for key, value in launch_style().items():
        kwargs.setdefault(key, value)
    return demo.launch(**kwargs)
