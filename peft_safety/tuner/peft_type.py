"""The names of peft-safety's PEFT adapter types and the prefixes of their adapter attributes (no imports: every tuner
module may use them; `peft_safety.tuner._registration` writes them into PEFT's tables)."""

from __future__ import annotations

import enum

__all__ = ["SAFETY_LORA_PREFIX", "SAFETY_PREFIX", "SafetyPeftType"]

#: Prefix of every SET adapter attribute (``safety_values``, ``safety_indices``); PEFT uses it to find adapter weights.
SAFETY_PREFIX = "safety_"

#: Prefix of every masked-LoRA (SPA) adapter attribute: LoRA's own (``lora_A``, ``lora_B``, ``lora_safety_entries``).
SAFETY_LORA_PREFIX = "lora_"


class SafetyPeftType(str, enum.Enum):
    """The PEFT types of peft-safety adapters.

    A ``str`` enum like ``peft.PeftType``: ``SafetyPeftType.SAFETY == "SAFETY"`` and both hash alike, so PEFT's
    dict lookups by the string stored in ``adapter_config.json`` find our entries.

    * ``SAFETY``: SET, trainable sparse deltas at the mask's entries (``SafetyConfig``).
    * ``SAFETY_LORA``: SPA with LoRA, a LoRA adapter whose update is exactly zero on the mask's entries
      (``SafetyLoraConfig``). A distinct type, not ``LORA``: a plain ``peft`` (without ``import peft_safety``) then
      fails to load it (``KeyError: 'SAFETY_LORA'``) instead of loading it as an unmasked LoRA.
    """

    SAFETY = "SAFETY"
    SAFETY_LORA = "SAFETY_LORA"
