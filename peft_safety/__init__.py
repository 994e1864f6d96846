"""peft-safety: safety-critical parameters for Hugging Face PEFT and TRL.

Importing ``peft_safety`` registers the ``SAFETY`` PEFT type (so that ``PeftModel.from_pretrained`` can load
peft-safety adapters) and nothing else: it imports neither trl nor datasets, and does not initialise CUDA. Public names
are resolved lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .tuner import _registration as _registration  # registers the SAFETY PEFT type

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # mask
    "Granularity": "peft_safety.mask",
    "Head": "peft_safety.mask",
    "Layer": "peft_safety.mask",
    "MaskSummary": "peft_safety.mask",
    "Neuron": "peft_safety.mask",
    "SafetyMask": "peft_safety.mask",
    "Weight": "peft_safety.mask",
    "fingerprint_tensor": "peft_safety.mask",
    # tuner
    "SafetyConfig": "peft_safety.tuner",
    "SafetyLinear": "peft_safety.tuner",
    "SafetyModel": "peft_safety.tuner",
    "SafetyPeftType": "peft_safety.tuner",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_safety' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .mask import Granularity, Head, Layer, MaskSummary, Neuron, SafetyMask, Weight, fingerprint_tensor  # noqa: F401
