"""Choosing the training step honestly: evaluate a dev split every N steps and keep the best checkpoint.

`DevSelectCallback` runs an evaluator (``evaluator(model, tokenizer) -> dict of metrics``; typically
`peft_safety.evaluation.DevSplit`, harmful and benign dev prompts checked disjoint from the evaluation sets) every
``eval_steps`` optimizer steps and at the last step, scores each evaluation with a rule (by default refusal minus
over-refusal: ``dev_refusal - dev_over_refusal``), keeps a CPU copy of the trainable parameters at the best score (the
first best wins a tie: fewer steps, less drift), and at the end of training writes the best copy back into the model, so
that the trainer saves the chosen checkpoint. Its curve (`curve`), the chosen step (`best_step`) and the evaluator's
evidence at that step (`evidence`: rates with intervals, judge and prompt sets) are what a result file or a model card
reports (`SafetySFTTrainer` puts `evidence` on the card of the adapter it saves).

Only the trainable parameters are copied (a SET adapter's deltas: the size of the mask), never the base weights. It
runs in one process: under DDP/FSDP/DeepSpeed each rank would have to restore the same copy, which a callback on the
main process cannot promise; it refuses to start there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import SafetyError, SafetyTypeError
from .callbacks import RefusalEvalCallback

logger = logging.getLogger(__name__)

__all__ = ["DevSelectCallback", "refusal_minus_over_refusal"]


def _metric(metrics: Mapping[str, float], key: str) -> float:
    for name in (key, f"safety/{key}"):
        if name in metrics:
            return float(metrics[name])
    raise KeyError(
        f"The dev evaluation returned no {key!r} (got {sorted(metrics)}): return it from the evaluator, or pass "
        "DevSelectCallback(rule=fn) with fn(metrics) -> score."
    )


def refusal_minus_over_refusal(metrics: Mapping[str, float]) -> float:
    """The default rule: ``dev_refusal - dev_over_refusal`` (higher is better)."""
    return _metric(metrics, "dev_refusal") - _metric(metrics, "dev_over_refusal")


class DevSelectCallback(RefusalEvalCallback):
    """Evaluate a dev split every ``eval_steps`` steps (and at the last one) and keep the best checkpoint.

    Args:
        evaluator: ``evaluator(model, tokenizer) -> dict[str, float]`` (e.g. `peft_safety.evaluation.DevSplit`); its
            metrics are logged with a ``safety/`` prefix. An evaluator with a ``last_evidence`` list (records with
            ``metric``, ``rate``, ``low``, ``high``, ``n``, ``dataset``, ``judge``) gives the card its evidence; one
            with ``summary()`` adds its description (sizes, overlap report) to `report`.
        eval_steps: cadence in optimizer steps (> 0).
        rule: ``rule(metrics) -> float``, higher is better (default `refusal_minus_over_refusal`).
        restore_best: write the best parameters back into the model at the end of training.
        trainer: the trainer whose ``log`` collects the metrics (set it for `SafetySFTTrainer`; see
            `RefusalEvalCallback`).

    Attributes:
        curve: ``[{"step": s, "score": x, **metrics}]`` in step order.
        best_step: the chosen step (`None` before the first evaluation).
        best_score: its score.
        restored: whether the best parameters were written back.
    """

    def __init__(
        self,
        evaluator: Callable[..., Mapping[str, float]],
        eval_steps: int,
        *,
        rule: Callable[[Mapping[str, float]], float] | None = None,
        restore_best: bool = True,
        trainer: Any = None,
    ) -> None:
        super().__init__(evaluator, eval_steps, trainer=trainer)
        if rule is not None and not callable(rule):
            raise SafetyTypeError(f"rule must be callable (metrics) -> float, got {type(rule).__name__}.")
        self.rule = rule or refusal_minus_over_refusal
        self.restore_best = bool(restore_best)
        self.curve: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.restored = False
        self._best_params: dict[str, torch.Tensor] | None = None
        self._best_evidence: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise SafetyError(
                "DevSelectCallback keeps and restores the best parameters in one process; this run has "
                f"world_size={args.world_size}. Save checkpoints and evaluate them after training instead."
            )

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        due = step % self.eval_steps == 0 or step == state.max_steps
        if not due or model is None or (self.curve and self.curve[-1]["step"] == step):
            return
        before = len(self.history)
        if step % self.eval_steps:  # the last step, off the cadence: evaluate as the parent does on the cadence
            saved, self.eval_steps = self.eval_steps, step
            try:
                super().on_step_end(args, state, control, model=model, processing_class=processing_class, **kwargs)
            finally:
                self.eval_steps = saved
        else:
            super().on_step_end(args, state, control, model=model, processing_class=processing_class, **kwargs)
        if len(self.history) == before:
            return
        metrics = self.history[-1][1]
        score = float(self.rule(metrics))
        if not math.isfinite(score):
            raise SafetyError(f"The dev rule gave a non-finite score ({score}) at step {step} for {metrics}.")
        self.curve.append({"step": step, "score": score, **metrics})
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, step
            self._best_params = {
                n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
            }
            self._best_evidence = [dict(e) for e in getattr(self.evaluator, "last_evidence", None) or []]
        logger.info("dev evaluation at step %d: score %.4f (best %.4f at step %s)", step, score, self.best_score,
                    self.best_step)  # fmt: skip

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.restore_best or self._best_params is None or model is None:
            return
        if self.curve and self.best_step == self.curve[-1]["step"]:
            return  # the last step is the best: nothing to write back
        self.restore(model)

    def restore(self, model: Any) -> None:
        """Write the best parameters into ``model`` (done at the end of training with ``restore_best``).

        Raises:
            RuntimeError: no evaluation ran yet, or the model lacks a kept parameter.
        """
        if self._best_params is None:
            raise RuntimeError("DevSelectCallback.restore: no dev evaluation has run yet.")
        params = dict(model.named_parameters())
        missing = [n for n in self._best_params if n not in params]
        if missing:
            raise RuntimeError(f"DevSelectCallback cannot restore {missing[:3]}: the model's parameters changed.")
        with torch.no_grad():
            for name, value in self._best_params.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        self.restored = True
        logger.info("restored the dev-selected checkpoint of step %d (score %.4f)", self.best_step, self.best_score)

    def evidence(self) -> list[dict[str, Any]]:
        """The evaluator's records at the chosen step, each with ``step`` and ``selected_by`` (for a model card)."""
        return [
            {**e, "step": self.best_step, "selected_by": getattr(self.rule, "__name__", "rule")}
            for e in self._best_evidence
        ]

    def report(self) -> dict[str, Any]:
        """A JSON-ready account: the rule, the curve, the chosen step, whether it was restored, and the evaluator's
        `summary()` (sizes, names, judge, overlap with the evaluation sets) when it has one."""
        summary = getattr(self.evaluator, "summary", None)
        return {
            "rule": getattr(self.rule, "__name__", repr(self.rule)),
            "eval_steps": self.eval_steps,
            "curve": self.curve,
            "best_step": self.best_step,
            "best_score": self.best_score,
            "restored": self.restored,
            "evaluator": summary() if callable(summary) else None,
        }
