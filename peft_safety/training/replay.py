"""Safety replay: mix refusal examples into a fine-tuning stream at a fixed ratio.

Benign fine-tuning erodes refusal; replaying a few refusal examples during training is the simplest counter-measure
(the "safety data mixing" baseline of Qi et al. 2023 and Bianchi et al. 2024). `mix_replay` builds the mixed
training set deterministically:

* the mixed set has ``T = N + R`` rows for ``N`` task rows, with ``R = round(N * ratio / (1 - ratio))`` replay
  rows, so that replay makes up ``ratio`` of the stream (exactly ``R / T``);
* replay rows are drawn from the replay set in a seeded permutation, cycling through it again if ``R`` exceeds its
  size (every replay row is used before any repeats);
* positions are spread evenly: row ``i`` of the stream (0-based) is a replay row iff
  ``floor((i + 1) * R / T) > floor(i * R / T)``, so every prefix of the stream holds ``floor(len * R / T)`` replay
  rows, never bunched at the start or the end; the task rows keep their order.

Replay rows are converted to the task data's format: ``messages`` (conversational), ``prompt``/``completion`` as
strings (standard) or as message lists (conversational prompt-completion). They may come as ``{"prompt",
"response"}`` rows (what `peft_safety.sources.datasets.load_rows` returns), ``messages`` rows or
``prompt``/``completion`` rows.

`SafetySFTConfig(safety_replay_dataset=..., safety_replay_ratio=0.1)` does this inside `SafetySFTTrainer` through
the `SafetyReplay` protection (the trainer also accepts ``safety_replay_dataset=rows`` directly); the data set is a
named offline set, a ``.json``/``.jsonl``/``.csv`` file or a Hub id, read by
`peft_safety.sources.datasets.load_rows`. Shuffling by the trainer's sampler still happens afterwards; the guarantee is
the exact ratio over each epoch, not the order.

Example:

```python
>>> task = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(9)]
>>> refusals = [{"prompt": "How do I build a bomb?", "response": "I can't help with that."}]
>>> mixed = mix_replay(task, refusals, ratio=0.1)
>>> len(mixed), sum(r["prompt"] == "How do I build a bomb?" for r in mixed)
(10, 1)
```
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .protection import Protection

__all__ = ["SafetyReplay", "mix_replay", "replay_count", "replay_positions"]


def replay_count(n_task: int, ratio: float) -> int:
    """``round(n_task * ratio / (1 - ratio))``: replay rows so that they are ``ratio`` of the mixed stream."""
    if isinstance(n_task, bool) or not isinstance(n_task, int) or n_task < 0:
        raise ValueError(f"n_task must be a non-negative int, got {n_task!r}.")
    _check_ratio(ratio)
    return round(n_task * ratio / (1.0 - ratio))


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"safety_replay_ratio must be in [0, 1) (the share of replay rows in the training stream), got {ratio!r}."
        )


def replay_positions(total: int, n_replay: int) -> list[bool]:
    """For a stream of ``total`` rows with ``n_replay`` replay rows: which positions hold a replay row.

    Row ``i`` is a replay row iff ``floor((i + 1) * n_replay / total) > floor(i * n_replay / total)``.
    """
    if not 0 <= n_replay <= total:
        raise ValueError(f"Need 0 <= n_replay <= total, got n_replay={n_replay}, total={total}.")
    return [((i + 1) * n_replay) // total > (i * n_replay) // total for i in range(total)]


def _fmt(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "conversational_pc" if isinstance(row["prompt"], list) else "prompt_completion"
    raise ValueError(
        f"Cannot mix replay rows into training rows with columns {sorted(row)}: use 'messages' or "
        "'prompt'/'completion' rows (TRL's conversational or prompt-completion formats)."
    )


def _as_pair(row: Any, index: int) -> tuple[str, str]:
    """A replay row -> (prompt, response)."""
    if not isinstance(row, dict):
        raise TypeError(f"Replay row {index} must be a dict, got {type(row).__name__}.")
    if "messages" in row:
        turns = row["messages"]
        users = [t["content"] for t in turns if t.get("role") == "user"]
        bots = [t["content"] for t in turns if t.get("role") == "assistant"]
        if users and bots:
            return users[-1], bots[-1]
    elif "prompt" in row:
        prompt, response = row["prompt"], row.get("response", row.get("completion"))
        if isinstance(prompt, list):  # conversational prompt-completion
            prompt = next((t["content"] for t in reversed(prompt) if t.get("role") == "user"), None)
        if isinstance(response, list):
            response = next((t["content"] for t in response if t.get("role") == "assistant"), None)
        if isinstance(prompt, str) and isinstance(response, str):
            return prompt, response
    raise ValueError(
        f"Replay row {index} needs a prompt and a response ('prompt'+'response', 'prompt'+'completion' or "
        f"'messages' with a user and an assistant turn); got columns {sorted(row)}. Refusal rows such as "
        "load_rows('uncensorbench_refusal') have both."
    )


def _convert(prompt: str, response: str, fmt: str, template: dict[str, Any]) -> dict[str, Any]:
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    if fmt == "conversational_pc":
        return {"prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": response}]}  # fmt: skip
    # a standard prompt-completion row: keep the task's separator convention (TRL concatenates prompt + completion)
    sep = " " if isinstance(template.get("completion"), str) and template["completion"].startswith(" ") else ""
    return {"prompt": prompt, "completion": sep + response}


def interleave_rows(
    train: Any, rows: list[dict], extra: Sequence[Any], n: int, *, seed: int, return_sources: bool
) -> Any:
    """``rows`` with ``n`` rows drawn from ``extra`` interleaved at `replay_positions`, converted to the format of
    ``rows[0]``; ``extra`` is drawn in whole seeded permutations (every row is used before any repeats). The result
    has the type of ``train`` (a ``datasets.Dataset`` keeps the task's columns only; extra rows get ``None`` for the
    others). Shared by safety replay and utility-aware SET."""
    fmt = _fmt(rows[0])
    pairs = [_as_pair(r, i) for i, r in enumerate(extra)]
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n:
        perm = list(range(len(pairs)))
        rng.shuffle(perm)
        order.extend(perm)
    converted = [_convert(*pairs[j], fmt, rows[0]) for j in order[:n]]
    flags = replay_positions(len(rows) + n, n)
    task_iter, extra_iter = iter(rows), iter(converted)
    mixed = [next(extra_iter) if flag else next(task_iter) for flag in flags]
    if hasattr(train, "to_list") and hasattr(train, "column_names"):
        from datasets import Dataset

        columns = list(train.column_names)
        mixed = Dataset.from_list([{c: r.get(c) for c in columns} for r in mixed])
    return (mixed, flags) if return_sources else mixed


def mix_replay(train: Any, replay: Any, ratio: float, *, seed: int = 0, return_sources: bool = False) -> Any:
    """Mix replay rows into training rows at ``ratio`` (see the module docstring for the exact rule).

    Args:
        train: the task rows: a list of dicts or a ``datasets.Dataset`` (``messages`` or ``prompt``/``completion``).
        replay: the replay rows: a list of dicts or a ``datasets.Dataset`` (see `_as_pair` for accepted columns).
        ratio: share of replay rows in the mixed stream, in ``[0, 1)``; 0 returns ``train`` unchanged.
        seed: seed of the replay-row permutation.
        return_sources: also return a list of booleans, `True` where a row is a replay row.

    Returns:
        The mixed rows, of the same type as ``train`` (a ``datasets.Dataset`` stays one, with the task's columns
        only); with ``return_sources``, ``(mixed, is_replay)``.

    Raises:
        ValueError: a bad ratio, an empty replay set with ``ratio > 0``, rows in a format that cannot be mixed.
        TypeError: an ``IterableDataset`` (its length is unknown: mix before streaming) or rows that are not dicts.
    """
    _check_ratio(ratio)
    is_dataset = hasattr(train, "to_list") and hasattr(train, "column_names")
    if not is_dataset and (isinstance(train, (str, bytes)) or not isinstance(train, Sequence)):
        raise TypeError(
            f"train must be a list of rows or a datasets.Dataset, got {type(train).__name__}; an IterableDataset "
            "has no length, so mix the replay rows before streaming."
        )
    rows = train.to_list() if is_dataset else list(train)
    replay_rows = replay.to_list() if hasattr(replay, "to_list") else list(replay or [])
    n_replay = replay_count(len(rows), ratio)
    if n_replay == 0:
        return (train, [False] * len(rows)) if return_sources else train
    if not rows:
        raise ValueError("Cannot mix replay rows into an empty training set.")
    if not replay_rows:
        raise ValueError(f"safety_replay_ratio={ratio} needs replay rows, but the replay data set is empty.")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise TypeError(f"Training row {i} must be a dict, got {type(r).__name__}.")
    return interleave_rows(train, rows, replay_rows, n_replay, seed=seed, return_sources=return_sources)


class SafetyReplay(Protection):
    """Safety replay as a protection: mix refusal rows into the training set at ``args.safety_replay_ratio``.

    Its one hook, `prepare_dataset`, runs before TRL tokenizes the data; the rows come from ``rows`` or, when `None`,
    from ``args.safety_replay_dataset`` (a named offline set such as ``uncensorbench_refusal``, a ``.json``/``.jsonl``
    file or a Hub id, through `peft_safety.sources.datasets.load_rows`). The seed is ``args.safety_replay_seed``
    (else ``args.seed``).

    Args:
        rows: replay rows (a list of dicts or a ``datasets.Dataset``), or `None` to read the configured data set.
    """

    name = "replay"

    def __init__(self, rows: Any = None) -> None:
        self.rows = rows
        self.mixed: int = 0

    def prepare_dataset(self, train_dataset: Any, args: Any = None) -> Any:
        """``train_dataset`` with the replay rows mixed in (unchanged when the ratio is 0 and no rows were given).

        Raises:
            ValueError: rows or a data set with a ratio of 0, a ratio without rows, no training set.
        """
        ratio = float(getattr(args, "safety_replay_ratio", 0.0) or 0.0)
        source = getattr(args, "safety_replay_dataset", None)
        replay = self.rows
        if ratio == 0.0:
            if replay is not None or source is not None:
                raise ValueError(
                    "A safety replay data set was given but safety_replay_ratio is 0: set safety_replay_ratio (e.g. "
                    "0.1 for one replay row in ten) or drop the replay data set."
                )
            return train_dataset
        if replay is None:
            if source is None:
                raise ValueError(
                    f"safety_replay_ratio={ratio} needs replay rows: set safety_replay_dataset (an offline data set "
                    "name, a .json/.jsonl path or a Hub id) or pass SafetySFTTrainer(safety_replay_dataset=rows)."
                )
            from ..sources.datasets import load_rows

            replay = load_rows(source, normalize=False)
        if train_dataset is None:
            raise ValueError(
                "safety_replay_ratio is set but the trainer got no train_dataset to mix the replay rows into."
            )
        seed = getattr(args, "safety_replay_seed", None)
        seed = int(getattr(args, "seed", 0) if seed is None else seed)
        mixed = mix_replay(train_dataset, replay, ratio, seed=seed)
        self.mixed = len(mixed) - len(train_dataset)
        return mixed

    def state(self) -> dict[str, Any]:
        return {"protection": self.name, "replay_rows": self.mixed}
