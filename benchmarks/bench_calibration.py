"""Calibration overhead and memory on the bundled model, measured in one run.

    .venv/bin/python benchmarks/bench_calibration.py [--samples 64] [--seq-len 256] [--json out.json]

1. Time: calibration with bucket + knn entropy and cosine + angular scores at all three
   granularities, divided by a bare forward of the same tokens through the same model without
   hooks (both the full LM forward and the decoder without the LM head are reported; calibration
   skips the LM head because logits are not needed). Goal: at most 1.25x.
2. Memory: peak resident memory *added* by calibration (sampled every 5 ms above the level after
   loading and a warm-up forward) at 32 versus 128 samples. Goal: at most 5% apart.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import torch

from entrodrop.calibrate import EstimatorSettings, run_calibration
from entrodrop.data import load_corpus, make_windows
from entrodrop.loading import load_model


def bare_forward_seconds(model, windows, *, lm_head: bool) -> float:
    runner = model if lm_head else model.base_model
    start = time.perf_counter()
    with torch.inference_mode():
        for row in windows:
            runner(input_ids=row[None], use_cache=False)
    return time.perf_counter() - start


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--memory-samples", default="32,128")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    loaded = load_model("smollm2")
    corpus = load_corpus("gsm8k")
    windows = make_windows(loaded.tokenizer, corpus, num_samples=args.samples, seq_len=args.seq_len, seed=0)
    settings = EstimatorSettings(("bucket", "knn"))
    model = loaded.model
    bare_forward_seconds(model, windows[:2], lm_head=True)  # warm-up

    full = bare_forward_seconds(model, windows, lm_head=True)
    decoder = bare_forward_seconds(model, windows, lm_head=False)
    start = time.perf_counter()
    run_calibration(model, windows, settings=settings, spec=loaded.arch)
    calib = time.perf_counter() - start

    memory = {}
    for n in (int(x) for x in args.memory_samples.split(",")):
        mem_windows = make_windows(loaded.tokenizer, corpus, num_samples=n, seq_len=args.seq_len, seed=1)
        baseline = psutil.Process().memory_info().rss
        with PeakRSS() as peak:
            run_calibration(model, mem_windows, settings=settings, spec=loaded.arch)
        memory[n] = peak.peak - baseline

    sizes = sorted(memory)
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
        "peak_added_mb": {n: round(b / 2**20, 1) for n, b in memory.items()},
        "memory_ratio": round(memory[sizes[-1]] / max(memory[sizes[0]], 1), 3),
    }
    print(f"calibration of {args.samples} x {args.seq_len} tokens on {loaded.name} ({result['threads']} threads)")
    print(f"  bare forward, full LM      {full:7.2f} s")
    print(f"  bare forward, decoder only {decoder:7.2f} s")
    print(f"  calibration (bucket+knn+cosine+angular, attn/mlp/layer) {calib:7.2f} s")
    print(f"  ratio vs full LM {result['ratio_vs_full_lm']:.3f}x, vs decoder {result['ratio_vs_decoder']:.3f}x (goal <= 1.25x)")
    for n in sizes:
        print(f"  peak memory added, {n:4d} samples: {memory[n] / 2**20:8.1f} MiB")
    print(f"  memory ratio {sizes[-1]} vs {sizes[0]} samples: {result['memory_ratio']:.3f} (goal within 5%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
