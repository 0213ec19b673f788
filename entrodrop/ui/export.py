"""Step 5, export: write, reload-verify and zip the pruned model and show its card; scores and plots
as files; push the export to the Hugging Face Hub."""

from __future__ import annotations

import re
import time
from pathlib import Path

import gradio as gr

from .. import plots, report
from ..criteria import resolve_estimator
from ..export import (
    ModelSource,
    TargetNotEmptyError,
    check_target,
    export_pruned,
    push_folder_to_hub,
    zip_export,
)
from ..select import plan_from_ticks
from .state import MODEL_GROUP, Session, error, loaded_model, need_scores, plan_to_run, user_errors


class ExportTab:
    """Step 5's components."""

    out_dir: gr.Textbox
    overwrite: gr.Checkbox
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
    """Lay out step 5 inside the current tab."""
    tab = ExportTab()
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            tab.out_dir = gr.Textbox("", label="Export folder", elem_id="export-dir",
                                     placeholder="blank: a new folder in this session's temporary space")
            tab.overwrite = gr.Checkbox(False, label="Overwrite a non-empty folder", elem_id="export-overwrite")
            tab.export_btn = gr.Button("Export and verify", variant="primary", elem_id="export-btn")
            tab.export_status = gr.Markdown("", elem_id="export-status")
            tab.download = gr.DownloadButton("Download the pruned model (.zip)", value=None, interactive=False,
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


class ExportHandlers:
    """Export, score files and push."""

    def __init__(self, export_tab: ExportTab):
        self.tab = export_tab

    @user_errors
    def export(self, session: Session, out_dir: str, overwrite: bool):
        """Write, reload-verify and zip the pruned model; show its card and offer the zip."""
        plan = plan_to_run(session)
        loaded = loaded_model(session)
        name = f"{slug(session.model_name)}-{plan.criterion}-{len(plan.blocks)}{session.kind}"
        target = Path(out_dir.strip()).expanduser() if (out_dir or "").strip() else session.work_path() / name
        if not target.is_absolute():
            target = session.work_path() / target
        try:
            check_target(target, bool(overwrite))  # a busy folder fails before the status says "Writing"
        except TargetNotEmptyError as exc:  # the library says overwrite=True; here it is a tick box
            raise error(f"The export folder {exc.path} is not empty. Tick 'Overwrite' to replace it, or choose "
                        "an empty or new folder.") from exc
        yield {self.tab.export_status: f"▶ Writing {plan.describe()} to {target} and reloading it to verify…",
               self.tab.download: gr.update(value=None, interactive=False)}
        result = export_pruned(loaded.model, loaded.tokenizer, plan, target, scores=session.scores,
                               checks=session.checks or None, source=ModelSource.of(loaded), overwrite=bool(overwrite))
        session.export_dir = result.path
        yield {self.tab.export_status: f"▶ {result.verdict}\n\nZipping…"}
        zip_path = zip_export(result.path, dest=session.work_path() / f"{result.path.name}.zip")
        card = card_for_display((result.path / "README.md").read_text(encoding="utf-8"))
        icon = "✓" if result.ok else "✗"
        status = (f"{icon} Exported to `{result.path}` ({result.pruned_params:,} of {result.dense_params:,} parameters "
                  f"kept). {result.verdict}\n\nReload with:\n```python\n{result.reload_hint}\n```")
        yield {self.tab.export_status: status, self.tab.card: card,
               self.tab.download: gr.update(value=str(zip_path), interactive=True)}

    @user_errors
    def score_files_handler(self, session: Session):
        """Scores as CSV and JSON, plots as PNG and one interactive HTML file."""
        scores = need_scores(session)
        folder = session.work_path() / f"scores-{int(time.time() * 1000)}"
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
    """Wire step 5."""
    tab = export_tab
    handlers = ExportHandlers(export_tab)
    light = {"concurrency_limit": None}
    tab.export_btn.click(handlers.export, [session, tab.out_dir, tab.overwrite],
                         [tab.export_status, tab.card, tab.download], api_name="export",
                         show_progress_on=[tab.export_status], concurrency_id=MODEL_GROUP, concurrency_limit=1)
    tab.files_btn.click(handlers.score_files_handler, [session], [tab.score_files], api_name="score_files", **light)
    tab.push_btn.click(handlers.push, [session, tab.hub_repo, tab.hub_token, tab.hub_private], [tab.hub_status],
                       api_name="push", **light)
