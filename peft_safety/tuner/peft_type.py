"""The names of peft-safety's PEFT adapter types and the prefixes of their adapter attributes (no imports: every tuner
module may use them; `peft_safety.tuner._registration` writes them into PEFT's tables)."""

from __future__ import annotations

import enum

__all__ = ["MIXING_HINTS", "SAFETY_LORA_PREFIX", "SAFETY_PREFIX", "SafetyPeftType"]

#: Prefix of every SET adapter attribute (``safety_values``, ``safety_indices``); PEFT uses it to find adapter weights.
SAFETY_PREFIX = "safety_"

#: Prefix of every masked-LoRA (SPA) adapter attribute: LoRA's own (``lora_A``, ``lora_B``, ``lora_safety_entries``).
SAFETY_LORA_PREFIX = "lora_"

#: What to do instead of putting an adapter of another PEFT type next to one of ours, per type.
MIXING_HINTS = {
    "SAFETY": (
        "peft-safety's SET adapter, which cannot share a model with adapters of another PEFT type: merge the adapter "
        "already in the model into the base first (base = model.merge_and_unload(); merge a SET adapter on a bf16/fp16 "
        "base into a float32 copy), then add the other adapter (e.g. LoRA) to the merged model"
    ),
    "SAFETY_LORA": (
        "peft-safety's masked LoRA, which cannot share a model with adapters of another PEFT type (a plain LoRA "
        "beside it would move its protected entries): build the LoRA with SafetyLoraConfig.from_lora_config("
        "lora_config, mask), or merge the adapter already in the model into the base first "
        "(base = model.merge_and_unload())"
    ),
}


class SafetyPeftType(str, enum.Enum):
    """The PEFT types of peft-safety adapters.

    A ``str`` enum like ``peft.PeftType``: ``SafetyPeftType.SAFETY == "SAFETY"`` and both hash alike, so PEFT's
    dict lookups by the string stored in ``adapter_config.json`` find our entries.

    * ``SAFETY``: SET, trainable sparse deltas at the mask's entries (``SafetyConfig``).
    * ``SAFETY_LORA``: SPA with LoRA, a LoRA adapter whose update is exactly zero on the mask's entries
      (``SafetyLoraConfig``). A distinct type, not ``LORA``: a plain ``peft`` (without ``import peft_safety``) then
      fails to load it (``KeyError: 'SAFETY_LORA'``) instead of loading it as an unmasked LoRA.

    Formatting (``f"{peft_type}"``) gives the name followed by what to do instead of mixing it with another adapter
    type (`MIXING_HINTS`). PEFT formats the types into the one error it raises, before any code of ours runs, when
    ``PeftModel.add_adapter`` / ``load_adapter`` meet two types ("Cannot combine adapters with different peft types.
    Found SAFETY (...) and PeftType.LORA."), so the hint reaches the user there. ``str()``, ``.value``, JSON and
    comparisons are unchanged.
    """

    SAFETY = "SAFETY"
    SAFETY_LORA = "SAFETY_LORA"

    def __format__(self, format_spec: str) -> str:
        if format_spec:
            return format(self.value, format_spec)
        return f"{self.value} ({MIXING_HINTS[self.value]})"
