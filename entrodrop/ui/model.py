"""Step 1, the model: pick a bundled model or a hub id (a folder or a .gguf file where the operator allows
local models, :mod:`.access`) and load it into the shared cache; a new page binds to the model preloaded at
launch. Loading resets every later step."""

from __future__ import annotations

import queue
import threading
import time

import gradio as gr
import pandas as pd

from .. import plots, report
from ..loading import BUNDLED_MODELS, DEFAULT_MODEL, format_bytes
from .access import check_model_spec, local_models_allowed, public_model_error
from .state import LOAD_GROUP, MODEL_CACHE, Session, error, facts_for, keep_errors, preload_info, user_errors

DEFAULT_DROP_SHARE = 0.25  # the paper drops 8 of 32 attention blocks as its mild setting


class ModelTab:
    """Step 1's components."""

    bundled: gr.Dropdown
    model_spec: gr.Textbox
    dtype: gr.Dropdown
    device: gr.Dropdown
    load_btn: gr.Button
    model_status: gr.Markdown
    facts: gr.Markdown


def create_ui(default_model: str = DEFAULT_MODEL) -> ModelTab:
    """Lay out step 1 inside the current tab."""
    tab = ModelTab()
    with gr.Row():
        with gr.Column(scale=2):
            tab.bundled = gr.Dropdown(
               [(f"{alias} — {text}", alias) for alias, text in BUNDLED_MODELS.items()],
               value=default_model if default_model in BUNDLED_MODELS else None,
               label="Bundled model", elem_id="model-bundled")
            local = local_models_allowed()
            tab.model_spec = gr.Textbox(
               "", label="…or a Hugging Face Hub id" + (", a local model folder, or a .gguf file" if local else ""),
               placeholder="HuggingFaceTB/SmolLM2-360M" + ("  ·  /path/to/folder  ·  /path/to/model.gguf" if local
                                                           else "") + " (leave empty to use the bundled model)",
               elem_id="model-spec")
            with gr.Row():
                tab.dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value="auto", label="dtype",
                                        info="auto: float32 on CPU, bfloat16 on GPU", elem_id="model-dtype")
                tab.device = gr.Dropdown(device_choices(), value="auto", label="device", elem_id="model-device")
            tab.load_btn = gr.Button("Load model", variant="primary", elem_id="load-btn")
            tab.model_status = gr.Markdown("", elem_id="model-status")
        with gr.Column(scale=1):
            tab.facts = gr.Markdown("*No model loaded yet.*", elem_id="model-facts")
    return tab


def facts_markdown(facts: dict) -> str:
    """The model facts as a two-column Markdown table."""
    rows = [
        ("Model", facts["name"]), ("Architecture", f"{facts['architecture']} ({facts['family']})"),
        ("Layers", facts["num_layers"]), ("Hidden size", facts["hidden_size"]),
        ("Parameters", f"{facts['parameters']:,}"), ("Memory", format_bytes(facts["memory_bytes"])),
        ("dtype / device", f"{facts['dtype']} / {facts['device']}"), ("Source", facts["source"]),
    ]
    return "| property | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def default_count(num_layers: int) -> int:
    """Blocks to drop by default: a quarter of the layers, at least one."""
    return max(1, round(DEFAULT_DROP_SHARE * num_layers)) if num_layers > 1 else 0


def device_choices() -> list[str]:
    """auto, cpu, and every CUDA device there is."""
    import torch

    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return choices


