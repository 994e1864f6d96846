"""The base of the protections that train on rows of their own (Lisa's alignment rows, Booster's harmful rows).

Such a protection reads its rows (a list of dicts, a ``datasets.Dataset``, or a named offline set / file / Hub id
through `peft_safety.sources.datasets.load_rows`), converts them to the training set's format when the trainer shows
it the training set (`Protection.prepare_dataset`: the same conversion as safety replay, so that a conversational
task set gets conversational rows rendered with the same chat template), has the trainer prepare them exactly as its
training set (`Protection.prepare_batches`) and then draws collated batches from an endless stream: the loader is
iterated again whenever it is exhausted, as the reference implementations re-create their iterators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .protection import Protection
from .replay import _as_pair, _convert, _fmt

__all__ = ["RowsProtection"]


def _first_row(dataset: Any) -> Any:
    try:
        return next(iter(dataset))
    except StopIteration:
        return None


class RowsProtection(Protection):
    """A protection fed by rows of its own (see the module docstring).

    Args:
        rows: the rows (dicts with a prompt and a response: ``prompt``+``response``, ``prompt``+``completion`` or
            ``messages``), a ``datasets.Dataset``, or where to read them (a named offline data set, a
            ``.json``/``.jsonl``/``.csv`` file or a Hub data set id).
        seed: seed of the order in which the rows are drawn.
        what: how the rows are named in error messages (``"alignment"``, ``"harmful"``).
        field: the config field that names the rows, for error messages.
    """

    name = "rows"

    def __init__(self, rows: Any, *, seed: int = 0, what: str = "protection", field: str = "") -> None:
        if rows is None:
            raise ValueError(f"{type(self).__name__} needs {what} rows: set {field} or pass the rows.")
        self.source = rows
        self.seed = int(seed)
        self.what = what
        self.field = field
        self.rows: list[dict[str, Any]] | None = None
        self.loader: Iterable[Any] | None = None
        self._stream: Iterator[Any] | None = None

    def _raw_rows(self) -> list[Any]:
        rows = self.source
        if isinstance(rows, str):
            from ..sources.datasets import load_rows

            rows = load_rows(rows, normalize=False)
        if hasattr(rows, "to_list"):
            rows = rows.to_list()
        if isinstance(rows, (bytes, dict)) or not isinstance(rows, Iterable):
            raise TypeError(
                f"{self.what} rows must be a list of dicts, a datasets.Dataset or a data set name / path / Hub id, got "
                f"{type(rows).__name__}."
            )
        rows = list(rows)
        if not rows:
            raise ValueError(f"The {self.what} rows of {type(self).__name__} are empty ({self.field}).")
        return rows

    def prepare_dataset(self, train_dataset: Any, args: Any = None) -> Any:
        """Convert the rows to the format of ``train_dataset`` (returned unchanged: these rows never join it).

        Raises:
            ValueError: no training set, a training set already tokenized or in a format rows cannot be converted to
                (``text``), rows without a prompt and a response.
        """
        first = _first_row(train_dataset) if train_dataset is not None else None
        if not isinstance(first, dict):
            raise ValueError(
                f"{type(self).__name__} converts its {self.what} rows to the training set's format, but the trainer "
                "got no training rows (a list of dicts or a datasets.Dataset)."
            )
        try:
            fmt = _fmt(first)
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__} cannot convert its {self.what} rows to training rows with columns "
                f"{sorted(first)}: use 'messages' or 'prompt'/'completion' training rows (TRL's conversational or "
                "prompt-completion formats)."
            ) from err
        pairs = [_as_pair(row, i) for i, row in enumerate(self._raw_rows())]
        self.rows = [_convert(prompt, response, fmt, first) for prompt, response in pairs]
        return train_dataset

    def prepare_batches(self, make_loader: Callable[..., Iterable[Any]]) -> None:
        """Have the trainer prepare the converted rows as its training set (tokenized, collated, batched)."""
        if self.rows is None:
            raise RuntimeError(f"{type(self).__name__}.prepare_batches ran before prepare_dataset.")
        self.loader = make_loader(self.rows, name=f"{self.name}_{self.what}", seed=self.seed)
        self._stream = None

    def next_batch(self) -> Any:
        """The next collated batch of the endless stream over the rows."""
        if self._stream is None:
            self._stream = self._endless()
        return next(self._stream)

    def stream(self) -> Iterator[Any]:
        """The endless stream of collated batches (shared: every call continues where the last one stopped)."""
        if self._stream is None:
            self._stream = self._endless()
        return self._stream

    def _endless(self) -> Iterator[Any]:
        if self.loader is None:
            raise RuntimeError(
                f"{type(self).__name__} has no batches: it is fed by SafetySFTTrainer (prepare_batches), or call "
                "prepare_batches(make_loader) yourself."
            )
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise ValueError(
                    f"The {self.what} rows of {type(self).__name__} gave no batch (fewer rows than one batch with "
                    "dataloader_drop_last?)."
                )
