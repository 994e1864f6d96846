"""Post-hoc realignment: restore from the aligned model the masked entries (or neurons) that drifted most.

Fine-tuning moves safety-critical weights; restoring *all* of them (Wei et al. 2024's rewind) can also undo part of
the task, and restoring none leaves the drift. `realign_` restores only the most-drifted part of a mask, in the
spirit of Wei et al.'s rewind and NLSR's neuron-level safety realignment (Yi et al. 2024):

* ``by="entry"``: every weight entry of the mask is a unit; its drift is ``|W - W_ref|``; the ``k`` entries with the
  largest drift (over all parameters together) are set back to the reference's values.
* ``by="neuron"``: a unit is an output neuron (a row, axis 0, of a weight; the mask's own axis for ``Neuron``/``Head``
  masks); its drift is the L2 norm of the drift of its *masked* entries; the masked entries of the ``k`` most drifted
  neurons are restored. For neuron masks that is the whole neuron, as in NLSR.

``k`` is given directly or as ``fraction`` of the mask's units (``round(fraction * units)``; ``fraction=1`` is a full
rewind of the mask). Ties in drift are broken by parameter order (the mask's order), then by index, so the restored
set is deterministic. Only masked entries are ever written; everything else is bit-identical.

**LoRA.** A LoRA update ``B @ A`` cannot be restored entry by entry. ``realign_`` on a `PeftModel` with unmerged
LoRA layers raises unless ``merge_lora=True``; then the adapter is merged into the base weights in place
(``model.merge_adapter()``), and the merged weights are realigned. The realigned model is the merged one: save it
with ``model.merge_and_unload().save_pretrained(...)`` (the adapter files alone do not carry the realignment). For the
same reason `RealignCallback` realigns a LoRA model only at the end of training, never every N steps.

`RealignCallback` applies `realign_` at the end of training (and optionally every N optimizer steps for full
fine-tuning), with the reference snapshotted from the model at the start of training when none is given (the
snapshot holds only the parameters the mask touches).

Example:

```python
>>> report = realign_(finetuned, aligned, mask, fraction=0.2)  # doctest: +SKIP
>>> report.units_restored, report.entries_written  # doctest: +SKIP
(123, 123)
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..analysis.probes import named_parameters_by_base_name
from ..mask import Head, Neuron, SafetyMask
from ..vocab import check_choice, check_fraction, is_int

__all__ = ["RealignCallback", "RealignReport", "realign_", "reference_snapshot"]

logger = logging.getLogger(__name__)

_BY = ("entry", "neuron")


@dataclass
class RealignReport:
    """What `realign_` did.

    Args:
        by: ``"entry"`` or ``"neuron"``.
        units_total: units (entries or neurons) the mask covers.
        units_restored: units restored (``k``).
        entries_written: weight entries written.
        drift_before: L2 norm of ``W - W_ref`` over all masked entries, before.
        drift_after: the same, after.
        threshold: the smallest drift among the restored units (`None` if none).
        per_parameter: ``{name: units restored}`` for parameters with at least one.
        merged_lora: whether a LoRA adapter was merged first.
    """

    by: str = field(metadata={"help": "entry or neuron."})
    units_total: int = field(metadata={"help": "Units the mask covers."})
    units_restored: int = field(metadata={"help": "Units restored."})
    entries_written: int = field(metadata={"help": "Weight entries written."})
    drift_before: float = field(metadata={"help": "L2 drift of the masked entries before."})
    drift_after: float = field(metadata={"help": "L2 drift of the masked entries after."})
    threshold: float | None = field(default=None, metadata={"help": "Smallest drift restored."})
    per_parameter: dict[str, int] = field(default_factory=dict, metadata={"help": "Units restored per parameter."})
    merged_lora: bool = field(default=False, metadata={"help": "Whether a LoRA adapter was merged first."})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _param_table(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their base-model names, also inside a PEFT wrapper (``...base_layer.weight`` -> ``...weight``)."""
    return named_parameters_by_base_name(model)


