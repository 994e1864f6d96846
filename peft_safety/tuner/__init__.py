"""peft-safety's PEFT integration: the ``SAFETY`` adapter type (SET) and the ``SAFETY_LORA`` type (masked LoRA, SPA).

Importing this package registers both PEFT types (see ``_registration``).
"""

from __future__ import annotations

from . import _registration  # noqa: F401  (registers the SAFETY and SAFETY_LORA types)
from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear
from .model import SafetyModel
from .peft_type import SafetyPeftType
from .spa_config import SafetyLoraConfig
from .spa_model import SafetyLoraModel

__all__ = [
    "SafetyConfig",
    "SafetyLayer",
    "SafetyLinear",
    "SafetyLoraConfig",
    "SafetyLoraModel",
    "SafetyModel",
    "SafetyPeftType",
]
