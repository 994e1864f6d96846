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

from ..vocab import base_name, check_mode

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


def named_parameters_by_base_name(model: nn.Module, *, remove_duplicate: bool = False) -> dict[str, torch.Tensor]:
    """Parameter lookup by the names a mask uses, also inside a PEFT or DDP wrapper.

    A mask computed on the base model names ``model.layers.0.mlp.down_proj.weight``; once the model is wrapped by
    PEFT the same tensor is ``base_model.model.model.layers.0.mlp.down_proj.base_layer.weight``. Both spellings map
    to the same tensor here (`peft_safety.vocab.base_name` strips the wrappers), so an intervention works before and
    after `get_peft_model`. A name that is both a raw and a base name keeps its raw tensor.

    Args:
        model: the model.
        remove_duplicate: list a tensor shared by several modules (tied embeddings) under its first name only, as
            ``model.named_parameters()`` does by default.
    """
    table: dict[str, torch.Tensor] = {}
    aliases: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        table[name] = param
        base = base_name(name)
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


def _reference_tensor(reference: Reference, name: str) -> torch.Tensor | None:
    """The reference's tensor named ``name`` (a mask name), or None."""
    if isinstance(reference, nn.Module):
        ref = named_parameters_by_base_name(reference).get(name)
        if ref is None:  # buffers can carry weights too (rare); fall back to the full state dict
            ref = reference.state_dict().get(name)
        return ref
    if isinstance(reference, Mapping):
        return reference.get(name)
    raise TypeError(
        f"reference must be a torch.nn.Module or a state dict (mapping name -> tensor), got {type(reference).__name__}."
    )


def _reference_values(reference: Reference, region: _Region) -> torch.Tensor:
    """The reference's values at ``region`` (same shape as ``region.gather()``)."""
    ref = _reference_tensor(reference, region.name)
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


