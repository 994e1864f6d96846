"""How an adapter stores a mask on one ``nn.Linear`` weight, and the one check of what an adapter file says about it.

Both adapter types describe each adapted module in ``adapter_config.json``'s ``mask_layout`` as
``{"kind": <storage kind>, "n": <number of stored indices>, "shape": [d_out, d_in]}``, and store the indices
themselves in ``adapter_model.safetensors``. The storage kinds are the project's words (`peft_safety.vocab.STORAGE_KINDS`):

| kind | from granularity | indices | limit (``n`` and every index below it) |
|---|---|---|---|
| ``"entries"`` | ``Weight()`` | flat ``i * d_in + j`` | ``d_out * d_in`` |
| ``"rows"`` | ``Neuron(axis=0)``, ``Head(axis=0)`` (heads expanded to rows) | row ids | ``d_out`` |
| ``"cols"`` | ``Neuron(axis=1)``, ``Head(axis=1)`` | column ids | ``d_in`` |
| ``"whole"`` | ``Layer()`` | ``[0]`` | ``1`` |

``SAFETY`` (SET) stores all four kinds (a ``whole`` module trains its entire weight). ``SAFETY_LORA`` stores the first
three: a ``Layer()``-masked module is excluded from LoRA instead of being stored.

The rule for ``n`` is ``1 <= n <= limit`` for both types. ``n = 0`` is refused: a layout lists a module only because
the mask has units there (`SafetyMask.names` holds only parameters with at least one unit), so no save writes it, and a
damaged file that did would make a module wrapped for nothing (SET) or a masked module that masks nothing (masked
LoRA). Index tensors follow the same rule: int32/int64, 1-D, non-empty, strictly increasing, every value below the
limit (for ``whole`` that is exactly ``[0]``).

Everything here is checked before anything sized by the file is allocated (``n = 10**12`` fails at once).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SafetyError, SafetyTypeError
from ..vocab import STORAGE_KINDS, base_name, did_you_mean, is_int

__all__ = [
    "LAYOUT_KEYS",
    "LORA_KINDS",
    "SET_KINDS",
    "check_indices",
    "check_layout",
    "check_layout_modules",
    "base_modules",
    "storage_of",
    "unit_limit",
]

#: The keys of one ``mask_layout`` entry, exactly.
LAYOUT_KEYS = ("kind", "n", "shape")

#: Storage kinds of a SET adapter: every kind (a ``Layer()`` mask trains the whole weight).
SET_KINDS: tuple[str, ...] = STORAGE_KINDS

#: Storage kinds of a masked-LoRA adapter: no ``whole`` (a ``Layer()``-masked module is left out of LoRA instead).
LORA_KINDS: tuple[str, ...] = tuple(k for k in STORAGE_KINDS if k != "whole")

_FIX_CONFIG = "The adapter folder is damaged or was edited by hand: save the adapter again from its training run."
_FIX_WEIGHTS = "The weights file is damaged or belongs to another model: save the adapter again from its training run."


def unit_limit(kind: str, shape: tuple[int, int] | list[int]) -> int:
    """How many indices a ``kind`` mask on a ``(d_out, d_in)`` weight can hold; also the exclusive bound of each index."""
    out_features, in_features = shape
    return {"entries": out_features * in_features, "rows": out_features, "cols": in_features, "whole": 1}[kind]


def storage_of(granularity: Any, indices: torch.Tensor, name: str) -> tuple[str, torch.Tensor]:
    """The storage kind of a mask tensor and the indices stored for it (sorted, unique, int64).

    Heads become the rows (or columns) they cover; a ``Layer()`` mask becomes ``("whole", [0])``.

    Raises:
        TypeError: an unknown granularity (the message names the parameter).
    """
    from ..mask import Head, Layer, Neuron, Weight

    if isinstance(granularity, Layer):
        return "whole", torch.zeros(1, dtype=torch.int64)
    idx = torch.as_tensor(indices).to(torch.int64)
    if isinstance(granularity, Weight):
        return "entries", torch.unique(idx)
    if isinstance(granularity, Neuron):
        return ("rows" if granularity.axis == 0 else "cols"), torch.unique(idx)
    if isinstance(granularity, Head):
        head_dim = int(granularity.head_dim)
        expanded = (idx[:, None] * head_dim + torch.arange(head_dim, dtype=torch.int64)[None, :]).reshape(-1)
        return ("rows" if granularity.axis == 0 else "cols"), torch.unique(expanded)
    raise SafetyTypeError(f"Unsupported granularity {granularity!r} for parameter {name!r}.")


def check_layout(
    layout: Any, *, kinds: Iterable[str], allow_empty: bool = False, where: str = "mask_layout"
) -> dict[str, dict[str, Any]]:
    """Validate a ``mask_layout`` (as read from an untrusted ``adapter_config.json``) and return it normalised.

    Args:
        layout: ``{module name: {"kind", "n", "shape"}}``.
        kinds: the storage kinds the adapter type implements (`SET_KINDS` or `LORA_KINDS`).
        allow_empty: whether an empty layout is valid (a masked LoRA whose mask only excludes modules).
        where: how to name the layout in messages.

    Returns:
        A new dict with ``n`` as ``int`` and ``shape`` as a two-int list.

    Raises:
        ValueError: the message names the module, the field, the value and the fix.
    """
    kinds = tuple(kinds)
    if not isinstance(layout, dict) or (not layout and not allow_empty):
        got = type(layout).__name__ if not isinstance(layout, dict) else "an empty dict"
        raise SafetyError(
            f"{where} must be a {'' if allow_empty else 'non-empty '}dict {{module name: {{'kind', 'n', 'shape'}}}}, "
            f"got {got}. {_FIX_CONFIG}"
        )
    out: dict[str, dict[str, Any]] = {}
    for module, entry in layout.items():
        if not isinstance(module, str) or not module:
            raise SafetyError(f"{where} keys must be non-empty module names, got {module!r}. {_FIX_CONFIG}")
        if not isinstance(entry, dict) or set(entry) != set(LAYOUT_KEYS):
            raise SafetyError(
                f"{where}[{module!r}] must be a dict with exactly the keys {list(LAYOUT_KEYS)}, got {entry!r}. "
                f"{_FIX_CONFIG}"
            )
        kind, n, shape = entry["kind"], entry["n"], entry["shape"]
        if kind not in kinds:
            raise SafetyError(
                f"{where}[{module!r}]['kind'] = {kind!r} is not a storage kind of this adapter type "
                f"({list(kinds)}).{did_you_mean(kind, kinds, available=False)} {_FIX_CONFIG}"
            )
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(is_int(d) and d > 0 for d in shape)):
            raise SafetyError(
                f"{where}[{module!r}]['shape'] = {shape!r} must be two positive ints [d_out, d_in]. {_FIX_CONFIG}"
            )
        limit = unit_limit(kind, shape)
        if not is_int(n) or not 1 <= n <= limit:
            raise SafetyError(
                f"{where}[{module!r}]['n'] = {n!r} must be an int between 1 and {limit} (the number of {kind} a "
                f"{shape[0]}x{shape[1]} weight has). {_FIX_CONFIG}"
            )
        out[module] = {"kind": kind, "n": int(n), "shape": [int(shape[0]), int(shape[1])]}
    return out


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{base name: module}`` of every module of ``model``, PEFT wrappers looked through to their base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        out.setdefault(base_name(key), module)
    return out


def check_layout_modules(layout: dict[str, dict[str, Any]], model: nn.Module, *, what: str) -> None:
    """Every module of a (checked) layout is an ``nn.Linear`` of ``model`` with the recorded shape.

    Args:
        layout: the output of `check_layout`.
        model: the base model (or a model with PEFT layers injected, or a ``PeftModel``).
        what: how to name the adapter in messages (e.g. ``"This SAFETY adapter"``).

    Raises:
        ValueError: a module the model lacks, that is not an ``nn.Linear``, or has another shape.
    """
    modules = base_modules(model)
    for key, entry in layout.items():
        base = modules.get(key)
        if not isinstance(base, nn.Linear):
            found = "is not in this model" if base is None else f"is a {type(base).__name__}, not an nn.Linear"
            raise SafetyError(
                f"{what}'s mask_layout names module {key!r}, which {found}: the adapter belongs to another base "
                "model. Load it on the base model it was trained on (see base_model_name_or_path)."
            )
        here = [int(base.out_features), int(base.in_features)]
        if here != list(entry["shape"]):
            raise SafetyError(
                f"{what}'s mask_layout[{key!r}] is for a {entry['shape'][0]}x{entry['shape'][1]} weight, but this "
                f"model's {key!r} is {here[0]}x{here[1]}: the adapter belongs to another base model. Load it on the "
                "base model it was trained on."
            )


def check_indices(idx: Any, kind: str, shape: tuple[int, int], where: str) -> None:
    """Check one stored index tensor (from a weights file or a layer's buffer) before it is used.

    int32/int64, 1-D, non-empty, at most `unit_limit` values, each in ``[0, limit)``, strictly increasing (sorted, no
    duplicates: repeated or unsorted indices double-count deltas and give wrong value gradients). Values of a tensor
    on the meta device are not read.

    Raises:
        ValueError: naming ``where``, what is wrong and the fix; the ``-1`` placeholder a layer allocates from the
            layout has its own message (the adapter weights were never loaded into it).
    """
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise SafetyError(f"{where} must hold int32/int64 integer indices, got {got}. {_FIX_WEIGHTS}")
    if idx.ndim != 1 or idx.numel() == 0:
        raise SafetyError(
            f"{where} must be a non-empty 1-D tensor of indices, got shape {tuple(idx.shape)}. {_FIX_WEIGHTS}"
        )
    limit = unit_limit(kind, shape)
    if idx.numel() > limit:
        raise SafetyError(
            f"{where} holds {idx.numel()} {kind} indices, more than a {shape[0]}x{shape[1]} weight has ({limit}). "
            f"{_FIX_WEIGHTS}"
        )
    if idx.device.type == "meta":
        return
    low, high = int(idx.min()), int(idx.max())
    if low == -1 and high == -1:
        raise SafetyError(
            f"{where} still holds its placeholder: the adapter weights were never loaded into it. Load adapters with "
            "PeftModel.from_pretrained / AutoPeftModelForCausalLM / load_adapter after `import peft_safety`."
        )
    if low < 0 or high >= limit:
        raise SafetyError(
            f"{where} has indices in [{low}, {high}], out of range [0, {limit}) for the {kind} of a "
            f"{shape[0]}x{shape[1]} weight. {_FIX_WEIGHTS}"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise SafetyError(
            f"{where} must be strictly increasing (sorted and unique, no duplicates): unsorted or repeated indices "
            f"double-count deltas and give wrong gradients. {_FIX_WEIGHTS}"
        )
