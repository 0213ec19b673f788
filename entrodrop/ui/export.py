"""Step 6, export: write, reload-verify and zip the pruned model and show its card; scores and plots
as files; push the export to the Hugging Face Hub.

A visitor names the export, never a path: it goes to ``exports/NAME`` in the session's private
folder (:mod:`.storage`), within the server's disk budget. Zipping is a separate event
(``/export_zip``, chained after a successful export in the page) in a group of its own, so it never
holds the model's turns; API clients call it after ``/export``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import gradio as gr

from .. import plots, report
from ..checks import ChecksResult
from ..costs import summarize_plan
from ..criteria import resolve_estimator
from ..devices import format_bytes
from ..export import (
    EXPORT_DTYPES,
    GGUF_TYPES,
    METADATA_FILE,
    ModelSource,
    TargetNotEmptyError,
    check_gguf_export,
    check_target,
    describe_gguf_type,
    export_dtype_for,
    export_gguf,
    export_pruned,
    gguf_type_for,
    iter_zip_export,
    push_folder_to_hub,
    weights_bytes_in,
)
from ..progress import time_left
from ..select import plan_from_ticks
from . import storage
from .healed import HEALED
from .limits import limit
from .state import (
    Session,
    error,
    keep_errors,
    model_events,
    model_job,
    need_scores,
    plan_to_run,
    session_facts,
    sharing_note,
    user_errors,
    verdict_for,
    waiting_for_model,
)

AUTO_DTYPE = "auto"
DTYPE_CHOICES = [("the model's own (bfloat16 for a GGUF source)", AUTO_DTYPE), *[(d, d) for d in EXPORT_DTYPES]]

FORMATS = [("safetensors (transformers)", "safetensors"), ("GGUF (llama.cpp, Ollama, LM Studio)", "gguf")]
AUTO_GGUF_TYPE = "auto"
GGUF_TYPE_CHOICES = [(f"{t}: {what}", t) for t, what in GGUF_TYPES.items()]
ZIP_GROUP = "zip"  # zipping reads only the session's files: off the model's group, one at a time


class ExportTab:
    """Step 6's components."""

    page: gr.Tab  # the step's tab (set by the app): selecting it refreshes plan_note
    plan_note: gr.Markdown
    name: gr.Textbox
    dtype: gr.Dropdown
    file_format: gr.Radio
    gguf_type: gr.Dropdown
    overwrite: gr.Checkbox
    healed: gr.Checkbox
    export_btn: gr.Button
    export_status: gr.Markdown
    download: gr.DownloadButton
    files_btn: gr.Button
    score_files: gr.File
    hub_repo: gr.Textbox
    hub_token: gr.Textbox
    hub_private: gr.Checkbox
    push_btn: gr.Button
    hub_status: gr.Markdown
    card: gr.Markdown


def create_ui() -> ExportTab:
    """Lay out step 6 inside the current tab."""
    tab = ExportTab()
    tab.plan_note = gr.Markdown("", elem_id="export-plan")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.name = gr.Textbox("", label="Export name", elem_id="export-name", max_length=storage.MAX_NAME_CHARS,
                                  placeholder="blank: MODEL-CRITERION-COUNT; letters, digits, '.', '_', '-'",
                                  info="Saved in this session's private space; removed when you leave.")
            tab.dtype = gr.Dropdown(DTYPE_CHOICES, value=AUTO_DTYPE, label="Weights dtype", elem_id="export-dtype",
                                    info="bfloat16/float16 halve the size of float32; the export is verified "
                                         "in the dtype it is written in.")
            tab.file_format = gr.Radio(FORMATS, value="safetensors", label="Format", elem_id="export-format",
                                       info="GGUF: whole layers, or attention blocks of Llama-family models; from a "
                                            "GGUF source (its tokenizer and settings kept) or a Llama or Gemma 3 "
                                            "safetensors one.")
            tab.gguf_type = gr.Dropdown(GGUF_TYPE_CHOICES, value=AUTO_GGUF_TYPE, label="GGUF tensors",
                                        elem_id="export-gguf-type",
                                        info="'stored' copies a GGUF source's quantised tensors byte for byte (the "
                                             "smallest file); a healed model or a safetensors source is written "
                                             "from its own weights (Llama, Gemma 3): 'source' keeps the source's "
                                             "types (auto after a linear heal), q8_0 keeps a LoRA heal in one file "
                                             "(auto); 'adapter' keeps it as a llama.cpp LoRA adapter beside the "
                                             "stored tensors (smaller; run both files together). Gemma 3: "
                                             "auto is f16 from any source, since llama.cpp's quantised arithmetic "
                                             "moves a pruned Gemma 3 far from itself.")
            tab.overwrite = gr.Checkbox(False, label="Replace my export of the same name", elem_id="export-overwrite")
            tab.healed = gr.Checkbox(True, label="Export the healed model when step 5 healed these blocks",
                                     elem_id="export-healed")
            tab.export_btn = gr.Button("Export and verify", variant="primary", elem_id="export-btn")
            tab.export_status = gr.Markdown("", elem_id="export-status")
            tab.download = gr.DownloadButton(DOWNLOAD_LABEL, value=None, interactive=False,
                                             elem_id="download-zip")
            gr.Markdown("**Scores and plots**")
            tab.files_btn = gr.Button("Prepare scores (CSV, JSON) and plots (PNG, HTML)", elem_id="files-btn")
            tab.score_files = gr.File(label="Files", file_count="multiple", interactive=False,
                                      elem_id="score-files")
            gr.Markdown("**Push to the Hugging Face Hub**")
            tab.hub_repo = gr.Textbox("", label="Repository id", placeholder="your-name/model-pruned", elem_id="hub-repo")
            tab.hub_token = gr.Textbox("", label="Access token (write)", type="password", elem_id="hub-token")
            tab.hub_private = gr.Checkbox(True, label="Private repository", elem_id="hub-private")
            tab.push_btn = gr.Button("Push", elem_id="push-btn")
            tab.hub_status = gr.Markdown("", elem_id="hub-status")
        with gr.Column(scale=2):
            tab.card = gr.Markdown("*The model card appears here after the export.*", elem_id="model-card")

    return tab


