"""peft-safety's PEFT integration: the ``SAFETY`` adapter type (SET) and masked LoRA (SPA).

Importing this package registers the ``SAFETY`` PEFT type (see ``_registration``).
"""

from __future__ import annotations

from ._registration import SafetyPeftType
from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear
from .model import SafetyModel

__all__ = ["SafetyConfig", "SafetyLayer", "SafetyLinear", "SafetyModel", "SafetyPeftType"]
