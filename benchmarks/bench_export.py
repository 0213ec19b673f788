"""How big a default export of the bundled SmolLM2 is, and how quickly its zip is ready.

Loads the bundled model (a Q4_1 GGUF de-quantised to float), drops the old default plan (8 attention
blocks by entrodrop order; any 8 attention blocks weigh the same), exports it with the default dtype
(bfloat16 for a GGUF source) and reload-verifies it, then zips it (stored). Goals: <= 300 MB on disk,
zip ready in <= 15 s.

    .venv/bin/python benchmarks/bench_export.py [--dtype bfloat16|float16|float32]

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from entrodrop.export import ModelSource, export_pruned, iter_zip_export  # noqa: E402
from entrodrop.loading import DEFAULT_MODEL, load_model  # noqa: E402
from entrodrop.plan import DropPlan  # noqa: E402
from entrodrop.progress import last_event  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    print(f"loaded {loaded.name} in {time.perf_counter() - t0:.1f} s ({loaded.dtype})")
    plan = DropPlan.parse(",".join(f"attn:{i}" for i in (4, 7, 11, 14, 17, 20, 23, 26)), loaded.num_layers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = export_pruned(loaded.model, loaded.tokenizer, plan, Path(tmp) / "smol", dtype=args.dtype,
                               source=ModelSource.of(loaded))
        export_s = time.perf_counter() - t0
        on_disk = sum(p.stat().st_size for p in result.path.iterdir())
        print(f"export ({result.dtype}) written and verified in {export_s:.1f} s: {result.verdict}")
        print(f"on disk: {on_disk / 1e6:.1f} MB (weights {result.weights_bytes / 1e6:.1f} MB; source "
              f"{result.source_bytes / 1e6:.1f} MB) -> goal <= 300 MB: {'met' if on_disk <= 300e6 else 'MISSED'}")
        t0 = time.perf_counter()
        events = 0

        def counted():
            nonlocal events
            for event in iter_zip_export(result.path):
                events += 1
                yield event

        zip_path = last_event(counted()).partial
        zip_s = time.perf_counter() - t0
        print(f"zip {zip_path.stat().st_size / 1e6:.1f} MB ready in {zip_s:.1f} s ({events} progress events) "
              f"-> goal <= 15 s: {'met' if zip_s <= 15 else 'MISSED'}")


if __name__ == "__main__":
    main()
