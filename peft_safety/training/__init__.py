"""Training with a safety mask: the protection interface, exact freezing for full fine-tuning, and the TRL trainer.

``Protection`` (the protocol every defense implements), ``Freezer`` and friends import only torch (and
``peft_safety.analysis``). The adapter protections, ``SafetySFTConfig``, ``SafetySFTTrainer`` and the callbacks import
peft, trl or transformers, so they are resolved lazily: ``import peft_safety.training`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .apply import apply_mask_
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
    "mix_replay": "peft_safety.training.replay",
    "RealignCallback": "peft_safety.training.realign",
    "RealignReport": "peft_safety.training.realign",
    "realign_": "peft_safety.training.realign",
    "reference_snapshot": "peft_safety.training.realign",
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
    "RealignCallback",
    "RealignReport",
    "RefusalEvalCallback",
    "SafetyDriftCallback",
    "SafetyReplay",
    "SafetySFTConfig",
    "SafetySFTTrainer",
    "SafetyUtility",
    "SetAdapter",
    "apply_mask_",
    "dense_frozen_masks",
    "detect_backend",
    "mask_protection",
    "mix_replay",
    "realign_",
    "reference_snapshot",
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
    from .realign import RealignCallback, RealignReport, realign_, reference_snapshot
    from .repair import repair
    from .replay import SafetyReplay, mix_replay
    from .trainer import SafetySFTTrainer
    from .utility import SafetyUtility
