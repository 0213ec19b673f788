"""Devices, dtypes and memory: what ``"auto"`` picks, how much is free, where a model's inputs go."""

from __future__ import annotations

import torch

DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """``"auto"``: CUDA if available (this process's own GPU under a multi-process launch), else CPU."""
    if str(device) == "auto":
        from .distributed import process_device

        return process_device()
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


def format_bytes(num_bytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def input_device(model) -> torch.device:
    """Where input ids must go; with accelerate offload the hook's execution device, not 'meta'."""
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    execution_device = getattr(hook, "execution_device", None)
    if execution_device is not None:
        return torch.device(execution_device)  # an int means that accelerator index
    return embeddings.weight.device
