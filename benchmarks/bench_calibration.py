"""Calibration overhead and memory on the bundled model, measured in one run.

    .venv/bin/python benchmarks/bench_calibration.py [--samples 64] [--seq-len 256] [--json out.json]

1. Time: calibration with bucket + knn entropy and cosine + angular scores at all three
   granularities, divided by a bare forward of the same tokens through the same model without
   hooks. Both the full LM forward and the decoder without the LM head are reported (calibration
   skips the LM head: logits are not needed). The three are interleaved window by window so they
   see the same machine load. Goal: at most 1.25x.
2. Memory: peak resident memory *added* by calibration (the kernel's high-water mark, reset after
   loading and a warm-up calibration), 32 versus 128 samples, each in a fresh process.
   Goal: at most 5% apart.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time

import torch

from entrodrop.calibrate import EstimatorSettings, RunningStats, iter_calibration, run_calibration
from entrodrop.data import load_corpus, make_windows
from entrodrop.loading import load_model


def interleaved_seconds(model, windows, settings, spec) -> dict[str, float]:
    """Per window, in turn: full LM forward, decoder-only forward, one calibration step.

    Interleaving puts the three measurements under the same machine load, so their ratios hold
    even on a noisy shared machine.
    """
    totals = {"full": 0.0, "decoder": 0.0, "calibration": 0.0}
    events = iter_calibration(model, windows, settings=settings, spec=spec)
    with torch.inference_mode():
        for row in windows:
            t0 = time.perf_counter()
            model(input_ids=row[None], use_cache=False)
            t1 = time.perf_counter()
            model.base_model(input_ids=row[None], use_cache=False)
            t2 = time.perf_counter()
            next(events)
            t3 = time.perf_counter()
            totals["full"] += t1 - t0
            totals["decoder"] += t2 - t1
            totals["calibration"] += t3 - t2
    return totals


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


def memory_child(samples: int, seq_len: int) -> None:
    """Run in a fresh process: peak RSS added by calibrating ``samples`` windows, printed as JSON."""
    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    settings = EstimatorSettings(("bucket", "knn"))
    warm = make_windows(loaded.tokenizer, corpus, num_samples=2, seq_len=seq_len, seed=2)
    run_calibration(loaded.model, warm, settings=settings, spec=loaded.arch)  # allocator steady state
    windows = make_windows(loaded.tokenizer, corpus, num_samples=samples, seq_len=seq_len, seed=1)
    baseline = reset_peak_rss()
    run_calibration(loaded.model, windows, settings=settings, spec=loaded.arch)
    peak = peak_rss()
    print(json.dumps({"samples": samples, "baseline_bytes": baseline, "peak_bytes": peak, "added_bytes": peak - baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory-samples", default="32,128")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.seq_len)
        return

    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    windows = make_windows(loaded.tokenizer, corpus, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    settings = EstimatorSettings(("bucket", "knn"))
    interleaved_seconds(loaded.model, windows[:2], settings, loaded.arch)  # warm-up
    seconds = interleaved_seconds(loaded.model, windows, settings, loaded.arch)
    full, decoder, calib = seconds["full"], seconds["decoder"], seconds["calibration"]

    memory = {}  # each size in a fresh process: one run's allocator state must not leak into the next
    for n in (int(x) for x in args.memory_samples.split(",")):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--seq-len", str(args.seq_len)],
                             capture_output=True, text=True, check=True).stdout
        memory[n] = json.loads(out.strip().splitlines()[-1])

    sizes = sorted(memory)
    small, large = memory[sizes[0]], memory[sizes[-1]]
    state = RunningStats(loaded.num_layers, settings.estimators).state_bytes()
    result = {
        "model": loaded.name,
        "windows": args.samples,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "bare_forward_full_lm_s": round(full, 2),
        "bare_forward_decoder_s": round(decoder, 2),
        "calibration_s": round(calib, 2),
        "ratio_vs_full_lm": round(calib / full, 3),
        "ratio_vs_decoder": round(calib / decoder, 3),
        "process_peak_mb": {n: round(m["peak_bytes"] / 2**20, 1) for n, m in memory.items()},
        "added_peak_mb": {n: round(m["added_bytes"] / 2**20, 1) for n, m in memory.items()},
        "process_peak_ratio": round(large["peak_bytes"] / small["peak_bytes"], 3),
        "added_peak_ratio": round(large["added_bytes"] / max(small["added_bytes"], 1), 3),
        "statistics_state_bytes": state,
    }
    print(f"calibration of {args.samples} x {args.seq_len} tokens on {loaded.name} ({result['threads']} threads)")
    print(f"  bare forward, full LM      {full:7.2f} s")
    print(f"  bare forward, decoder only {decoder:7.2f} s")
    print(f"  calibration (bucket+knn+cosine+angular, attn/mlp/layer) {calib:7.2f} s")
    print(f"  ratio vs full LM {result['ratio_vs_full_lm']:.3f}x, vs decoder {result['ratio_vs_decoder']:.3f}x (goal <= 1.25x)")
    for n in sizes:
        print(f"  {n:4d} samples: process peak {memory[n]['peak_bytes'] / 2**20:8.1f} MiB, "
              f"added by calibration {memory[n]['added_bytes'] / 2**20:6.1f} MiB")
    print(f"  peak ratio {sizes[-1]} vs {sizes[0]} samples: process {result['process_peak_ratio']:.3f}, "
          f"added part {result['added_peak_ratio']:.3f} (goal within 5%)")
    print(f"  running statistics kept between batches: {state} bytes, whatever the sample count")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
