"""Utility metrics: perplexity of held-out responses, and multiple-choice accuracy by log-likelihood.

Both score token log-probabilities in float32 (``log_softmax`` of fp32 logits, sums in fp32/fp64), batched with
right padding; padded positions never enter a sum.

* `perplexity`: ``exp(sum of response-token NLL / number of response tokens)`` over all rows, where the prompt is
  rendered with the chat template (the user turn plus the generation prompt) and only the response tokens are scored
  (the response is tokenized on its own, without special tokens, and appended).
* `multiple_choice_accuracy`: for each row, the choice whose continuation has the highest log-likelihood given the
  context ``"{prompt}\\nAnswer:"`` (continuation ``" {choice}"``); ``normalize="length"`` divides by the number of
  continuation tokens. Accuracy = fraction of rows whose best choice is ``row["answer"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..scoring.generation import _pad_id, render_prompts

__all__ = ["choice_loglikelihoods", "multiple_choice_accuracy", "perplexity", "sequence_logprobs"]


def sequence_logprobs(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int = 0, batch_size: int = 8
) -> list[tuple[float, int]]:
    """Sum of log p(continuation | context) and the continuation length, for each ``(context_ids, cont_ids)``.

    Args:
        model: a causal LM returning ``.logits``.
        pairs: token id lists; the context must be non-empty.
        pad_id: id written at padded positions (masked out).
        batch_size: sequences per forward pass.

    Returns:
        ``[(sum_logprob, num_tokens), ...]`` in the input order.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                batch = order[s : s + batch_size]
                seqs = [pairs[i][0] + pairs[i][1] for i in batch]
                width = max(len(q) for q in seqs)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                target = torch.zeros((len(batch), width), dtype=torch.bool)
                for r, i in enumerate(batch):
                    ctx, _cont = pairs[i]
                    if not ctx:
                        raise ValueError(f"Sequence {i} has an empty context; the first token has no prediction.")
                    ids[r, : len(seqs[r])] = torch.tensor(seqs[r], dtype=torch.long)
                    attn[r, : len(seqs[r])] = 1
                    target[r, len(ctx) : len(seqs[r])] = True
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
                # position t predicts token t+1
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                mask = target[:, 1:].to(device)
                sums = (tok_lp.double() * mask).sum(dim=1).tolist()
                counts = mask.sum(dim=1).tolist()
                for r, i in enumerate(batch):
                    out[i] = (float(sums[r]), int(counts[r]))
    finally:
        model.train(was_training)
    return out


def _response_text(row: Any, index: int) -> tuple[str, str]:
    if not isinstance(row, dict):
        raise TypeError(f"rows[{index}] must be a dict with 'prompt' and 'response', got {type(row).__name__}.")
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise ValueError(f"rows[{index}] needs a string 'prompt' and a non-empty string 'response'; got keys {sorted(row)}.")  # fmt: skip
    return prompt, response


def perplexity(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    system_prompt: str | None = None,
    template: str = "chat",
    max_length: int | None = 1024,
) -> float:
    """Perplexity of the responses given their prompts (response tokens only).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: dicts with ``"prompt"`` and ``"response"``.
        batch_size: sequences per forward pass.
        system_prompt: optional system turn of the chat template.
        template: ``"chat"``, ``"raw"``, ``"inst"`` or ``"alpaca"`` (see `peft_safety.scoring.generation.render_prompts`).
        max_length: responses are cut so that prompt + response fit (``None``: no cut).

    Returns:
        ``exp(total NLL / total response tokens)``.

    Raises:
        ValueError: empty rows, a row without a response, or no response token left.
    """
    if not rows:
        raise ValueError("perplexity needs at least one row with a 'response'.")
    texts = [_response_text(r, i) for i, r in enumerate(rows)]
    ctx = render_prompts(tokenizer, [p for p, _ in texts], system_prompt=system_prompt, template=template)
    pairs = []
    for c, (_, response) in zip(ctx, texts):
        cont = tokenizer(response, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            cont = cont[: max(0, max_length - len(c))]
        pairs.append((c, cont))
    scored = sequence_logprobs(model, pairs, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    total = sum(lp for lp, _ in scored)
    count = sum(n for _, n in scored)
    if count == 0:
        raise ValueError("No response token left to score (raise max_length).")
    return math.exp(-total / count)


def choice_loglikelihoods(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 8, normalize: str = "none"
) -> list[list[float]]:
    """Log-likelihood of every choice of every multiple-choice row (see the module docstring for the format)."""
    if normalize not in ("none", "length"):
        raise ValueError(f"normalize must be 'none' or 'length', got {normalize!r}.")
    pairs, owners = [], []
    for i, row in enumerate(rows):
        choices = row.get("choices") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(choices, list) or len(choices) < 2:  # fmt: skip
            raise ValueError(f"rows[{i}] needs 'prompt' (str), 'choices' (a list of 2+ strings) and 'answer' (int).")
        context = tokenizer(f"{row['prompt']}\nAnswer:", add_special_tokens=True)["input_ids"]
        for choice in choices:
            pairs.append((context, tokenizer(f" {choice}", add_special_tokens=False)["input_ids"]))
            owners.append(i)
    scored = sequence_logprobs(model, pairs, pad_id=_pad_id(tokenizer), batch_size=batch_size)
    out: list[list[float]] = [[] for _ in rows]
    for i, (lp, n) in zip(owners, scored):
        out[i].append(lp / max(n, 1) if normalize == "length" else lp)
    return out


def multiple_choice_accuracy(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 8, normalize: str = "none"
) -> float:
    """Fraction of rows whose highest log-likelihood choice is the answer (ties: the first choice wins).

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        rows: dicts with ``"prompt"``, ``"choices"`` (2+ strings) and ``"answer"`` (the index of the right one),
            e.g. ``load_rows("arc_easy")``.
        batch_size: sequences per forward pass (each choice is one sequence).
        normalize: ``"none"`` (sum of log-probabilities) or ``"length"`` (mean per continuation token).

    Returns:
        The accuracy in [0, 1].
    """
    if not rows:
        raise ValueError("multiple_choice_accuracy needs at least one row.")
    for i, row in enumerate(rows):
        answer = row.get("answer") if isinstance(row, dict) else None
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(row.get("choices") or []):
            raise ValueError(f"rows[{i}]['answer'] must be an index into its choices, got {answer!r}.")
    lls = choice_loglikelihoods(model, tokenizer, rows, batch_size=batch_size, normalize=normalize)
    correct = sum(int(max(range(len(ll)), key=lambda k: (ll[k], -k)) == row["answer"]) for ll, row in zip(lls, rows))
    return correct / len(rows)
