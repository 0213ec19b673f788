"""Calibration overhead and memory on the bundled model, measured in one run.

    .venv/bin/python benchmarks/bench_calibration.py [--samples 32] [--seq-len 256] [--threads 1,2]
        [--breakdown-only] [--breakdown-windows 16] [--passes-only] [--passes-batches 1,2,4,8] [--json out.json]

1. Time, at each torch thread count: calibration with bucket + knn entropy and cosine + angular scores
   at all three granularities, with the statistics on the forward's thread (``overlap=False``) and on a
   second thread beside the next forward (``overlap=True``), divided by a bare forward of the same
   windows without hooks (the full LM, and the decoder without the LM head, which calibration skips).
   The four runs alternate, in a rotated order each round, so they see the same machine load.
   Goal: at most 1.10x the decoder.
2. Data-parallel: the same calibration split over 2 processes (``accelerate launch``, 1 torch thread
   each) against 1 process with 2 threads, equal total threads; each in fresh processes, timed from a
   barrier after loading to the reduced scores, and the two runs' scores compared.
3. Memory: peak resident memory *added* by calibration (the kernel's high-water mark, reset after
   loading and a warm-up calibration), 32 versus 128 samples, each in a fresh process.
   Goal: at most 5% apart.
4. Where calibration's time goes (``--breakdown-windows`` windows, at each thread count): calibration with
   bucket + knn, bucket alone and knn alone (``overlap=False``), alternated like the runs above with a bare
   decoder forward of the same windows. knn's part is what adding it costs (both minus bucket alone),
   bucket's likewise, and the rest (capturing the streams, cosines, the angular matrix, the massive-token
   report) is what the single-estimator runs add to the forward beyond their estimator.
   ``--breakdown-only`` runs this part alone.
5. The estimators in passes of a few streams (the library's default on the CPU, ``estimators.CPU_PASS_BYTES``)
   against one pass per call (the 31 X or 30 Y streams), with 1, 2, 4 and 8 windows a batch (``--passes-batches``): the
   median seconds of one captured batch's statistics, the two alternated ``--rounds`` times in this process,
   and the peak memory added by a calibration of two such batches and its scores, each in a fresh process.
   ``--passes-only`` runs this part alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import torch

from entrodrop import estimators
from entrodrop.calibrate import (  # _captured_batches and _fold: calibration's own capture and statistics step
    EstimatorSettings,
    RunningStats,
    _captured_batches,
    _fold,
    run_calibration,
)
from entrodrop.data import load_corpus, make_windows
from entrodrop.loading import load_model

SETTINGS = EstimatorSettings(("bucket", "knn"))


def alternate(runs: dict, rounds: int) -> dict[str, float]:
    """Total seconds of each of ``runs`` (name -> callable), alternated ``rounds`` times in a rotated order so
    that each sees the same machine load."""
    totals = dict.fromkeys(runs, 0.0)
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with torch.inference_mode():
                t0 = time.perf_counter()
                runs[name]()
                totals[name] += time.perf_counter() - t0
    return totals


def forward_each(module, windows) -> None:
    """A bare forward of ``module`` (the full LM, or ``model.base_model``: the decoder without the LM head, which
    calibration skips), one window at a time, without hooks."""
    for row in windows:
        module(input_ids=row[None], use_cache=False)


def alternating_seconds(model, windows, spec, rounds: int) -> dict[str, float]:
    """Total seconds of each of four runs over ``windows``, alternated ``rounds`` times (rotated order)."""
    return alternate({
        "full": lambda: forward_each(model, windows),
        "decoder": lambda: forward_each(model.base_model, windows),
        "calibration": lambda: run_calibration(model, windows, settings=SETTINGS, spec=spec, overlap=False),
        "calibration_overlap": lambda: run_calibration(model, windows, settings=SETTINGS, spec=spec, overlap=True),
    }, rounds)


def statistics_breakdown(model, windows, spec, rounds: int) -> dict[str, float]:
    """Seconds per window of a decoder forward and of what calibration adds to it, by part (section 4 above)."""

    def calibration(*estimators):
        return lambda: run_calibration(model, windows, settings=EstimatorSettings(estimators), spec=spec,
                                       overlap=False)

    totals = alternate({"decoder": lambda: forward_each(model.base_model, windows), "both": calibration("bucket", "knn"),
                        "bucket": calibration("bucket"), "knn": calibration("knn")}, rounds)
    per = {k: v / (rounds * len(windows)) for k, v in totals.items()}
    parts = {"knn": per["both"] - per["bucket"], "bucket": per["both"] - per["knn"],
             "rest": per["bucket"] + per["knn"] - per["both"] - per["decoder"]}
    return {"decoder_s": per["decoder"], "calibration_s": per["both"], **{f"{k}_s": v for k, v in parts.items()},
            "calibration_vs_decoder": per["both"] / per["decoder"],
            **{f"{k}_vs_decoder": v / per["decoder"] for k, v in parts.items()}}


def data_parallel_child(samples: int, seq_len: int, out: str) -> None:
    """In each launched process (or alone): load, wait for every process, time the calibration to its
    reduced scores; the main process writes the seconds and the scores."""
    import torch.distributed as dist

    from entrodrop.distributed import is_main, world

    processes = world()
    loaded = load_model("smollm2")
    windows = make_windows(loaded.tokenizer, load_corpus("gsm8k"), num_samples=samples, seq_len=seq_len, seed=0)
    run_calibration(loaded.model, windows[:1], settings=SETTINGS, spec=loaded.arch)  # warm-up, untimed
    if processes.size > 1:
        dist.barrier()
    t0 = time.perf_counter()
    scores = run_calibration(loaded.model, windows, settings=SETTINGS, spec=loaded.arch, overlap=False)
    seconds = time.perf_counter() - t0
    if is_main():
        Path(out).write_text(json.dumps({"processes": processes.size, "threads": torch.get_num_threads(),
                                         "seconds": seconds, "scores": scores.to_dict()}))


def data_parallel(samples: int, seq_len: int) -> dict:
    """2 processes x 1 thread against 1 process x 2 threads, each in fresh processes."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        child = [__file__, "--dp-child", str(samples), "--seq-len", str(seq_len)]
        one, two = f"{tmp}/one.json", f"{tmp}/two.json"
        subprocess.run([sys.executable, *child, "--dp-out", one], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", *child, "--dp-out", two],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results = {"one": json.loads(Path(one).read_text()), "two": json.loads(Path(two).read_text())}
    return {"one_process_2_threads_s": round(results["one"]["seconds"], 2),
            "two_processes_1_thread_s": round(results["two"]["seconds"], 2),
            "speedup": round(results["one"]["seconds"] / results["two"]["seconds"], 3),
            "max_relative_difference": score_difference(results["one"]["scores"], results["two"]["scores"])}


def score_difference(a: dict, b: dict) -> float:
    """Largest relative difference between two runs' scores (``Scores.to_dict()``): the entropy curves, all
    and sink-free, and each block's cosine importance."""
    curves = [(x, y) for key in ("entropy_curve", "entropy_curve_sinkfree") for est in a[key]
              for x, y in zip(a[key][est], b[key][est], strict=True)]
    cosines = [(x["cosine_importance"], y["cosine_importance"]) for x, y in zip(a["blocks"], b["blocks"], strict=True)]
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in curves + cosines)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's high-water mark of resident memory (VmHWM); return current RSS in bytes.

    Freed heap memory is handed back to the OS first (glibc malloc_trim), so the baseline is live
    memory only and reusing already-resident free pages cannot hide part of the peak."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Highest resident memory since the last reset, in bytes, as tracked by the kernel."""
    return _status_kib("VmHWM") * 1024


