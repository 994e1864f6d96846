"""Booster (Huang et al., ICLR 2025): an alignment-stage regulariser against harmful perturbation.

During an alignment run (e.g. SET or full fine-tuning on refusal rows), the loss gains

    lambda * [ h(w) - h(w - alpha * g_h / ||g_h||) ]

where ``h`` is the language-modelling loss on a batch of harmful (prompt, harmful answer) rows and ``g_h = grad h(w)``:
the model is trained so that one simulated harmful fine-tuning step lowers the harmful loss as little as possible.

How the gradient is taken (from the public code, ``git-disl/Booster``, ``trainer.py``, ``BoosterAlignmentTrainer``):
the reference computes ``g_h(w)`` (first backward on the harmful batch), moves the weights to
``w' = w - alpha * g_h / (||g_h|| + 1e-7)`` (``||.||``: the global L2 norm over every trainable tensor), computes
``g_h(w')`` on the same batch (second backward), puts the weights back, and adds ``lambda * g_h(w) - lambda * g_h(w')``
to the gradient of the alignment loss (third backward). The perturbation is therefore treated as a constant: no
gradient flows through ``g_h / ||g_h||`` (a first-order approximation, as in SAM). This protection does the same: its
`extra_loss` returns a term whose value is ``lambda * (h(w) - h(w'))`` and whose gradient is exactly
``lambda * (g_h(w) - g_h(w'))``; the trainer adds it to the alignment loss and runs the third backward.

Other details from the reference: the harmful batch is drawn fresh at every step from a random sampler over the
harmful rows (cycled when exhausted), and the same batch is used for both harmful passes; its script uses
``lambda = 5``, ``alpha = 0.1`` and the same batch size (10) for alignment and harmful batches (here the harmful batch
has the training batch size); the reference's optional ``perturb_aware`` variant (off by default) is not implemented.

The weights are perturbed in place and written back exactly from a copy (not by adding the step back, which rounds).
Cost: two more forward and backward passes per micro-batch, on the harmful batch. With a `Freezer`
(``safety_mode="freeze"``), ``g_h`` and the perturbation include the frozen entries (the attack would move them), and
the frozen entries' final gradient is masked as usual, so they stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ._rows import RowsProtection

__all__ = ["Booster", "booster_perturbation"]

#: the constant the reference adds to the gradient norm before dividing
NORM_EPS = 1e-7

# the batch keys a causal LM forward takes (the collator may add others, e.g. for packing)
_FORWARD_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def booster_perturbation(grads: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    """``alpha * g / (||g|| + 1e-7)`` for every tensor ``g`` of ``grads``; ``||g||`` is the global L2 norm over all of
    them (fp32)."""
    norm = torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads)) + NORM_EPS
    return [alpha * g / norm.to(g.dtype) for g in grads]


def _lm_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    kwargs = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
    if "labels" not in kwargs:
        raise ValueError("Booster's harmful batches need labels (the trainer's collator gives them).")
    return model(**kwargs, use_cache=False).loss


class Booster(RowsProtection):
    """Booster as a protection: the harmful-perturbation term added to every training micro-batch's loss.

    Args:
        rows: harmful (prompt, harmful answer) rows, or where to read them (see `RowsProtection`).
        lamb: ``lambda`` (> 0).
        alpha: ``alpha`` (> 0), the step size of the simulated harmful step.
        seed: seed of the order of the harmful batches.

    Attributes:
        last: ``{"harmful_loss": h(w), "perturbed_loss": h(w'), "grad_norm": ||g_h||}`` of the last micro-batch.
    """

    name = "booster"

    def __init__(self, rows: Any, *, lamb: float, alpha: float = 0.1, seed: int = 0) -> None:
        for label, value in (("lamb", lamb), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Booster {label} must be a number > 0, got {value!r}.")
        super().__init__(rows, seed=seed, what="harmful", field="safety_booster_harmful_dataset")
        self.lamb = float(lamb)
        self.alpha = float(alpha)
        self.last: dict[str, float] = {}
        self._params: list[nn.Parameter] = []

    @classmethod
    def from_args(cls, args: Any, rows: Any = None) -> Booster:
        """Build from a `SafetySFTConfig`: ``safety_booster_lambda``, ``safety_booster_alpha``; rows from ``rows`` or
        ``args.safety_booster_harmful_dataset``; seed ``seed + 1`` (a stream apart from the training set's)."""
        source = rows if rows is not None else getattr(args, "safety_booster_harmful_dataset", None)
        if source is None:
            raise ValueError(
                "Booster (safety_booster_lambda > 0) needs harmful rows: set safety_booster_harmful_dataset (an offline "
                "data set name such as uncensorbench_compliant, a .json/.jsonl path or a Hub id) or pass "
                "SafetySFTTrainer(safety_booster_harmful_dataset=rows)."
            )
        return cls(
            source,
            lamb=float(args.safety_booster_lambda),
            alpha=float(args.safety_booster_alpha),
            seed=int(getattr(args, "seed", 0)) + 1,
        )

    def install(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Booster:
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("Booster found no trainable parameter in the model.")
        return self

    def extra_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``lambda * (h(w) - h(w'))`` with the gradient ``lambda * (g_h(w) - g_h(w'))`` (two passes on one harmful
        batch; the weights are written back exactly before returning)."""
        params = self._params or [p for p in model.parameters() if p.requires_grad]
        device = inputs["input_ids"].device if "input_ids" in inputs else params[0].device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.next_batch().items()}
        harmful, g1, perturbed, g2 = self.passes(model, batch, params)
        coefficients = [self.lamb * (a - b) for a, b in zip(g1, g2)]
        term = self.lamb * (harmful - perturbed)
        # value lambda*(h(w) - h(w')), gradient exactly the coefficients: (p - p.detach()) is 0 with gradient 1
        for p, c in zip(params, coefficients):
            term = term + ((p - p.detach()) * c).sum()
        return term

    def passes(
        self, model: nn.Module, batch: Mapping[str, Any], params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """The two harmful passes: ``(h(w), g_h(w), h(w'), g_h(w'))``, ``w' = w - alpha * g_h / (||g_h|| + 1e-7)``;
        the losses detached, the model's weights unchanged on return."""
        h = _lm_loss(model, batch)
        g1 = self._grads(h, params)
        step = booster_perturbation(g1, self.alpha)
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, s in zip(params, step):
                    p.data.sub_(s)  # .data: the alignment loss's graph must not see a version change
            h2 = _lm_loss(model, batch)
            g2 = self._grads(h2, params)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.data.copy_(s)
        self.last = {
            "harmful_loss": float(h.detach()),
            "perturbed_loss": float(h2.detach()),
            "grad_norm": float(torch.sqrt(sum(g.float().pow(2).sum() for g in g1))),
        }
        return h.detach(), g1, h2.detach(), g2

    @staticmethod
    def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]

    def metrics(self) -> dict[str, float]:
        if not self.last:
            return {}
        return {
            "safety/booster_harmful_loss": self.last["harmful_loss"],
            "safety/booster_loss_drop": self.last["harmful_loss"] - self.last["perturbed_loss"],
        }

    def state(self) -> dict[str, Any]:
        return {
            "protection": self.name,
            "lambda": self.lamb,
            "alpha": self.alpha,
            "harmful_rows": len(self.rows) if self.rows is not None else None,
        }

    def remove(self) -> None:
        self._params = []
