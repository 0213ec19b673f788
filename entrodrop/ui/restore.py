"""A page reload brings the session back: calibration, plan and check history.

The browser holds only a random token (``gr.BrowserState``, encrypted in its localStorage); the
results stay on the server (:data:`~.storage.SESSION_STORE`, bounded in entries, size and age), saved
after every successful action (:func:`~.state.save_session`). Another browser has another token, so
it never sees them; a malformed or unknown token gets a fresh one.
"""

from __future__ import annotations

import logging

import gradio as gr

from . import storage
from .calibrate import CalibrateHandlers
from .check import history_updates, verdict_markdown
from .choose import ChooseHandlers
from .export import plan_note
from .state import Session, restore_snapshot

logger = logging.getLogger(__name__)

STORAGE_KEY = "entrodrop-session"


class RestoreHandlers:
    """Runs after the page has bound its model: adopt or make the browser's token, restore what it kept."""

    def __init__(self, token: gr.BrowserState, steps):
        self.token, self.steps = token, steps
        self.calibrate = CalibrateHandlers(steps.calibrate, steps.check)
        self.choose = ChooseHandlers(steps.choose, steps.calibrate)

    def outputs(self) -> list:
        s = self.steps
        return list(dict.fromkeys([
            self.token, s.model.model_status, s.calibrate.calib_status, s.calibrate.entropy_plot, s.calibrate.norms_plot,
            s.calibrate.blocks_plot, s.calibrate.explainer, *self.choose.outputs(), s.choose.criterion,
            s.choose.kind, s.check.verdict,
            s.check.history_table, s.check.history_plot, s.check.compare_a, s.check.compare_b, s.check.compare_table,
            s.export.plan_note]))

    def restore(self, session: Session, token):
        """Give this browser its token; when results were kept under it, put them back on every step."""
        if not isinstance(session, Session):
            return {self.token: gr.skip()}
        if not storage.valid_token(token):
            token = storage.new_browser_token()
        session.browser_token = token
        try:
            if session.scores is not None or not restore_snapshot(session, token):
                return {self.token: token}
            return {self.token: token, **self.views(session)}
        except Exception:  # a snapshot from an older app version: start afresh rather than break the page
            logger.exception("Restoring a session failed; starting afresh")
            return {self.token: token}

    def views(self, session: Session) -> dict:
        s = self.steps
        updates: dict = {s.model.model_status: f"↺ Restored your session on **{session.model_name}** from before "
                                               "the reload (calibration, plan and checks)."}
        if session.scores is not None:
            scores = session.scores
            updates[s.calibrate.calib_status] = (f"↺ Restored: {scores.batches_done} of {scores.batches_total} "
                                                 "batches calibrated before the reload. Next: step 3, Choose.")
            updates.update(self.calibrate._curves(session, session.view_kind, session.view_est))
            updates.update(self.choose._choose_view(session))
            updates[s.choose.count] = gr.update(maximum=scores.num_layers, value=session.count)
            updates[s.choose.criterion], updates[s.choose.kind] = session.criterion, session.kind
        updates.update(history_updates(s.check, session))
        if session.history:
            last = session.history[-1]
            updates[s.check.verdict] = verdict_markdown(last.verdict, last.number)
        updates[s.export.plan_note] = plan_note(session)
        return updates