ONE_PASS = 2**62  # a pass budget no stream count reaches: the estimators measure every stream in one pass


def memory_child(samples: int, seq_len: int, batch: int = 1, one_pass: bool = False) -> None:
    """Run in a fresh process: peak RSS added by calibrating ``samples`` windows, ``batch`` a forward, and the
    scores, printed as JSON. ``one_pass``: the estimators measure every stream in one pass (section 5)."""
    if one_pass:
        estimators.CPU_PASS_BYTES = ONE_PASS
    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    warm = make_windows(loaded.tokenizer, corpus, num_samples=max(2, batch), seq_len=seq_len, seed=2)
    run_calibration(loaded.model, warm, settings=SETTINGS, spec=loaded.arch, batch_size=batch)  # allocator steady
    windows = make_windows(loaded.tokenizer, corpus, num_samples=samples, seq_len=seq_len, seed=1)
    baseline = reset_peak_rss()
    scores = run_calibration(loaded.model, windows, settings=SETTINGS, spec=loaded.arch, batch_size=batch)
    peak = peak_rss()
    print(json.dumps({"samples": samples, "batch": batch, "one_pass": one_pass, "baseline_bytes": baseline,
                      "peak_bytes": peak, "added_bytes": peak - baseline, "scores": scores.to_dict()}))


