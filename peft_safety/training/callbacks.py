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

__all__ = ["FreezerCallback", "RefusalEvalCallback", "SafetyDriftCallback", "mask_drift_metrics"]


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


class SafetyDriftCallback(TrainerCallback):
    """Compute `mask_drift_metrics` at every logging step of a plain ``transformers.Trainer``.

    The metrics are added to the ``logs`` dict passed to later callbacks and kept in ``self.history`` (a list of
    ``(step, metrics)``). For full-weight training it keeps a CPU copy of the covered tensors (taken at train begin)
    as the reference; for PEFT adapters no copy is needed.

    Args:
        mask: the `SafetyMask`.
        mode: ``"freeze"`` or ``"train_only"``.
        full_weights: keep the CPU reference copy (set False for adapters, or to save memory).
    """

    def __init__(self, mask: Any, mode: str, full_weights: bool = True) -> None:
        self.mask, self.mode, self.full_weights = mask, mode, full_weights
        self.reference: dict[str, torch.Tensor] | None = None
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.full_weights and model is not None:
            covered = set(self.mask.shapes)
            self.reference = {
                canonical_name(n): p.detach().to("cpu", copy=True)
                for n, p in model.named_parameters()
                if canonical_name(n) in covered
            }

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None:
            return
        metrics = mask_drift_metrics(model, self.mask, self.mode, reference=self.reference)
        self.history.append((state.global_step, metrics))
        if logs is not None:
            logs.update(metrics)


class RefusalEvalCallback(TrainerCallback):
    """Run ``evaluator(model, tokenizer) -> dict[str, float]`` every ``eval_steps`` optimizer steps and log the result
    with a ``safety/`` prefix (on the main process only; the model is put back in train mode afterwards).

    A typical evaluator generates answers to held-out harmful prompts and returns ``{"refusal_rate": ...}``:
    `peft_safety.evaluation.refusal_evaluator(prompts, judges=("wei2024",))` builds one (logged as
    ``safety/refusal_rate/<judge>``, ``safety/judge_errors/<judge>``, ...; see ``docs/trainer.md``). Under FSDP or
    DeepSpeed ZeRO-3 a generation on one rank alone would wait forever for the other ranks' shards: evaluate after
    training there.

    Args:
        evaluator: the callable.
        eval_steps: cadence in optimizer steps (> 0).
        trainer: the trainer whose ``log`` receives the metrics (set automatically by `SafetySFTTrainer`).
    """

    def __init__(self, evaluator: Callable[..., Mapping[str, float]], eval_steps: int, trainer: Any = None) -> None:
        if not callable(evaluator):
            raise TypeError(f"evaluator must be callable (model, tokenizer) -> dict, got {type(evaluator).__name__}.")
        if not isinstance(eval_steps, int) or eval_steps <= 0:
            raise ValueError(f"eval_steps must be a positive int, got {eval_steps!r}.")
        self.evaluator, self.eval_steps, self.trainer = evaluator, eval_steps, trainer
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.eval_steps or not state.is_world_process_zero or model is None:
            return
        was_training = model.training
        try:
            with torch.no_grad():
                result = dict(self.evaluator(model, processing_class))
        finally:
            model.train(was_training)
        metrics = {k if k.startswith("safety/") else f"safety/{k}": float(v) for k, v in result.items()}
        self.history.append((state.global_step, metrics))
        if self.trainer is not None:
            self.trainer.log(metrics)


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
