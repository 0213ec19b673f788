"""What the app's steps share: the process-wide model cache and launch preload, the per-session
:class:`Session`, and how library errors reach the user.

Sharing: the loaded models live in one process-wide :class:`~entrodrop.cache.ModelCache`
(bounded by count and memory); everything a user chooses or computes lives in a per-session
:class:`Session` held by ``gr.State``, its files in a private folder (:mod:`.storage`).

Model use: events that run a model (calibrate, check, generate, export) share the concurrency
group :data:`MODEL_GROUP`, which admits ``ENTRODROP_MODEL_JOBS`` jobs at once (:func:`model_events`).
Calibration hooks and the reversible preview both act on the shared model object, so admitted jobs
take fair turns on it between batches (:mod:`.turns`) and never overlap; :func:`model_job` holds
the model in the cache for the whole job, so eviction never drops it mid-job. Request sizes are
checked against the operator's limits first (:mod:`.limits`).

Errors: handlers are wrapped by :func:`user_errors`, which turns the library's ValueError /
OSError / TypeError into ``gr.Error`` with the library's message (it says what to do), and keeps
that message in the session; :func:`keep_errors` chains a step's events to write it, red, into the
step's status area, where it stays until the step's next action writes its own status.

Loading: a page opened while the bundled model is still loading at launch has no model yet;
:func:`model_job` (and :func:`waiting_for_model`, which says so on the page) wait for that model
instead of saying none is loaded.

Reloads: after every successful action the session's results are kept in a bounded server-side
store under the browser's random token (:func:`save_session`, :func:`restore_snapshot`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ..cache import ModelCache
from ..checks import CheckRecord, ChecksResult, Verdict, plan_key
from ..costs import BlockCosts
from ..criteria import DEFAULT_CRITERION, get_criterion, resolve_estimator
from ..loading import DEFAULT_MODEL, model_facts
from ..plan import DropPlan
from ..scores import Scores
from ..select import plan_from_ticks, protected_layers
from . import storage
from .healed import HEALED
from .limits import limit
from .turns import MODEL_TURNS, ModelJob

logger = logging.getLogger(__name__)

MODEL_GROUP = "model"  # concurrency_id of every event that runs a model
LOAD_GROUP = "load"


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
    data: dict | None = None  # load_corpus kwargs of the last calibration (the check reads its report part)
    scores: Scores | None = None
    costs: BlockCosts | None = None
    kind: str = "attn"
    criterion: str = DEFAULT_CRITERION
    estimator: str | None = None
    protect: str = "default"
    stage_boundary: int | None = None
    count: int = 0
    auto_plan: DropPlan | None = None
    ticked: set[int] = field(default_factory=set)
    checks: ChecksResult = field(default_factory=ChecksResult)
    export_dir: Path | None = None
    workdir: Path | None = None
    view_kind: str = "attn"  # what step 2's per-block plot shows
    view_est: str | None = None
    stop_requested: bool = False  # set by Stop, read by the running calibration or search between steps
    tradeoff: list[dict] = field(default_factory=list)  # step 3's sweep: one point per (criterion, count)
    # step 2's kept calibrations for the compare and claims panels: (number, label, Scores), newest last,
    # bounded by ui.compare.KEEP_CALIBRATIONS; kept across model loads (comparing models is the point)
    calibrations: list = field(default_factory=list)
    curve: str = "sink-free"  # step 2's entropy chart: "sink-free" (teaching) or "all-token" (the method's)
    history: list[CheckRecord] = field(default_factory=list)  # every finished check, oldest first
    verdicts: dict[str, Verdict] = field(default_factory=dict)  # plan_key -> verdict of its latest check
    history_model: str | None = None  # the model the history was measured on
    last_error: str = ""  # the last message user_errors showed; keep_errors writes it into the step's status
    browser_token: str | None = None  # this browser's key in the reload store (set on page load)
    healed_key: str | None = None  # this session's entry in the healed-model store (step 5), never shared
    # gr.State deep-copies the default Session for every new session, so nothing here may hold a lock

    def reset_results(self) -> None:
        """Forget everything computed for the previous model or calibration."""
        self.scores = self.costs = self.auto_plan = None
        self.ticked = set()
        self.checks = ChecksResult()
        self.tradeoff = []
        self.export_dir = None
        HEALED.discard(self.healed_key)  # healed for the previous model or calibration: nothing to export now
        self.healed_key = None
        if self.history_model != self.model_spec:  # checks of another model compare nothing with this one
            self.history, self.verdicts = [], {}
            self.history_model = self.model_spec

    def add_check(self, plan: DropPlan, result: ChecksResult, healed: str = "") -> CheckRecord:
        """Keep a finished check in the history, and its verdict under the plan's blocks (a healed model's
        check is kept beside them, under its own key: it never stands for the plan as dropped)."""
        number = (self.history[-1].number + 1) if self.history else 1
        record = CheckRecord(number, plan, result, criterion_label=get_criterion(plan.criterion).label_for(plan.blocks[0].kind)
                             if plan.blocks else get_criterion(plan.criterion).label, healed=healed)
        self.history.append(record)
        del self.history[:-MAX_HISTORY]
        self.history_model = self.model_spec
        if record.verdict is not None:
            self.verdicts[record.key] = record.verdict
        return record

    def work_path(self) -> Path:
        """This session's private folder for exports and files, marked as used now.

        Removed when the session ends or after ``ENTRODROP_SESSION_TTL_MIN`` unused minutes; a new
        one is made if the janitor removed it."""
        if self.workdir is None or not self.workdir.is_dir():
            if self.workdir is not None:  # removed as unused: what was in it is gone
                self.export_dir = None
            self.workdir = storage.new_session_folder()
        storage.touch(self.workdir)
        return self.workdir

    def protection(self) -> str:
        """The protection in force: the criterion's own when the user left it at "default"."""
        return get_criterion(self.criterion).default_protection if self.protect == "default" else self.protect

    def entrodrop_protection(self) -> str:
        """The protection the explainer describes for EntroDrop's own rule."""
        return get_criterion("entrodrop").default_protection if self.protect == "default" else self.protect

    def protected(self) -> dict[int, str]:
        """Protected layer -> why, under the current choice ({} before calibration or on a bad boundary)."""
        if self.scores is None:
            return {}
        est = resolve_estimator(self.scores, self.estimator)
        try:
            return protected_layers(self.scores, self.protection(), estimator=est, stage_boundary=self.stage_boundary)
        except ValueError:
            return {}


