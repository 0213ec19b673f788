"""Reloading an export: :func:`load_pruned` (no remote code) and the generated ``modeling_entrodrop.py``.

Whole-layer exports are ordinary checkpoints. Sub-block exports name the dropped modules in
``config.entrodrop_dropped``; a subclass of the model's class rebuilds them as weightless stand-ins
before the weights load, either here (:func:`load_pruned`) or, opt-in, in a self-contained file next
to the weights (:func:`remote_code_source`).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from torch import nn

from ..prune import (
    DROPPED_KEY,
    SkippedAttention,
    ZeroBlock,
    _find_cache,
    _hidden_states_of,
    _record_placeholder,
    install_standins,
    make_standin,
)

REMOTE_CODE_FILE = "modeling_entrodrop.py"

_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(base: type) -> type:
    """A subclass of ``base`` that installs the stand-ins named in its config right after building,
    so ``from_pretrained`` neither expects the dropped weights nor initialises them."""
    if base not in _PRUNED_CLASSES:
        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install_standins(self)

        _PRUNED_CLASSES[base] = type(f"EntroDrop{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
    return _PRUNED_CLASSES[base]


def _causal_lm_class(config) -> type:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise ValueError(f"transformers has no *ForCausalLM class for model type {config.model_type!r}.") from exc


def load_pruned(path: str | os.PathLike, *, output_loading_info: bool = False, **kwargs):
    """Load an EntroDrop export (any plan) without remote code.

    Whole-layer exports are ordinary checkpoints; for sub-block exports the dropped modules listed in
    ``config.entrodrop_dropped`` are rebuilt as weightless stand-ins before the weights load.
    ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json). Point at the folder an export wrote.")
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, DROPPED_KEY, None):
        return AutoModelForCausalLM.from_pretrained(path, output_loading_info=output_loading_info, **kwargs)
    cls = _pruned_class(_causal_lm_class(config))
    return cls.from_pretrained(path, config=config, output_loading_info=output_loading_info, **kwargs)


# -- remote code -----------------------------------------------------------------------------------
# what the generated file needs: whole layers are removed physically, so no SkippedLayer
_STANDIN_SOURCES = (_find_cache, _hidden_states_of, _record_placeholder, SkippedAttention, ZeroBlock,
                    make_standin, install_standins)


def remote_code_source(base: type, version: str) -> tuple[str, str]:
    """(class name, source of ``modeling_entrodrop.py``) for a pruned model whose base class is ``base``.

    The file needs only torch and transformers: the stand-ins' own source is copied in."""
    cls_name = f"EntroDrop{base.__name__}"
    parts = [
        f'"""Weightless stand-ins for the blocks EntroDrop {version} dropped from this model.\n\n'
        f"Generated file: ``{cls_name}`` is transformers' ``{base.__name__}`` with the attention/MLP modules\n"
        "listed in ``config.entrodrop_dropped`` replaced by stand-ins that output zeros (their weights are not\n"
        'in the checkpoint). Needs only torch and transformers; load with trust_remote_code=True."""\n',
        "import torch\nfrom torch import nn\n",
        f"from transformers import {base.__name__}\n",
    ]
    parts += [inspect.getsource(obj) for obj in _STANDIN_SOURCES]
    parts.append(
        f"class {cls_name}({base.__name__}):\n"
        f'    """{base.__name__} with its dropped sub-blocks replaced by weightless stand-ins."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        "        install_standins(self)\n"
    )
    return cls_name, "\n\n".join(parts)


def remote_code_base(model: nn.Module) -> type | None:
    """The model's class if a generated file can import it from ``transformers``, else None."""
    import transformers

    base = type(model)
    return base if getattr(transformers, base.__name__, None) is base else None

