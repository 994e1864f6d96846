"""The protection interface: one small protocol for every way of keeping a safety guarantee during training.

A *protection* is an object with a few hooks that a training loop calls at fixed points. `SafetySFTTrainer` holds a
list of them and calls each hook on every one, in order, so defenses compose (full-weight freezing with safety
replay, or a new defense next to a mask); it never branches on which protection it holds. `apply_mask_` returns one
(a `Freezer`) for users of their own loop. The implementations in this package:

| protection | what it guarantees | hooks it uses |
|---|---|---|
| `Freezer` (``training/freeze.py``) | a mask's entries (``"freeze"``) or the rest of each covered tensor (``"train_only"``) stay bit-identical in full fine-tuning | `prepare_model` (switch off tensors frozen whole), `install`, `before_clip` (FSDP1), `after_optimizer_step` (DeepSpeed), `verify`, `metrics`, `remove` |
| `SetAdapter` (``training/adapters.py``) | only the mask's entries train (SET, a ``SAFETY`` adapter) | `prepare_model` (the `SafetyConfig`), `on_wrapped` (fp32 deltas on quantised bases), `verify`, `metrics` |
| `MaskedLora` (``training/adapters.py``) | LoRA's update is exactly zero on the mask (SPA, a ``SAFETY_LORA`` adapter) | `prepare_model` (the masked LoRA), `verify`, `metrics` |
| `SafetyReplay` (``training/replay.py``) | refusal rows make up a fixed share of the training stream | `prepare_dataset` |
| `Lisa` (``training/lisa.py``) | alternating alignment / task states with a proximal term (Huang et al. 2024) | `prepare_dataset` (the task format), `prepare_batches`, `install`, `batch_source`, `extra_loss`, `after_optimizer_step`, `metrics` |
| `Booster` (``training/booster.py``) | the harmful-perturbation regulariser of an alignment run (Huang et al. 2025) | `prepare_dataset` (the task format), `prepare_batches`, `extra_loss`, `metrics` |

The order in which a trainer calls the hooks:

1. ``prepare_dataset(train_dataset, args)`` and ``prepare_model(model, peft_config, args)``: before TRL wraps the
   model (a protection may build the PEFT model itself or hand TRL a ``peft_config``; tensors it switches off leave
   the optimizer and DDP before they exist).
2. ``on_wrapped(model)``: after TRL applied PEFT and its dtype casts, before ``accelerator.prepare``; then
   ``prepare_batches(make_loader)``: ``make_loader(rows, name=..., seed=...)`` turns raw rows into a data loader of
   collated batches prepared exactly as the training set (TRL's tokenization, the trainer's collator and batch size).
3. ``install(model, optimizer)``: after ``accelerator.prepare`` and the checkpoint load, on every rank (hooks see the
   final, wrapped or sharded parameters).
4. per optimizer step: ``batch_source(step)`` (where this step's batches come from), ``extra_loss(model, inputs)``
   (a term added to each micro-batch's training loss), ``before_clip(model)`` (before gradient clipping),
   ``after_optimizer_step(step)``.
5. ``metrics()`` at every logging step; ``save_pretrained(folder)`` with every checkpoint and the final model.
6. ``verify()`` at the end of training (raises `FreezeViolationError`), then ``remove()`` in a ``finally``.

Every hook has a default that does nothing, so a new defense overrides only what it needs. See ``docs/trainer.md``
("Customization: write your own protection").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..vocab import check_mode

__all__ = ["FreezeReport", "FreezeViolationError", "MaskProtection", "Protection"]


class FreezeViolationError(RuntimeError):
    """Raised by a protection's ``verify`` when an entry that had to stay unchanged moved."""