MAX_HISTORY = 50  # checks kept per session (the table and the reload store stay small)

# what a reload brings back (everything computed; not the private folder, which the session end removes)
_KEPT_FIELDS = ("model_spec", "dtype", "device", "model_name", "num_layers", "data", "scores", "costs", "kind",
                "criterion", "estimator", "protect", "stage_boundary", "count", "auto_plan", "ticked", "checks",
                "view_kind", "view_est", "history", "verdicts", "history_model")


def verdict_for(session: Session, plan: DropPlan | None) -> Verdict | None:
    """The verdict of the session's latest check of the same blocks as ``plan`` (None if never checked)."""
    if plan is None or not isinstance(session, Session):
        return None
    return session.verdicts.get(plan_key(plan))


def save_session(session: Session) -> None:
    """Keep the session's results under its browser token (no token: an API client, nothing kept)."""
    if session.browser_token:
        storage.SESSION_STORE.put(session.browser_token, {k: getattr(session, k) for k in _KEPT_FIELDS})


def restore_snapshot(session: Session, token: str) -> bool:
    """Fill ``session`` with what was kept under ``token``; False when nothing (or nothing valid) was kept."""
    kept = storage.SESSION_STORE.get(token)
    if not kept or not kept.get("model_spec"):
        return False
    for key, value in kept.items():
        if key in _KEPT_FIELDS:
            setattr(session, key, value)
    return True


