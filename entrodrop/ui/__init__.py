"""EntroDrop Studio, the Gradio web app: layout and thin handlers over the library.

This package is the only place that imports gradio. Six steps, one tab and one module each, in
the two phases of text-generation-webui: every step's ``create_ui()`` lays out its components
(returned as a small typed holder), then every step's ``create_event_handlers()`` wires them,
receiving the other steps' components it writes as arguments:

* :mod:`.state` — the shared model cache and launch preload, the per-session :class:`Session`,
  error mapping to ``gr.Error``;
* :mod:`.limits`, :mod:`.turns`, :mod:`.storage`, :mod:`.access` — running in public: request limits set
  by the operator, fair turns on the shared model, private session folders with a disk budget and a janitor,
  and which server files a visitor may make it read (their own uploads, bundled models, hub ids);
* :mod:`.model` — 1, load a model (resets every later step);
* :mod:`.calibrate` — 2, stream the curves while calibration runs;
* :mod:`.choose` — 3, automatic selection and ticks;
* :mod:`.check` — 4, dense vs pruned, side-by-side generations;
* :mod:`.heal` — 5, win back what the drop cost (linear or LoRA) on a copy, then check it beside the drop
  (:mod:`.healed` keeps the sessions' healed models, bounded);
* :mod:`.export` — 6, export and verify (the healed model, when asked), zip, score files, push to the Hub;
* :mod:`.restore` — a page reload brings the session's results back (per-browser token).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from ..loading import DEFAULT_MODEL
from . import calibrate, check, choose, export, heal, model, restore, storage
from .access import UploadGate
from .state import MODEL_CACHE, Session, delete_session, start_preload

__all__ = ["MODEL_CACHE", "Session", "Steps", "build_app", "create_steps", "launch", "launch_style", "start_preload"]

INTRO = """# EntroDrop Studio
See inside a language model's blocks and drop the ones it does not need. **EntroDrop** (Yang et al., 2025)
measures how much *entropy* each block adds to the hidden representations and drops the blocks that add least;
compare it here with the cosine and angular baselines on **your** model and data, then check and export the result.
"""


CSS = """
#explainer { font-size: 0.92em; }
#model-card { max-height: 720px; overflow-y: auto; }
.status-error { color: #8b1111; background: #fdecec; border-left: 4px solid #c62828; padding: 0.5em 0.75em;
                border-radius: 4px; font-weight: 500; }
.verdict { padding: 0.5em 0.75em; border-radius: 4px; border-left: 4px solid; }
.verdict-usable { background: #e8f5ec; border-color: #2a9d4b; }
.verdict-degraded { background: #fff6dc; border-color: #e0a100; }
.verdict-damaged { background: #fdecec; border-color: #c62828; color: #8b1111; }
"""


@dataclass
class Steps:
    """The components of the six steps, as their ``create_ui()`` returned them."""

    model: model.ModelTab
    calibrate: calibrate.CalibrateTab
    choose: choose.ChooseTab
    check: check.CheckTab
    heal: heal.HealTab
    export: export.ExportTab


def create_steps(default_model: str = DEFAULT_MODEL) -> Steps:
    """Lay out the six tabs (inside an open ``gr.Blocks``); nothing is wired yet."""
    with gr.Tabs(overflow_behavior="wrap"):  # at 400 px every step stays reachable, on two rows
        with gr.Tab("1 · Model", id="tab-model"):
            model_tab = model.create_ui(default_model)
        with gr.Tab("2 · Calibrate", id="tab-calibrate"):
            calibrate_tab = calibrate.create_ui()
        with gr.Tab("3 · Choose", id="tab-choose"):
            choose_tab = choose.create_ui()
        with gr.Tab("4 · Check", id="tab-check"):
            check_tab = check.create_ui()
        with gr.Tab("5 · Heal", id="tab-heal") as heal_page:
            heal_tab = heal.create_ui()
        with gr.Tab("6 · Export", id="tab-export") as export_page:
            export_tab = export.create_ui()
    heal_tab.page, export_tab.page = heal_page, export_page
    return Steps(model_tab, calibrate_tab, choose_tab, check_tab, heal_tab, export_tab)


def build_app(default_model: str = DEFAULT_MODEL) -> gr.Blocks:
    """The EntroDrop Studio Blocks app (queue enabled), not launched; starts the session-folder janitor."""
    storage.start_janitor()
    uploads = UploadGate()  # which file paths are this server's uploads: known once the Blocks exist
    with gr.Blocks(title="EntroDrop Studio", analytics_enabled=False, delete_cache=(3600, 7200)) as demo:
        session = gr.State(Session(), delete_callback=delete_session)
        token = gr.BrowserState(None, storage_key=restore.STORAGE_KEY)
        gr.Markdown(INTRO)
        steps = create_steps(default_model)
        page_load = model.create_event_handlers(demo, session, steps.model, steps.calibrate, steps.choose,
                                                steps.check, steps.export, steps.heal)
        restoring = restore.RestoreHandlers(token, steps)
        page_load.then(restoring.restore, [session, token], restoring.outputs(), api_visibility="private",
                       concurrency_limit=None, show_progress="hidden")
        calibrating = calibrate.create_event_handlers(session, steps.calibrate, steps.check, uploads)
        choose.create_event_handlers(session, steps.choose, steps.calibrate, calibrating)
        check.create_event_handlers(session, steps.check)
        heal.create_event_handlers(session, steps.heal, steps.check, check.history_updates, steps.export.plan_note)
        export.create_event_handlers(session, steps.export)
    uploads.attach(demo)
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
    kwargs.setdefault("max_file_size", f"{float(os.environ.get('ENTRODROP_MAX_UPLOAD_MB', '50')):g}mb")
    kwargs.setdefault("allowed_paths", [str(storage.sessions_root())])  # zips served from an ENTRODROP_WORK_DIR too
    for key, value in launch_style().items():
        kwargs.setdefault(key, value)
    return demo.launch(**kwargs)
