"""Recipes: applications built from the library's stages (nothing inside the library imports them).

* `peft_safety.recipes.main_job` -- the main job (`run_main_job`, ``peft-safety demo``): score the embedded model,
  select a mask, run SET and SPA, evaluate and write a report;
* `peft_safety.recipes.sft` -- the TRL-style SFT entry point shared by ``examples/sft_safety.py`` and
  ``peft-safety train``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .main_job import MainJobConfig, MainJobResult, run_main_job
