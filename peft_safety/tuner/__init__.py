"""peft-safety's PEFT integration: two adapter types, each a folder shaped like PEFT's own tuners.

* ``safety/``: the ``SAFETY`` type (SET), trainable sparse deltas at a mask's entries (`SafetyConfig`, `SafetyModel`).
* ``safety_lora/``: the ``SAFETY_LORA`` type (SPA with LoRA), a LoRA adapter whose update is exactly zero on a mask
  (`SafetyLoraConfig`, `SafetyLoraModel`; `get_masked_lora_model` for code that holds a ``LoraConfig`` and a mask).

Shared by both: ``_layout`` (storage kinds and the one check of an adapter's ``mask_layout`` and index tensors),
``provenance`` (base-model fingerprints and Hub id, weights digest), ``peft_type`` (the type names) and
``_registration`` (the one place that writes into PEFT's tables), ``_mixing`` (one PEFT type per model),
``_load_check`` (the load checks for loaders that bypass PEFT's hook). `detect_adapter_type` says what an adapter
folder's weights file holds, whatever its ``adapter_config.json`` says (`check_adapter_type` compares the two).
Importing this package registers both types.
"""

from __future__ import annotations

from ..mask.adapter_files import check_adapter_type, detect_adapter_type
from . import _registration  # noqa: F401  (registers the SAFETY and SAFETY_LORA types)
from .peft_type import SafetyPeftType
from .safety import SafetyConfig, SafetyLayer, SafetyLinear, SafetyModel
from .safety_lora import (
    SafetyLoraConfig,
    SafetyLoraLinear,
    SafetyLoraModel,
    check_masked_lora_model,
    get_masked_lora_model,
)

__all__ = [
    "SafetyConfig",
    "SafetyLayer",
    "SafetyLinear",
    "SafetyLoraConfig",
    "SafetyLoraLinear",
    "SafetyLoraModel",
    "SafetyModel",
    "SafetyPeftType",
    "check_adapter_type",
    "check_masked_lora_model",
    "detect_adapter_type",
    "get_masked_lora_model",
]
