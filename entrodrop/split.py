"""The three parts of every text source, decided by each document's own content.

Every corpus (bundled set, file, hub set, pasted text) is split into three disjoint parts, the same
for every caller, seed and process:

* ``calibration`` (60%): what the method reads to make its choice — the calibration statistics, our
  measured criteria (the single-block ablation, the greedy search and the race of whole plans) and
  healing's training and validation windows;
* ``development`` (20%): what a choice of *settings* may be made on — the defaults benchmarks tune,
  and the app's trade-off sweep, where a visitor picks a plan by its numbers;
* ``report`` (20%): what results are reported on — the checks of the CLI and the app, and every
  figure in README.md and docs/results.md. No default-choosing run and no selection reads it.

A document's part is a hash of its normalised text (Unicode NFKC, case-folded, whitespace collapsed),
so a document repeated in the source, even with other spacing or case, lands in one part. With fewer
than three distinct documents the split falls back (:func:`assign_parts`): two documents give a
calibration and a report part, one document is cut by characters.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence

PARTS = ("calibration", "development", "report")
# each part's share of the documents, in the order of PARTS (the hash's unit interval is cut in this order)
SHARES = {"calibration": 0.6, "development": 0.2, "report": 0.2}
ROLES = {
    "calibration": "calibration and selection read it",
    "development": "defaults and the trade-off sweep may be tuned on it",
    "report": "checks and published results are measured on it; nothing is chosen on it",
}
# older names of a part, still accepted where a part is named: "heldout" was the text calibration never saw
ALIASES = {"heldout": "report"}
ALL = "all"


def resolve_part(name: str) -> str:
    """The canonical part name (``calibration``, ``development``, ``report``, or ``all``); ValueError otherwise."""
    canonical = ALIASES.get(name, name)
    if canonical not in (*PARTS, ALL):
        raise ValueError(f"Unknown part {name!r}; use one of {', '.join((*PARTS, ALL))}.")
    return canonical


def normalise(text: str) -> str:
    """The form two copies of one document share: NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_unit(text: str) -> float:
    """A stable number in [0, 1) from a document's normalised text (the same in every process)."""
    digest = hashlib.blake2b(normalise(text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _bounds() -> list[tuple[str, float, float]]:
    bounds, low = [], 0.0
    for part in PARTS:
        bounds.append((part, low, low + SHARES[part]))
        low += SHARES[part]
    return bounds


def part_of_unit(unit: float) -> str:
    """The part a hash value falls in (the unit interval is cut by :data:`SHARES`, in the order of PARTS)."""
    for part, _, high in _bounds():
        if unit < high:
            return part
    return PARTS[-1]


def assign_parts(documents: Sequence[str]) -> list[str] | None:
    """The part of each document, or None for a corpus of one distinct document (cut it with :func:`split_text`).

    Documents with the same normalised text always share a part. With three or more distinct documents
    every part gets at least one: an empty part takes the distinct document whose hash lies nearest its
    interval, from a part that keeps at least one. With two, the lower hash is calibration, the other report."""
    groups: dict[str, float] = {}
    keys = [normalise(d) for d in documents]
    for key, doc in zip(keys, documents, strict=True):
        if key not in groups:
            groups[key] = content_unit(doc)
    if len(groups) <= 1:
        return None
    if len(groups) == 2:
        low, high = sorted(groups, key=groups.__getitem__)
        chosen = {low: "calibration", high: "report"}
    else:
        chosen = {key: part_of_unit(unit) for key, unit in groups.items()}
        for part, low, high in _bounds():
            if part in chosen.values():
                continue
            members = {p: sum(1 for v in chosen.values() if v == p) for p in PARTS}
            movable = [key for key in groups if members[chosen[key]] > 1]
            nearest = min(movable, key=lambda key: (max(low - groups[key], groups[key] - high, 0.0), key))
            chosen[nearest] = part
    return [chosen[key] for key in keys]


def split_text(text: str) -> dict[str, str]:
    """One document cut into the three parts by characters (at the shares' boundaries, moved back to the
    nearest whitespace before them, else after them); a part may come out empty for a very short text."""
    cuts, low = [], 0.0
    for part in PARTS[:-1]:
        low += SHARES[part]
        cuts.append(_whitespace_cut(text, int(len(text) * low)))
    pieces, start = {}, 0
    for part, end in zip(PARTS, [*cuts, len(text)], strict=True):
        end = max(end, start)
        pieces[part] = text[start:end].strip()
        start = end
    return pieces


def _whitespace_cut(text: str, cut: int) -> int:
    before = max(text.rfind(ws, 0, cut + 1) for ws in (" ", "\n", "\t"))
    if before > 0:
        return before
    after = [i for i in (text.find(ws, cut) for ws in (" ", "\n", "\t")) if i != -1]
    return min(after) if after else cut
