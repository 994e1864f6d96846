"""Reversible in-place interventions on the entries a `SafetyMask` selects.

Analysis experiments edit a model's weights at the mask and measure what changes: prune the mask (`zeroed`), scale it
(`scaled`, the Safety Layers over-rejection probe), add noise to it (`noised`, the ESI perturbation probe), or put back
the values of a reference model (`restored_from`, Wei et al.'s rewind). The context managers here edit the live
model in place, without a second copy of it, and on exit (normal or through an exception) write back a saved copy of
the touched entries, so the weights are bit-identical to what they were before. The saved copy is O(mask): only the
selected entries (whole rows/columns for neuron and head masks, the whole tensor for layer masks) are kept.

Restoration never inverts the edit (dividing by ``alpha`` after scaling is lossy in bf16; subtracting noise is lossy
in every dtype): it copies the saved values back.

Permanent counterparts: `rewind_` (set the masked entries to a reference's values, for good) and the drift report
`mask_drift` (how far the masked and the unmasked entries moved from a reference).

Example:

```python
>>> from peft_safety.analysis.probes import zeroed, scaled
>>> with zeroed(model, mask):          # the masked entries are 0 inside the block
...     refusal_rate_pruned = evaluate(model)
>>> with scaled(model, layer_mask, 1.2):
...     over_rejections = evaluate(model)
>>> # the weights are bit-identical to the original here
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..mask import SafetyMask

__all__ = ["mask_drift", "noised", "restored_from", "rewind_", "scaled", "zeroed"]

Reference = nn.Module | Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# addressing: granularity + indices -> the slice of one parameter they cover
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Region:
    """The entries of one parameter that a mask selects, as an advanced index into a view of the parameter.

    ``view`` is the parameter itself (row units, flat weight entries) or its last two dimensions swapped (column
    units), so that selected units are always the leading-dimension index ``index`` of ``view``: ``view[index]`` is a
    ``(n_units, unit_len)`` block for rows/columns, ``(n,)`` for weight entries, the whole tensor for a layer mask.
    """

    name: str
    param: torch.Tensor
    view: torch.Tensor
    index: tuple[torch.Tensor, ...] | None  # None: the whole parameter

    def gather(self) -> torch.Tensor:
        """A copy of the selected entries (same dtype and device as the parameter)."""
        if self.index is None:
            return self.view.detach().clone()
        return self.view.detach()[self.index].clone()

    def write(self, values: torch.Tensor) -> None:
        """Write ``values`` (the shape `gather` returns) into the selected entries, in place."""
        with torch.no_grad():
            if self.index is None:
                self.view.copy_(values)
            else:
                self.view.index_put_(self.index, values.to(dtype=self.view.dtype, device=self.view.device))

    def numel(self) -> int:
        if self.index is None:
            return self.param.numel()
        n_units = self.index[0].numel()
        unit = math.prod(self.view.shape[len(self.index) :])
        return n_units * unit


def _unit_index(units: torch.Tensor, lead_shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Unravel unit ids over the leading dimensions ``lead_shape`` (experts, then rows), as int64 on ``device``."""
    units = units.to(device=device, dtype=torch.int64)
    if len(lead_shape) == 1:
        return (units,)
    return tuple(torch.unravel_index(units, lead_shape))


def _region(name: str, param: torch.Tensor, granularity: Any, indices: torch.Tensor) -> _Region:
    """Build the `_Region` of ``param`` that ``indices`` (in the unit of ``granularity``) covers (concepts.md)."""
    from ..mask import Head, Layer, Neuron, Weight

    shape = tuple(param.shape)
    if isinstance(granularity, Layer):
        return _Region(name, param, param, None)
    if isinstance(granularity, Weight):
        return _Region(name, param, param, _unit_index(indices, shape, param.device))
    if isinstance(granularity, Neuron | Head):
        axis = granularity.axis
        if param.dim() == 1:
            if axis != 0:
                raise ValueError(
                    f"Parameter {name!r} is 1-D (shape {shape}) but the mask addresses it by columns "
                    f"({granularity!r}); 1-D parameters only have rows (entries): use Neuron(axis=0) or Weight()."
                )
            units = indices
            if isinstance(granularity, Head):
                units = _expand_heads(indices, granularity.head_dim)
            return _Region(name, param, param, (units.to(device=param.device, dtype=torch.int64),))
        view = param if axis == 0 else param.movedim(-1, -2)
        units = indices if isinstance(granularity, Neuron) else _expand_heads(indices, granularity.head_dim)
        return _Region(name, param, view, _unit_index(units, tuple(view.shape[:-1]), param.device))
    raise TypeError(
        f"Unsupported granularity {granularity!r} for parameter {name!r}; expected Weight(), Neuron(axis), "
        "Head(head_dim, axis) or Layer() from peft_safety.mask."
    )


