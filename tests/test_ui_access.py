"""Issue 21: a visitor reads only what they uploaded. Requests as a visitor sends them, against a launched
app: raw HTTP calls of the API (what a client on another machine can send) and gradio_client; server
files, another session's export, a symlink out of the upload folder and missing files are all refused
alike; a real upload still works; the model field takes bundled models and hub ids unless the operator
allows local paths."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import save_tiny_model, served_app
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from tiny_models import tiny_config

from entrodrop.ui import storage
from entrodrop.ui.access import ALLOW_LOCAL_MODELS, NOT_AN_UPLOAD, UploadGate, check_model_spec, model_refusal

REPO = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, {i} times." for i in range(400))


@pytest.fixture(scope="module")
def app():
    with served_app() as url:
        yield url


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return str(save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_tokenizer))


def fit_args(file_data) -> list:
    """The /fit_text inputs for a file source (what the page sends when a file is picked)."""
    return ["file", file_data, "", "", "", 4, 32]


def raw_call(url: str, api: str, data: list, session_hash: str) -> tuple[str, str]:
    """Call an endpoint over plain HTTP as any program can: (SSE event, its data) of the answer."""
    posted = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data, "session_hash": session_hash}, timeout=30)
    posted.raise_for_status()
    event_id = posted.json()["event_id"]
    event, payload = "", ""
    with httpx.stream("GET", f"{url}gradio_api/call/{api}/{event_id}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                payload = line.split(":", 1)[1].strip()
                if event in ("complete", "error"):
                    break
    return event, payload


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "notes.txt"}


@pytest.fixture(scope="module")
def loaded_session(app, tiny_dir):
    """A session hash with the tiny model loaded (raw calls share it)."""
    session = f"access-{time.monotonic_ns()}"
    event, payload = raw_call(app, "load_model", ["smollm2", tiny_dir, "auto", "auto"], session)
    assert event == "complete", payload
    return session


def test_server_paths_sent_over_http_are_refused_alike_whether_they_exist_or_not(app, loaded_session, tmp_path):
    outside = tmp_path / "private.txt"
    outside.write_text(TEXT)
    inside = Path(get_upload_folder()) / f"never-uploaded-{time.monotonic_ns()}"
    inside.mkdir(parents=True)
    (inside / "notes.txt").write_text(TEXT)  # in gradio's folder, but not received by the upload route
    link = inside / "link.txt"
    link.symlink_to(outside)  # a symlink out of the upload folder
    other = storage.new_session_folder()
    (other / "exports" / "theirs").mkdir(parents=True)
    (other / "exports" / "theirs" / "README.md").write_text(TEXT)  # another session's export
    try:
        answers = {}
        for name, path in {"outside": outside, "outside, missing": tmp_path / "missing.txt",
                           "repository README": REPO / "README.md", "symlink out": link,
                           "in the upload folder": inside / "notes.txt",
                           "in the upload folder, missing": inside / "missing.txt",
                           "another session's export": other / "exports" / "theirs" / "README.md"}.items():
            answers[name] = raw_call(app, "fit_text", fit_args(file_data(str(path))), loaded_session)
        for name, (_event, payload) in answers.items():
            assert "window" not in payload and "tokens" not in payload, f"{name} was read: {payload}"
        # what exists and what does not get the same answer at each place
        assert answers["outside"] == answers["outside, missing"] == answers["repository README"] == \
            answers["symlink out"]  # gradio refuses paths outside its folder before the app sees them
        assert answers["in the upload folder"] == answers["in the upload folder, missing"] == \
            answers["another session's export"]
        assert NOT_AN_UPLOAD in answers["in the upload folder"][1]
    finally:
        shutil.rmtree(inside, ignore_errors=True)
        storage.remove_session_folder(other)


def test_the_calibration_refuses_what_the_fit_refuses(app, loaded_session):
    inside = Path(get_upload_folder()) / f"never-uploaded-{time.monotonic_ns()}"
    inside.mkdir(parents=True)
    (inside / "notes.txt").write_text(TEXT)
    try:
        args = ["file", file_data(str(inside / "notes.txt")), "", "", "", 4, 32, ["bucket"], 20, 25, 0, "attn", "bucket"]
        event, payload = raw_call(app, "calibrate", args, loaded_session)
        assert event == "error" and NOT_AN_UPLOAD in payload
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def test_a_real_upload_still_calibrates(app, tiny_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text(TEXT)
    client = Client(app, verbose=False, download_files=False)
    client.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    _, fit = client.predict(source="file", upload=handle_file(str(notes)), hub_name="", column="", text="",
                            samples=4, seq_len=32, api_name="/fit_text")
    assert "calibration window" in fit
    status, *_ = client.predict(source="file", upload=handle_file(str(notes)), samples=4, seq_len=32,
                                estimators=["bucket"], api_name="/calibrate")
    assert status.startswith("✓ Done: 4 batches")


def test_gradio_client_uploads_a_local_path_itself(app, tiny_dir, tmp_path):
    """The issue's reproduction sends a FileData naming a local path through gradio_client, which reads the
    file on the *client's* machine and uploads it: the server then reads an upload, not its own file. The
    same request from a program that does not upload is refused (the tests above)."""
    mine = tmp_path / "client-side.txt"
    mine.write_text(TEXT)
    client = Client(app, verbose=False, download_files=False)
    client.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    before = {p for p in Path(get_upload_folder()).rglob("client-side.txt")}
    client.predict("file", file_data(str(mine)), "", "", "", 4, 32, api_name="/fit_text")
    copies = {p for p in Path(get_upload_folder()).rglob("client-side.txt")} - before
    assert copies and all(p.read_text() == TEXT for p in copies)  # it arrived as an upload of its bytes


def test_the_gate_refuses_what_gradio_never_received(tmp_path):
    gate = UploadGate()
    inside = Path(tempfile.mkdtemp(dir=get_upload_folder()))
    received = inside / "notes.txt"
    received.write_text(TEXT)

    class Blocks:
        upload_file_set = {str(received)}

    try:
        with pytest.raises(ValueError, match="not one uploaded"):
            gate.check(received)  # not attached yet: nothing is an upload
        gate.attach(Blocks())
        assert gate.check(received) == str(received.resolve())
        (inside / "alias.txt").symlink_to(received)
        assert gate.check(inside / "alias.txt") == str(received.resolve())  # symlinks followed to the upload
        for refused in (inside, inside / "missing.txt", REPO / "README.md", tmp_path):
            with pytest.raises(ValueError) as exc:
                gate.check(refused)
            assert str(exc.value) == NOT_AN_UPLOAD
    finally:
        shutil.rmtree(inside, ignore_errors=True)


# -- the model field ---------------------------------------------------------------------------------
@pytest.fixture()
def public(monkeypatch):
    monkeypatch.delenv(ALLOW_LOCAL_MODELS, raising=False)


def test_model_field_refuses_server_paths_alike_by_default(public, app, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(40))
    client = Client(app, verbose=False, download_files=False)
    answers = {}
    for spec in (tiny_dir, str(tmp_path / "missing"), str(tmp_path / "model.gguf"), str(tmp_path / "missing.gguf"),
                 "tests", "entrodrop", "no-such-owner/no-such-model", "../etc", "~/models"):
        with pytest.raises(AppError) as exc:
            client.predict(bundled="smollm2", spec_text=spec, api_name="/load_model")
        answers[spec] = str(exc.value)
        assert str(exc.value) == model_refusal(spec)  # offline, a hub miss reads exactly like a path refused
    with pytest.raises(ValueError, match="neither one it has"):
        check_model_spec(tiny_dir)
    check_model_spec("SmolLM2")  # bundled aliases and hub-shaped ids pass
    check_model_spec("HuggingFaceTB/SmolLM2-360M")


def test_model_field_takes_local_paths_when_the_operator_allows(app, tiny_dir, monkeypatch):
    monkeypatch.setenv(ALLOW_LOCAL_MODELS, "1")
    client = Client(app, verbose=False, download_files=False)
    status, *_ = client.predict(bundled="smollm2", spec_text=tiny_dir, api_name="/load_model")
    assert "is ready" in status
    with pytest.raises(AppError, match="No such file or folder"):
        client.predict(bundled="smollm2", spec_text=os.path.join(tiny_dir, "missing"), api_name="/load_model")
