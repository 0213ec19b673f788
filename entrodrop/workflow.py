"""The calibrate step as both front ends run it: text to windows, windows to a streaming calibration,
and the per-block costs of the model it scores.

The CLI (``entrodrop scan``, and ``prune`` / ``eval`` / ``sweep`` without ``--scores``) and the web
app's step 2 call :func:`start_calibration` and then only drive its ``events``: a progress bar in
one, live plots in the other. The checks of a plan have their own owner, :func:`entrodrop.checks.iter_checks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .calibrate import CalibrationEvent, EstimatorSettings, iter_calibration
from .costs import BlockCosts, measure_block_costs
from .data import load_corpus, make_windows


@dataclass
class Calibration:
    """A calibration ready to run: nothing has gone through the model until ``events`` is iterated."""

    windows: torch.Tensor  # (samples, seq_len) token ids from the calibration part of the text
    data_name: str  # the text as reports name it (a bundled set, a file's name, a hub set, "text")
    events: Iterator[CalibrationEvent]  # one event per batch; close it to stop (hooks are removed)
    costs: BlockCosts | None  # per-block parameters and FLOPs at seq_len (when asked for)


def start_calibration(
    loaded,
    data: Mapping,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    settings: EstimatorSettings | None = None,
    batch_size: int = 1,
    skip_first: int = 0,
    calibration: Mapping | None = None,
    costs: bool = False,
    overlap: bool | None = None,
) -> Calibration:
    """Read ``samples`` windows of ``seq_len`` tokens from the calibration part of the text ``data``
    names (``load_corpus`` keyword arguments: ``source``, and ``column`` / ``text`` where they apply)
    and set up the calibration of ``loaded`` (a :class:`~entrodrop.loading.LoadedModel`) on them.

    The scores record ``{"data": <the text's name>, "seed": seed}`` updated with ``calibration``.
    ``costs=True`` also measures the model's per-block costs, now, while no preview is active.
    ``overlap``: statistics on a second thread beside the next forward (see :func:`iter_calibration`).
    Bad text, sizes or settings raise a ValueError here or at the first event."""
    if "source" not in data:
        raise ValueError("data needs a 'source' (a bundled set, a file, a hub set or 'text'), as for load_corpus.")
    corpus = load_corpus(**data)
    windows = make_windows(loaded.tokenizer, corpus, num_samples=samples, seq_len=seq_len, seed=seed,
                           config=loaded.model.config)
    block_costs = measure_block_costs(loaded.model, seq_len) if costs else None
    events = iter_calibration(
        loaded.model, windows, settings=settings, batch_size=batch_size, model_name=loaded.name,
        calibration={"data": corpus.name, "seed": seed, **(calibration or {})}, spec=loaded.arch,
        skip_first=skip_first, overlap=overlap,
    )
    return Calibration(windows=windows, data_name=corpus.name, events=events, costs=block_costs)
