"""Issue 9: the app is safe to put on the internet. Hostile but realistic requests through `gradio_client`
against a running app (a tiny random model: nothing here depends on weights): export names that are
paths, overwriting outside the session, server paths as data names, oversized requests; a second
visitor's small job while a large one runs; the disk a session used, back to zero after it leaves."""

import os
import threading
import time
from pathlib import Path

import pytest
from conftest import save_tiny_model, served_app
from gradio.utils import get_upload_folder
from gradio_client import Client
from gradio_client.exceptions import AppError
from tiny_models import tiny_config

from entrodrop.ui import storage
from entrodrop.ui.calibrate import calibration_data
from entrodrop.ui.turns import ModelTurns

TTL_MIN = 0.25  # 15 s: a session's folder goes within 1.25 x TTL of its last use
CALIBRATION = dict(source="gsm8k", upload=None, samples=4, seq_len=64, estimators=["bucket"])
SMALL_JOB_BOUND_S = 15.0  # what a second visitor may wait for a 2-window calibration while a large one runs


@pytest.fixture(scope="module")
def work_root():
    root = Path(get_upload_folder()) / f"entrodrop-test-{os.getpid()}-{time.monotonic_ns()}"
    saved = {k: os.environ.get(k) for k in ("ENTRODROP_WORK_DIR", "ENTRODROP_SESSION_TTL_MIN")}
    os.environ.update(ENTRODROP_WORK_DIR=str(root), ENTRODROP_SESSION_TTL_MIN=str(TTL_MIN))
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        storage.start_janitor()  # re-read the TTL
        storage.remove_session_folder(root)


@pytest.fixture(scope="module")
def app_url(work_root):
    with served_app() as url:
        yield url


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return str(save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_tokenizer))


def client_for(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def ready_client(url: str, tiny_dir: str, **calibration) -> Client:
    client = client_for(url)
    client.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    client.predict(**{**CALIBRATION, **calibration}, api_name="/calibrate")
    client.predict(criterion="entrodrop", kind="attn", count=1, estimator="bucket", protect="none", boundary="",
                   api_name="/select")
    return client


def export(client: Client, name: str, overwrite: bool = False) -> Path:
    """Export and zip; the server path of the zip (inside the session's folder)."""
    status, *_ = client.predict(name=name, overwrite=overwrite, api_name="/export")
    assert "Verification PASSED" in status
    download = client.predict(api_name="/export_zip")
    return Path(download["value"]["path"])


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


# -- 1. exports confined ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/tmp/entrodrop-victim", "../../tmp/entrodrop-pwned", "..", "a/b", "~root/x",
                                  ".hidden", "x" * 200, "bad name!", "a\\b"])
def test_export_names_that_are_paths_are_refused(name):
    with pytest.raises(ValueError):
        storage.export_name(name, "default")


def test_export_names_refused_through_the_api(app_url, tiny_dir, tmp_path, work_root):
    client = ready_client(app_url, tiny_dir)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    outside_before = set(Path("/tmp").iterdir())
    for name in (str(victim), "../../victim", f"../../../../..{victim}", "..", "sub/dir", "x" * 200):
        with pytest.raises(AppError, match="export name"):
            client.predict(name=name, overwrite=True, api_name="/export")
    assert (victim / "keep.txt").read_text() == "mine" and sorted(victim.iterdir()) == [victim / "keep.txt"]
    assert set(Path("/tmp").iterdir()) - outside_before <= {work_root}  # nothing new outside the sessions
    # a proper name lands in the session's own folder, and overwrite replaces only that session's export
    zip_a = export(client, "same")
    other = ready_client(app_url, tiny_dir)
    zip_b = export(other, "same")
    session_a, session_b = zip_a.parent.parent, zip_b.parent.parent
    assert session_a != session_b and session_a.parent == session_b.parent == work_root
    before_b = (session_b / "exports" / "same" / "config.json").stat().st_mtime_ns
    with pytest.raises(AppError, match="already have an export named 'same'"):
        client.predict(name="same", api_name="/export")
    export(client, "same", overwrite=True)
    assert (session_b / "exports" / "same" / "config.json").stat().st_mtime_ns == before_b


def test_a_sub_block_export_loads_as_what_it_is(app_url, tiny_dir):
    """Problem 2 through the app: Load of a sub-block export shows the pruned model's parameter count."""
    client = ready_client(app_url, tiny_dir)
    zip_path = export(client, "pruned-attn")
    status, *_ = client.predict(name="x", api_name="/export")  # the card says what was kept
    kept = int(status.split(" of ")[0].rsplit("(", 1)[1].replace(",", ""))
    folder = zip_path.parent.parent / "exports" / "pruned-attn"
    status, facts, *_ = client_for(app_url).predict(bundled="smollm2", spec_text=str(folder), api_name="/load_model")
    assert "is ready" in status and f"| Parameters | {kept:,} |" in facts


