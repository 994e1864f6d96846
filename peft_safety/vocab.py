"""The words of peft-safety: one spelling and one check per concept, imported by every stage.

Every concept that more than one stage names lives here exactly once: the two modes, the fingerprint policy, how much
of a model a mask keeps, how an adapter stores a mask's units, the name of a parameter as a mask spells it, the
decoder-layer index in a name, the "did you mean" hint of an error, and the environment record written next to every
measured number. A stage that needs one of them imports it from here instead of writing its own copy, so a rule
cannot drift between two copies (``tests/test_vocab.py`` checks that no stage defines its own).

This module imports only the standard library (torch and the HF libraries inside `environment`), so that every stage,
``mask/`` included, may import it. The words are documented for users in ``docs/concepts.md``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from .errors import SafetyError, SafetyTypeError

__all__ = [
    "FINGERPRINT_POLICIES",
    "MODES",
    "STORAGE_KINDS",
    "FingerprintPolicy",
    "Mode",
    "StorageKind",
    "base_name",
    "check_choice",
    "check_fingerprint_policy",
    "check_fraction",
    "check_mode",
    "did_you_mean",
    "environment",
    "is_int",
    "layer_index",
    "split_layer",
]

# ------------------------------------------------------------------------------------------------------------- modes
#: what an intervention does with a mask's entries: ``"freeze"`` keeps them unchanged (SPA, RSN-Tune, SPPFT),
#: ``"train_only"`` trains them and nothing else (SET, SN-Tune)
MODES: tuple[str, ...] = ("freeze", "train_only")
Mode = Literal["freeze", "train_only"]

_MODE_HELP = "'freeze' (SPA: keep the mask's entries unchanged) or 'train_only' (SET: train only the mask's entries)"

# ---------------------------------------------------------------------------------------------- fingerprint policy
#: what to do when a mask's or an adapter's recorded weight fingerprints differ from the model's. The public spelling
#: is ``fingerprint_check`` (``safety_fingerprint_check`` in `SafetySFTConfig`, as TRL prefixes its fields)
FINGERPRINT_POLICIES: tuple[str, ...] = ("error", "warn", "ignore")
FingerprintPolicy = Literal["error", "warn", "ignore"]

# ----------------------------------------------------------------------------------------------------- storage kinds
#: how an adapter or the freezer stores the units of a mask on one 2-D weight: single ``entries`` (weight
#: granularity, flat indices), whole ``rows`` (output neurons), whole ``cols`` (input neurons), or the ``whole``
#: tensor (a layer mask, or a mask dense enough that storing every value is cheaper than indices)
STORAGE_KINDS: tuple[str, ...] = ("entries", "rows", "cols", "whole")
StorageKind = Literal["entries", "rows", "cols", "whole"]

# ------------------------------------------------------------------------------------------------------------- names
# path components that wrappers insert into parameter names: DDP/DataParallel ("module." at the front),
# torch.compile, FSDP1 and activation-checkpointing wrappers, and PEFT's "base_layer" of a tuned module
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"})

# the decoder-layer index: "model.layers.3.", "transformer.h.3.", "blocks.3.", "block.3.", "layer.3."
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def base_name(name: str) -> str:
    """The name a mask uses for a parameter seen through wrappers.

    Strips the leading ``module.`` of DDP/DataParallel, ``_orig_mod`` (torch.compile), FSDP1 and checkpoint-wrapper
    components, PEFT's ``base_model.model.`` prefix and its ``base_layer`` component. A name without wrappers is
    returned unchanged.

    Example:

    ```python
    >>> base_name("module.base_model.model.model.layers.0.mlp.down_proj.base_layer.weight")
    'model.layers.0.mlp.down_proj.weight'
    ```
    """
    parts = name.split(".")
    while parts and parts[0] == "module":
        parts.pop(0)
    parts = [p for p in parts if p not in _WRAPPER_PARTS]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def split_layer(name: str) -> tuple[int | None, str]:
    """The decoder-layer index in a name and the part of the name after it.

    ``(None, name)`` for names outside the layer stack; the part after the index is ``""`` when the name ends there.

    Example:

    ```python
    >>> split_layer("model.layers.12.self_attn.q_proj.weight"), split_layer("lm_head.weight")
    ((12, 'self_attn.q_proj.weight'), (None, 'lm_head.weight'))
    ```
    """
    m = _LAYER_RE.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end() :] if name[m.end() - 1 : m.end()] == "." else ""


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a parameter or module name, or `None` for names outside the layer stack.

    Example:

    ```python
    >>> layer_index("model.layers.12.self_attn.q_proj.weight"), layer_index("lm_head.weight")
    (12, None)
    ```
    """
    return split_layer(name)[0]


