"""Names a package exports without importing their modules until first use (PEP 562 module ``__getattr__``).

A package whose public names pull heavy dependencies (transformers, trl) lists them in a table ``{name: module}`` and
sets ``__getattr__ = lazy_getattr(__name__, table, globals())``; ``import`` of the package then stays light, and the
first access imports the module and caches the value in the package's namespace. Only the standard library.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: resolves ``name`` from ``table[name]`` and caches it in
    ``namespace`` (the package's ``globals()``); any other name is an ``AttributeError``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