# -- 6. data names are not paths ---------------------------------------------------------------------
def test_server_paths_as_data_names_are_refused(app_url, tiny_dir):
    client = client_for(app_url)
    client.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    for name in ("/etc/passwd", "../../etc", tiny_dir, "~/x", "csv", "json:/etc/passwd"):
        with pytest.raises(AppError, match="never a file on this server|Hugging Face data set name|not a valid"):
            client.predict(**{**CALIBRATION, "source": "hub", "hub_name": name}, api_name="/calibrate")


def test_files_in_session_folders_are_not_uploads(work_root):
    folder = storage.new_session_folder()
    (folder / "secret.txt").write_text("another visitor's file")
    with pytest.raises(ValueError, match="not one uploaded to this page"):
        calibration_data("file", upload=str(folder / "secret.txt"))
    storage.remove_session_folder(folder)


# -- 3. fair use ---------------------------------------------------------------------------------
def test_oversized_requests_are_refused_with_the_limit(app_url, tiny_dir):
    client = ready_client(app_url, tiny_dir)
    with pytest.raises(AppError, match=r"256 samples x 2048 tokens = 524,288, over its limit of 16,384 .*"
                                       r"ENTRODROP_MAX_CALIB_TOKENS"):
        client.predict(**{**CALIBRATION, "samples": 256, "seq_len": 2048}, api_name="/calibrate")
    with pytest.raises(AppError, match="ENTRODROP_MAX_CHECK_TOKENS"):
        client.predict(n_windows=64, seq_len=2048, measure_speed=False, api_name="/run_check")
    with pytest.raises(AppError, match="ENTRODROP_MAX_PREFILL_TOKENS"):
        client.predict(n_windows=2, seq_len=32, measure_speed=True, prefill=2048, decode=4, api_name="/run_check")
    with pytest.raises(AppError, match="ENTRODROP_MAX_NEW_TOKENS"):
        client.predict(prompt="Hi", max_new=256, api_name="/generate")
    with pytest.raises(AppError, match="whole number"):
        client.predict(**{**CALIBRATION, "samples": 2.5}, api_name="/calibrate")


def test_turns_go_to_the_job_that_used_the_model_least():
    turns, order = ModelTurns(), []
    long_job, short_job = turns.job(), turns.job()
    long_job.model_seconds = 100.0  # a long calibration's batches so far

    def take(job, name):
        with turns.turn(job):
            order.append(name)

    def wait_for(waiting: int):
        deadline = time.monotonic() + 10
        while turns.waiting < waiting and time.monotonic() < deadline:
            time.sleep(0.01)

    with turns.turn(long_job):  # a batch of the long job runs; its next batch, then a short job, queue up
        threads = [threading.Thread(target=take, args=(long_job, "long"))]
        threads[0].start()
        wait_for(1)
        threads.append(threading.Thread(target=take, args=(short_job, "short")))
        threads[1].start()
        wait_for(2)
    for thread in threads:
        thread.join(timeout=10)
    assert order == ["short", "long"]


def test_a_second_visitor_is_served_while_a_large_job_runs(app_url, tiny_dir):
    large, small = client_for(app_url), ready_client(app_url, tiny_dir)
    large.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    job = large.submit(**{**CALIBRATION, "samples": 256, "estimators": ["bucket", "knn", "renyi"]},
                       api_name="/calibrate")
    deadline = time.monotonic() + 60
    while not any("Batch" in str(out[0]) for out in job.outputs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    status, *_ = small.predict(**{**CALIBRATION, "samples": 2}, api_name="/calibrate")
    waited = time.monotonic() - started
    large_running = not job.done()
    large.predict(api_name="/stop")
    job.result(timeout=120)
    print(f"\nsecond visitor's 2-window calibration answered in {waited:.2f} s while the large one ran")
    assert status.startswith("✓ Done: 2 batches")
    assert large_running and waited < SMALL_JOB_BOUND_S


# -- 1. disk back to zero ------------------------------------------------------------------------------
def test_disk_of_a_session_that_left_goes_back_to_zero(app_url, tiny_dir, work_root):
    client = ready_client(app_url, tiny_dir)
    zips = [export(client, f"export-{i}") for i in range(3)]
    session = zips[0].parent.parent
    assert all(z.is_file() and z.is_relative_to(session) for z in zips)  # served from there: no copies
    assert storage.folder_bytes(session) > 0
    left = time.monotonic()
    del client  # the visitor leaves
    while session.exists() and time.monotonic() - left < 60:
        time.sleep(0.2)
    gone_after = time.monotonic() - left
    print(f"\nsession folder of 3 exports removed {gone_after:.1f} s after its last use (TTL {TTL_MIN * 60:g} s)")
    assert not session.exists() and gone_after < 1.25 * TTL_MIN * 60 + 5
    assert not [p for p in files_under(work_root) if p.is_file() and p.is_relative_to(session)]