# ------------------------------------------------------------------------------------------------------------ checks
def did_you_mean(
    value: Any,
    choices: Iterable[str],
    *,
    n: int = 1,
    available: bool = True,
    aliases: Mapping[str, str] | None = None,
) -> str:
    """The hint an error about an unknown name ends with: ``" Did you mean 'x'? Available: 'a', 'b'."``.

    A choice that differs from ``value`` only by a dotted prefix (a wrapper's ``base_model.model.`` or ``module.``, in
    either direction) is the most likely intended one and comes first; otherwise the closest spellings by
    `difflib.get_close_matches`.

    Args:
        value: what the user gave.
        choices: the valid names (a mapping gives its keys).
        n: how many close matches to suggest.
        available: append the list of every choice.
        aliases: other spellings ``{alias: name}`` that are matched too; the name they stand for is suggested.
    """
    names = list(choices)
    spellings = {**{c: c for c in names}, **(aliases or {})}
    close: list[str] = []
    if isinstance(value, str):
        close = [c for c in spellings if c.endswith("." + value) or value.endswith("." + c)]
        close = close or difflib.get_close_matches(value, list(spellings), n=n)
    suggested = list(dict.fromkeys(spellings[c] for c in close))[:n]
    hint = f" Did you mean {', '.join(repr(c) for c in suggested)}?" if suggested else ""
    if available:
        hint += f" Available: {', '.join(repr(c) for c in names)}."
    return hint


def check_choice(value: Any, choices: Sequence[str], *, where: str, help: str | None = None) -> str:
    """``value`` if it is one of ``choices``; otherwise a `ValueError` naming ``where``, the value, the closest choice
    and every choice (``help``, when given, replaces the list)."""
    if isinstance(value, str) and value in choices:
        return value
    tail = f" Use {help}." if help else did_you_mean(value, choices)
    if help:
        tail = did_you_mean(value, choices, available=False) + tail
    raise SafetyError(f"{where}={value!r} is not valid.{tail}")


def check_mode(value: Any, *, where: str = "mode") -> str:
    """``value`` if it is a mode (`MODES`), else a `ValueError` saying what each mode does."""
    return check_choice(value, MODES, where=where, help=_MODE_HELP)


def check_fingerprint_policy(value: Any, *, where: str = "fingerprint_check") -> str:
    """``value`` if it is a fingerprint policy (`FINGERPRINT_POLICIES`), else a `ValueError`."""
    return check_choice(value, FINGERPRINT_POLICIES, where=where, help="'error', 'warn' or 'ignore'")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON and numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_fraction(value: Any, *, where: str = "fraction", allow_zero: bool = False) -> float:
    """How much of a model a mask keeps, as a plain float in ``(0, 1]`` (``[0, 1]`` with ``allow_zero``).

    The public spelling of "how much" is ``fraction`` everywhere (``select(fraction=...)``, ``--fraction``); the
    mask's own ``sparsity`` is the same number measured after the fact.

    Raises:
        TypeError: not a real number (bools refused).
        ValueError: NaN, infinite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SafetyTypeError(f"{where} must be a number in (0, 1] (e.g. 0.01 for 1%), got {type(value).__name__}.")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not math.isfinite(value) or not low_ok or value > 1.0:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise SafetyError(f"{where}={value!r} must lie in {interval}: the share of entries kept (0.01 = 1%).")
    return value


# ------------------------------------------------------------------------------------------------------- environment
def environment(**extra: Any) -> dict[str, Any]:
    """The record written next to every measured number: library versions, Python, platform, torch threads.

    Args:
        extra: more fields to record (the command line, a preset name, ...).
    """
    import os
    import platform
    import sys
    from importlib import metadata

    from ._version import __version__

    record: dict[str, Any] = {
        "peft_safety": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "safetensors"):
        try:
            record[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            record[dist] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        record["torch_threads"] = torch.get_num_threads()
        record["cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
    record.update(extra)
    return record
