"""Training with a safety mask: the protection interface, exact freezing for full fine-tuning, and the TRL trainer.

``Protection`` (the protocol every defense implements), ``Freezer`` and friends import only torch (and
``peft_safety.analysis``). The adapter protections, ``SafetySFTConfig``, ``SafetySFTTrainer`` and the callbacks import
peft, trl or transformers, so they are resolved lazily: ``import peft_safety.training`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .freeze import Freezer, FreezeReport, FreezeViolationError, dense_frozen_masks, detect_backend
from .protection import MaskProtection, Protection

_LAZY: dict[str, str] = {
    "SafetySFTConfig": "peft_safety.training.config",
    "SafetySFTTrainer": "peft_safety.training.trainer",
    "SafetyDriftCallback": "peft_safety.training.callbacks",
    "RefusalEvalCallback": "peft_safety.training.callbacks",
    "ProtectionCallback": "peft_safety.training.callbacks",
    "MaskedLora": "peft_safety.training.adapters",
    "SetAdapter": "peft_safety.training.adapters",
    "mask_protection": "peft_safety.training.adapters",
    "SafetyReplay": "peft_safety.training.replay",
    "Lisa": "peft_safety.training.lisa",
    "Booster": "peft_safety.training.booster",
    "SafetyUtility": "peft_safety.training.utility",
    "DevSelectCallback": "peft_safety.training.dev_select",
    "repair": "peft_safety.training.repair",
}

__all__ = [
    "Booster",
    "DevSelectCallback",
    "FreezeReport",
    "FreezeViolationError",
    "Freezer",
    "Lisa",
    "MaskProtection",
    "MaskedLora",
    "Protection",
    "ProtectionCallback",
    "RefusalEvalCallback",
    "SafetyDriftCallback",
    "SafetyReplay",
    "SafetySFTConfig",
    "SafetySFTTrainer",
    "SafetyUtility",
    "SetAdapter",
    "dense_frozen_masks",
    "detect_backend",
    "mask_protection",
    "repair",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_safety.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .adapters import MaskedLora, SetAdapter, mask_protection
    from .booster import Booster
    from .callbacks import ProtectionCallback, RefusalEvalCallback, SafetyDriftCallback
    from .config import SafetySFTConfig
    from .dev_select import DevSelectCallback
    from .lisa import Lisa
    from .repair import repair
    from .replay import SafetyReplay
    from .trainer import SafetySFTTrainer
    from .utility import SafetyUtility
