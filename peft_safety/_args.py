"""Dataclass fields -> ``argparse`` flags, shared by the CLI and the benchmark scripts (standard library only)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = ["add_dataclass_arguments", "dataclass_from_namespace"]

_KINDS = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float, "str | None": str}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, dash_case: bool = True) -> None:
    """Add one flag per field of the dataclass ``cls``: its ``metadata["help"]`` is the help text, its default the
    default; ``bool`` fields become ``--flag`` / ``--no-flag``.

    Args:
        parser: the parser to extend.
        cls: a dataclass whose fields are ``int``, ``float``, ``str`` (optionally ``| None``) or ``bool``.
        dash_case: ``--max-new-tokens`` (True) or ``--max_new_tokens`` (False).

    Raises:
        TypeError: a field of another type.
    """
    for f in dataclasses.fields(cls):
        flag = "--" + (f.name.replace("_", "-") if dash_case else f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        help_text = f.metadata.get("help", "")
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)  # fmt: skip
        elif kind in _KINDS:
            parser.add_argument(flag, dest=f.name, type=_KINDS[kind], default=f.default,
                                help=f"{help_text} (default: %(default)s)")  # fmt: skip
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has type {kind!r}; only int, float, str and bool become flags.")


def dataclass_from_namespace(cls: type, namespace: argparse.Namespace, **overrides: Any) -> Any:
    """Build ``cls`` from the parsed values of its fields (other attributes of ``namespace`` are ignored)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if hasattr(namespace, f.name)}
    values.update(overrides)
    return cls(**values)
