"""EntroDrop Studio: see inside an LLM's blocks and prune the ones it does not need.

The library never imports gradio. Main entry points:

* :func:`entrodrop.loading.load_model` — bundled alias, local folder, .gguf file or hub id;
* :func:`entrodrop.data.load_corpus` / :func:`entrodrop.data.make_windows` — calibration text;
* :func:`entrodrop.calibrate.iter_calibration` — streaming per-block statistics;
* :func:`entrodrop.workflow.start_calibration` — the calibrate step both front ends run (text to events);
* :func:`entrodrop.select.select_blocks` — entrodrop / cosine / angular / manual drop plans;
* :mod:`entrodrop.prune`, :mod:`entrodrop.evaluate`, :mod:`entrodrop.export` — apply, check, save;
* :mod:`entrodrop.criteria`, :mod:`entrodrop.costs`, :mod:`entrodrop.progress`, :mod:`entrodrop.checks` —
  the criterion registry, what blocks cost, progress events, and the checks both front ends run;
* :func:`load_pruned` — reload a sub-block-pruned export.
"""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Reload a model exported by ``entrodrop prune`` (any plan); see :func:`entrodrop.export.load_pruned`."""
    from .export import load_pruned as _load_pruned

    return _load_pruned(path, **kwargs)
