"""What one request may ask of the shared machine, set by the operator through environment variables.

Every model-running request is checked here on the server before any text is read or the model
runs; the client's sliders are never trusted. The defaults suit a 2-core CPU Space running the
bundled 135M model (a 64 x 256-token calibration takes about a minute there); an operator with a
GPU raises them. A refused request gets a message that says the limit and the variable that sets
it. Values are read when checked, so a changed environment applies to the next request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# variable -> (default, what it bounds); README's "Running it in public" lists the same
LIMITS = {
    "ENTRODROP_MAX_CALIB_TOKENS": (16384, "calibration samples x tokens per window"),
    "ENTRODROP_MAX_CHECK_TOKENS": (16384, "check: report windows x tokens per window"),
    "ENTRODROP_MAX_SWEEP_TOKENS": (131072, "trade-off sweep: criteria x counts x development windows x tokens"),
    "ENTRODROP_MAX_SEARCH_TOKENS": (524288, "trade-off sweep: the most calibration tokens recommended's search "
                                            "and final comparison may read over all counts"),
    "ENTRODROP_MAX_PREFILL_TOKENS": (1024, "prefill tokens of the latency check"),
    "ENTRODROP_MAX_DECODE_TOKENS": (64, "decode tokens of the latency check"),
    "ENTRODROP_MAX_NEW_TOKENS": (128, "new tokens per side-by-side generation"),
    "ENTRODROP_MAX_TEXT_CHARS": (2_000_000, "characters of pasted text"),
    "ENTRODROP_MODEL_JOBS": (4, "model jobs admitted at once (they take turns on the model between batches)"),
    "ENTRODROP_MAX_HEAL_STEPS": (60, "training steps of one LoRA heal"),
    "ENTRODROP_MAX_HEAL_MINUTES": (10, "minutes one heal may run"),
    "ENTRODROP_MAX_HEAL_RANK": (32, "LoRA rank of a heal"),
    "ENTRODROP_MAX_HEAL_TOKENS": (16384, "heal: calibration windows taught on x tokens per window"),
    "ENTRODROP_HEALED_MODELS": (2, "healed models kept in memory for all sessions (the oldest goes first)"),
}


def limit(name: str) -> int:
    """The operator's value of ``name`` (a key of :data:`LIMITS`), else its default."""
    default = LIMITS[name][0]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number; the server's operator must fix it.") from exc
    return max(value, 1)


def whole_number(value, what: str, *, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``; ValueError naming ``what`` for anything else
    (a client can send any JSON, not just what the slider allows)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be a whole number, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a whole number, got {value!r}.") from exc
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise ValueError(f"{what} must be a whole number, got {value!r}.")
    if int(number) < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {int(number)}.")
    return int(number)


@dataclass(frozen=True)
class Budget:
    """One request's size against one operator limit."""

    name: str  # the environment variable
    asked: int
    described: str  # how the request's size was computed, e.g. "64 windows x 512 tokens"

    def check(self) -> None:
        """ValueError when the request is over the limit, saying the limit and how to fit in it."""
        allowed = limit(self.name)
        if self.asked > allowed:
            what = LIMITS[self.name][1]
            raise ValueError(
                f"This request is too large for this server: {self.described} = {self.asked:,}, over its limit "
                f"of {allowed:,} for {what} ({self.name}). Ask for less, or run the app or the `entrodrop` "
                "command on your own machine, where you set the limit."
            )


def check_calibration(samples: int, seq_len: int) -> None:
    """Refuse a calibration over ``ENTRODROP_MAX_CALIB_TOKENS``."""
    Budget("ENTRODROP_MAX_CALIB_TOKENS", samples * seq_len, f"{samples} samples x {seq_len} tokens").check()


def check_check(windows: int, seq_len: int, *, prefill: int = 0, decode: int = 0) -> None:
    """Refuse a quality/latency check over its limits (windows x tokens, prefill, decode)."""
    Budget("ENTRODROP_MAX_CHECK_TOKENS", windows * seq_len, f"{windows} windows x {seq_len} tokens").check()
    if prefill:
        Budget("ENTRODROP_MAX_PREFILL_TOKENS", prefill, f"{prefill} prefill tokens").check()
    if decode:
        Budget("ENTRODROP_MAX_DECODE_TOKENS", decode, f"{decode} decode tokens").check()


def check_generation(max_new_tokens: int) -> None:
    """Refuse more new tokens than ``ENTRODROP_MAX_NEW_TOKENS``."""
    Budget("ENTRODROP_MAX_NEW_TOKENS", max_new_tokens, f"{max_new_tokens} new tokens").check()


def check_heal(steps: int, minutes: float, rank: int, windows: int, seq_len: int) -> None:
    """Refuse a heal over its limits (steps, minutes, rank, training tokens)."""
    Budget("ENTRODROP_MAX_HEAL_STEPS", steps, f"{steps} steps").check()
    Budget("ENTRODROP_MAX_HEAL_MINUTES", int(minutes + 0.999), f"{minutes:g} minutes").check()
    Budget("ENTRODROP_MAX_HEAL_RANK", rank, f"rank {rank}").check()
    Budget("ENTRODROP_MAX_HEAL_TOKENS", windows * seq_len, f"{windows} windows x {seq_len} tokens").check()


def check_text(text: str | None) -> None:
    """Refuse pasted text longer than ``ENTRODROP_MAX_TEXT_CHARS``."""
    size = len(text or "")
    Budget("ENTRODROP_MAX_TEXT_CHARS", size, f"{size:,} characters of pasted text").check()