@dataclass
class FreezeReport:
    """What a protection's ``verify`` found.

    Attributes:
        changed: ``{parameter name: number of entries that had to stay unchanged and differ}`` (only names with a
            difference).
        max_abs_diff: ``{parameter name: largest absolute difference}`` for the same names.
        checked_entries: number of entries compared.
        checked_parameters: number of parameters with such entries.
        metrics: further numbers measured by the check (an adapter's drift, ``safety/violations``).
    """

    changed: dict[str, int] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    checked_entries: int = 0
    checked_parameters: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every checked entry is bit-identical to its reference."""
        return not self.changed

    def to_metrics(self) -> dict[str, float]:
        """``{"checked_entries": ..., **metrics}``: what `SafetySFTTrainer.verify_safety` returns."""
        return {"checked_entries": float(self.checked_entries), **self.metrics}

    def __str__(self) -> str:
        if self.ok:
            return f"all {self.checked_entries:,} frozen entries in {self.checked_parameters} parameters bit-identical"
        worst = ", ".join(f"{n}: {c} changed (max |diff| {self.max_abs_diff[n]:.3g})" for n, c in self.changed.items())
        return f"{sum(self.changed.values()):,} of {self.checked_entries:,} frozen entries changed: {worst}"


class Protection:
    """The protocol every protection implements: hooks a training loop calls, each a no-op by default.

    Subclass it and override the hooks a defense needs (see the module docstring for when each one runs). A
    protection is also a context manager that calls `remove` on exit.

    Attributes:
        name: a short label for logs, errors and `state` (``"freezer"``, ``"set"``, ``"masked_lora"``, ...).
    """

    name: str = "protection"

    # ------------------------------------------------------------------ before training
    def prepare_dataset(self, train_dataset: Any, args: Any = None) -> Any:
        """Return the training set to use (e.g. with rows mixed in). Called before TRL tokenizes it."""
        return train_dataset

    def prepare_model(self, model: nn.Module, peft_config: Any = None, args: Any = None) -> tuple[nn.Module, Any]:
        """Return ``(model, peft_config)`` to hand to TRL: build an adapter, or switch off tensors that must not train
        (before the optimizer and DDP exist). Called in the order of the trainer's list."""
        return model, peft_config

    def on_wrapped(self, model: nn.Module) -> None:
        """Called with the model TRL built (PEFT applied, its dtype casts done), before ``accelerator.prepare``."""

    def prepare_batches(self, make_loader: Callable[..., Iterable[Any]]) -> None:
        """Called once after `on_wrapped`, with ``make_loader(rows, *, name, seed)``: a function that turns raw rows
        (in the training set's format) into a finite iterable of collated batches prepared exactly as the trainer
        prepares its training set (TRL's tokenization and the same options, the trainer's collator, the per-device
        batch size), in a random order drawn from ``seed``. A defense that trains on rows of its own (Lisa's
        alignment rows, Booster's harmful rows) builds its loader here and feeds it through `batch_source` or
        `extra_loss`."""

    def install(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Protection:
        """Register hooks on the model as it will be trained (after ``accelerator.prepare``); returns ``self``."""
        return self

    # ------------------------------------------------------------------ per step
    def batch_source(self, step: int) -> Iterator[Any] | None:
        """An iterator of collated batches to draw the next optimizer step's batches from instead of the training
        set, or `None` to keep the training set. Every protection is asked at every step; the first that answers
        wins. ``step`` counts the optimizer steps already taken. An alternating defense (Lisa) answers with its
        alignment batches on its alignment steps."""
        return None

    def extra_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """A term added to the training loss of each micro-batch (never in evaluation), at the scale of that loss:
        the trainer divides the sum by the gradient accumulation steps as it does the loss. `None` adds nothing."""
        return None

    def before_clip(self, model: nn.Module) -> None:
        """Called after the backward passes of an optimizer step, before gradient clipping."""

    def after_optimizer_step(self, step: int) -> None:
        """Called right after each optimizer step; ``step`` counts the steps taken, this one included."""

    # ------------------------------------------------------------------ checks, logs, files
    def verify(self, *, strict: bool = True) -> FreezeReport:
        """Check the guarantee now; raise `FreezeViolationError` when ``strict`` and it does not hold."""
        return FreezeReport()

    def metrics(self) -> dict[str, float]:
        """Numbers logged at every logging step (``safety/*`` keys)."""
        return {}

    def state(self) -> dict[str, Any]:
        """A JSON-able description of the protection (its name and settings), for logs and reports."""
        return {"protection": self.name}

    def save_pretrained(self, folder: str) -> None:
        """Write what must travel with the trained model into ``folder`` (called on the main process)."""

    def remove(self) -> None:
        """Undo everything the protection did to the model: hooks removed, ``requires_grad`` given back. Safe to
        call twice."""

    def __enter__(self) -> Protection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.state()})"


class MaskProtection(Protection):
    """A protection built on a `SafetyMask` and a mode: the mask travels with every save, and the drift of the masked
    and the unmasked entries is logged.

    Args:
        mask: the `SafetyMask`.
        mode: ``"freeze"`` (keep the mask's entries unchanged) or ``"train_only"`` (train only them).
        log_drift: add ``safety/masked_drift`` and ``safety/unmasked_drift`` to `metrics`.
    """

    def __init__(self, mask: Any, mode: str = "freeze", *, log_drift: bool = False) -> None:
        self.mask = mask
        self.mode = check_mode(mode, where="mode")
        self.log_drift = bool(log_drift)
        self._model: nn.Module | None = None
        self._reference: dict[str, torch.Tensor] | None = None

    def state(self) -> dict[str, Any]:
        return {"protection": self.name, "mode": self.mode}

    def save_pretrained(self, folder: str) -> None:
        """Save the mask (``safety_mask.safetensors``) next to the model or adapter."""
        if hasattr(self.mask, "save_pretrained"):
            self.mask.save_pretrained(folder)

    def _drift(self, *, violations: bool = False) -> dict[str, float]:
        if self._model is None:
            return {}
        metrics = _drift_metrics(self._model, self.mask, self.mode, reference=self._reference)
        return metrics if violations else {k: v for k, v in metrics.items() if k != "safety/violations"}

    def metrics(self) -> dict[str, float]:
        return self._drift() if self.log_drift else {}


def _drift_metrics(
    model: nn.Module, mask: Any, mode: str, reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """The drift a trainer logs: ``safety/masked_drift``, ``safety/unmasked_drift`` (relative norms of the update
    on the masked and the other entries of the covered weights) and ``safety/violations``, read from
    `peft_safety.analysis.mask_drift` (the one definition; parameters a sharded wrapper hides are skipped)."""
    from ..analysis.probes import mask_drift

    drift = mask_drift(model, reference, mask, mode=mode, strict=False)
    return {
        "safety/masked_drift": float(drift["masked_relative"]),
        "safety/unmasked_drift": float(drift["unmasked_relative"]),
        "safety/violations": float(drift["violations"]),
    }
