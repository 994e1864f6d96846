"""The name of peft-safety's PEFT adapter type and the prefix of its adapter attributes (no imports: every tuner
module may use them; `peft_safety.tuner._registration` writes them into PEFT's tables)."""

from __future__ import annotations

import enum

__all__ = ["SAFETY_PREFIX", "SafetyPeftType"]

#: Prefix of every adapter attribute (``safety_values``, ``safety_indices``); PEFT uses it to find adapter weights.
SAFETY_PREFIX = "safety_"


class SafetyPeftType(str, enum.Enum):
    """The PEFT type of peft-safety adapters.

    A ``str`` enum like ``peft.PeftType``: ``SafetyPeftType.SAFETY == "SAFETY"`` and both hash alike, so PEFT's
    dict lookups by the string stored in ``adapter_config.json`` find our entries.
    """

    SAFETY = "SAFETY"
