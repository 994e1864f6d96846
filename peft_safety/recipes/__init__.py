"""Recipes: applications built from the library's stages (nothing inside the library imports them).

* `peft_safety.recipes.main_job` -- the main job (`run_main_job`, ``peft-safety demo``): score the embedded model,
  select a mask, run SET and SPA, evaluate and write a report;
* `peft_safety.recipes.sft` -- the TRL-style SFT entry point shared by ``examples/sft_safety.py`` and
  ``peft-safety train``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "MainJobConfig": "peft_safety.recipes.main_job",
    "MainJobResult": "peft_safety.recipes.main_job",
    "run_main_job": "peft_safety.recipes.main_job",
}

__all__ = [
    "MainJobConfig",
    "MainJobResult",
    "run_main_job",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_safety.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from .main_job import MainJobConfig, MainJobResult, run_main_job
