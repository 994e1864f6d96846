"""peft-safety's PEFT integration: the ``SAFETY`` adapter type (SET) and masked LoRA (SPA).

Importing this package registers the ``SAFETY`` PEFT type (see ``_registration``).
"""

from __future__ import annotations

from . import _registration  # noqa: F401  (registers the SAFETY type)
from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear
from .model import SafetyModel
from .peft_type import SafetyPeftType

__all__ = ["SafetyConfig", "SafetyLayer", "SafetyLinear", "SafetyModel", "SafetyPeftType"]