class ModelHandlers:
    """Loading a model, and binding a new page to the preloaded one; both reset every later step."""

    def __init__(self, model_tab, calibrate_tab, choose_tab, check_tab, export_tab, heal_tab=None):
        self.tab, self.calibrate, self.choose, self.check, self.export = (model_tab, calibrate_tab, choose_tab,
                                                                          check_tab, export_tab)
        self.heal = heal_tab

    def outputs(self) -> list:
        """What loading writes, in the order of the ``load_model`` API's outputs."""
        return [self.tab.model_status, self.tab.facts, self.choose.count, self.calibrate.entropy_plot,
                self.calibrate.blocks_plot, self.calibrate.explainer, self.calibrate.calib_status, self.choose.ticks,
                self.choose.summary, self.choose.table, self.check.check_status, self.check.check_table,
                self.export.export_status, self.export.card, self.export.download, self.calibrate.norms_plot,
                self.calibrate.fit_info] + ([self.heal.status, self.heal.result] if self.heal is not None else [])

    def bind_model(self, session: Session, spec: str, dtype: str, device: str, facts: dict) -> dict:
        """Point the session at a model and clear every step's results (the updates that say so)."""
        session.model_spec, session.dtype, session.device = spec, dtype, device
        session.model_name, session.num_layers = facts["name"], facts["num_layers"]
        session.reset_results()
        L = facts["num_layers"]
        return {
            self.tab.facts: facts_markdown(facts),
            self.choose.count: gr.update(maximum=L, value=min(default_count(L), L)),
            self.calibrate.entropy_plot: plots.empty_figure(f"{facts['name']} is loaded: start a calibration in step 2."),
            self.calibrate.blocks_plot: plots.empty_figure(),
            self.calibrate.norms_plot: plots.empty_figure("Token norms per layer appear after the first batch."),
            self.calibrate.fit_info: "",
            self.calibrate.explainer: report.explain_scores(None),
            self.calibrate.calib_status: "",
            self.choose.ticks: gr.update(choices=[], value=[]),
            self.choose.summary: "*Calibrate first (step 2).*",
            self.choose.table: pd.DataFrame(),
            self.check.check_status: "",
            self.check.check_table: pd.DataFrame(),
            self.export.export_status: "",
            self.export.card: "*The model card appears here after the export.*",
            self.export.download: gr.update(value=None, interactive=False),
            **({self.heal.status: "", self.heal.result: ""} if self.heal is not None else {}),
        }

    @user_errors
    def load_model(self, session: Session, bundled: str | None, spec_text: str | None, dtype: str, device: str):
        """Load (or take from the shared cache) the model; streams the loader's progress messages."""
        spec = (spec_text or "").strip() or (bundled or "").strip()
        if not spec:
            raise error("Choose the bundled model or type a hub id.")
        check_model_spec(spec)  # a public server loads bundled models and hub ids only
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
        yield {self.tab.model_status: f"▶ {waiting}"}
        while worker.is_alive() or not messages.empty():
            try:
                log.append(messages.get(timeout=0.5))
            except queue.Empty:
                pass
            preload = preload_info()["thread"]
            if not log and preload is not None and preload.is_alive():
                status = f"▶ Waiting for the model that started loading at launch… {time.monotonic() - started:.0f} s"
            else:
                status = "▶ " + (log[-1] if log else waiting) + f" ({time.monotonic() - started:.0f} s)"
            yield {self.tab.model_status: status}
        if "error" in outcome:
            raise public_model_error(spec, outcome["error"])
        facts = facts_for(key, outcome["loaded"])
        updates = self.bind_model(session, spec, dtype, device, facts)
        updates[self.tab.model_status] = (f"✓ **{facts['name']}** is ready ({facts['num_layers']} layers, "
                                          f"loaded in {time.monotonic() - started:.0f} s). Next: step 2, Calibrate.")
        yield updates

    def on_page_load(self, session: Session):
        """Bind a new page to the model preloaded at launch, waiting for it if it is still loading."""
        preload = preload_info()
        thread, spec = preload["thread"], preload["spec"]
        if session.model_spec or thread is None:
            yield {self.tab.model_status: gr.skip()}  # an empty dict reads as one output value
            return
        while thread.is_alive():
            yield {self.tab.model_status: f"▶ Loading the bundled model {spec} (started at launch, "
                                          f"{time.monotonic() - preload['started']:.0f} s)…"}
            thread.join(timeout=1.0)
        if preload["error"]:
            yield {self.tab.model_status: f"⚠ The bundled model could not be loaded at launch: {preload['error']}"}
            return
        key = MODEL_CACHE.make_key(spec)
        if session.model_spec == spec and key in MODEL_CACHE:  # a job that waited for it bound it already
            yield {self.tab.facts: facts_markdown(facts_for(key, MODEL_CACHE.get_or_load(spec))),
                   self.tab.model_status: f"✓ **{session.model_name}** is loaded and ready."}
            return
        if key not in MODEL_CACHE or session.model_spec:
            yield {self.tab.model_status: "Press **Load model** to start."}
            return
        facts = facts_for(key, MODEL_CACHE.get_or_load(spec))
        updates = self.bind_model(session, spec, "auto", "auto", facts)
        updates[self.tab.model_status] = f"✓ **{facts['name']}** is loaded and ready. Next: step 2, Calibrate."
        yield updates


def create_event_handlers(demo: gr.Blocks, session: gr.State, model_tab: ModelTab, calibrate_tab, choose_tab,
                          check_tab, export_tab, heal_tab=None):
    """Wire step 1: the Load button and the page load; they write every step's components. Returns the
    page-load event (the app restores a reloaded session after it)."""
    handlers = ModelHandlers(model_tab, calibrate_tab, choose_tab, check_tab, export_tab, heal_tab)
    loading = model_tab.load_btn.click(handlers.load_model, [session, model_tab.bundled, model_tab.model_spec, model_tab.dtype,
                                                   model_tab.device],
                             handlers.outputs(), api_name="load_model", concurrency_id=LOAD_GROUP,
                             concurrency_limit=1, show_progress_on=[model_tab.model_status])
    keep_errors(loading, session, model_tab.model_status)  # status area: the error stays until the next action
    return demo.load(handlers.on_page_load, inputs=[session], outputs=handlers.outputs(),
                     api_visibility="private", concurrency_limit=None, show_progress="hidden")
