"""Data-parallel runs: `accelerate launch` of 2 CPU processes (gloo) gives the single process's numbers.

Each process measures its share of the windows; sums and counts are reduced with a sum and per-window
losses joined in window order (entrodrop.distributed). The scores, the ranks they give, the plans the
recommended search chooses and every held-out number must equal one process's, to 1e-6.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_config

from entrodrop.cli import main
from entrodrop.distributed import World, shard
from entrodrop.scores import Scores
from entrodrop.select import rank_blocks

CALIBRATION = ["--samples", "5", "--seq-len", "40"]  # 5 batches: shares of 2 and 3, unequal token counts
SWEEP = ["--criteria", "recommended,ablation,entrodrop,cosine", "--counts", "0,1,2", "--protect", "none",
         "--eval-samples", "5"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return str(save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("llama"), tiny_tokenizer))


def launch_two(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of the entrodrop CLI in 2 CPU processes, one torch thread each."""
    from conftest import free_port

    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", str(free_port()), "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "entrodrop", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    scan = launch_two("scan", tiny_dir, *CALIBRATION, "--json", str(out / "scores.json"))
    assert scan.returncode == 0, scan.stderr[-3000:]
    sweep = launch_two("sweep", tiny_dir, *CALIBRATION, *SWEEP, "--json", str(out / "sweep.json"))
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    return out, scan, sweep


@pytest.fixture(scope="module")
def one_process_runs(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert main(["scan", tiny_dir, *CALIBRATION, "--json", str(out / "scores.json")]) == 0
    assert main(["sweep", tiny_dir, *CALIBRATION, *SWEEP, "--json", str(out / "sweep.json")]) == 0
    return out


def test_shares_are_contiguous_disjoint_and_cover_every_item():
    for n in (0, 1, 5, 7):
        for size in (1, 2, 3, 8):
            shares = [shard(n, World(rank, size)) for rank in range(size)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_processes_give_the_scores_and_ranks_of_one(two_process_runs, one_process_runs):
    two = Scores.load(two_process_runs[0] / "scores.json")
    one = Scores.load(one_process_runs / "scores.json")
    assert two.complete and two.batches_done == one.batches_done == 5
    assert two.calibration["tokens"] == one.calibration["tokens"] == 200
    for est in one.estimators:
        assert two.entropy_curve[est] == pytest.approx(one.entropy_curve[est], rel=1e-6)
        assert two.entropy_curve_sinkfree[est] == pytest.approx(one.entropy_curve_sinkfree[est], rel=1e-6)
    for a, b in zip(two.blocks, one.blocks, strict=True):
        assert (a.layer, a.kind) == (b.layer, b.kind)
        assert a.delta_entropy == pytest.approx(b.delta_entropy, rel=1e-6, abs=1e-9)
        assert a.cosine_importance == pytest.approx(b.cosine_importance, rel=1e-6)
        assert a.angular_distance == pytest.approx(b.angular_distance, rel=1e-6)
    for row2, row1 in zip(two.angular_matrix, one.angular_matrix, strict=True):
        assert row2 == pytest.approx(row1, rel=1e-6, abs=1e-9)
    for s2, s1 in zip(two.massive_tokens["streams"], one.massive_tokens["streams"], strict=True):
        assert (s2["count"], s2["positions"], s2["token_ids"]) == (s1["count"], s1["positions"], s1["token_ids"])
        assert s2["max_ratio"] == pytest.approx(s1["max_ratio"], rel=1e-6)
    for criterion in ("entrodrop", "cosine", "angular"):
        for kind in ("attn", "mlp", "layer"):
            assert [layer for layer, _ in rank_blocks(two, criterion, kind)] == \
                   [layer for layer, _ in rank_blocks(one, criterion, kind)]


def test_two_processes_choose_and_score_the_plans_of_one(two_process_runs, one_process_runs):
    two = json.loads((two_process_runs[0] / "sweep.json").read_text())["rows"]
    one = json.loads((one_process_runs / "sweep.json").read_text())["rows"]
    assert [(r["criterion"], r["count"]) for r in two] == [(r["criterion"], r["count"]) for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["plan"] == b["plan"], f"{a['criterion']} at {a['count']} chose another plan"
        assert a["window_nll"] == pytest.approx(b["window_nll"], rel=1e-6)
        for key in ("dense_perplexity", "pruned_perplexity", "kl_mean", "top1_agreement"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_only_the_main_process_prints(two_process_runs):
    _, scan, sweep = two_process_runs
    assert scan.stdout.count("scores written to") == 1
    assert sweep.stdout.count("written to") == 1 and sweep.stdout.count("criterion   count") == 1


def test_commands_that_run_in_one_process_refuse_a_launch_clearly(tiny_dir):
    run = launch_two("eval", tiny_dir, "--plan", "attn:1")
    assert run.returncode != 0
    assert "eval runs in one process" in run.stderr and "scan, select, sweep" in run.stderr
