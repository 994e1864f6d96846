"""Calibration data: (prompt, response) rows -> tokenized, padded batches with response-only loss masks.

A `CalibrationSet` is what every scorer consumes. It is built once from rows and a tokenizer, keeps the token ids
(never re-tokenizes), and yields batches of tensors::

    {"input_ids": LongTensor (B, T), "attention_mask": LongTensor (B, T), "labels": LongTensor (B, T)}

Rows are dicts in any of TRL's dataset formats: ``messages`` (chat turns: ``[{"role": ..., "content": ...}, ...]``;
a final ``assistant`` turn is the response), ``prompt`` + ``completion`` (two strings, or two lists of messages: the
conversational prompt-completion format; the completion is the response), ``text`` (language modeling: every token is
scored), or the library's ``prompt`` (+ optional ``response``). Anything else is an error that lists these formats. A
``datasets.Dataset`` with those columns works too (``datasets`` is never imported here: the dataset is read through its
``to_list()``).

Token layout (identical for every template): the prompt is tokenized on its own, the response on its own without
special tokens, and the two id lists are concatenated. The prompt/response boundary is therefore exact (Wei et al.'s
"disentangle" mode, which drops the response BOS), and the response positions are known without any string search.

Labels follow the HF convention (the model shifts them): a position whose label is ``-100`` contributes no loss.
Prompt positions and padding positions are always ``-100``; padding positions also have ``attention_mask == 0``, so
padding can never reach a score: no loss term reads it and, with right padding and causal attention, no real token
attends to it.

Example:

```python
>>> from peft_safety import CalibrationSet
>>> from peft_safety.testing import tiny_tokenizer
>>> calib = CalibrationSet([{"prompt": "hi", "response": "I cannot help with that."}], tiny_tokenizer())
>>> batch = next(calib.batches(8))
>>> sorted(batch)
['attention_mask', 'input_ids', 'labels']
```
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SafetyError, SafetyTypeError

__all__ = [
    "LOSS_POLICIES",
    "ROW_FORMATS",
    "TEMPLATES",
    "CalibrationSet",
    "refusal_rows",
    "utility_rows",
]

logger = logging.getLogger(__name__)

#: prompt formats understood by `CalibrationSet`
TEMPLATES = ("chat", "raw", "inst", "alpaca")
#: which positions carry a loss label
LOSS_POLICIES = ("response_only", "full_text", "last_token", "none")
_RESPONSE_POLICIES = ("response_only",)
#: the default refusal of `refusal_rows`
DEFAULT_REFUSAL = "I cannot help with that."

_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)


@dataclass(frozen=True)
class _Example:
    """One tokenized row: the prompt ids and the (possibly truncated, possibly empty) response ids."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def _is_hf_dataset(obj: Any) -> bool:
    # duck typing keeps `datasets` out of the import graph: a Dataset has column_names and to_list()
    return hasattr(obj, "column_names") and hasattr(obj, "to_list") and not isinstance(obj, (list, tuple, dict))


#: the row formats `CalibrationSet` reads (TRL's dataset formats plus the library's own ``prompt``/``response``)
ROW_FORMATS = (
    "messages: [{role, content}, ...] (a final assistant turn is the response)",
    "prompt + completion (strings: TRL's standard prompt-completion)",
    "prompt + completion (lists of {role, content}: TRL's conversational prompt-completion)",
    "prompt (+ response)",
    "text (TRL's language modeling: every token is scored)",
)


def _turns(messages: Any, index: int, field: str) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise SafetyError(f"Row {index}: {field!r} must be a non-empty list of {{'role', 'content'}} dicts.")
    turns = []
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise SafetyError(f"Row {index}: every message in {field!r} needs 'role' and 'content', got {turn!r}.")
        if not isinstance(turn["content"], str):
            raise SafetyError(
                f"Row {index}: {field!r} has a {turn['role']!r} turn whose content is a {type(turn['content']).__name__}"
                "; only text content is supported."
            )
        turns.append({"role": str(turn["role"]), "content": turn["content"]})
    return turns


def _completion_text(completion: Any, index: int, conversational: bool) -> str:
    """The response of a prompt-completion row: the completion string, or the one assistant turn's content."""
    if not conversational:
        if not isinstance(completion, str):
            raise SafetyError(
                f"Row {index}: the prompt is a string but 'completion' is a {type(completion).__name__}; TRL's "
                "standard format pairs two strings, the conversational one two lists of messages."
            )
        return completion
    turns = _turns(completion, index, "completion")
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise SafetyError(
            f"Row {index}: a conversational 'completion' must be exactly one assistant message, got roles "
            f"{[t['role'] for t in turns]}; put earlier turns in 'prompt'."
        )
    return turns[0]["content"]