def _lora_layers(model: nn.Module) -> list[Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def reference_snapshot(model: nn.Module, mask: SafetyMask) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters ``mask`` touches (memory: those parameters only), keyed by mask names."""
    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask must be a SafetyMask, got {type(mask).__name__}.")
    table = _param_table(model)
    missing = [n for n in mask.names if n not in table]
    if missing:
        raise ValueError(
            f"The model has no parameter {missing[0]!r} that the mask selects; check mask.validate(model)."
        )
    return {n: table[n].detach().clone() for n in mask.names}


def _reference_tensor(reference: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(reference, nn.Module):
        ref = _param_table(reference).get(name)
    elif isinstance(reference, Mapping):
        ref = reference.get(name)
    else:
        raise TypeError(
            f"reference must be a torch.nn.Module or a state dict (name -> tensor), got {type(reference).__name__}."
        )
    if ref is None:
        raise ValueError(
            f"The reference has no parameter {name!r}; pass the aligned model (or reference_snapshot(model, mask) "
            "taken before fine-tuning)."
        )
    if tuple(ref.shape) != shape:
        raise ValueError(f"Parameter {name!r} has shape {tuple(ref.shape)} in the reference but {shape} in the model.")
    return ref.detach()


def _unit_axis(mask: SafetyMask, name: str) -> int:
    gran = mask.granularity_of(name)
    return gran.axis if isinstance(gran, (Neuron, Head)) else 0


def realign_(
    model: nn.Module,
    reference: Any,
    mask: SafetyMask,
    *,
    fraction: float | None = None,
    k: int | None = None,
    by: str = "entry",
    merge_lora: bool = False,
) -> RealignReport:
    """Restore from ``reference`` the masked units of ``model`` that drifted most (in place).

    Memory: one fp32 drift value per masked entry, plus (for ``by="neuron"``) one per neuron.

    Args:
        model: the fine-tuned model (plain, or a `PeftModel`: see ``merge_lora``).
        reference: the aligned model, its state dict, or `reference_snapshot` taken before fine-tuning (names as in
            the mask).
        mask: the `SafetyMask` whose entries may be restored (any granularity; counted in weight entries).
        fraction: share of the mask's units to restore, in ``[0, 1]``; exactly one of ``fraction`` and ``k``.
        k: number of units to restore.
        by: ``"entry"`` (weight entries) or ``"neuron"`` (output neurons; see the module docstring).
        merge_lora: merge unmerged LoRA layers into the base weights first (required for a LoRA model).

    Returns:
        A `RealignReport`.

    Raises:
        ValueError: both or neither of ``fraction``/``k``, out-of-range values, unknown ``by``, a LoRA model without
            ``merge_lora=True``, missing or mis-shaped parameters.
        TypeError: wrong argument types.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask must be a SafetyMask, got {type(mask).__name__}.")
    check_choice(by, _BY, where="by")
    if (fraction is None) == (k is None):
        raise ValueError("Pass exactly one of fraction= (share of the mask's units) or k= (number of units).")
    if fraction is not None:
        fraction = check_fraction(fraction, allow_zero=True)
    if k is not None and (not is_int(k) or k < 0):
        raise ValueError(f"k must be a non-negative int, got {k!r}.")
    merged = False
    unmerged = [m for m in _lora_layers(model) if not getattr(m, "merged", False)]
    if unmerged:
        if not merge_lora:
            raise ValueError(
                "realign_ got a model with unmerged LoRA layers: a LoRA update B @ A cannot be restored entry by "
                "entry. Pass merge_lora=True (merges the adapter into the base weights in place, then realigns them; "
                "save the result with model.merge_and_unload().save_pretrained(...)), or merge it yourself first."
            )
        with torch.no_grad():
            for layer in unmerged:
                layer.merge()
        merged = True

    table = _param_table(model)
    weight_mask = mask.to_weight()
    # per parameter: flat masked indices, their drift, and the unit each entry belongs to
    entries: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for name in weight_mask.names:
        param = table.get(name)
        if param is None:
            raise ValueError(f"The mask selects {name!r}, which the model does not have; check mask.validate(model).")
        shape = tuple(param.shape)
        if shape != tuple(mask.shapes[name]):
            raise ValueError(f"Parameter {name!r} has shape {shape} in the model but {mask.shapes[name]} in the mask.")
        ref = _reference_tensor(reference, name, shape)
        idx = weight_mask[name].to(device=param.device, dtype=torch.int64)
        cur = param.detach().reshape(-1)[idx].float()
        old = ref.reshape(-1).to(param.device)[idx].float()
        drift = (cur - old).abs()
        if by == "neuron" and param.dim() >= 2:
            # rows are axis -2 and columns axis -1 of each (expert's) matrix; a neuron id is unique per parameter
            rows, cols = shape[-2], shape[-1]
            if _unit_axis(mask, name) == 0:
                unit = idx // cols
            else:
                unit = (idx // (rows * cols)) * cols + idx % cols
        else:
            unit = idx  # entries (and 1-D parameters: every entry is its own neuron)
        entries.append((name, idx, drift, unit, old))

    # unit drift: entry drift, or the L2 norm over a neuron's masked entries
    unit_names: list[str] = []
    unit_ids: list[torch.Tensor] = []
    unit_drift: list[torch.Tensor] = []
    for name, _, drift, unit, _ in entries:
        if by == "neuron":
            ids, inverse = torch.unique(unit, sorted=True, return_inverse=True)
            sq = torch.zeros(ids.numel(), dtype=torch.float32, device=drift.device).index_add_(
                0, inverse, drift * drift
            )
            unit_ids.append(ids)
            unit_drift.append(sq.sqrt())
        else:
            unit_ids.append(unit)
            unit_drift.append(drift)
        unit_names.append(name)
    total = sum(int(u.numel()) for u in unit_ids)
    n_restore = k if k is not None else round(fraction * total)
    if n_restore > total:
        raise ValueError(f"k={n_restore} exceeds the {total} units of the mask (by={by!r}).")
    before = float(sum(float((d * d).sum()) for _, _, d, _, _ in entries)) ** 0.5

    # global ranking: drift descending, then parameter order, then unit index (a stable sort on the concatenation,
    # already ordered by parameter and index, gives exactly that tie-break)
    chosen: dict[str, torch.Tensor] = {}
    threshold = None
    if n_restore > 0 and total > 0:
        all_drift = torch.cat([d.cpu() for d in unit_drift])
        order = torch.sort(all_drift, descending=True, stable=True).indices[:n_restore]
        threshold = float(all_drift[order[-1]])
        offsets = torch.tensor([0] + [int(u.numel()) for u in unit_ids]).cumsum(0)
        for p, name in enumerate(unit_names):
            sel = order[(order >= offsets[p]) & (order < offsets[p + 1])] - offsets[p]
            if sel.numel():
                chosen[name] = unit_ids[p].cpu()[sel]

    written = 0
    per_parameter: dict[str, int] = {}
    after_sq = 0.0
    with torch.no_grad():
        for name, idx, drift, unit, old in entries:
            picked = chosen.get(name)
            keep_drift = drift
            if picked is not None:
                hit = torch.isin(unit, picked.to(unit.device))
                flat = table[name].view(-1) if table[name].is_contiguous() else None
                if flat is None:
                    raise ValueError(f"Parameter {name!r} is not contiguous; realign_ writes into its flat view.")
                flat[idx[hit]] = old[hit].to(flat.dtype)
                written += int(hit.sum())
                per_parameter[name] = int(picked.numel())
                keep_drift = drift.masked_fill(hit, 0.0)
            after_sq += float((keep_drift * keep_drift).sum())
    return RealignReport(by, total, n_restore, written, before, after_sq**0.5, threshold, per_parameter, merged)


class RealignCallback(TrainerCallback):
    """Apply `realign_` at the end of training (and, for full fine-tuning, every ``every_n_steps`` steps).

    Args:
        mask: the `SafetyMask` whose drifted entries are restored.
        reference: the aligned model or a state dict; `None` snapshots the masked parameters at the start of
            training (`reference_snapshot`).
        fraction: share of the mask's units to restore (or ``k``).
        k: number of units to restore.
        by: ``"entry"`` or ``"neuron"``.
        every_n_steps: also realign every this many optimizer steps (not for LoRA models: see the module docstring).
        at_end: realign at the end of training (default).

    The reports are kept in ``reports`` (one per application) and the last one is logged as ``safety/realign_*``
    metrics when a trainer is attached (``callback.trainer = trainer``) -- optional.
    """

    def __init__(
        self,
        mask: SafetyMask,
        reference: Any = None,
        *,
        fraction: float | None = None,
        k: int | None = None,
        by: str = "entry",
        every_n_steps: int | None = None,
        at_end: bool = True,
    ) -> None:
        if not isinstance(mask, SafetyMask):
            raise TypeError(f"mask must be a SafetyMask, got {type(mask).__name__}.")
        if (fraction is None) == (k is None):
            raise ValueError("Pass exactly one of fraction= or k=.")
        check_choice(by, _BY, where="by")
        if fraction is not None:
            fraction = check_fraction(fraction, allow_zero=True)
        if every_n_steps is not None and (not is_int(every_n_steps) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None, got {every_n_steps!r}.")
        self.mask, self.reference = mask, reference
        self.fraction, self.k, self.by = fraction, k, by
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self.reports: list[RealignReport] = []
        self.trainer: Any = None

    def _apply(self, model: nn.Module, merge: bool) -> None:
        report = realign_(model, self.reference, self.mask, fraction=self.fraction, k=self.k, by=self.by,
                          merge_lora=merge)  # fmt: skip
        self.reports.append(report)
        logger.info("realign: restored %d of %d units (%d entries)", report.units_restored, report.units_total,
                    report.entries_written)  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("RealignCallback needs the model (the Trainer passes it).")
        if self.every_n_steps is not None and _lora_layers(model):
            raise ValueError(
                "RealignCallback(every_n_steps=...) cannot realign a LoRA model during training (realigning needs the "
                "adapter merged); use at_end=True only."
            )
        if self.reference is None:
            self.reference = reference_snapshot(model, self.mask)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and model is not None and state.global_step % self.every_n_steps == 0:
            self._apply(model, merge=False)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.at_end and model is not None:
            self._apply(model, merge=True)
        return control