def _modules_by_base_name(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        out.setdefault(base_name(name), module)
    return out


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight of a (PEFT tuner) layer, dequantized when bitsandbytes packs it."""
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
def _effective_update(module: nn.Module) -> torch.Tensor | None:
    """``W_eff - W`` of an unmerged PEFT tuner layer, measured through its forward; None for other modules.

    ``nn.Linear``: row ``j`` of ``layer(I) - base(I)`` is column ``j`` of the update (the identity fed in chunks of at
    most 2**22 output values); ``nn.Embedding``: every token id. In the layer's own dtype, with dropout off. Whatever
    the layer's forward does (masked or not, sparse or dense) is what is measured, not what its merge helper would
    produce.
    """
    if not hasattr(module, "get_base_layer") or not hasattr(module, "active_adapters"):
        return None
    if getattr(module, "merged", False):
        return None  # merged into the base weight: only a reference copy can tell
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    device = weight.device
    dtype = weight.dtype if weight.dtype.is_floating_point else (getattr(base, "compute_dtype", None) or torch.float32)
    # Dropout off without module.eval(): an eval-mode forward repacks bitsandbytes 4-bit weights for good.
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


def _forward_tolerance(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(per-entry bound, merged delta)`` of a layer whose forward is exact only up to rounding, else ``(None, None)``."""
    bound_of = getattr(module, "forward_tolerance", None)
    bound = bound_of() if callable(bound_of) else None
    if bound is None:
        return None, None
    return bound, _adapter_delta(module)


def _violations(
    delta: torch.Tensor,
    dense: torch.Tensor,
    mode: str,
    tolerance: torch.Tensor | None,
    merged: torch.Tensor | None,
) -> int:
    """Entries that must stay unchanged and moved: a non-zero effective update, or, for a layer with a
    ``tolerance``, one above it or a non-zero merged delta."""
    frozen = dense if mode == "freeze" else ~dense
    if tolerance is None:
        return int(torch.count_nonzero(delta[frozen]))
    moved = delta[frozen].abs() > tolerance.to(delta.device).reshape(dense.shape)[frozen]
    if merged is not None:
        moved |= merged.to(delta.device).reshape(dense.shape)[frozen] != 0
    return int(moved.sum())


@torch.no_grad()
def mask_drift(
    model: nn.Module,
    reference: Reference | None,
    mask: SafetyMask,
    *,
    mode: str | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """How far the masked and the unmasked entries of ``model`` moved away from ``reference``: the one definition of
    drift (the trainer's ``safety/masked_drift``, ``safety/unmasked_drift`` and ``safety/violations`` are read from it).

    For every parameter in ``mask.shapes`` (the parameters the mask was computed over, selected or not) the update
    ``dW`` is, for a PEFT tuner layer with an unmerged adapter, its **effective** update measured through its forward
    (the adapted layer and its base layer run on an identity input, dropout off: a forward that leaks through the mask
    is caught even when the merge helper would mask the delta), against ``W0`` = its base weight (no copy needed);
    for any other parameter ``W_model - W_reference`` (skipped when ``reference`` is `None`). With the parameter's
    mask in dense form (one tensor at a time), in fp32 with float64 sums:

    * ``masked_norm`` / ``unmasked_norm``: ``||dW[mask]||`` and ``||dW[~mask]||``;
    * ``masked_rms`` / ``unmasked_rms``: the norm per entry (``norm / sqrt(count)``: the masked part is usually tiny,
      so compare RMS, not norms);
    * ``masked_relative`` / ``unmasked_relative``: ``||dW[mask]|| / ||W0[mask]||`` and ``||dW[~mask]|| /
      ||W0[~mask]||`` (0 where ``W0`` is 0);
    * ``masked_max_abs``, ``masked_numel``, ``unmasked_numel``;
    * with ``mode``: ``violations``, the number of entries that must stay unchanged and did not (the mask's in
      ``"freeze"`` mode, the rest of each covered tensor in ``"train_only"`` mode): for adapters an entry whose
      effective update is not exactly zero. A layer whose forward is exact only up to rounding says so through a
      ``forward_tolerance()`` method (masked LoRA's ``"sparse"`` entry path): there an entry violates when its
      effective update exceeds that per-entry bound, or when the delta a merge would add
      (``get_delta_weight``) is not exactly zero on it: the merged weights are held to bit-exactness, the training
      forward to its rounding bound.

    Args:
        model: the model after fine-tuning (or any edit): plain, or wrapped by PEFT or DDP.
        reference: the model (or state dict) before, in the mask's names; `None` measures adapter updates only.
        mask: a `SafetyMask` of any granularity.
        mode: ``"freeze"`` or ``"train_only"``, to count ``violations``.
        strict: raise when the model (or a given reference) lacks a parameter of the mask; `False` skips it (the
            trainer's logs, where a sharded wrapper may hide a parameter).

    Returns:
        The totals above over all parameters, and ``per_parameter``: ``{name: {the same keys}}``. Plain Python
        numbers, ready for ``json.dumps``.

    Raises:
        TypeError: a reference that is neither a module nor a mapping; a mode that is not a string.
        ValueError: a missing parameter (with ``strict``), a parameter whose shape differs from the mask's, an
            unknown mode.
    """
    from ..mask import SafetyMask

    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask must be a peft_safety.SafetyMask, got {type(mask).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if mode is not None:
        check_mode(mode)
    if isinstance(reference, nn.Module):  # one lookup table instead of one per parameter
        reference = {**reference.state_dict(), **named_parameters_by_base_name(reference)}
    elif reference is not None and not isinstance(reference, Mapping):
        _reference_tensor(reference, "")  # raises the TypeError naming the type
    modules = _modules_by_base_name(model)
    params = named_parameters_by_base_name(model)
    keys = ("dm", "du", "wm", "wu", "nm", "nu", "max", "violations")
    totals = dict.fromkeys(keys, 0.0)
    per_parameter: dict[str, dict[str, float | int]] = {}
    for name, shape in mask.shapes.items():
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        delta = _effective_update(module) if module is not None and leaf == "weight" else None
        tolerance = merged = None
        if delta is not None:
            w0 = _base_weight(module)
            tolerance, merged = _forward_tolerance(module)
        else:
            param = params.get(name)
            ref = None if reference is None else _reference_tensor(reference, name)
            if param is None or (reference is not None and ref is None):
                if strict:
                    where = "model" if param is None else "reference"
                    raise ValueError(
                        f"The mask lists parameter {name!r}, which the {where} does not have. Pass the model the mask "
                        "was computed on (or its state_dict()), with the same parameter names."
                    )
                continue
            if ref is None:
                continue  # full weights without a reference: nothing to compare with
            if tuple(ref.shape) != tuple(param.shape):
                raise ValueError(
                    f"Parameter {name!r} has shape {tuple(ref.shape)} in the reference but {tuple(param.shape)} in "
                    "the model; the reference must be the same architecture."
                )
            w0 = ref.detach()
            delta = param.detach().float() - w0.to(param.device).float()
        if delta.numel() != math.prod(shape):
            raise ValueError(
                f"Parameter {name!r} has {delta.numel()} entries in the model but shape {tuple(shape)} in the mask; "
                "the mask was computed on a different model."
            )
        dense = mask.to_dense(name, device=delta.device)
        delta = delta.float().reshape(dense.shape)
        w0 = w0.detach().to(delta.device).float().reshape(dense.shape)
        row = {
            "dm": float(delta[dense].double().square().sum()),
            "du": float(delta[~dense].double().square().sum()),
            "wm": float(w0[dense].double().square().sum()),
            "wu": float(w0[~dense].double().square().sum()),
            "nm": int(dense.sum()),
            "nu": dense.numel() - int(dense.sum()),
            "max": float(delta[dense].abs().max()) if bool(dense.any()) else 0.0,
            "violations": _violations(delta, dense, mode, tolerance, merged) if mode else 0,
        }
        per_parameter[name] = _drift_row(row, mode)
        for key in keys:
            totals[key] = max(totals[key], row[key]) if key == "max" else totals[key] + row[key]
    result: dict[str, Any] = _drift_row(totals, mode)
    result["per_parameter"] = per_parameter
    return result


def _drift_row(acc: Mapping[str, float], mode: str | None) -> dict[str, float | int]:
    def ratio(num: float, den: float) -> float:
        return math.sqrt(num / den) if den > 0 else 0.0

    row: dict[str, float | int] = {
        "masked_norm": math.sqrt(acc["dm"]),
        "unmasked_norm": math.sqrt(acc["du"]),
        "masked_rms": ratio(acc["dm"], acc["nm"]),
        "unmasked_rms": ratio(acc["du"], acc["nu"]),
        "masked_relative": ratio(acc["dm"], acc["wm"]),
        "unmasked_relative": ratio(acc["du"], acc["wu"]),
        "masked_max_abs": acc["max"],
        "masked_numel": int(acc["nm"]),
        "unmasked_numel": int(acc["nu"]),
    }
    if mode is not None:
        row["violations"] = int(acc["violations"])
    return row