def _normalize_row(row: Any, index: int, system_prompt: str | None) -> dict[str, Any]:
    """Return ``{"messages": [...prompt turns...], "response": str | None}`` for one input row, or
    ``{"messages": [], "response": None, "text": str}`` for a language-modeling row.

    Accepted formats: see `ROW_FORMATS`. The completion of a prompt-completion row is the response.
    """
    if not isinstance(row, dict):
        raise SafetyTypeError(
            f"Row {index} is a {type(row).__name__}; expected a dict in one of the formats {ROW_FORMATS}."
        )
    if row.get("response") is not None and row.get("completion") is not None:
        raise SafetyError(f"Row {index} has both 'response' and 'completion'; keep one (they mean the same).")
    if "messages" in row and row["messages"] is not None:
        turns = _turns(row["messages"], index, "messages")
        response = None
        if turns[-1]["role"] == "assistant":
            response = turns[-1]["content"]
            turns = turns[:-1]
        extra = row.get("response") if row.get("response") is not None else row.get("completion")
        if extra is not None:
            if response is not None:
                raise SafetyError(f"Row {index} has both a final assistant turn and a 'response'; keep one.")
            response = _completion_text(extra, index, not isinstance(extra, str))
        if not turns:
            raise SafetyError(f"Row {index}: 'messages' holds only an assistant turn; add the user turn before it.")
    elif "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        conversational = isinstance(prompt, (list, tuple))
        if conversational:
            turns = _turns(prompt, index, "prompt")
        elif isinstance(prompt, str):
            turns = [{"role": "user", "content": prompt}]
        else:
            raise SafetyError(
                f"Row {index}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got a "
                f"{type(prompt).__name__}."
            )
        if row.get("completion") is not None:
            response = _completion_text(row["completion"], index, conversational)
        elif row.get("response") is not None:
            response = str(row["response"])
        else:
            response = None
    elif isinstance(row.get("text"), str):
        return {"messages": [], "response": None, "text": row["text"]}
    else:
        raise SafetyError(
            f"Row {index} is in no known format (keys: {sorted(row)}). Use one of: {'; '.join(ROW_FORMATS)}."
        )
    if system_prompt is not None and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    return {"messages": turns, "response": response}


def _flatten_prompt(turns: Sequence[dict[str, str]]) -> str:
    """Prompt text of the non-chat templates: the turns' contents, system first, separated by blank lines."""
    return "\n\n".join(t["content"] for t in turns)


