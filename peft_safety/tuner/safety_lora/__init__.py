"""The ``SAFETY_LORA`` PEFT type (SPA with LoRA): a LoRA adapter whose update is exactly zero on a ``SafetyMask``.

``config.py`` holds the options (pure data), ``layer.py`` the masked LoRA layer (mask buffers and their checks),
``variant.py`` its forward and merge as a PEFT ``LoraVariant``, ``model.py`` the tuner (which modules, loading checks)
and `get_masked_lora_model`.
"""

from __future__ import annotations

from .config import ENTRIES_METHODS, SPARSE_MAX_DENSITY, SafetyLoraConfig
from .layer import SafetyLoraLinear
from .model import SafetyLoraModel, check_masked_lora_model, get_masked_lora_model
from .variant import MaskedLoraVariant

__all__ = [
    "ENTRIES_METHODS",
    "SPARSE_MAX_DENSITY",
    "MaskedLoraVariant",
    "SafetyLoraConfig",
    "SafetyLoraLinear",
    "SafetyLoraModel",
    "check_masked_lora_model",
    "get_masked_lora_model",
]