def delete_session(session: Session) -> None:
    """``gr.State``'s delete callback: remove the session's private folder."""
    if isinstance(session, Session):
        storage.remove_session_folder(session.workdir)
        HEALED.discard(session.healed_key)


def model_events() -> dict:
    """Event options of every model-running event: one concurrency group admitting ``ENTRODROP_MODEL_JOBS``
    jobs, which then take turns on the model (:func:`model_job`)."""
    return {"concurrency_id": MODEL_GROUP, "concurrency_limit": limit("ENTRODROP_MODEL_JOBS")}


# -- helpers ---------------------------------------------------------------------------------
def error(message: str) -> gr.Error:
    """A message for the user (no server-side traceback: it is not a bug)."""
    return gr.Error(message, print_exception=False)


def error_markdown(message: str) -> str:
    """A message for a step's status area, red and kept until the step's next action."""
    from html import escape

    return f'<div class="status-error" role="alert">⚠ {escape(message)}</div>'


def _session_of(args, kwargs) -> Session | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Session)), None)


def show_last_error(session: Session) -> str:
    """What :func:`keep_errors` writes after a failed event: the session's last error, red."""
    message = session.last_error if isinstance(session, Session) else ""
    return error_markdown(message or "That did not work; try again.")


def keep_errors(event, session: gr.State, status) -> None:
    """After ``event`` fails, write its message into ``status`` (the step's status area), where it stays
    until the step's next action replaces it (a toast alone fades after a few seconds)."""
    event.failure(show_last_error, [session], [status], api_visibility="private", concurrency_limit=None,
                  show_progress="hidden", queue=False)


def user_errors(fn):
    """Turn the library's ValueError/OSError/TypeError into gr.Error (its message says what to do), keep the
    message in the session for :func:`keep_errors`, and keep the session's results after a success."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] ..." -> the message itself
            return error(exc.strerror + (f" ({exc.filename})" if exc.filename else ""))
        if isinstance(exc, (ValueError, OSError, TypeError, KeyError)):
            return error(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
        logger.exception("Unexpected error in %s", fn.__name__)
        return gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The shared model is unchanged; "
                        "try again or reload the page.")

    def failed(exc: Exception, session: Session | None) -> gr.Error:
        converted = convert(exc)
        if session is not None:
            session.last_error = str(converted.message)
        return converted

    def succeeded(session: Session | None) -> None:
        if session is not None:
            session.last_error = ""
            save_session(session)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            session = _session_of(args, kwargs)
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise failed(exc, session) from exc
            succeeded(session)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        session = _session_of(args, kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as exc:
            raise failed(exc, session) from exc
        succeeded(session)
        return out

    return wrapper


def session_facts(session: Session) -> dict | None:
    """``model_facts`` of the session's model if it was loaded in this process (None otherwise)."""
    if not session.model_spec:
        return None
    try:
        key = MODEL_CACHE.make_key(session.model_spec, session.dtype, session.device)
    except ValueError:
        return None
    with _FACTS_LOCK:
        return _FACTS.get(key)


def facts_for(key: tuple, loaded) -> dict:
    """``model_facts`` of a cached model, computed once per cache key."""
    with _FACTS_LOCK:
        if key not in _FACTS:
            _FACTS[key] = model_facts(loaded)
        return _FACTS[key]


def _preload_pending(session: Session) -> bool:
    """True while the session has no model and the launch preload is still loading one."""
    thread = _PRELOAD["thread"]
    return not session.model_spec and thread is not None and thread.is_alive()


