"""Issue 9, problem 5: every `entrodrop` failure is one clear line on stderr with a non-zero exit, never
a traceback, and never exit 0 with a wrong answer. Each test failed on the code before the fix."""

import json
import os

import pytest
from conftest import save_tiny_model
from tiny_models import tiny_config

from entrodrop.cli import main


def scores_dict(num_layers: int = 4, model: str = "tiny-qwen2", estimators=("bucket",)) -> dict:
    """A complete, valid scores JSON for a model of ``num_layers`` layers (no calibration needed)."""
    blocks = [{"layer": layer, "kind": kind, "delta_entropy": {e: 0.1 * (layer + 1) for e in estimators},
               "cosine_importance": 0.01 * (layer + 1), "angular_distance": 0.02 * (layer + 1)}
              for kind in ("attn", "mlp", "layer") for layer in range(num_layers)]
    curve = [10.0 - i if i < 2 else 8.0 + i for i in range(num_layers + 1)]
    return {"model": model, "num_layers": num_layers, "estimators": list(estimators),
            "entropy_curve": {e: curve for e in estimators}, "mid_entropy": {e: [9.0] * num_layers for e in estimators},
            "stage_boundary": {e: min(2, num_layers) for e in estimators}, "blocks": blocks,
            "angular_matrix": [[0.0] * (num_layers + 1) for _ in range(num_layers + 1)], "calibration": {},
            "batches_done": 1, "batches_total": 1, "complete": True}


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def one_error_line(capsys, code: int, expected_code: int | None = None) -> str:
    """The single stderr line of a failed command (asserts exit != 0, no traceback, one line)."""
    err = capsys.readouterr().err
    assert code != 0, err
    if expected_code is not None:
        assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("entrodrop: error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return str(save_tiny_model(tiny_config("qwen2"), tmp_path_factory.mktemp("m") / "tiny-qwen2", tiny_tokenizer))


def test_zero_or_negative_batch_size(tiny_dir, capsys):
    line = one_error_line(capsys, main(["scan", tiny_dir, "--samples", "2", "--seq-len", "32", "--batch-size", "0"]), 2)
    assert "--batch-size must be at least 1, got 0" in line
    line = one_error_line(capsys, main(["scan", tiny_dir, "--samples", "-3"]), 2)
    assert "--samples must be at least 1" in line


def test_os_errors_on_the_target(tiny_dir, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    line = one_error_line(capsys, main(["prune", tiny_dir, "--plan", "attn:1", "--out", str(a_file / "sub")]))
    assert f"{a_file} is a file" in line
    line = one_error_line(capsys, main(["prune", tiny_dir, "--plan", "attn:1", "--out", "/proc/entrodrop-x"]))
    assert "Cannot write to /proc" in line and "disk space" not in line
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_error_line(capsys, main(["prune", tiny_dir, "--plan", "attn:1", "--out", str(locked / "out")]))
        assert "permission denied" in line.lower()


def test_unwritable_json_output(tiny_dir, tmp_path, capsys):
    scores = write(tmp_path / "s.json", scores_dict())
    line = one_error_line(capsys, main(["select", scores, "--count", "1", "--protect", "none",
                                        "--out", str(tmp_path / "s.json" / "plan.json")]))
    assert "plan.json" in line


@pytest.mark.parametrize("field,value,named", [
    ("num_layers", "four", "num_layers"),
    ("blocks", {"layer": 1}, "blocks"),
    ("entropy_curve", {"bucket": [1, 2]}, "entropy_curve.bucket"),
    ("model", 7, "model"),
    ("stage_boundary", {"bucket": "two"}, "stage_boundary.bucket"),
])
def test_malformed_scores_fields_are_named(tmp_path, capsys, field, value, named):
    data = scores_dict()
    data[field] = value
    line = one_error_line(capsys, main(["select", write(tmp_path / "s.json", data), "--count", "1"]), 2)
    assert f"'{named}" in line and "s.json" in line


def test_mistyped_block_fields_are_named(tmp_path, capsys):
    data = scores_dict()
    data["blocks"][3]["delta_entropy"] = {"bucket": "small"}
    line = one_error_line(capsys, main(["select", write(tmp_path / "s.json", data), "--count", "1"]), 2)
    assert "blocks[3].delta_entropy.bucket" in line
    data = scores_dict()
    data["blocks"][0]["layer"] = [0]
    line = one_error_line(capsys, main(["select", write(tmp_path / "s.json", data), "--count", "1"]), 2)
    assert "blocks[0].layer" in line


def test_malformed_plan_fields_are_named(tiny_dir, tmp_path, capsys):
    plan = {"num_layers": 4, "blocks": [{"layer": "1", "kind": "attn"}]}
    line = one_error_line(capsys, main(["eval", tiny_dir, "--plan", write(tmp_path / "p.json", plan)]), 2)
    assert "blocks[0].layer" in line
    plan = {"num_layers": 4, "blocks": [{"layer": 1, "kind": ["attn"]}]}
    line = one_error_line(capsys, main(["eval", tiny_dir, "--plan", write(tmp_path / "p.json", plan)]), 2)
    assert "blocks[0].kind" in line
    plan = {"num_layers": 8, "blocks": [{"layer": 1, "kind": "attn"}]}
    line = one_error_line(capsys, main(["eval", tiny_dir, "--plan", write(tmp_path / "p.json", plan)]), 2)
    assert "8 layers" in line


def test_sweep_refuses_unknown_criteria_and_unreachable_counts(tiny_dir, tmp_path, capsys):
    scores = write(tmp_path / "s.json", scores_dict())
    line = one_error_line(capsys, main(["sweep", tiny_dir, "--scores", scores, "--criteria", "entrodrop,bogus",
                                        "--counts", "0,1"]), 2)
    assert "bogus" in line
    line = one_error_line(capsys, main(["sweep", tiny_dir, "--scores", scores, "--criteria", "cosine",
                                        "--counts", "0,9"]), 2)
    assert "Counts must be whole numbers from 0 to 3" in line and "[9]" in line
    line = one_error_line(capsys, main(["sweep", tiny_dir, "--scores", scores, "--criteria", "entrodrop",
                                        "--counts", "0,3"]), 2)
    assert "entrodrop at count 3" in line and "only 1 of 4 are eligible" in line
    line = one_error_line(capsys, main(["sweep", tiny_dir, "--scores", scores, "--counts", "1,x"]), 2)
    assert "--counts" in line


def test_select_never_returns_fewer_blocks_than_asked(tmp_path, capsys):
    scores = write(tmp_path / "s.json", scores_dict(num_layers=3))
    line = one_error_line(capsys, main(["select", scores, "--fraction", "0.1"]), 2)
    assert "0 of the" not in line or "asked" in line
    line = one_error_line(capsys, main(["select", scores, "--count", "2"]), 2)
    assert "only 0 of 3 are eligible" in line
    line = one_error_line(capsys, main(["select", scores, "--criterion", "manual"]), 2)
    assert "--layers" in line


def test_scores_of_another_model_warn(tiny_dir, tmp_path, capsys, caplog):
    other = write(tmp_path / "other.json", scores_dict(model="some-other-model"))
    code = main(["eval", tiny_dir, "--scores", other, "--count", "1", "--protect", "none", "--eval-samples", "1",
                 "--seq-len", "32", "--no-speed", "--max-new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "measured on 'some-other-model'" in err + caplog.text  # the log goes to stderr
    wrong_size = write(tmp_path / "wrong.json", scores_dict(num_layers=6))
    line = one_error_line(capsys, main(["eval", tiny_dir, "--scores", wrong_size, "--count", "1"]), 2)
    assert "6 layers" in line


def test_sequence_length_beyond_the_models_positions(tiny_dir, capsys):
    line = one_error_line(capsys, main(["scan", tiny_dir, "--seq-len", "100000", "--samples", "1"]), 2)
    assert "--seq-len 100000 is longer than the 256 token positions" in line


def test_empty_and_truncated_gguf(tmp_path, capsys):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    line = one_error_line(capsys, main(["scan", str(empty), "--samples", "1"]), 2)
    assert "empty.gguf" in line and "empty" in line
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    line = one_error_line(capsys, main(["scan", str(short), "--samples", "1"]), 2)
    assert "short.gguf" in line


def test_undecodable_text_names_the_file(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("café au lait, crème brûlée ".encode("latin-1") * 50)
    line = one_error_line(capsys, main(["scan", tiny_dir, "--data", str(bad), "--samples", "1", "--seq-len", "16"]), 2)
    assert "latin.txt" in line and "utf-8" in line.lower()


def test_an_unexpected_error_is_one_line_too(tiny_dir, monkeypatch, capsys):
    import entrodrop.cli.common as common

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nover two lines")

    monkeypatch.setattr(common, "calibrate_from_args", broken)
    monkeypatch.setattr("entrodrop.cli.scan.calibrate_from_args", broken)
    line = one_error_line(capsys, main(["scan", tiny_dir, "--samples", "1", "--seq-len", "32"]), 1)
    assert "unexpected RuntimeError: something inside broke over two lines" in line
