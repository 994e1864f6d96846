"""Trainer callbacks for safety-masked training.

* `SafetyDriftCallback`: the drift of the masked vs the other entries of every covered weight
  (`peft_safety.analysis.mask_drift`) at every logging step of a plain ``transformers.Trainer`` (``SafetySFTTrainer``
  logs it itself).
* `RefusalEvalCallback`: run a pluggable evaluation (e.g. refusal rate on held-out harmful prompts) every N steps.
* `ProtectionCallback`: the per-step hook of `SafetySFTTrainer`'s protections that needs a callback
  (``after_optimizer_step``: under DeepSpeed the engine steps where no optimizer hook fires).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from ..vocab import base_name, check_mode
from .protection import _drift_metrics

logger = logging.getLogger(__name__)

__all__ = ["ProtectionCallback", "RefusalEvalCallback", "SafetyDriftCallback", "attach_first"]


def _merge_into_log(state: Any, logs: dict | None, metrics: Mapping[str, float]) -> None:
    """Add ``metrics`` to the log being dispatched: the ``logs`` dict later callbacks (console, report_to integrations
    placed after this callback) receive, and the ``state.log_history`` entry ``Trainer.log`` appended just before
    calling ``on_log`` (it stores a copy, so updating ``logs`` alone never reaches ``log_history``)."""
    if logs is None:
        return
    history = getattr(state, "log_history", None)
    # the entry is {**logs, "step": ...} as appended; callbacks before this one may only have added keys to logs
    if history and history[-1].get("step") == state.global_step and all(k in logs for k in history[-1] if k != "step"):
        history[-1].update(metrics)
    logs.update(metrics)


def attach_first(trainer: Any, callback: TrainerCallback) -> TrainerCallback:
    """Register ``callback`` on ``trainer`` right after transformers' ``DefaultFlowCallback``, ahead of the
    ``report_to`` integrations, so the metrics it adds in ``on_log`` reach every integration as well as
    ``trainer.state.log_history``. Returns the callback."""
    callbacks = trainer.callback_handler.callbacks
    if callback in callbacks:
        callbacks.remove(callback)
    position = 1 if callbacks and type(callbacks[0]).__name__ == "DefaultFlowCallback" else 0
    callbacks.insert(position, callback)
    return callback


class SafetyDriftCallback(TrainerCallback):
    """Log the drift of a mask's entries at every logging step of a plain ``transformers.Trainer``.

    ``safety/masked_drift`` and ``safety/unmasked_drift`` are the relative norms of the update on the masked and the
    other entries of the covered weights, ``safety/violations`` the entries that had to stay unchanged and moved (the
    ``masked_relative``, ``unmasked_relative`` and ``violations`` of `peft_safety.analysis.mask_drift`).

    The metrics join the training log of that step, next to ``loss``, ``grad_norm`` and ``learning_rate``: they are in
    ``trainer.state.log_history`` and in the ``logs`` passed to later callbacks. ``report_to`` integrations run before
    user callbacks in transformers; to reach them too, register the callback with `attach` (``callback.attach(trainer)``)
    instead of ``Trainer(callbacks=[...])``. Every call is also kept in ``self.history`` (a list of ``(step, metrics)``).
    For full-weight training it keeps a CPU copy of the covered tensors (taken at train begin) as the reference; for PEFT
    adapters no copy is needed. (``SafetySFTTrainer`` logs these metrics itself.)

    Args:
        mask: the `SafetyMask`.
        mode: ``"freeze"`` or ``"train_only"``.
        full_weights: keep the CPU reference copy (set False for adapters, or to save memory).
    """

    def __init__(self, mask: Any, mode: str, full_weights: bool = True) -> None:
        self.mask, self.mode, self.full_weights = mask, check_mode(mode), full_weights
        self.reference: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def attach(self, trainer: Any) -> SafetyDriftCallback:
        """Register on ``trainer`` ahead of its ``report_to`` integrations (see `attach_first`); returns self."""
        return attach_first(trainer, self)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.full_weights and model is not None:
            covered = set(self.mask.shapes)
            self.reference = {
                base_name(n): p.detach().to("cpu", copy=True)
                for n, p in model.named_parameters()
                if base_name(n) in covered
            }

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or (logs is not None and any(k.startswith("eval_") for k in logs)):
            return  # evaluation logs carry evaluation metrics only
        metrics = _drift_metrics(model, self.mask, self.mode, reference=self.reference)
        self.history.append((state.global_step, metrics))
        _merge_into_log(state, logs, metrics)


class RefusalEvalCallback(TrainerCallback):
    """Run ``evaluator(model, tokenizer) -> dict[str, float]`` every ``eval_steps`` optimizer steps and log the result
    with a ``safety/`` prefix (on the main process only; the model is put back in train mode afterwards).

    The results join the training log of the same step, which the callback requests (``control.should_log``) on every
    rank: ``loss``, ``grad_norm`` and ``learning_rate`` stay in that entry. With `SafetySFTTrainer` (``trainer=``) they
    are added before the log is dispatched, so ``trainer.state.log_history`` and every ``report_to`` integration get
    them; with a plain ``transformers.Trainer`` they are merged in ``on_log`` (``log_history`` and later callbacks; use
    `attach_first` to precede the integrations).

    A typical evaluator generates answers to held-out harmful prompts and returns ``{"refusal_rate": ...}``:
    `peft_safety.evaluation.refusal_evaluator(prompts, judges=("wei2024",))` builds one (logged as
    ``safety/refusal_rate/<judge>``, ``safety/judge_errors/<judge>``, ...; see ``docs/trainer.md``). Under FSDP or
    DeepSpeed ZeRO-3 a generation on one rank alone would wait forever for the other ranks' shards: evaluate after
    training there.

    Args:
        evaluator: the callable.
        eval_steps: cadence in optimizer steps (> 0).
        trainer: the trainer whose ``log`` collects the metrics with `pop_pending` (set by `SafetySFTTrainer`).
    """

    def __init__(self, evaluator: Callable[..., Mapping[str, float]], eval_steps: int, trainer: Any = None) -> None:
        if not callable(evaluator):
            raise TypeError(f"evaluator must be callable (model, tokenizer) -> dict, got {type(evaluator).__name__}.")
        if not isinstance(eval_steps, int) or eval_steps <= 0:
            raise ValueError(f"eval_steps must be a positive int, got {eval_steps!r}.")
        self.evaluator, self.eval_steps, self.trainer = evaluator, eval_steps, trainer
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: dict[str, float] = {}

    def pop_pending(self) -> dict[str, float]:
        """The metrics of the last evaluation not yet logged (emptied by the call)."""
        pending, self._pending = self._pending, {}
        return pending

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.eval_steps or model is None:
            return
        # every rank logs this step (the loss is all-gathered inside the logging step); only the main one evaluates
        control.should_log = True
        if not state.is_world_process_zero:
            return
        was_training = model.training
        try:
            with torch.no_grad():
                result = dict(self.evaluator(model, processing_class))
        finally:
            model.train(was_training)
        metrics = {k if k.startswith("safety/") else f"safety/{k}": float(v) for k, v in result.items()}
        self.history.append((state.global_step, metrics))
        self._pending.update(metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending:  # not collected by the trainer's log (a plain transformers.Trainer)
            _merge_into_log(state, logs, self.pop_pending())


class ProtectionCallback(TrainerCallback):
    """Call ``after_optimizer_step(step)`` on every protection of a trainer right after each optimizer step.

    ``on_optimizer_step`` runs after the real step on every backend, DeepSpeed included (its engine steps inside
    ``accelerator.backward`` and the Trainer's optimizer is a no-op wrapper, so no optimizer hook fires there).

    Args:
        trainer: an object with a ``protections`` list, e.g. `SafetySFTTrainer`.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        for component in getattr(self.trainer, "protections", ()):
            component.after_optimizer_step(state.global_step + 1)