DOWNLOAD_LABEL = "Download the pruned model (.zip)"


def _key(plan) -> str:
    from ..checks import plan_key

    return plan_key(plan)


def card_for_display(card: str) -> str:
    """The model card with its YAML front matter shown as code (Markdown would run it into the text)."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            return f"```yaml\n{card[4:end]}\n```\n" + card[end + 5:]
    return card


def slug(text: str) -> str:
    """``text`` as a safe folder name (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "model"


def resolve_dtype(session: Session, dtype) -> str:
    """The dtype asked for (``auto``: the model's compute dtype, bfloat16 for a GGUF source); refuses others."""
    if dtype in (None, "", AUTO_DTYPE):
        facts = session_facts(session) or {}
        return export_dtype_for(facts.get("dtype", "float32"), bool(facts.get("gguf_file")) or facts.get("source") == "gguf")
    if dtype not in EXPORT_DTYPES:
        raise error(f"Choose the weights dtype from {', '.join(EXPORT_DTYPES)} (or the model's own).")
    return dtype


def size_estimate(session: Session, plan, dtype: str) -> str:
    """'about 256.0 MB in bfloat16 (source: 98.2 MB)' from the plan's kept parameters; "" before calibration."""
    if session.costs is None:
        return ""
    kept = session.costs.dense_params - summarize_plan(plan, session.costs).params_removed
    text = f"about {format_bytes(weights_bytes_in(kept, dtype))} of weights in {dtype}"
    gguf = (session_facts(session) or {}).get("gguf_file")
    try:
        if gguf and Path(gguf).is_file():
            text += f" (source: {format_bytes(Path(gguf).stat().st_size)} GGUF file)"
    except OSError:
        pass
    return text


def plan_note(session: Session, dtype=AUTO_DTYPE) -> str:
    """What Export will write: the plan, a damaged verdict flagged, the size before writing."""
    try:
        plan = plan_to_run(session)
        dtype = resolve_dtype(session, dtype)
    except gr.Error as exc:
        return f"*{exc.message}*"
    lines = [f"**To export:** {plan.describe()} ({plan.criterion}); {size_estimate(session, plan, dtype)}."]
    kept = HEALED.get(session.healed_key)
    if kept is not None and kept[0] == _key(plan):
        lines.append(f"**Healed in step 5:** {kept[1].summary()}. Tick 'Export the healed model' to write it "
                     "(its card states the method, the data, the steps and the numbers before and after).")
    verdict = verdict_for(session, plan)
    if verdict is not None and verdict.damaged:
        lines.append(f'<div class="status-error" id="export-damaged">⚠ A check found this plan <b>damaged</b> '
                     f"({verdict.text}). You can still export it; the verdict goes into the model card.</div>")
    elif verdict is not None:
        lines.append(f"Last check of these blocks: {verdict.text}.")
    else:
        lines.append("*Not checked yet: step 4 says how much it loses.*")
    return "\n\n".join(lines)


class ExportHandlers:
    """Export, score files and push."""

    def __init__(self, export_tab: ExportTab):
        self.tab = export_tab

    @user_errors
    def export(self, session: Session, name: str, overwrite: bool, dtype=AUTO_DTYPE, healed=True,
               file_format="safetensors", gguf_type=AUTO_GGUF_TYPE):
        """Write and reload-verify the pruned model (the healed one when step 5 healed these blocks and
        ``healed``) under ``name`` in the session's folder, as safetensors or GGUF; show its card."""
        plan = plan_to_run(session)
        if file_format not in ("safetensors", "gguf"):
            raise error("Choose the export format: safetensors or gguf.")
        if gguf_type not in GGUF_TYPES:
            raise error(f"Choose the GGUF tensors from {', '.join(GGUF_TYPES)}.")
        dtype = resolve_dtype(session, dtype)
        kept = HEALED.get(session.healed_key) if healed else None
        heal_entry = kept if kept is not None and kept[0] == _key(plan) else None

        if name is not None and not isinstance(name, str):
            raise error("The export name must be text, e.g. 'my-model-pruned'.")
        name = storage.export_name(name, f"{slug(session.model_name)}-{plan.criterion}-{len(plan.blocks)}{session.kind}")
        folder = session.work_path()
        target = folder / "exports" / name
        for note in waiting_for_model(session):
            yield {self.tab.export_status: note}
        with storage.busy(folder), model_job(session) as (loaded, job):
            # the folder and its zip: at most the dense model's size each
            storage.check_disk_budget(2 * int(loaded.model.get_memory_footprint()), replacing=target)
            try:
                check_target(target, bool(overwrite))  # a busy folder fails before the status says "Writing"
            except TargetNotEmptyError as exc:  # the library says overwrite=True; here it is a tick box
                raise error(f"You already have an export named '{name}'. Tick 'Replace my export of the same "
                            "name' to replace it, or choose another name.") from exc
            if file_format == "gguf":  # what GGUF cannot express is refused before anything is written
                method = heal_entry[1].method if heal_entry is not None else None
                try:
                    gguf_type = gguf_type_for(loaded.model, ModelSource.of(loaded), gguf_type, method)
                    check_gguf_export(loaded.model, plan, ModelSource.of(loaded), heal=method,
                                      gguf_type=gguf_type, tokenizer=loaded.tokenizer)
                except ValueError as exc:
                    raise error(str(exc).replace("(format='safetensors')", "(Format: safetensors)")
                                .replace("export the healed model as safetensors.", "export the healed model as "
                                         "safetensors, or untick 'Export the healed model'.")) from exc
            size = size_estimate(session, plan, dtype) if file_format != "gguf" else \
                f"GGUF in {describe_gguf_type(gguf_type)}"
            yield {self.tab.export_status: f"▶ Writing {plan.describe()} as '{name}' ({size or dtype}) and reloading "
                                           f"it to verify{sharing_note(job)}…",
                   self.tab.download: gr.update(value=None, interactive=False, label=DOWNLOAD_LABEL)}
            checked = session.history[-1].result if session.history and session.history[-1].key == _key(plan) \
                else None  # the card quotes the checks of these blocks only
            source_model, heal = loaded.model, None
            if heal_entry is not None:  # the healed copy of these blocks, its card quoting the healed checks
                source_model, heal = heal_entry[1].model, dict(heal_entry[2])
                checked = ChecksResult.from_dict(heal.pop("checks", None))
            if file_format == "gguf":
                result = job.call(export_gguf, source_model, loaded.tokenizer, plan, target, scores=session.scores,
                                  checks=checked, source=ModelSource.of(loaded), overwrite=bool(overwrite),
                                  gguf_type=gguf_type, heal=heal)
            else:
                result = job.call(export_pruned, source_model, loaded.tokenizer, plan, target,
                                  scores=session.scores, checks=checked, source=ModelSource.of(loaded),
                                  overwrite=bool(overwrite), dtype=dtype, heal=heal)
        session.export_dir = result.path
        card = card_for_display((result.path / "README.md").read_text(encoding="utf-8"))
        icon = "✓" if result.ok else "✗"
        hint = result.reload_hint.replace(str(result.path), name)
        what = f"the model healed with {heal_entry[1].method}" if heal_entry is not None else "the pruned model"
        if file_format == "gguf":
            what += " as GGUF"
            stored = f"GGUF in {describe_gguf_type(gguf_type)}"
            then = f"run it with:\n```bash\n{hint}\n```"
        else:
            stored, then = f"in {result.dtype}", f"reload with:\n```python\n{hint}\n```"
        status = (f"{icon} Exported {what} as '{name}' ({result.pruned_params:,} of {result.dense_params:,} parameters kept; "
                  f"{format_bytes(result.weights_bytes)} {stored}, ×{result.weights_bytes / result.source_bytes:.2f} "
                  f"the source). {result.verdict}\n\nThe download button below turns on when the zip is ready. After "
                  f"unzipping, {then}")
        if healed and session.healed_key and kept is None:  # healed, then evicted by later heals of other sessions
            status += ("\n\n⚠ The model healed in step 5 is no longer in memory (this server keeps "
                       f"{limit('ENTRODROP_HEALED_MODELS')} healed models for all visitors), so this is the model as "
                       "dropped. Heal again in step 5 to export the healed one.")
        yield {self.tab.export_status: status, self.tab.card: card}

    @user_errors
    def zip_download(self, session: Session):
        """Zip the session's last export (stored, not deflated) and offer it for download; the button shows
        the bytes written and the time left meanwhile."""
        export_dir = session.export_dir
        if export_dir is None or not (export_dir / METADATA_FILE).is_file():
            raise error("Export the pruned model first (the button above), then download it.")
        folder = session.work_path()
        dest = folder / "zips" / f"{export_dir.name}.zip"
        with storage.busy(folder):
            storage.check_disk_budget(storage.folder_bytes(export_dir), replacing=dest)
            dest.parent.mkdir(exist_ok=True)
            started, shown, zip_path = time.monotonic(), 0.0, None
            for event in iter_zip_export(export_dir, dest=dest):
                zip_path = event.partial
                now = time.monotonic()
                if now - shown >= 0.5 and not event.finished:
                    shown = now
                    left = time_left(now - started, event.fraction)
                    yield gr.update(label=f"Zipping… {format_bytes(event.done)} of {format_bytes(event.total)}"
                                          f"{' · ' + left if left else ''}", interactive=False)
        yield gr.update(value=str(zip_path), interactive=True,
                        label=f"{DOWNLOAD_LABEL} · {format_bytes(zip_path.stat().st_size)}")

    @user_errors
    def score_files_handler(self, session: Session):
        """Scores as CSV and JSON, plots as PNG and one interactive HTML file."""
        scores = need_scores(session)
        folder = session.work_path() / "scores" / f"scores-{int(time.time() * 1000)}"
        folder.mkdir(parents=True)
        (folder / "scores.csv").write_text(report.scores_csv(scores), encoding="utf-8")
        scores.save(folder / "scores.json")
        files = [folder / "scores.csv", folder / "scores.json"]
        if session.auto_plan is not None or session.ticked:
            try:
                plan = plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
                plan.save(folder / "plan.json")
                files.append(folder / "plan.json")
            except ValueError:
                pass
        est = resolve_estimator(scores, session.estimator)
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

    @user_errors
    def push(self, session: Session, repo_id: str, token: str, private: bool):
        """Upload the last export to the Hub."""
        if session.export_dir is None:
            raise error("Export the pruned model first (the button above), then push it.")
        url = push_folder_to_hub(session.export_dir, repo_id, token, private=bool(private))
        return f"✓ Pushed to {url}"


def create_event_handlers(session: gr.State, export_tab: ExportTab) -> None:
    """Wire step 6."""
    tab = export_tab
    handlers = ExportHandlers(export_tab)
    light = {"concurrency_limit": None}
    exporting = tab.export_btn.click(handlers.export, [session, tab.name, tab.overwrite, tab.dtype, tab.healed,
                                                       tab.file_format, tab.gguf_type],
                                     [tab.export_status, tab.card, tab.download], api_name="export",
                                     show_progress_on=[tab.export_status], **model_events())
    keep_errors(exporting, session, tab.export_status)
    zipping = exporting.success(handlers.zip_download, [session], [tab.download], api_name="export_zip",
                                show_progress="hidden", concurrency_id=ZIP_GROUP, concurrency_limit=1)
    keep_errors(zipping, session, tab.export_status)
    files = tab.files_btn.click(handlers.score_files_handler, [session], [tab.score_files], api_name="score_files",
                                **light)
    keep_errors(files, session, tab.export_status)
    pushing = tab.push_btn.click(handlers.push, [session, tab.hub_repo, tab.hub_token, tab.hub_private],
                                 [tab.hub_status], api_name="push", **light)
    keep_errors(pushing, session, tab.hub_status)
    tab.dtype.input(plan_note, [session, tab.dtype], [tab.plan_note], api_visibility="private", **light)
    if getattr(tab, "page", None) is not None:
        tab.page.select(plan_note, [session, tab.dtype], [tab.plan_note], api_visibility="private", **light)
