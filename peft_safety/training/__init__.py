"""Training with a safety mask: exact freezing for full fine-tuning, and the TRL trainer.

``Freezer`` and friends import only torch. ``SafetySFTConfig``, ``SafetySFTTrainer`` and the callbacks import trl, so
they are resolved lazily: ``import peft_safety.training`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .freeze import Freezer, FreezeReport, FreezeViolationError, canonical_name, dense_frozen_masks, detect_backend

_LAZY: dict[str, str] = {
    "SafetySFTConfig": "peft_safety.training.config",
    "SafetySFTTrainer": "peft_safety.training.trainer",
    "SafetyDriftCallback": "peft_safety.training.callbacks",
    "RefusalEvalCallback": "peft_safety.training.callbacks",
    "FreezerCallback": "peft_safety.training.callbacks",
}

__all__ = [
    "FreezeReport",
    "FreezeViolationError",
    "Freezer",
    "FreezerCallback",
    "RefusalEvalCallback",
    "SafetyDriftCallback",
    "SafetySFTConfig",
    "SafetySFTTrainer",
    "canonical_name",
    "dense_frozen_masks",
    "detect_backend",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_safety.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import FreezerCallback, RefusalEvalCallback, SafetyDriftCallback
    from .config import SafetySFTConfig
    from .trainer import SafetySFTTrainer