def _expand_heads(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head ids -> the ``head_dim`` consecutive row/column ids each head owns (h*d_h ... (h+1)*d_h - 1)."""
    heads = heads.to(torch.int64)
    return (heads[:, None] * head_dim + torch.arange(head_dim, dtype=torch.int64)[None, :]).reshape(-1)


def named_parameters_by_base_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter lookup by the names a mask uses, also inside a PEFT wrapper.

    A mask computed on the base model names ``model.layers.0.mlp.down_proj.weight``; once the model is wrapped by
    PEFT the same tensor is ``base_model.model.model.layers.0.mlp.down_proj.base_layer.weight``. Both spellings map
    to the same tensor here, so an intervention works before and after `get_peft_model`.
    """
    table: dict[str, torch.Tensor] = {}
    aliases: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        table[name] = param
        base = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if base != name:
            aliases.setdefault(base, param)
    for name, param in aliases.items():
        table.setdefault(name, param)
    return table


def _regions(model: nn.Module, mask: SafetyMask) -> list[_Region]:
    """The regions of ``model``'s parameters that ``mask`` selects (parameters without entries are skipped)."""
    from ..mask import SafetyMask

    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask must be a peft_safety.SafetyMask, got {type(mask).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    params = named_parameters_by_base_name(model)
    regions = []
    for name, indices in mask:
        if indices.numel() == 0:
            continue
        param = params.get(name)
        if param is None:
            raise ValueError(
                f"The mask selects parameter {name!r}, which the model does not have. Was the mask computed on "
                "another model? Check with mask.validate(model)."
            )
        expected = tuple(mask.shapes[name])
        if tuple(param.shape) != expected:
            raise ValueError(
                f"Parameter {name!r} has shape {tuple(param.shape)} in the model but {expected} in the mask. "
                "The mask was computed on a different model (or a sharded/quantized copy); recompute it or load the "
                "matching model."
            )
        if not param.is_floating_point():
            raise TypeError(
                f"Parameter {name!r} has dtype {param.dtype}; in-place interventions need floating-point weights. "
                "Quantized (e.g. bitsandbytes 4/8-bit) weights must be dequantized first."
            )
        regions.append(_region(name, param, mask.granularity_of(name), indices))
    return regions


@contextlib.contextmanager
def _edited(regions: list[_Region], edit) -> Iterator[None]:
    """Save every region, apply ``edit(region, saved) -> new values``, and always write the saved values back."""
    saved: list[tuple[_Region, torch.Tensor]] = []
    try:
        for region in regions:
            original = region.gather()
            saved.append((region, original))
            region.write(edit(region, original))
        yield
    finally:
        # reverse order, so that a parameter listed twice (aliases) ends with its oldest saved copy
        for region, original in reversed(saved):
            region.write(original)


# ---------------------------------------------------------------------------------------------------------------------
# context managers
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def zeroed(model: nn.Module, mask: SafetyMask) -> Iterator[nn.Module]:
    """Set the masked entries of ``model`` to zero inside the block (pruning), then restore them exactly.

    Args:
        model: the model to edit in place (a plain transformers model or a PEFT wrapper of it).
        mask: a `SafetyMask` of any granularity whose parameter names and shapes match ``model``.

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: if ``mask`` is not a `SafetyMask` or a masked parameter is not floating point.
        ValueError: if the mask names a parameter the model lacks, or with another shape.

    Example:

    ```python
    >>> with zeroed(model, mask):
    ...     logits = model(input_ids).logits
    ```
    """
    with _edited(_regions(model, mask), lambda region, original: torch.zeros_like(original)):
        yield model


@contextlib.contextmanager
def scaled(model: nn.Module, mask: SafetyMask, alpha: float) -> Iterator[nn.Module]:
    """Multiply the masked entries by ``alpha`` inside the block, then restore them exactly.

    The product is computed in fp32 and rounded once to the parameter dtype. Restoration copies the saved entries back
    (never divides by ``alpha``: ``(w * 1.2) / 1.2 != w`` in bf16). This is the Safety Layers over-rejection probe when
    ``mask`` is a layer mask.

    Args:
        model: the model to edit in place.
        mask: a `SafetyMask` of any granularity.
        alpha: the scale factor (finite; ``alpha > 1`` strengthens, ``alpha < 1`` weakens the masked entries).

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: if ``alpha`` is not a real number, or for the reasons of `zeroed`.
        ValueError: if ``alpha`` is not finite, or for the reasons of `zeroed`.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__} ({alpha!r}).")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}.")
    with _edited(_regions(model, mask), lambda region, original: original.float() * float(alpha)):
        yield model


@contextlib.contextmanager
def noised(model: nn.Module, mask: SafetyMask, rho: float, seed: int = 0) -> Iterator[nn.Module]:
    """Add Gaussian noise ``N(0, (rho * std(W))**2)`` to the masked entries inside the block, then restore them.

    This is ESI's perturbation probe (Qi et al. 2026 use ``rho = 0.38``): ``std(W)`` is the standard deviation of the
    **whole** parameter tensor, computed in fp32, so every entry of a tensor gets noise of the same scale. The noise is
    drawn on the CPU from one generator seeded with ``seed``, parameter by parameter in the mask's order, so the same
    ``(mask, rho, seed)`` perturbs the same entries by the same amounts on any device.

    Args:
        model: the model to edit in place.
        mask: a `SafetyMask` of any granularity.
        rho: noise scale relative to each tensor's standard deviation (``>= 0``).
        seed: seed of the noise.

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: if ``rho`` or ``seed`` has the wrong type, or for the reasons of `zeroed`.
        ValueError: if ``rho`` is negative or not finite, or for the reasons of `zeroed`.
    """
    if isinstance(rho, bool) or not isinstance(rho, int | float):
        raise TypeError(f"rho must be a real number, got {type(rho).__name__} ({rho!r}).")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r}).")
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def edit(region: _Region, original: torch.Tensor) -> torch.Tensor:
        std = region.param.detach().float().std() if region.param.numel() > 1 else torch.zeros(())
        noise = torch.randn(original.shape, generator=generator, dtype=torch.float32)
        return original.float() + noise.to(original.device) * (float(rho) * std.to(original.device))

    with _edited(_regions(model, mask), edit):
        yield model


def _reference_values(reference: Reference, region: _Region) -> torch.Tensor:
    """The reference's values at ``region`` (same shape as ``region.gather()``)."""
    if isinstance(reference, nn.Module):
        ref = named_parameters_by_base_name(reference).get(region.name)
        if ref is None:  # buffers can carry weights too (rare); fall back to the full state dict
            ref = reference.state_dict().get(region.name)
    elif isinstance(reference, Mapping):
        ref = reference.get(region.name)
    else:
        raise TypeError(
            f"reference must be a torch.nn.Module or a state dict (mapping name -> tensor), got "
            f"{type(reference).__name__}."
        )
    if ref is None:
        raise ValueError(
            f"The reference has no parameter {region.name!r}. Pass the model the mask was computed on (or its "
            "state_dict()), with the same parameter names."
        )
    if tuple(ref.shape) != tuple(region.param.shape):
        raise ValueError(
            f"Parameter {region.name!r} has shape {tuple(ref.shape)} in the reference but "
            f"{tuple(region.param.shape)} in the model; the reference must be the same architecture."
        )
    view = ref.detach() if region.view is region.param else ref.detach().movedim(-1, -2)
    index = region.index
    if index is not None and index[0].device != view.device:
        index = tuple(i.to(view.device) for i in index)
    values = view.clone() if index is None else view[index]
    return values.to(device=region.param.device, dtype=region.param.dtype)


@contextlib.contextmanager
def restored_from(model: nn.Module, reference: Reference, mask: SafetyMask) -> Iterator[nn.Module]:
    """Set the masked entries to a reference model's values inside the block, then restore the model's own values.

    With ``model`` a fine-tuned model and ``reference`` the aligned model it started from, this is Wei et al.'s
    rewind ("recover from base"): does putting back only the safety-critical entries restore the refusals?

    Args:
        model: the model to edit in place.
        reference: the reference model (``nn.Module``) or its state dict, with the mask's parameter names; its values
            are cast to each parameter's dtype and device.
        mask: a `SafetyMask` of any granularity.

    Returns:
        A context manager yielding ``model``.

    Raises:
        TypeError: if ``reference`` is neither a module nor a mapping, or for the reasons of `zeroed`.
        ValueError: if the reference lacks a masked parameter or has it with another shape, or for the reasons of
            `zeroed`.
    """
    with _edited(_regions(model, mask), lambda region, original: _reference_values(reference, region)):
        yield model


def rewind_(model: nn.Module, reference: Reference, mask: SafetyMask) -> int:
    """Permanently set the masked entries of ``model`` to a reference's values (in place).

    The permanent form of `restored_from`: after fine-tuning without restriction, copy the aligned model's values back
    into the mask (Wei et al.'s freeze emulation, ``rewind_ft_model.py``). Every value is checked before anything is
    written, so a missing or mis-shaped reference parameter leaves the model untouched.

    Args:
        model: the model to edit in place.
        reference: the reference model or its state dict.
        mask: a `SafetyMask` of any granularity.

    Returns:
        The number of weight entries written.

    Raises:
        TypeError, ValueError: as `restored_from`.

    Example:

    ```python
    >>> n = rewind_(finetuned, aligned, mask)
    >>> mask_drift(finetuned, aligned, mask)["masked_norm"]
    0.0
    ```
    """
    regions = _regions(model, mask)
    values = [_reference_values(reference, region) for region in regions]
    for region, value in zip(regions, values):
        region.write(value)
    return sum(region.numel() for region in regions)


def mask_drift(model: nn.Module, reference: Reference, mask: SafetyMask) -> dict[str, Any]:
    """How far the masked and the unmasked entries of ``model`` moved away from ``reference``.

    For every parameter in ``mask.shapes`` (the parameters the mask was computed over, selected or not), with
    ``dW = W_model - W_reference`` in fp32: the Frobenius norm of ``dW`` on the masked entries and on the rest, the
    entry counts, and the RMS per entry (norm / sqrt(count): the masked part is usually tiny, so compare RMS, not
    norms). Squares are summed in float64. Memory: one parameter's ``dW`` at a time.

    Args:
        model: the model after fine-tuning (or any edit).
        reference: the model (or state dict) before.
        mask: a `SafetyMask` of any granularity.

    Returns:
        A dict with ``masked_norm``, ``unmasked_norm``, ``masked_rms``, ``unmasked_rms``, ``masked_max_abs``,
        ``masked_numel``, ``unmasked_numel`` over all parameters, and ``per_parameter``: ``{name: {the same keys}}``.
        Plain Python numbers, ready for ``json.dumps``.

    Raises:
        TypeError, ValueError: as `restored_from`.
    """
    regions = {region.name: region for region in _regions(model, mask)}
    params = named_parameters_by_base_name(model)
    per_parameter: dict[str, dict[str, float | int]] = {}
    totals = {"masked_sq": 0.0, "unmasked_sq": 0.0, "masked_numel": 0, "unmasked_numel": 0, "masked_max_abs": 0.0}
    for name in mask.shapes:
        param = params.get(name)
        if param is None:
            raise ValueError(f"The mask lists parameter {name!r}, which the model does not have.")
        full = _Region(name, param, param, None)
        delta = param.detach().float() - _reference_values(reference, full).float()
        total_sq = float(delta.double().square().sum())
        region = regions.get(name)
        if region is None:
            masked_sq, masked_numel, masked_max = 0.0, 0, 0.0
        else:
            dview = delta if region.view is region.param else delta.movedim(-1, -2)
            dmasked = dview if region.index is None else dview[region.index]
            masked_sq = float(dmasked.double().square().sum())
            masked_numel = dmasked.numel()
            masked_max = float(dmasked.abs().max()) if dmasked.numel() else 0.0
        unmasked_sq = max(total_sq - masked_sq, 0.0)  # clamp the float cancellation of an unmoved rest
        unmasked_numel = param.numel() - masked_numel
        per_parameter[name] = _drift_row(masked_sq, unmasked_sq, masked_numel, unmasked_numel, masked_max)
        totals["masked_sq"] += masked_sq
        totals["unmasked_sq"] += unmasked_sq
        totals["masked_numel"] += masked_numel
        totals["unmasked_numel"] += unmasked_numel
        totals["masked_max_abs"] = max(totals["masked_max_abs"], masked_max)
    result: dict[str, Any] = _drift_row(
        totals["masked_sq"],
        totals["unmasked_sq"],
        int(totals["masked_numel"]),
        int(totals["unmasked_numel"]),
        totals["masked_max_abs"],
    )
    result["per_parameter"] = per_parameter
    return result


def _drift_row(masked_sq: float, unmasked_sq: float, masked_numel: int, unmasked_numel: int, masked_max: float):
    return {
        "masked_norm": math.sqrt(masked_sq),
        "unmasked_norm": math.sqrt(unmasked_sq),
        "masked_rms": math.sqrt(masked_sq / masked_numel) if masked_numel else 0.0,
        "unmasked_rms": math.sqrt(unmasked_sq / unmasked_numel) if unmasked_numel else 0.0,
        "masked_max_abs": masked_max,
        "masked_numel": masked_numel,
        "unmasked_numel": unmasked_numel,
    }
