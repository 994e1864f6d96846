"""What an adapter folder holds, read from its weights file: `detect_adapter_type` and `check_adapter_type`.

``adapter_config.json`` says which PEFT type a folder is (``"peft_type"``), and PEFT believes it. A folder whose
``peft_type`` was relabelled ``"LORA"`` loads through PEFT's own LoRA code, where no code of ours runs: a SET adapter
then becomes an identity LoRA (every delta dropped), a masked LoRA an unmasked one (every protected entry free to
move). The weights file still says what the adapter is, by its tensor names: SET stores ``<module>.safety_indices`` and
``<module>.safety_values``, masked LoRA stores its masks as ``<module>.lora_safety_rows|cols|entries`` next to LoRA's
``lora_A`` / ``lora_B``. peft-safety's loaders, ``peft-safety eval`` and the card tooling compare the two before
loading or describing a folder (`check_adapter_type`); the public name is ``peft_safety.tuner.detect_adapter_type``.

Only the tensor names are read (the safetensors header, or the keys of a ``.bin`` file), never the tensors.
"""

from __future__ import annotations

import json
import os

from ..errors import SafetyFileError

__all__ = ["ADAPTER_WEIGHTS_FILES", "check_adapter_type", "detect_adapter_type", "type_of_tensor_names"]

#: The weights files of a PEFT adapter folder, in the order PEFT looks for them.
ADAPTER_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_SET = ("safety_indices", "safety_values")
_MASKED_LORA = ("lora_safety_rows", "lora_safety_cols", "lora_safety_entries")
_LORA = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

#: What each detected type holds, for messages, and what loading it under another type does.
_HOLDS = {
    "SAFETY": ("SET index/value tensors", "every SET delta would be dropped (PEFT loads it as an identity LoRA)"),
    "SAFETY_LORA": (
        "masked-LoRA mask tensors",
        "every mask would be dropped (PEFT loads it as an unmasked LoRA, which moves the protected entries)",
    ),
    "LORA": ("LoRA factors only", "it would not load as a peft-safety adapter"),
}


def type_of_tensor_names(names: list[str] | tuple[str, ...] | set[str]) -> tuple[str | None, str | None]:
    """``(type, an example name)`` of a weights file with these tensor names: ``"SAFETY"`` (SET index/value tensors),
    ``"SAFETY_LORA"`` (masked-LoRA mask tensors), ``"LORA"`` (LoRA factors and no masks), or ``(None, None)``."""
    found: dict[str, str] = {}
    for name in sorted(names):
        parts = set(name.split("."))
        for kind, attrs in (("SAFETY", _SET), ("SAFETY_LORA", _MASKED_LORA), ("LORA", _LORA)):
            if kind not in found and parts.intersection(attrs):
                found[kind] = name
    for kind in ("SAFETY", "SAFETY_LORA", "LORA"):
        if kind in found:
            return kind, found[kind]
    return None, None


def _tensor_names(path: str) -> list[str]:
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        import torch

        return list(torch.load(path, map_location="meta", weights_only=True).keys())
    except Exception as err:  # any unreadable file is reported the same way, naming it
        raise SafetyFileError(
            f"{path}: cannot read the tensor names ({type(err).__name__}: {err}); the file is damaged."
        ) from err


def detect_adapter_type(folder: str | os.PathLike) -> str | None:
    """What the weights file of an adapter folder holds, whatever its ``adapter_config.json`` says.

    Args:
        folder: a local adapter folder (``adapter_model.safetensors`` or ``adapter_model.bin``).

    Returns:
        ``"SAFETY"`` (a SET adapter: index and value tensors), ``"SAFETY_LORA"`` (a masked LoRA: LoRA factors and mask
        tensors), ``"LORA"`` (LoRA factors and no masks; also a masked LoRA whose mask holds ``Layer()`` entries only,
        which leaves those modules out of LoRA and stores nothing), or `None` (no weights file, or another PEFT type).

    Raises:
        ValueError: a weights file whose tensor names cannot be read.

    Example:

    ```python
    >>> from peft_safety.tuner import detect_adapter_type
    >>> detect_adapter_type("spa-adapter")                     # doctest: +SKIP
    'SAFETY_LORA'
    ```
    """
    for filename in ADAPTER_WEIGHTS_FILES:
        path = os.path.join(os.fspath(folder), filename)
        if os.path.isfile(path):
            return type_of_tensor_names(_tensor_names(path))[0]
    return None


def check_adapter_type(folder: str | os.PathLike) -> str | None:
    """Refuse an adapter folder whose ``adapter_config.json`` says another PEFT type than its weights file holds.

    A config relabelled away from ``SAFETY`` / ``SAFETY_LORA`` (to ``"LORA"``, say) would load through PEFT's own code
    without any of peft-safety's checks; a config claiming one of our types for weights that hold another is as wrong.
    A masked LoRA without mask tensors (a ``Layer()``-only mask) is consistent.

    Args:
        folder: a local adapter folder.

    Returns:
        The type the weights hold (`detect_adapter_type`), or `None` when the folder has no config or no weights.

    Raises:
        ValueError: naming both files, what each says, and the fix.
    """
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = next(
        (os.path.join(folder, f) for f in ADAPTER_WEIGHTS_FILES if os.path.isfile(os.path.join(folder, f))), None
    )
    if weights_path is None or not os.path.isfile(config_path):
        return None
    held, example = type_of_tensor_names(_tensor_names(weights_path))
    try:
        with open(config_path, encoding="utf-8") as f:
            declared = json.load(f).get("peft_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise SafetyFileError(f"{config_path}: not a readable JSON object ({err}); the file is damaged.") from None
    ours = ("SAFETY", "SAFETY_LORA")
    if held is None or declared == held or (declared == "SAFETY_LORA" and held == "LORA"):
        return held
    if held not in ours and declared not in ours:
        return held
    holds, consequence = _HOLDS[held]
    if held in ours:
        fix = f'restore "peft_type": "{held}" in {config_path}'
        what = f"a {held} adapter whose config was relabelled; loaded as {declared!r}, {consequence}"
    else:
        fix = "save the adapter again (the two files come from different adapters)"
        what = f"not a {declared} adapter"
    raise SafetyFileError(
        f"{config_path} says peft_type {declared!r}, but {weights_path} holds {holds} (e.g. {example!r}): the folder "
        f"is {what}. Fix: {fix}."
    )
