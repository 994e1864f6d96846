"""The one place where peft-safety extends PEFT's closed set of adapter types (``SAFETY`` and ``SAFETY_LORA``).

PEFT keeps its adapter types in a closed ``str`` enum (``peft.utils.peft_types.PeftType``) and its public hook,
``peft.utils.register_peft_method(name=..., ...)``, refuses any name that is not already a member of that enum
(``ValueError: Unknown PEFT type SAFETY, please add an entry to peft.utils.peft_types.PeftType``; peft 0.21.2,
``peft/utils/peft_types.py:173``; upstream: https://github.com/huggingface/peft/blob/main/src/peft/utils/peft_types.py).
Every lookup PEFT performs afterwards goes through three module-level dicts in ``peft.mapping`` keyed by the
``peft_type`` string read from ``adapter_config.json``. A member of our own ``str`` enum hashes and compares equal to
its value, so writing our member into those three dicts makes ``"SAFETY"`` resolvable everywhere (``PeftConfig``,
``PeftModel.from_pretrained``, ``AutoPeftModel*``, transformers' ``load_adapter``) without touching PEFT's enum.

The workaround is guarded (it refuses to overwrite another library's entry) and idempotent (importing twice, or
reloading this module, is a no-op). ``tests/tuner/test_registration.py`` fails as soon as upstream makes it
unnecessary (``register_peft_method`` accepting new names, or ``PeftType`` gaining ``SAFETY``), so that we then switch
to the public API.

The same holds for ``SAFETY_LORA`` (masked LoRA, SPA): ``SafetyLoraConfig`` / ``SafetyLoraModel`` under the prefix
``lora_``. Its own type (rather than ``LORA``) is what makes a plain ``peft`` refuse a masked adapter instead of loading
it as an unmasked LoRA.

Important: PEFT has no plugin discovery. **Import ``peft_safety`` before loading a SAFETY or SAFETY_LORA adapter**;
otherwise PEFT raises ``KeyError: 'SAFETY'`` (``'SAFETY_LORA'``) from its own code, where we cannot intercept it.
"""

from __future__ import annotations

from .peft_type import SAFETY_LORA_PREFIX, SAFETY_PREFIX, SafetyPeftType
from .safety.config import SafetyConfig
from .safety.model import SafetyModel
from .safety_lora.config import SafetyLoraConfig
from .safety_lora.model import SafetyLoraModel

__all__ = ["SAFETY_PREFIX", "SafetyPeftType", "is_registered", "register"]


def _entries():
    """``{type: (config class, tuner class, prefix)}`` for every type we register."""
    return {
        SafetyPeftType.SAFETY: (SafetyConfig, SafetyModel, SAFETY_PREFIX),
        SafetyPeftType.SAFETY_LORA: (SafetyLoraConfig, SafetyLoraModel, SAFETY_LORA_PREFIX),
    }


def _tables():
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    return PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING


def is_registered() -> bool:
    """Whether ``SAFETY`` and ``SAFETY_LORA`` currently resolve to peft-safety's classes in PEFT's mapping tables."""
    config_map, tuner_map, prefix_map = _tables()
    return all(
        config_map.get(key) is config_cls and tuner_map.get(key) is tuner_cls and prefix_map.get(key) == prefix
        for key, (config_cls, tuner_cls, prefix) in _entries().items()
    )


def register() -> None:
    """Insert the ``SAFETY`` and ``SAFETY_LORA`` types into PEFT's three mapping tables (idempotent).

    Raises:
        RuntimeError: if another library already registered a different class under one of our names (we refuse to
            overwrite it silently; uninstall or stop importing the other library). Nothing is written then.
    """
    config_map, tuner_map, prefix_map = _tables()
    plan = []
    for key, (config_cls, tuner_cls, prefix) in _entries().items():
        plan += [(config_map, key, config_cls), (tuner_map, key, tuner_cls), (prefix_map, key, prefix)]
    for table, key, value in plan:
        current = table.get(key)
        # Compare by qualified name too: a module reload creates new class objects for the same code.
        if (
            current is not None
            and current != value
            and getattr(current, "__qualname__", None) != getattr(value, "__qualname__", object())
        ):
            raise RuntimeError(
                f"PEFT type {key.value!r} is already registered to {current!r}, not peft-safety's {value!r}. Another "
                "library claims the same name; import only one of them."
            )
    for table, key, value in plan:
        table[key] = value


register()
