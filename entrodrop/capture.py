"""Forward hooks that capture the residual stream around every block. The only place that owns hooks.

Hooks are global state on the model: every one registered here is removed in ``finally``, so a
forward that raises (or a generator closed mid-way) never leaves a hook behind.

Capture points, per decoder layer l (names a reader can guess):

* ``x[l]`` — ``layers.{l}.resid_pre``: the residual stream entering layer l (X_l); ``x[L]`` is
  the output of the last layer (X_L), *before* the final norm.
* ``y[l]`` — ``layers.{l}.resid_mid``: the stream between the attention and MLP sub-blocks,
  Y_l = X_l + (output of ``spec.attn_residual``), see :mod:`entrodrop.arch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ArchSpec, get_arch, get_layers, get_module


def _first_tensor(value) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first element is the hidden states."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"Cannot find the hidden states in a module output of type {type(value).__name__}.")


@dataclass
class ResidualCapture:
    """The residual streams of the last forward pass: ``x`` has L+1 entries, ``y`` has L.

    Tensors are detached, in ``dtype`` (float32 by default) on ``device``, shape (B, T, d).
    """

    num_layers: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    x: list[torch.Tensor | None] = field(default_factory=list)
    y: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.x = [None] * (self.num_layers + 1)
        self.y = [None] * self.num_layers

    def complete(self) -> bool:
        return all(t is not None for t in self.x) and all(t is not None for t in self.y)

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device=self.device, dtype=self.dtype)


@contextmanager
def capture_residuals(
    model: nn.Module,
    spec: ArchSpec | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: set[int] | None = None,
) -> Iterator[ResidualCapture]:
    """Register the capture hooks for the duration of the ``with`` block; always remove them.

    ``layers``: keep only X_l and Y_l of these layers (the rest stay None; ``complete()`` is then False),
    for readers of a few streams of a large batch. Works under :func:`~entrodrop.prune.preview_plan` too
    (enter the preview first): a skipped layer's X_{l+1} and Y_l are its X_l, a skipped sub-block adds
    nothing."""
    spec = spec or get_arch(model)
    decoder_layers = get_layers(model, spec)
    cap = ResidualCapture(num_layers=len(decoder_layers), device=torch.device(device), dtype=dtype)
    wanted = set(range(len(decoder_layers) + 1)) if layers is None else set(layers)
    handles = []

    def on_layer_input(idx: int, skipped: bool):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cap.x[idx] = cap._store(hidden)
            if skipped:  # a whole layer skipped by a preview adds nothing: Y_l = X_l
                cap.y[idx] = cap.x[idx]

        return hook

    def on_layer_output(idx: int):
        def hook(_module, _args, output):
            cap.x[idx + 1] = cap._store(_first_tensor(output))

        return hook

    def on_attn_contribution(idx: int):
        def hook(_module, _args, output):
            contribution = _first_tensor(output)
            x = cap.x[idx]
            assert x is not None, "layer input hook must run before the attention hook"
            cap.y[idx] = x + cap._store(contribution).view_as(x)

        return hook

    try:
        for idx, layer in enumerate(decoder_layers):
            try:
                attn_out = get_module(layer, spec.attn_residual)
            except AttributeError:  # the stand-in of a whole layer a preview skips
                attn_out = None
            if idx in wanted:
                handles.append(layer.register_forward_pre_hook(on_layer_input(idx, attn_out is None), with_kwargs=True))
            if idx + 1 in wanted:
                handles.append(layer.register_forward_hook(on_layer_output(idx)))
            if attn_out is not None and idx in wanted:
                handles.append(attn_out.register_forward_hook(on_attn_contribution(idx)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replace_outputs(replacements: dict[nn.Module, Callable]) -> Iterator[None]:
    """For the ``with`` block, each module's output is ``fn(module, inputs, output)`` (hooks removed after).

    A hook registered here runs after those :func:`capture_residuals` registered before it, so a capture
    entered first records what the module produced, and the forward goes on with the replacement."""
    handles = [module.register_forward_hook(fn) for module, fn in replacements.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised by :func:`forward_until`'s hook once the last layer it needs has run."""


def forward_until(model: nn.Module, last_layer: int, spec: ArchSpec | None = None, **inputs) -> None:
    """Run the decoder (no LM head) on ``inputs`` and stop right after decoder layer ``last_layer``.

    For readers of the residual streams of the first layers only (a :func:`capture_residuals` entered
    before this call has recorded them: its hooks run first): the layers after ``last_layer`` and the
    head are never computed. The stopping hook is removed whatever happens."""
    spec = spec or get_arch(model)
    layers = get_layers(model, spec)

    def stop(_module, _args, _output):
        raise _StopForward

    handle = layers[last_layer].register_forward_hook(stop)
    try:
        model.base_model(**inputs)
    except _StopForward:
        pass
    finally:
        handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks currently registered anywhere in ``model`` (for tests)."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
    )
