"""Checks of a model object that every stage may run before it starts (peft is imported inside the function).

`check_fresh_base` refuses a model that already holds PEFT adapter layers where a plain base model is expected.
``get_peft_model`` and `SafetySFTTrainer` wrap the model they are given **in place**: after SET training the variable
``model`` holds ``SafetyLinear`` layers whose weights are renamed ``...base_layer.weight``. Handing that object to
the next step (LoRA fine-tuning, scoring, a second trainer) would otherwise fail far from the cause ("No mask entry
lies in a module LoRA trains": the mask names ``q_proj.weight``, the model now has ``q_proj.base_layer.weight``) or
silently stack a second adapter on the first.
"""

from __future__ import annotations

from typing import Any

from .errors import SafetyError

__all__ = ["adapter_layers", "check_fresh_base"]


def adapter_layers(model: Any) -> list[tuple[str, str]]:
    """``(module name, class name)`` of every PEFT adapter layer inside ``model`` (empty for a plain model)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    named = getattr(model, "named_modules", None)
    if named is None:
        return []
    return [(name, type(module).__name__) for name, module in named() if isinstance(module, BaseTunerLayer)]


def check_fresh_base(model: Any, where: str) -> None:
    """Raise if ``model`` already holds adapter layers (see the module docstring).

    Args:
        model: the model about to be used as a base model.
        where: who asks, for the message (``"SafetySFTTrainer"``, ``"score()"``).

    Raises:
        SafetyError: naming the first adapter layer and how to get a base model again.
    """
    found = adapter_layers(model)
    if not found:
        return
    name, kind = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    raise SafetyError(
        f"{where} needs a base model, but this model already holds adapter layers ({name!r} is a {kind}{more}): "
        "get_peft_model() and SafetySFTTrainer add their adapter to the model object they are given, in place. Load "
        "a fresh base model (e.g. `model, tokenizer = load_default_model()` again, or "
        "AutoModelForCausalLM.from_pretrained(...)), or merge the adapter first (model = model.merge_and_unload())."
    )
