"""Calibration sets whose responses the model writes itself (greedy, batched, same template as the set).

`build_refusal_set` pairs harmful prompts with refusals (fixed text, or the model's own answers, optionally forced to
start with a prefix: Wei et al.'s "safety-full" data); `build_utility_set` pairs benign prompts with the model's own
answers (the usual utility calibration data when no responses exist). The pure row builders (`refusal_rows`,
`utility_rows`) live in `peft_safety.scoring.calibration`; generation in `peft_safety.scoring.generation`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .calibration import DEFAULT_REFUSAL, CalibrationSet, _check_prompts, refusal_rows, utility_rows
from .generation import generate_responses

__all__ = ["build_refusal_set", "build_utility_set"]


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    calib_kwargs: dict[str, Any],
    response_prefix: str | None = None,
) -> list[str]:
    """Greedy answers rendered with the same template and system turn as the calibration set they will fill."""
    return generate_responses(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=calib_kwargs.get("system_prompt"),
        template=calib_kwargs.get("template", "chat"),
        response_prefix=response_prefix,
        progress=False,
    )


def build_refusal_set(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    generate: bool = False,
    refusal: str | Callable[[str], str] = DEFAULT_REFUSAL,
    refusal_prefix: str | None = None,
    max_new_tokens: int = 64,
    generation_batch_size: int = 8,
    **calib_kwargs: Any,
) -> CalibrationSet:
    """A refusal calibration set: harmful prompts paired with refusals.

    Args:
        model: the model whose refusals are generated (`generate=True`); unused otherwise (may be `None`).
        tokenizer: its tokenizer.
        prompts: harmful prompts.
        generate: `True` lets the model write its own refusals (greedy, batched, chat template: Wei et al.'s
            "safety-full" data); `False` pairs every prompt with ``refusal``.
        refusal: fixed refusal text or callable, used when ``generate=False``.
        refusal_prefix: with ``generate=True``, text forced at the start of every answer (e.g. ``"I cannot"``),
            which steers a weakly aligned model into a refusal.
        max_new_tokens: generation budget.
        generation_batch_size: prompts per `generate` call.
        **calib_kwargs: forwarded to `CalibrationSet` (``template``, ``max_length``, ``system_prompt`` ...).

    Returns:
        A `CalibrationSet` with ``loss="response_only"`` unless overridden.
    """
    prompts = _check_prompts(prompts)
    if generate:
        if model is None:
            raise ValueError("generate=True needs a model to write the refusals; pass the model or generate=False.")
        responses = _generate(
            model, tokenizer, prompts, max_new_tokens, generation_batch_size, calib_kwargs, refusal_prefix
        )
        rows = utility_rows(prompts, responses)
    else:
        if refusal_prefix is not None:
            raise ValueError("refusal_prefix only applies with generate=True; put it in `refusal` instead.")
        rows = refusal_rows(prompts, refusal)
    return CalibrationSet(rows, tokenizer, **calib_kwargs)


def build_utility_set(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    generation_batch_size: int = 8,
    **calib_kwargs: Any,
) -> CalibrationSet:
    """A utility calibration set: benign prompts paired with the model's own greedy answers.

    Args:
        model: the model that answers.
        tokenizer: its tokenizer.
        prompts: benign prompts.
        max_new_tokens: generation budget.
        generation_batch_size: prompts per `generate` call.
        **calib_kwargs: forwarded to `CalibrationSet`.
    """
    prompts = _check_prompts(prompts)
    responses = _generate(model, tokenizer, prompts, max_new_tokens, generation_batch_size, calib_kwargs)
    return CalibrationSet(utility_rows(prompts, responses), tokenizer, **calib_kwargs)
