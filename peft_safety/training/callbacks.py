"""Trainer callbacks and metrics for safety-masked training.

* `mask_drift_metrics`: relative change of the masked vs the other entries of every covered weight, for full
  weights (against a reference copy) and for PEFT adapters (the adapter's effective delta against the base weight).
* `SafetyDriftCallback`: those metrics for a plain ``transformers.Trainer`` (``SafetySFTTrainer`` logs them itself).
* `RefusalEvalCallback`: run a pluggable evaluation (e.g. refusal rate on held-out harmful prompts) every N steps.
* `FreezerCallback`: the per-step action the `Freezer` cannot hook under DeepSpeed (restore after the engine step).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .freeze import canonical_name

logger = logging.getLogger(__name__)

__all__ = ["FreezerCallback", "RefusalEvalCallback", "SafetyDriftCallback", "attach_first", "mask_drift_metrics"]


def _modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        out.setdefault(canonical_name(name), module)
    return out


def _base_weight(module: nn.Module) -> torch.Tensor:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None or type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base)
    return weight


def _adapter_delta(module: nn.Module) -> torch.Tensor | None:
    """The dense update a PEFT tuner layer adds to its base weight (summed over active adapters), or None."""
    if not hasattr(module, "get_delta_weight") or not hasattr(module, "active_adapters"):
        return None
    delta = None
    for adapter in module.active_adapters:
        if adapter in getattr(module, "merged_adapters", []):
            continue
        try:
            d = module.get_delta_weight(adapter)
        except KeyError:
            continue
        delta = d if delta is None else delta + d
    return delta


@torch.no_grad()
def mask_drift_metrics(
    model: nn.Module,
    mask: Any,
    mode: str,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Relative drift of the masked and the unmasked entries of every weight the mask covers.

    ``safety/masked_drift = ||dW[mask]|| / ||W0[mask]||`` and ``safety/unmasked_drift = ||dW[~mask]|| /
    ||W0[~mask]||``, each summed over the covered tensors (fp32 accumulators). ``dW`` is ``W - reference`` for full
    weights. For PEFT tuner layers it is the layer's **effective** update, measured by running the real layer: the
    adapted layer and its base layer on an identity input (``nn.Linear``: row ``j`` of ``layer(I) - base(I)`` is column
    ``j`` of the update; ``nn.Embedding``: every token id), in the layer's own dtype and with dropout off. Whatever
    the layer's forward does (masked or not, sparse or dense) is what is measured, not what its merge helper would
    produce; ``W0`` is the base weight and no copy is needed. ``safety/violations`` counts entries that must stay
    unchanged and did not (the mask in ``"freeze"`` mode, its complement in ``"train_only"`` mode): for adapters an
    entry whose effective update is not exactly zero. Only one covered tensor's dense mask and update are alive at a
    time; the identity input is fed in chunks of at most 2**22 output values.

    Args:
        model: the model being trained (plain or PEFT).
        mask: the `SafetyMask`.
        mode: ``"freeze"`` or ``"train_only"``.
        reference: ``{name: original weight}`` for full-weight training; without it, full weights count as unchanged
            and only adapter deltas are measured.

    Returns:
        ``{"safety/masked_drift", "safety/unmasked_drift", "safety/violations"}``.
    """

    def effective_update(module: nn.Module) -> torch.Tensor | None:
        """``W_eff - W`` of a tuner layer measured through its forward, or None (merged / not a tuner layer)."""
        if not hasattr(module, "get_base_layer") or not hasattr(module, "active_adapters"):
            return None
        if getattr(module, "merged", False):
            return None  # merged into the base weight: only a reference copy can tell
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if weight is None:
            return None
        device = weight.device
        dtype = (
            weight.dtype if weight.dtype.is_floating_point else (getattr(base, "compute_dtype", None) or torch.float32)
        )
        # Dropout off without module.eval(): an eval-mode forward repacks bitsandbytes 4-bit weights for good (§6.2).
        dropouts = [m for m in module.modules() if isinstance(m, nn.Dropout) and m.training]
        for m in dropouts:
            m.train(False)
        try:
            if isinstance(base, nn.Linear):
                d_in, d_out = base.in_features, base.out_features
                chunk = max(1, min(d_in, (1 << 22) // max(1, d_out)))
                update = torch.empty((d_out, d_in), dtype=dtype, device=device)
                for start in range(0, d_in, chunk):
                    stop = min(d_in, start + chunk)
                    eye = torch.zeros((stop - start, d_in), dtype=dtype, device=device)
                    eye[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1
                    update[:, start:stop] = (module(eye) - base(eye)).t().to(dtype)
                return update
            if isinstance(base, nn.Embedding):
                ids = torch.arange(base.num_embeddings, device=device)
                return (module(ids) - base(ids)).to(dtype)
        finally:
            for m in dropouts:
                m.train(True)
        return _adapter_delta(module)  # other layer types: the adapter's own delta

    modules = _modules_by_name(model)
    acc = dict.fromkeys(("dm", "wm", "du", "wu"), 0.0)
    violations = 0
    for name in mask.shapes:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            continue
        delta = effective_update(module) if leaf == "weight" else None
        if delta is not None:
            w0 = _base_weight(module)
        else:
            current = getattr(module, leaf, None)
            if current is None or hasattr(module, "get_base_layer"):
                continue  # a tuner layer without an active delta: base weight frozen by PEFT
            w0 = reference.get(name) if reference is not None else None
            if w0 is None:
                continue
            delta = current.detach().float() - w0.to(current.device).float()
        dense = mask.to_dense(name, device=delta.device)
        delta, w0 = delta.float().reshape(dense.shape), w0.detach().float().reshape(dense.shape)
        acc["dm"] += float(delta[dense].pow(2).sum())
        acc["wm"] += float(w0[dense].pow(2).sum())
        acc["du"] += float(delta[~dense].pow(2).sum())
        acc["wu"] += float(w0[~dense].pow(2).sum())
        frozen = dense if mode == "freeze" else ~dense
        violations += int(torch.count_nonzero(delta[frozen]))

    def ratio(num: float, den: float) -> float:
        return math.sqrt(num) / math.sqrt(den) if den > 0 else 0.0

    return {
        "safety/masked_drift": ratio(acc["dm"], acc["wm"]),
        "safety/unmasked_drift": ratio(acc["du"], acc["wu"]),
        "safety/violations": float(violations),
    }


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
    """Compute `mask_drift_metrics` at every logging step of a plain ``transformers.Trainer``.

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
        self.mask, self.mode, self.full_weights = mask, mode, full_weights
        self.reference: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def attach(self, trainer: Any) -> SafetyDriftCallback:
        """Register on ``trainer`` ahead of its ``report_to`` integrations (see `attach_first`); returns self."""
        return attach_first(trainer, self)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.full_weights and model is not None:
            covered = set(self.mask.shapes)
            self.reference = {
                canonical_name(n): p.detach().to("cpu", copy=True)
                for n, p in model.named_parameters()
                if canonical_name(n) in covered
            }

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or (logs is not None and any(k.startswith("eval_") for k in logs)):
            return  # evaluation logs carry evaluation metrics only
        metrics = mask_drift_metrics(model, self.mask, self.mode, reference=self.reference)
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


class FreezerCallback(TrainerCallback):
    """Per-step actions of a trainer's `Freezer` that hooks cannot cover.

    Under DeepSpeed the engine steps inside ``accelerator.backward`` and the Trainer's optimizer is a no-op wrapper,
    so no optimizer hook fires: restore the frozen entries in ``on_optimizer_step``, which runs after the real step.
    Elsewhere the optimizer hook does it and this callback does nothing.

    Args:
        trainer: an object with a ``freezer`` attribute (a `Freezer` or None), e.g. `SafetySFTTrainer`.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        freezer = getattr(self.trainer, "freezer", None)
        if freezer is not None and freezer.resolved_backend == "deepspeed":
            freezer.restore_()
