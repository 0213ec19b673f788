"""Load a causal decoder LM and its tokenizer from a bundled alias, a local folder, a .gguf file or a hub id.

Everything that can be refused is refused *before* the weights load: the spec is resolved
without touching weights, the config is checked for a supported decoder-only architecture, and
the memory the weights will take is compared with what the target device has free.

GGUF checkpoints are always de-quantised to a plain float model, so hooks, pruning and export
see ordinary ``nn.Linear`` weights. Such a model still carries transformers' GGUF quantizer,
which makes ``save_pretrained`` refuse; :func:`entrodrop.gguf.strip_gguf_quantization` removes it.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from entrodrop.arch import ArchSpec, check_config_supported, config_model_type, get_arch, get_layers
from entrodrop.bundled import _BUNDLED_FILES, BUNDLED_MODELS, DEFAULT_MODEL, bundled_model_path  # noqa: F401
from entrodrop.devices import available_memory_bytes, format_bytes, input_device, parse_device, parse_dtype
from entrodrop.gguf import check_gguf_file, gemma3_query_scalar, gguf_parse_once, gguf_rope_parameters

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MEMORY_HEADROOM = 0.9  # refuse to load when the weights need more than this share of free memory

# A hub repo id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class InsufficientMemoryError(ValueError):
    """The weights would not fit in the free memory of the target device."""


class ModelNotFoundError(ValueError):
    """A hub id the hub does not have, or cannot be asked about (offline and not in the local cache)."""


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


def looks_like_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a hub repo id ("name" or "owner/name"), judged on the text alone."""
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "-")) and ".." not in spec \
        and not spec.lower().endswith(".gguf")


def looks_like_path(spec: str, extensions: tuple[str, ...] = (".gguf",)) -> bool:
    """Whether ``spec`` is meant as a file system path rather than an alias or a hub id."""
    if spec.startswith(("/", ".", "~")) or spec.lower().endswith(extensions):
        return True
    # "owner/name" is a hub id even though it contains os.sep on POSIX.
    has_sep = os.sep in spec or bool(os.altsep and os.altsep in spec)
    return has_sep and not _HUB_ID.match(spec)


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


def _not_found(resolved: ResolvedSpec, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Could not find model '{resolved.spec}' on the Hugging Face Hub or as a local path: {err} "
        "Check the id, or pass a local folder or .gguf file."
    )


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


@gguf_parse_once()  # transformers opens a GGUF file once per part (entrodrop.gguf)
def load_config(spec: str | ResolvedSpec, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (cheap: no weights), with hub and GGUF failures turned into ValueErrors."""
    from transformers import AutoConfig

    resolved = _as_resolved(spec)
    if resolved.gguf_file:
        check_gguf_file(resolved.gguf_path)
    offline = resolved.kind == "hub" and not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(
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
            raise ModelNotFoundError(
                f"The Hugging Face Hub is not reachable from this machine and '{resolved.spec}' is not in the "
                "local cache. Pass a local folder or .gguf file, or connect to the network."
            ) from err
        if resolved.kind == "hub":
            raise _not_found(resolved, err) from err
        raise ValueError(f"Could not read the config of '{resolved.spec}': {err}") from err
    if resolved.gguf_file:  # RoPE scaling, which transformers does not read from GGUF (entrodrop.gguf)
        rope = gguf_rope_parameters(resolved.gguf_path)
        if rope is not None:
            config.rope_parameters = rope
        if getattr(config, "model_type", None) == "gemma3_text":  # its attention scale, as llama.cpp reads it
            config.query_pre_attn_scalar = gemma3_query_scalar(config.num_hidden_layers, config.hidden_size,
                                                               config.num_attention_heads, config.head_dim)
    return config


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


@gguf_parse_once()  # transformers opens a GGUF file once per part (entrodrop.gguf)
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
            # Imported here: the export package imports this module (export.metadata reads quant_method).
            from .export.reload import load_pruned

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
