"""The ``SAFETY`` PEFT type (SET): trainable sparse deltas at a ``SafetyMask``'s entries, everything else frozen.

``config.py`` holds the options (pure data), ``layer.py`` the tensors, forward and merge, ``model.py`` which modules
are wrapped, how a saved adapter is rebuilt and checked.
"""

from __future__ import annotations

from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear
from .model import SafetyModel

__all__ = ["SafetyConfig", "SafetyLayer", "SafetyLinear", "SafetyModel"]
