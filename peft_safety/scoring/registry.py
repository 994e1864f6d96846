"""One registry of scorers, with lazily imported built-ins and helpful lookup errors.

A scorer is any callable with the signature::

    fn(model, calib: CalibrationSet | None, *, targets: Targets, **kwargs) -> Scores

* ``model``: the model to score (a ``PreTrainedModel``, or any ``nn.Module`` whose parameters ``targets`` names).
* ``calib``: the calibration data; `None` for data-free scorers (``random``, ``magnitude``).
* ``targets``: the eligible parameters and their roles (`peft_safety.scoring.targets.Targets`), resolved by
  `peft_safety.scoring.score` from ``target_modules`` / ``exclude_modules`` / ``include_*``.
* ``**kwargs``: method options. `score` also passes ``progress`` (bool) to scorers that accept it (an explicit
  ``progress`` parameter or ``**kwargs``).
* Returns `Scores`, which `select` turns into a mask. A scorer that selects internally (safety neurons, safety
  layers) attaches its selection as ``Scores(..., rule=...)`` (a `peft_safety.scoring.scores.SelectionRule`), which
  ``select(scores)`` applies when no ``fraction`` or ``k`` is given.

Built-in scorers live in modules that are imported only when first looked up (``import peft_safety.scoring`` stays
lean): see `BUILTIN_SCORERS`.

Example:

```python
>>> from peft_safety.scoring.registry import SCORERS, register_scorer
>>> @register_scorer("my_magnitude_squared")
... def my_scorer(model, calib, *, targets, **kwargs):
...     ...
>>> "my_magnitude_squared" in SCORERS
True
```
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import SafetyError
from ..vocab import did_you_mean

__all__ = ["BUILTIN_ALIASES", "BUILTIN_SCORERS", "SCORERS", "Registry", "register_scorer"]

#: built-in scorer name -> module that registers it on import
BUILTIN_SCORERS: dict[str, str] = {
    "snip": "peft_safety.scoring.gradient",
    "esi": "peft_safety.scoring.gradient",
    "wanda": "peft_safety.scoring.activation",
    "random": "peft_safety.scoring.baselines",
    "magnitude": "peft_safety.scoring.baselines",
    "safety_neurons": "peft_safety.scoring.neuron",
    "safety_layers": "peft_safety.scoring.layer",
}
#: paper / reference-code names -> built-in scorer name
BUILTIN_ALIASES: dict[str, str] = {
    "wandg": "snip",
    "grad_x_std": "esi",
    "plnd": "safety_neurons",
    "sn_tune": "safety_neurons",
    "sppft": "safety_layers",
}


class Registry:
    """A name -> callable table with aliases, a duplicate check, lazy built-ins and "did you mean" errors.

    Args:
        kind: what the entries are, used in error messages ("scorer", "judge", ...).
        lazy: name -> module imported on first lookup of that name; the module registers the name itself.
        lazy_aliases: alias -> name for lazy entries, so aliases resolve before their module is imported.
    """

    def __init__(
        self, kind: str, lazy: Mapping[str, str] | None = None, lazy_aliases: Mapping[str, str] | None = None
    ) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._aliases: dict[str, str] = {}
        self._lazy: dict[str, str] = dict(lazy or {})
        self._lazy_aliases: dict[str, str] = dict(lazy_aliases or {})

    # ------------------------------------------------------------------ registration
    def register(
        self, name: str, aliases: Sequence[str] = (), *, override: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers a callable under ``name`` (and ``aliases``).

        Args:
            name: the lookup name (lowercase by convention).
            aliases: other names for the same entry (paper names).
            override: replace an existing entry of the same name instead of raising.

        Raises:
            ValueError: the name or an alias is already registered to a different callable (and not ``override``).
            TypeError: the name is not a string.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"A {self.kind} name must be a non-empty str, got {name!r}.")
        if isinstance(aliases, str):
            aliases = (aliases,)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(fn):
                raise TypeError(f"Only callables can be registered as a {self.kind}, got {type(fn).__name__}.")
            for key in (name, *aliases):
                existing = self._entries.get(key) or self._entries.get(self._aliases.get(key, ""))
                # re-registering the same function (a module imported twice, e.g. under importlib.reload) is fine
                if existing is not None and not override and _qualname(existing) != _qualname(fn):
                    raise ValueError(
                        f"A {self.kind} named {key!r} is already registered ({_qualname(existing)}). Pick another "
                        "name, or pass override=True to replace it."
                    )
            self._entries[name] = fn
            self._aliases.pop(name, None)
            for alias in aliases:
                self._aliases[alias] = name
            return fn

        return decorator

    # ------------------------------------------------------------------ lookup
    def _canonical(self, name: str) -> str:
        return self._aliases.get(name) or self._lazy_aliases.get(name) or name

    def get(self, name: str) -> Callable[..., Any]:
        """Return the callable registered under ``name`` or an alias, importing a built-in's module if needed.

        Raises:
            ValueError: unknown name; the message suggests the closest name and lists the available ones.
            TypeError: the name is not a string.
        """
        if not isinstance(name, str):
            raise TypeError(f"A {self.kind} name must be a str, got {type(name).__name__}.")
        key = self._canonical(name)
        if key not in self._entries and key not in self._lazy:
            key = self._canonical(name.strip().lower())
        if key not in self._entries and key in self._lazy:
            importlib.import_module(self._lazy[key])
        if key in self._entries:
            return self._entries[key]
        hint = did_you_mean(name, self.names(), aliases=self.aliases())
        raise SafetyError(f"Unknown {self.kind} {name!r}.{hint}")

    __getitem__ = get

    def names(self) -> list[str]:
        """Every registered or lazily available name (aliases excluded), sorted."""
        return sorted({*self._entries, *self._lazy})

    def aliases(self) -> dict[str, str]:
        """alias -> name, for registered and lazy entries."""
        return {**self._lazy_aliases, **self._aliases}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = self._canonical(name)
        return key in self._entries or key in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


#: the scorer registry used by `peft_safety.scoring.score`
SCORERS = Registry("scorer", lazy=BUILTIN_SCORERS, lazy_aliases=BUILTIN_ALIASES)


def register_scorer(
    name: str, aliases: Sequence[str] = (), *, override: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a scorer in `SCORERS` (decorator). See the module docstring for the scorer signature.

    Example:

    ```python
    >>> import torch
    >>> from peft_safety.scoring import register_scorer
    >>> @register_scorer("abs_weight_squared")
    ... def abs_weight_squared(model, calib, *, targets, **kwargs):
    ...     params = dict(model.named_parameters())
    ...     return {name: params[name].detach().float() ** 2 for name in targets}
    ```
    """
    return SCORERS.register(name, aliases, override=override)