def adopt_preload(session: Session, *, wait: bool = True) -> bool:
    """Bind a session without a model to the model preloaded at launch (waiting for it when ``wait``);
    True when the session has a model afterwards. Never resets what the session computed."""
    if session.model_spec:
        return True
    thread, spec = _PRELOAD["thread"], _PRELOAD["spec"]
    if thread is None:
        return False
    if wait:
        thread.join()
    if thread.is_alive() or _PRELOAD["error"]:
        return False
    key = MODEL_CACHE.make_key(spec)
    if key not in MODEL_CACHE:
        return False
    facts = facts_for(key, MODEL_CACHE.get_or_load(spec))
    session.model_spec, session.dtype, session.device = spec, "auto", "auto"
    session.model_name, session.num_layers = facts["name"], facts["num_layers"]
    return True


def waiting_for_model(session: Session, every_s: float = 1.0) -> Iterator[str]:
    """Status lines while the model loading at launch is not ready yet (nothing when it is, or when the
    session has its own model): a handler yields them, then its :func:`model_job` finds the model."""
    thread = _PRELOAD["thread"]
    while _preload_pending(session):
        yield (f"▶ Waiting for the bundled model {_PRELOAD['spec']}, still loading since launch "
               f"({time.monotonic() - _PRELOAD['started']:.0f} s); this starts by itself when it is ready…")
        thread.join(timeout=every_s)


@contextmanager
def model_job(session: Session) -> Iterator[tuple]:
    """``(loaded, job)``: the session's model, held in the shared cache (loaded again if it was evicted)
    for the whole ``with`` block, and a :class:`~.turns.ModelJob` whose turns every model run must take.
    A session opened while the bundled model was loading at launch waits for that model."""
    if not session.model_spec and not adopt_preload(session):
        if _PRELOAD["error"]:
            raise error(f"The bundled model could not be loaded at launch ({_PRELOAD['error']}): load a model in "
                        "step 1.")
        raise error("No model loaded yet: load one in step 1.")
    with MODEL_CACHE.use(session.model_spec, dtype=session.dtype, device=session.device) as loaded, \
            MODEL_TURNS.job() as job:
        yield loaded, job


def sharing_note(job: ModelJob) -> str:
    """Says how many other jobs take turns on the model now (explains a slower pace); "" when none."""
    others = job.others()
    return f" (taking turns on the model with {others} other job{'s' if others > 1 else ''})" if others else ""


def need_scores(session: Session) -> Scores:
    """The session's scores, or an error that says to calibrate first."""
    if session.scores is None:
        raise error("No calibration yet: run one in step 2 first.")
    return session.scores


def plan_to_run(session: Session) -> DropPlan:
    """The ticked plan, refusing an empty one (nothing to compare) or one that drops everything."""
    scores = need_scores(session)
    if not session.ticked:
        raise error("Nothing is ticked: tick at least one block to drop in step 3, or take the automatic selection.")
    try:
        return plan_from_ticks(scores, session.kind, session.ticked, session.auto_plan)
    except ValueError as exc:
        raise error(f"{exc} Untick some blocks in step 3.") from exc


def start_preload(spec: str = DEFAULT_MODEL, **kwargs) -> threading.Thread:
    """Load ``spec`` into the shared cache in a background thread (called at launch)."""

    def work():
        try:
            key = MODEL_CACHE.make_key(spec, kwargs.get("dtype", "auto"), kwargs.get("device", "auto"))
            facts_for(key, MODEL_CACHE.get_or_load(spec, **kwargs))
            logger.info("Preloaded %s", spec)
        except Exception as exc:  # shown on the page; the user can load something else
            logger.warning("Preloading %s failed: %s", spec, exc)
            _PRELOAD["error"] = str(exc)

    thread = threading.Thread(target=work, name="entrodrop-preload", daemon=True)
    _PRELOAD.update(thread=thread, spec=spec, error=None, started=time.monotonic())
    thread.start()
    return thread


def preload_info() -> dict:
    """The launch preload: ``thread``, ``spec``, ``error`` and ``started`` (monotonic seconds)."""
    return _PRELOAD
