"""Batched greedy generation: the one implementation behind evaluation, model judges and generated calibration sets.

`peft_safety.scoring.rows.build_refusal_set` / `build_utility_set` and the over-rejection probe call it too. Prompts are
rendered by `CalibrationSet`'s templating (by default the tokenizer's chat template (a user turn, optionally after a system turn, plus the
generation prompt), sorted by length so each batch wastes little padding, left-padded (decoder-only models continue
from the right edge), generated greedily under `torch.inference_mode`, and returned in the input order. Greedy
decoding makes the output a function of the inputs only; ``seed`` is still set so sampling-free code paths that draw
random numbers (none in transformers' greedy search) cannot change it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GenerationStats", "generate_responses", "generate_with_stats", "render_prompts"]

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Counts of one generation run: prompts, generated tokens (up to and including EOS), wall seconds."""

    num_prompts: int
    new_tokens: int
    seconds: float
    batch_size: int

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tokens_per_second": self.tokens_per_second}


def _prompt_text(row: Any, index: int) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise TypeError(f"prompts[{index}] must be a string or a row dict with a 'prompt', got {type(row).__name__}.")


def render_prompts(
    tokenizer: Any, prompts: Sequence[Any], *, system_prompt: str | None = None, template: str = "chat"
) -> list[list[int]]:
    """Token ids of each prompt as the model sees it before answering.

    The text is rendered by `peft_safety.scoring.calibration.CalibrationSet` (prompt only, ``loss="none"``), so generation,
    evaluation and scoring see byte-identical prompts for the same template.

    Args:
        tokenizer: a tokenizer; ``template="chat"`` needs its ``chat_template``.
        prompts: strings or rows with ``"prompt"``.
        system_prompt: optional system turn (with a non-chat template its text comes first, then a blank line).
        template: ``"chat"`` (the tokenizer's chat template with the generation prompt), ``"raw"`` (the text),
            ``"inst"`` or ``"alpaca"`` (see `peft_safety.scoring.calibration.TEMPLATES`).

    Returns:
        One list of token ids per prompt.

    Raises:
        ValueError: an unknown template, or ``template="chat"`` with a tokenizer that has no chat template.
        TypeError: a prompt that is neither a string nor a row with a ``"prompt"`` string.
    """
    from .calibration import TEMPLATES, CalibrationSet

    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}.")
    texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
    if not texts:
        return []
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("The tokenizer has no chat_template; set one (tokenizer.chat_template = ...) or use template='raw'.")  # fmt: skip
    calib = CalibrationSet(
        [{"prompt": t} for t in texts], tokenizer, template=template, loss="none", system_prompt=system_prompt
    )
    return [list(example.prompt_ids) for example in calib._examples]


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("The tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token.")


def generate_with_stats(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    system_prompt: str | None = None,
    template: str = "chat",
    seed: int = 0,
    progress: bool = True,
    response_prefix: str | None = None,
) -> tuple[list[str], GenerationStats]:
    """`generate_responses` that also returns a `GenerationStats` (tokens generated, seconds)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if response_prefix is not None and not isinstance(response_prefix, str):
        raise TypeError(f"response_prefix must be a str or None, got {type(response_prefix).__name__}.")
    ids = render_prompts(tokenizer, prompts, system_prompt=system_prompt, template=template)
    if response_prefix:
        # the forced opening is tokenized on its own, exactly as CalibrationSet tokenizes responses, so a refusal
        # set built from these answers has the same prompt/response boundary as the generation
        prefix_ids = list(tokenizer(response_prefix, add_special_tokens=False)["input_ids"])
        ids = [[*p, *prefix_ids] for p in ids]
    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stop = {int(eos)} if eos is not None else set()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    responses: list[str | None] = [None] * len(ids)
    new_tokens = 0
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    try:
        from tqdm.auto import tqdm

        with torch.inference_mode():
            for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress or len(batches) < 2):
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i], dtype=torch.long)
                    attention[row, width - len(ids[i]) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
                for row, i in enumerate(batch):
                    gen = out[row, width:].tolist()
                    # count tokens up to and including the first stop token: the rest is padding
                    cut = next((k + 1 for k, t in enumerate(gen) if t in stop), len(gen))
                    new_tokens += cut
                    text = tokenizer.decode(gen[:cut], skip_special_tokens=True)
                    # strip the whole answer, not the continuation alone: "I cannot" + " help" keeps its space
                    responses[i] = ((response_prefix or "") + text).strip()
    finally:
        model.train(was_training)
    stats = GenerationStats(len(ids), new_tokens, time.perf_counter() - start, batch_size)
    logger.info("Generated %d tokens for %d prompts in %.1f s", new_tokens, len(ids), stats.seconds)
    return [r if r is not None else "" for r in responses], stats


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    system_prompt: str | None = None,
    template: str = "chat",
    seed: int = 0,
    progress: bool = True,
    response_prefix: str | None = None,
) -> list[str]:
    """Greedy answers of ``model`` to ``prompts``, batched with left padding, in the input order.

    Args:
        model: a causal LM (a `PeftModel` works too).
        tokenizer: its tokenizer.
        prompts: strings or rows with ``"prompt"``.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per ``generate`` call.
        system_prompt: optional system turn.
        template: ``"chat"`` (chat template), ``"raw"`` (the prompt text as is), ``"inst"`` or ``"alpaca"``.
        seed: seeds torch before generating (greedy decoding does not sample).
        progress: show a progress bar over batches.
        response_prefix: text forced at the start of every answer (e.g. ``"I cannot"``, which steers a weakly
            aligned model into a refusal); it is part of the returned responses.

    Returns:
        One decoded response per prompt (the prefix plus the new tokens, special tokens removed, stripped).

    Raises:
        ValueError: bad ``max_new_tokens``/``batch_size``/``template``, or a tokenizer without a chat template.
        TypeError: a prompt that is not a string or a row with a ``"prompt"``, a ``response_prefix`` not a str.

    Example:

    ```python
    >>> from peft_safety.testing import tiny_llama, tiny_tokenizer
    >>> out = generate_responses(tiny_llama(), tiny_tokenizer(), ["hi"], max_new_tokens=4, progress=False)
    >>> len(out)
    1
    ```
    """
    responses, _ = generate_with_stats(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
        template=template, seed=seed, progress=progress, response_prefix=response_prefix,
    )  # fmt: skip
    return responses
