"""Drop plans: which blocks to remove, and why. Validated at construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arch import BLOCK_KINDS
from .jsonfile import load_json_file


def _is_whole(value) -> bool:
    """An int (or a float with no fraction, as some JSON writers give), never a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


@dataclass(frozen=True)
class DroppedBlock:
    """One block to drop: ``layer`` index (0-based), ``kind`` in attn/mlp/layer, and the reason."""

    layer: int
    kind: str
    reason: str = ""

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.kind)


@dataclass
class DropPlan:
    """A validated list of blocks to drop from a model with ``num_layers`` decoder layers.

    Rules: indexes in range, kinds known, no block listed twice, a layer not listed both whole
    and as a sub-block, and never every block of the model (something must remain).
    """

    num_layers: int
    blocks: list[DroppedBlock] = field(default_factory=list)
    criterion: str = "manual"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = [b if isinstance(b, DroppedBlock) else DroppedBlock(**b) for b in self.blocks]
        self.blocks.sort(key=lambda b: (b.layer, BLOCK_KINDS.index(b.kind) if b.kind in BLOCK_KINDS else 9))
        self.validate()

    def validate(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")
        seen: set[tuple[int, str]] = set()
        for b in self.blocks:
            if b.kind not in BLOCK_KINDS:
                raise ValueError(f"Unknown block kind {b.kind!r} in the plan; use one of {', '.join(BLOCK_KINDS)}.")
            if not isinstance(b.layer, int) or not 0 <= b.layer < self.num_layers:
                raise ValueError(
                    f"Layer {b.layer} is out of range: the model has layers 0..{self.num_layers - 1}."
                )
            if b.key in seen:
                raise ValueError(f"Block {b.kind} of layer {b.layer} is listed twice in the plan.")
            seen.add(b.key)
        whole = {b.layer for b in self.blocks if b.kind == "layer"}
        for b in self.blocks:
            if b.kind != "layer" and b.layer in whole:
                raise ValueError(
                    f"Layer {b.layer} is dropped whole and its {b.kind} sub-block is listed too; keep one."
                )
        # over the listed blocks, never range(num_layers): a plan file may claim any number of layers
        gone = whole | {layer for layer, kind in seen if kind == "attn" and (layer, "mlp") in seen}
        if len(gone) == self.num_layers:
            raise ValueError(
                f"This plan drops every block of all {self.num_layers} layers; nothing would remain. "
                "Drop fewer blocks."
            )

    # -- views ---------------------------------------------------------------------------------
    def keys(self) -> set[tuple[int, str]]:
        return {b.key for b in self.blocks}

    def layers_of(self, kind: str) -> list[int]:
        return [b.layer for b in self.blocks if b.kind == kind]

    def __len__(self) -> int:
        return len(self.blocks)

    def describe(self) -> str:
        if not self.blocks:
            return "empty plan (dense model)"
        parts = [f"{b.kind}@{b.layer}" for b in self.blocks]
        return f"{len(self.blocks)} block(s): " + ", ".join(parts)

    def compact(self) -> str:
        """The blocks as :meth:`parse` reads them back, e.g. ``"attn:3,attn:7,layer:12"`` (empty: ``""``)."""
        return ",".join(f"{b.kind}:{b.layer}" for b in self.blocks)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "criterion": self.criterion,
            "blocks": [asdict(b) for b in self.blocks],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> DropPlan:
        """A plan from its JSON form, every field checked: ValueError naming the first wrong field."""
        shape = "A plan needs 'num_layers' and 'blocks' (a list of {'layer': int, 'kind': 'attn'|'mlp'|'layer'})."
        if not isinstance(data, dict) or "num_layers" not in data or "blocks" not in data:
            raise ValueError(shape)
        num_layers = data["num_layers"]
        if not _is_whole(num_layers):
            raise ValueError(f"Field 'num_layers' of the plan must be a whole number, got {num_layers!r}. {shape}")
        if not isinstance(data["blocks"], list):
            raise ValueError(f"Field 'blocks' of the plan must be a list, got {data['blocks']!r:.80}. {shape}")
        blocks = []
        for i, b in enumerate(data["blocks"]):
            if not isinstance(b, dict) or "layer" not in b or "kind" not in b:
                raise ValueError(f"Field 'blocks[{i}]' of the plan must be an object with 'layer' and 'kind', "
                                 f"got {b!r:.80}.")
            if not _is_whole(b["layer"]):
                raise ValueError(f"Field 'blocks[{i}].layer' of the plan must be a whole number, got {b['layer']!r}.")
            for key in ("kind", "reason"):
                if not isinstance(b.get(key, ""), str):
                    raise ValueError(f"Field 'blocks[{i}].{key}' of the plan must be text, got {b[key]!r}.")
            blocks.append(DroppedBlock(int(b["layer"]), b["kind"], b.get("reason", "")))
        criterion, meta = data.get("criterion", "manual"), data.get("meta", {})
        if not isinstance(criterion, str):
            raise ValueError(f"Field 'criterion' of the plan must be text, got {criterion!r}.")
        if not isinstance(meta, dict):
            raise ValueError(f"Field 'meta' of the plan must be an object, got {meta!r:.80}.")
        return cls(num_layers=int(num_layers), blocks=blocks, criterion=criterion, meta=meta)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DropPlan:
        return load_json_file(path, "Plan file", cls.from_dict)

    @classmethod
    def parse(cls, text: str, num_layers: int) -> DropPlan:
        """Parse a compact plan such as ``"attn:3,attn:7,layer:12"`` (kind defaults to attn)."""
        blocks = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            kind, _, idx = item.rpartition(":")
            try:
                blocks.append(DroppedBlock(int(idx), kind or "attn", "manual"))
            except ValueError as exc:
                raise ValueError(f"Cannot read {item!r} in the plan; write KIND:LAYER, e.g. attn:3.") from exc
        return cls(num_layers=num_layers, blocks=blocks, criterion="manual")
