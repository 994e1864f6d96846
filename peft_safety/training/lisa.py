"""Lisa (Huang et al., NeurIPS 2024, "Lazy Safety Alignment"): alternate alignment and task states with a proximal term.

Fine-tuning runs in two states that alternate: ``K_a`` optimizer steps on alignment rows (refusal demonstrations),
then ``K_f`` steps on the user's task data, and so on, starting with an alignment state. In each state the training
loss gains the proximal term

    rho / 2 * ||w - w_switch||^2

over the trainable weights ``w``, where ``w_switch`` are the trainable weights at the last switch of state (at the
start of training for the first state), so that neither state drifts far from where the other left the model.

Details taken from the public code (``git-disl/Lisa``, ``trainer.py``, ``LisaTrainer``):

* the first state is the alignment state; the state switches after exactly ``K_a`` (``--alignment_step``) or ``K_f``
  (``--finetune_step``) steps; the reference script uses 100 and 900 and ``rho = 1``;
* ``w_switch`` is a copy of the trainable weights taken at each switch (``switch_model``); one copy is enough, since
  each state's anchor is the weights where the other state ended;
* the alignment batches come from a random sampler over the alignment rows at the training batch size, cycled when
  exhausted; the task batches of the task stream are not consumed during alignment steps here (the reference draws and
  discards one), which leaves the number of task batches per epoch the same;
* the reference adds the proximal term only after 10% of the run's steps (a comment says it hurts early
  convergence); here that is ``proximal_after`` (`SafetySFTConfig.safety_lisa_proximal_after`), 0 by default,
  which is the paper's formula.

Step counts are optimizer steps (with gradient accumulation, one step draws ``gradient_accumulation_steps``
alignment batches, and the proximal term is added once per step at the scale of the loss).

`SafetySFTTrainer` builds it from ``safety_lisa_alignment_steps``, ``safety_lisa_task_steps``, ``safety_lisa_rho``
and ``safety_lisa_proximal_after``, with the rows of ``safety_replay_dataset``. It composes with every mask
protection (``safety_mode="freeze"``: the frozen entries have ``w == w_switch``, so the term never moves them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ._rows import RowsProtection

__all__ = ["Lisa", "lisa_state"]


def lisa_state(step: int, alignment_steps: int, task_steps: int) -> str:
    """``"alignment"`` or ``"task"``: the state of optimizer step ``step`` (0-based) in Lisa's schedule.

    Steps ``[0, K_a)`` are alignment steps, ``[K_a, K_a + K_f)`` task steps, and so on.

    Example:

    ```python
    >>> [lisa_state(s, 2, 3)[0] for s in range(7)]
    ['a', 'a', 't', 't', 't', 'a', 'a']
    ```
    """
    return "alignment" if step % (alignment_steps + task_steps) < alignment_steps else "task"


class Lisa(RowsProtection):
    """Lisa as a protection: alignment batches on the alignment steps, the proximal term on every step.

    Args:
        rows: the alignment rows (refusal demonstrations), or where to read them (see `RowsProtection`).
        alignment_steps: ``K_a``, optimizer steps of each alignment state (> 0).
        task_steps: ``K_f``, optimizer steps of each task state (> 0).
        rho: weight of the proximal term (>= 0; 0 is Bi-State Optimization).
        proximal_after: first optimizer step (0-based) at which the proximal term is added.
        seed: seed of the order of the alignment batches.

    Attributes:
        steps: ``{"alignment": n, "task": n}`` optimizer steps taken in each state.
        switches: the optimizer steps (counts of steps taken) at which ``w_switch`` was taken again.
    """

    name = "lisa"

    def __init__(
        self,
        rows: Any,
        *,
        alignment_steps: int,
        task_steps: int,
        rho: float = 1.0,
        proximal_after: int = 0,
        seed: int = 0,
    ) -> None:
        for label, value in (("alignment_steps", alignment_steps), ("task_steps", task_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Lisa {label} must be a positive int, got {value!r}.")
        if isinstance(proximal_after, bool) or not isinstance(proximal_after, int) or proximal_after < 0:
            raise ValueError(f"Lisa proximal_after must be a non-negative int, got {proximal_after!r}.")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
            raise ValueError(f"Lisa rho must be a number >= 0, got {rho!r}.")
        super().__init__(rows, seed=seed, what="alignment", field="safety_replay_dataset")
        self.alignment_steps = alignment_steps
        self.task_steps = task_steps
        self.rho = float(rho)
        self.proximal_after = proximal_after
        self.steps = {"alignment": 0, "task": 0}
        self.switches: list[int] = []
        self._params: list[tuple[str, nn.Parameter]] = []
        self._anchor: list[torch.Tensor] = []
        self._step = 0

    @classmethod
    def from_args(cls, args: Any, rows: Any = None) -> Lisa:
        """Build from a `SafetySFTConfig`: ``safety_lisa_*`` fields; rows from ``rows`` or
        ``args.safety_replay_dataset``; seed ``safety_replay_seed`` (else ``seed``)."""
        source = rows if rows is not None else getattr(args, "safety_replay_dataset", None)
        if source is None:
            raise ValueError(
                "Lisa (safety_lisa_alignment_steps > 0) needs alignment rows: set safety_replay_dataset (an offline "
                "data set name such as uncensorbench_refusal, a .json/.jsonl path or a Hub id) or pass "
                "SafetySFTTrainer(safety_replay_dataset=rows)."
            )
        seed = getattr(args, "safety_replay_seed", None)
        seed = int(getattr(args, "seed", 0) if seed is None else seed)
        return cls(
            source,
            alignment_steps=int(args.safety_lisa_alignment_steps),
            task_steps=int(args.safety_lisa_task_steps),
            rho=float(args.safety_lisa_rho),
            proximal_after=int(args.safety_lisa_proximal_after),
            seed=seed,
        )

    def state_of(self, step: int) -> str:
        """The state of optimizer step ``step`` (0-based): ``"alignment"`` or ``"task"``."""
        return lisa_state(step, self.alignment_steps, self.task_steps)

    # ------------------------------------------------------------------ hooks
    def install(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Lisa:
        """Take ``w_switch`` for the first state: a copy of the trainable weights as they will be trained."""
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("Lisa found no trainable parameter in the model.")
        self._anchor = [p.detach().clone() for _, p in self._params]
        return self

    def _take_anchor(self) -> None:
        with torch.no_grad():
            for anchor, (_, p) in zip(self._anchor, self._params):
                anchor.copy_(p.detach())

    def batch_source(self, step: int) -> Iterator[Any] | None:
        """The alignment stream on alignment steps, `None` (the task data) on task steps."""
        self._step = step
        return self.stream() if self.state_of(step) == "alignment" else None

    def extra_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """``rho / 2 * sum ||w - w_switch||^2`` (fp32), from step ``proximal_after`` on."""
        if self.rho == 0.0 or self._step < self.proximal_after or not self._params:
            return None
        total = None
        for anchor, (_, p) in zip(self._anchor, self._params):
            term = (p - anchor).float().pow(2).sum()
            total = term if total is None else total + term
        return total * (self.rho / 2.0)

    def after_optimizer_step(self, step: int) -> None:
        """Count the step; at a switch of state, take ``w_switch`` again (the weights where this state ended)."""
        self.steps[self.state_of(step - 1)] += 1
        if self._params and self.state_of(step) != self.state_of(step - 1):
            self._take_anchor()
            self.switches.append(step)

    def metrics(self) -> dict[str, float]:
        if not self._params:
            return {}
        with torch.no_grad():
            drift = sum(float((p.detach() - a).float().pow(2).sum()) for a, (_, p) in zip(self._anchor, self._params))
        return {
            "safety/lisa_alignment_state": 1.0 if self.state_of(self._step) == "alignment" else 0.0,
            "safety/lisa_drift": drift,
            "safety/lisa_alignment_steps": float(self.steps["alignment"]),
        }

    def state(self) -> dict[str, Any]:
        return {
            "protection": self.name,
            "alignment_steps": self.alignment_steps,
            "task_steps": self.task_steps,
            "rho": self.rho,
            "proximal_after": self.proximal_after,
            "alignment_rows": len(self.rows) if self.rows is not None else None,
            "steps": dict(self.steps),
        }

    def remove(self) -> None:
        """Drop the references to the model and the copy of its weights."""
        self._params = []
        self._anchor = []