class CalibrationSet:
    """Tokenized calibration data with padding-aware loss masks, consumed by every scorer.

    Args:
        rows: a sequence of dicts in one of the formats of `ROW_FORMATS` (``messages``; ``prompt`` + ``completion``,
            standard or conversational; ``text``; ``prompt`` [+ ``response``]), a ``datasets.Dataset`` with those
            columns, or where to read them: a named offline data set, a ``.json``/``.jsonl``/``.csv``/``.parquet``
            file or a Hub data set id (`peft_safety.sources.datasets.load_rows`, rows as stored).
        tokenizer: a Hugging Face tokenizer. It needs a pad token (or an eos token, which is then used for padding).
        template: ``"chat"`` (``tokenizer.apply_chat_template``), ``"raw"`` (prompt text followed by the response),
            ``"inst"`` (``"[INST] prompt [/INST] response"``), or ``"alpaca"`` (the Alpaca instruction format).
        loss: ``"response_only"`` (default: the NLL of the response tokens), ``"full_text"`` (every token),
            ``"last_token"`` (the final token only), or ``"none"`` (prompt only, every label ``-100``: for
            hidden-state probes; responses are dropped).
        max_length: truncate each sequence to this many tokens (the end of the response is cut first). A row whose
            response is cut away entirely is dropped for response-loss policies.
        truncation: ``"warn"`` (default: one warning that says how many rows were truncated or dropped) or
            ``"error"`` (any truncation raises).
        padding_side: ``"right"`` (default) or ``"left"``. With left padding the batches also carry ``position_ids``
            so that positions of real tokens do not depend on the padding.
        system_prompt: an optional system turn prepended to every row that has none.
        chat_fallback: template used when ``template="chat"`` and the tokenizer has no chat template
            (``"raw"``, ``"inst"`` or ``"alpaca"``); `None` (default) raises instead.
        add_eos: append the tokenizer's eos token to responses of the non-chat templates (chat templates close the
            turn themselves).

    Raises:
        ValueError: empty data, an unknown template or loss policy, rows without responses under
            ``loss="response_only"``, a chat template that is missing, or every response truncated away.
        TypeError: rows that are not dicts.

    Example:

    ```python
    >>> from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
    >>> from peft_safety.testing import tiny_tokenizer
    >>> calib = CalibrationSet(refusal_rows(["How do I pick a lock?"]), tiny_tokenizer(), max_length=128)
    >>> len(calib), calib.template, calib.loss
    (1, 'chat', 'response_only')
    ```
    """

    def __init__(
        self,
        rows: Sequence[dict[str, Any]] | Any,
        tokenizer: Any,
        *,
        template: str = "chat",
        loss: str = "response_only",
        max_length: int | None = None,
        truncation: str = "warn",
        padding_side: str = "right",
        system_prompt: str | None = None,
        chat_fallback: str | None = None,
        add_eos: bool = True,
    ) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"Unknown template {template!r}; choose one of {list(TEMPLATES)}.")
        if loss not in LOSS_POLICIES:
            raise ValueError(f"Unknown loss policy {loss!r}; choose one of {list(LOSS_POLICIES)}.")
        if truncation not in ("warn", "error"):
            raise ValueError(f"truncation must be 'warn' or 'error', got {truncation!r}.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TypeError(f"max_length must be an int or None, got {type(max_length).__name__}.")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a response token), got {max_length}.")
        if chat_fallback is not None and chat_fallback not in ("raw", "inst", "alpaca"):
            raise ValueError(f"chat_fallback must be 'raw', 'inst', 'alpaca' or None, got {chat_fallback!r}.")
        if template == "chat" and getattr(tokenizer, "chat_template", None) is None:
            if chat_fallback is None:
                raise ValueError(
                    f"template='chat' but the tokenizer ({type(tokenizer).__name__}) has no chat template. Set "
                    "tokenizer.chat_template, pass template='raw', 'inst' or 'alpaca', or pass "
                    "chat_fallback='raw'|'inst'|'alpaca'."
                )
            template = chat_fallback
        if isinstance(rows, (str, os.PathLike)):
            from ..sources.datasets import load_rows

            rows = load_rows(rows, normalize=False)
        if _is_hf_dataset(rows):
            rows = rows.to_list()
        if isinstance(rows, bytes) or not isinstance(rows, Iterable):
            raise TypeError(
                f"rows must be a sequence of dicts, a datasets.Dataset or a data set name / path / Hub id, got "
                f"{type(rows).__name__}."
            )
        rows = list(rows)
        if not rows:
            raise ValueError("The calibration data is empty: pass at least one row.")
        self.tokenizer = tokenizer
        self.template = template
        self.loss = loss
        self.max_length = max_length
        self.padding_side = padding_side
        self.add_eos = add_eos
        self.pad_token_id = self._pad_id(tokenizer)
        normalized = [_normalize_row(row, i, system_prompt) for i, row in enumerate(rows)]
        if loss in _RESPONSE_POLICIES:
            missing = [i for i, r in enumerate(normalized) if not r["response"] and not r.get("text")]
            if missing:
                raise ValueError(
                    f"loss={loss!r} needs a response in every row, but {len(missing)} of {len(normalized)} rows have "
                    f"none (first: row {missing[0]}). Add responses (e.g. with refusal_rows() or build_refusal_set()), "
                    "or use loss='full_text', 'last_token' or 'none'."
                )
        examples, kept, n_cut, n_dropped = [], [], 0, 0
        for i, row in enumerate(normalized):
            example, cut = self._tokenize(row, i, truncation)
            n_cut += cut
            if loss in _RESPONSE_POLICIES and not example.response_ids:
                n_dropped += 1
                continue
            examples.append(example)
            kept.append(row)
        if not examples:
            raise ValueError(
                f"Every response was truncated away (max_length={max_length}): the prompts alone fill the budget. "
                "Raise max_length or shorten the prompts."
            )
        if n_cut:
            warnings.warn(
                f"CalibrationSet: {n_cut} of {len(normalized)} rows were truncated to max_length={max_length}"
                + (f"; {n_dropped} of them lost their whole response and were dropped" if n_dropped else "")
                + ". Raise max_length to keep them, or pass truncation='error' to fail instead.",
                UserWarning,
                stacklevel=2,
            )
        self._examples: list[_Example] = examples
        self._rows: list[dict[str, Any]] = kept

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token.")
        return int(pad)

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _texts(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """Prompt text and response text (with the template's separators) of one normalized row."""
        turns, response = row["messages"], row["response"]
        if self.template == "chat":
            prompt = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            if response is None:
                return prompt, None
            full = self.tokenizer.apply_chat_template(
                [*turns, {"role": "assistant", "content": response}], tokenize=False
            )
            # the template decides what closes the assistant turn (eos, <|im_end|>, newline): take it from the text
            if full.startswith(prompt):
                return prompt, full[len(prompt) :]
            eos = self.tokenizer.eos_token or ""
            return prompt, response + eos
        text = _flatten_prompt(turns)
        if self.template == "raw":
            prompt = text
        elif self.template == "inst":
            prompt = f"[INST] {text} [/INST]"
            if response is not None and response[:1] not in (" ", "\n"):
                response = " " + response
        else:
            prompt = _ALPACA_PROMPT.format(prompt=text)
        if response is not None and self.add_eos and self.tokenizer.eos_token:
            response = response + self.tokenizer.eos_token
        return prompt, response

    def _tokenize(self, row: dict[str, Any], index: int, truncation: str) -> tuple[_Example, int]:
        if row.get("text") is not None:
            # language modeling (TRL's "text" rows): no prompt, every token is scored; the tokenizer's special
            # tokens (a BOS) open the sequence, as TRL's own tokenization of text rows does
            text = row["text"] + (self.tokenizer.eos_token or "" if self.add_eos else "")
            full = self._encode(text, special=True)
            plain = self._encode(text, special=False)
            lead = len(full) - len(plain) if full[len(full) - len(plain) :] == plain else 0
            prompt_ids, response_ids = full[:lead], full[lead:]
            if self.loss == "none":
                prompt_ids, response_ids = full, []
        else:
            prompt_text, response_text = self._texts(row)
            # chat templates write their own BOS; the legacy templates let the tokenizer add it
            prompt_ids = self._encode(prompt_text, special=self.template != "chat")
            response_ids = [] if response_text is None or self.loss == "none" else self._encode(response_text, False)
        cut = 0
        if self.max_length is not None and len(prompt_ids) + len(response_ids) > self.max_length:
            if truncation == "error":
                raise ValueError(
                    f"Row {index} has {len(prompt_ids) + len(response_ids)} tokens, more than "
                    f"max_length={self.max_length}. Raise max_length or pass truncation='warn'."
                )
            cut = 1
            room = self.max_length - len(prompt_ids)
            if room > 0:
                response_ids = response_ids[:room]
            else:
                prompt_ids, response_ids = prompt_ids[: self.max_length], []
        return _Example(tuple(prompt_ids), tuple(response_ids)), cut

    @classmethod
    def _from_examples(cls, parent: CalibrationSet, indices: Sequence[int]) -> CalibrationSet:
        new = cls.__new__(cls)
        new.__dict__.update(parent.__dict__)
        new._examples = [parent._examples[i] for i in indices]
        new._rows = [parent._rows[i] for i in indices]
        return new

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return len(self._examples)

    def __repr__(self) -> str:
        return (
            f"CalibrationSet(rows={len(self)}, template={self.template!r}, loss={self.loss!r}, "
            f"max_length={self.max_length}, tokens={self.num_tokens})"
        )

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The normalized rows kept after truncation: ``{"messages": prompt turns, "response": str | None}``."""
        return list(self._rows)

    @property
    def num_tokens(self) -> int:
        """Total number of (unpadded) tokens."""
        return sum(len(e.prompt_ids) + len(e.response_ids) for e in self._examples)

    @property
    def num_loss_tokens(self) -> int:
        """Number of positions with a label (summed over rows)."""
        return sum(int((self._labels(e) != -100).sum()) for e in self._examples)

    def _ids(self, example: _Example) -> list[int]:
        return [*example.prompt_ids, *example.response_ids]

    def _labels(self, example: _Example) -> torch.Tensor:
        ids = torch.tensor(self._ids(example), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        if self.loss == "response_only":
            labels[len(example.prompt_ids) :] = ids[len(example.prompt_ids) :]
        elif self.loss == "full_text":
            labels[:] = ids
        elif self.loss == "last_token":
            labels[-1] = ids[-1]
        return labels

    def example(self, index: int) -> dict[str, torch.Tensor]:
        """The unpadded tensors of one row: ``input_ids``, ``attention_mask`` and ``labels`` (1-D)."""
        e = self._examples[index]
        ids = torch.tensor(self._ids(e), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self._labels(e)}

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the rows at ``indices`` into one batch (see the module docstring for the layout)."""
        items = [self.example(i) for i in indices]
        width = max(len(it["input_ids"]) for it in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for r, it in enumerate(items):
            t = len(it["input_ids"])
            sl = slice(0, t) if self.padding_side == "right" else slice(width - t, width)
            input_ids[r, sl] = it["input_ids"]
            attention_mask[r, sl] = 1
            labels[r, sl] = it["labels"]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.padding_side == "left":
            batch["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        return batch

    def batches(self, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
        """Yield padded batches in row order.

        Args:
            batch_size: rows per batch (the last batch may be smaller).

        Returns:
            An iterator of dicts with ``input_ids``, ``attention_mask`` and ``labels`` (int64, shape ``(B, T)``),
            plus ``position_ids`` with left padding.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        for start in range(0, len(self), batch_size):
            yield self.collate(range(start, min(start + batch_size, len(self))))

    def num_batches(self, batch_size: int = 8) -> int:
        """Number of batches `batches(batch_size)` yields."""
        return -(-len(self) // batch_size)

    def subsample(self, n: int, seed: int = 0) -> CalibrationSet:
        """A deterministic random subset of ``n`` rows (row order preserved); ``n >= len(self)`` returns a copy.

        Args:
            n: number of rows to keep.
            seed: seed of the permutation; the same (data, n, seed) always gives the same subset.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}.")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if n >= len(self):
            return self._from_examples(self, range(len(self)))
        generator = torch.Generator().manual_seed(int(seed))
        picked = sorted(torch.randperm(len(self), generator=generator)[:n].tolist())
        return self._from_examples(self, picked)

    @property
    def data_hash(self) -> str:
        """sha256 over the template, the loss policy and every row's token ids and labels (hex string)."""
        h = hashlib.sha256()
        h.update(f"template={self.template};loss={self.loss};n={len(self)};".encode())
        for e in self._examples:
            h.update(len(e.prompt_ids).to_bytes(4, "little"))
            h.update(torch.tensor(self._ids(e), dtype=torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    def provenance(self) -> dict[str, Any]:
        """The fields recorded into `Scores.provenance`: data hash, row count, template, loss policy, max length."""
        return {
            "data_hash": self.data_hash,
            "num_rows": len(self),
            "template": self.template,
            "loss_policy": self.loss,
            "max_length": self.max_length,
        }


# ---------------------------------------------------------------------- builders
def refusal_rows(
    prompts: Sequence[str], refusal: str | Callable[[str], str] = DEFAULT_REFUSAL
) -> list[dict[str, str]]:
    """Pair every prompt with a fixed refusal (or one computed per prompt).

    Args:
        prompts: harmful prompts (e.g. ``[r["prompt"] for r in load_rows("advbench")]``).
        refusal: the refusal text, or a callable ``prompt -> refusal``. For refusals written by the model itself,
            use `build_refusal_set(..., generate=True)`.

    Returns:
        Rows ``{"prompt": ..., "response": ...}`` for `CalibrationSet`.
    """
    prompts = _check_prompts(prompts)
    if callable(refusal):
        return [{"prompt": p, "response": str(refusal(p))} for p in prompts]
    if not isinstance(refusal, str):
        raise TypeError(f"refusal must be a str or a callable, got {type(refusal).__name__}.")
    return [{"prompt": p, "response": refusal} for p in prompts]


def utility_rows(prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, str]]:
    """Pair benign prompts with their answers (e.g. from `generate_responses`).

    Raises:
        ValueError: when the two sequences differ in length.
    """
    prompts = _check_prompts(prompts)
    responses = list(responses)
    if len(responses) != len(prompts):
        raise ValueError(f"Got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt.")
    return [{"prompt": p, "response": str(r)} for p, r in zip(prompts, responses)]


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not a single string; wrap it in a list.")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got a {bad[0]}.")
    return prompts