def run_memory_child(samples: int, seq_len: int, batch: int = 1, one_pass: bool = False) -> dict:
    """:func:`memory_child` in a fresh process (one run's allocator state must not leak into the next)."""
    command = [sys.executable, __file__, "--memory-child", str(samples), "--seq-len", str(seq_len),
               "--batch", str(batch), *(["--one-pass"] if one_pass else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def passes(loaded, windows, batches: list[int], rounds: int) -> dict:
    """Section 5, at each batch size (windows a forward): the median seconds of one batch's statistics in this
    process, the estimators in passes (the default) and in one pass, alternated ``rounds`` times after a warm-up;
    and, each in a fresh process, the peak memory a calibration of two such batches adds and its scores."""
    default = estimators.CPU_PASS_BYTES
    seq_len = windows.shape[1]
    result = {}
    for batch in batches:
        mask = torch.ones_like(windows[:batch], dtype=torch.bool)
        with closing(_captured_batches(loaded.model, loaded.arch, windows[:batch], mask, mask, range(1), batch,
                                       torch.device("cpu"))) as captured:
            streams = next(captured)
        seconds = {"passes": [], "one_pass": []}
        try:
            for r in range(rounds + 1):
                for mode in (("passes", "one_pass") if r % 2 == 0 else ("one_pass", "passes")):
                    estimators.CPU_PASS_BYTES = ONE_PASS if mode == "one_pass" else default
                    stats = RunningStats(loaded.num_layers, SETTINGS.estimators)
                    t0 = time.perf_counter()
                    _fold(stats, streams, SETTINGS)
                    if r:  # round 0 warms up
                        seconds[mode].append(time.perf_counter() - t0)
        finally:
            estimators.CPU_PASS_BYTES = default
        runs = {mode: run_memory_child(2 * batch, seq_len, batch, one_pass=mode == "one_pass")
                for mode in ("passes", "one_pass")}
        result[batch] = {"tokens": int(streams.xs.shape[1]), "threads": torch.get_num_threads(),
                         "statistics_ms": {mode: round(statistics.median(v) * 1e3, 1) for mode, v in seconds.items()},
                         "added_peak_mb": {mode: round(m["added_bytes"] / 2**20, 1) for mode, m in runs.items()},
                         "max_relative_difference": score_difference(runs["one_pass"]["scores"],
                                                                     runs["passes"]["scores"])}
    return result


def print_passes(result: dict, rounds: int) -> None:
    threads = next(iter(result.values()))["threads"]
    print(f"the estimators in passes against one pass per call (31 or 30 streams), {len(os.sched_getaffinity(0))} "
          f"cores, {threads} torch thread(s): one batch's statistics, median of {rounds} alternated runs; peak "
          f"memory added by calibrating 2 batches, each in a fresh process")
    for batch, r in result.items():
        t, m = r["statistics_ms"], r["added_peak_mb"]
        print(f"  {batch} window(s) a batch ({r['tokens']} tokens): statistics {t['passes']:.0f} ms in passes, "
              f"{t['one_pass']:.0f} ms in one ({t['passes'] / t['one_pass']:.3f}x); added peak {m['passes']:.0f} "
              f"against {m['one_pass']:.0f} MiB ({m['passes'] / m['one_pass']:.3f}x); scores differ by "
              f"{r['max_relative_difference']:.1e} (relative)")


def write_json(path: str | None, result: dict) -> None:
    """The run's figures as JSON at ``path`` (``--json``; None: not asked for)."""
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time at")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-samples", default="32,128")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dp-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dp-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--breakdown-windows", type=int, default=16)
    parser.add_argument("--breakdown-only", action="store_true", help="run section 4 (where the time goes) alone")
    parser.add_argument("--passes-batches", default="1,2,4,8", help="section 5: windows per batch to compare at")
    parser.add_argument("--passes-only", action="store_true", help="run section 5 (statistics in passes) alone")
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--one-pass", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.breakdown_windows < 1:
        parser.error("--breakdown-windows must be at least 1")
    batches = [int(b) for b in args.passes_batches.split(",")]
    if not args.breakdown_only and (min(batches) < 1 or max(batches) > args.samples):
        parser.error("--passes-batches must be at least 1 and at most --samples")
    if args.memory_child is not None:
        memory_child(args.memory_child, args.seq_len, args.batch, args.one_pass)
        return
    if args.dp_child is not None:
        data_parallel_child(args.dp_child, args.seq_len, args.dp_out)
        return

    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    windows = make_windows(loaded.tokenizer, corpus, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    if args.passes_only:
        in_passes = passes(loaded, windows, batches, args.rounds)
        print_passes(in_passes, args.rounds)
        write_json(args.json, {"model": loaded.name, "seq_len": args.seq_len, "rounds": args.rounds,
                               "cores": len(os.sched_getaffinity(0)), "passes_by_batch": in_passes})
        return
    part = windows[: args.breakdown_windows]
    breakdown, timing = {}, {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        statistics_breakdown(loaded.model, windows[:1], loaded.arch, 1)  # warm-up
        breakdown[threads] = statistics_breakdown(loaded.model, part, loaded.arch, args.rounds)
        if args.breakdown_only:
            continue
        alternating_seconds(loaded.model, windows[:2], loaded.arch, 1)  # warm-up
        sec = alternating_seconds(loaded.model, windows, loaded.arch, args.rounds)
        timing[threads] = {**{f"{k}_s": round(v, 2) for k, v in sec.items()},
                           "ratio_vs_full_lm": round(sec["calibration"] / sec["full"], 3),
                           "ratio_vs_decoder": round(sec["calibration"] / sec["decoder"], 3),
                           "overlap_ratio_vs_decoder": round(sec["calibration_overlap"] / sec["decoder"], 3)}
    print(f"where calibration's time goes: {len(part)} windows x {args.seq_len} tokens on "
          f"{loaded.name}, {args.rounds} alternating rounds, per window")
    for threads, b in breakdown.items():
        print(f"  {threads} torch thread(s): decoder forward {b['decoder_s'] * 1e3:.0f} ms, calibration "
              f"{b['calibration_s'] * 1e3:.0f} ms ({b['calibration_vs_decoder']:.3f}x); added, as a share of the "
              f"forward: knn {b['knn_vs_decoder']:.3f}, bucket {b['bucket_vs_decoder']:.3f}, the rest "
              f"{b['rest_vs_decoder']:.3f}")
    if args.breakdown_only:
        write_json(args.json, {"model": loaded.name, "windows": len(part), "seq_len": args.seq_len,
                               "rounds": args.rounds, "cores": len(os.sched_getaffinity(0)),
                               "breakdown_by_threads": breakdown})
        return
    dp = data_parallel(args.samples, args.seq_len)

    memory = {n: run_memory_child(n, args.seq_len) for n in (int(x) for x in args.memory_samples.split(","))}
    in_passes = passes(loaded, windows, batches, args.rounds)

    sizes = sorted(memory)
    small, large = memory[sizes[0]], memory[sizes[-1]]
    state = RunningStats(loaded.num_layers, SETTINGS.estimators).state_bytes()
    result = {
        "model": loaded.name,
        "windows": args.samples,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "cores": len(os.sched_getaffinity(0)),
        "timing_by_threads": timing,
        "data_parallel": dp,
        "process_peak_mb": {n: round(m["peak_bytes"] / 2**20, 1) for n, m in memory.items()},
        "added_peak_mb": {n: round(m["added_bytes"] / 2**20, 1) for n, m in memory.items()},
        "process_peak_ratio": round(large["peak_bytes"] / small["peak_bytes"], 3),
        "added_peak_ratio": round(large["added_bytes"] / max(small["added_bytes"], 1), 3),
        "statistics_state_bytes": state,
        "breakdown_windows": len(part),
        "breakdown_by_threads": breakdown,
        "passes_by_batch": in_passes,
    }
    print(f"calibration of {args.samples} x {args.seq_len} tokens on {loaded.name}, {args.rounds} alternating rounds, "
          f"{result['cores']} cores")
    for threads, t in timing.items():
        print(f"  {threads} torch thread(s): full LM {t['full_s']:.2f} s, decoder {t['decoder_s']:.2f} s, "
              f"calibration {t['calibration_s']:.2f} s, overlapped {t['calibration_overlap_s']:.2f} s")
        print(f"    vs decoder: {t['ratio_vs_decoder']:.3f}x, overlapped {t['overlap_ratio_vs_decoder']:.3f}x "
              f"(goal <= 1.10x); vs full LM {t['ratio_vs_full_lm']:.3f}x")
    print(f"  data-parallel: 1 process x 2 threads {dp['one_process_2_threads_s']:.2f} s, 2 processes x 1 thread "
          f"{dp['two_processes_1_thread_s']:.2f} s ({dp['speedup']:.3f}x); scores differ by at most "
          f"{dp['max_relative_difference']:.1e} (relative)")
    for n in sizes:
        print(f"  {n:4d} samples: process peak {memory[n]['peak_bytes'] / 2**20:8.1f} MiB, "
              f"added by calibration {memory[n]['added_bytes'] / 2**20:6.1f} MiB")
    print(f"  peak ratio {sizes[-1]} vs {sizes[0]} samples: process {result['process_peak_ratio']:.3f}, "
          f"added part {result['added_peak_ratio']:.3f} (goal within 5%)")
    print(f"  running statistics kept between batches: {state} bytes, whatever the sample count")
    print_passes(in_passes, args.rounds)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
