"""SET layers: a frozen ``nn.Linear`` (dense or bitsandbytes-quantised) plus trainable deltas at a mask's entries.

How a module's mask entries are stored depends on the storage kind (``peft_safety.tuner._layout``):

| kind | ``safety_indices`` (int32, persistent) | ``safety_values`` (trainable) |
|---|---|---|
| ``"entries"`` | sorted flat indices ``i * d_in + j`` | 1-D, one value per entry |
| ``"rows"`` | sorted row indices | ``(n_rows, d_in)`` dense rows |
| ``"cols"`` | sorted column indices | ``(d_out, n_cols)`` dense columns |
| ``"whole"`` | ``[0]`` | ``(d_out, d_in)``: the whole weight is trainable |

Forward, for an input ``x`` and frozen weight ``W``:

* ``entries`` on a float32/float64 base: ``_FoldedDeltaLinear``, a custom autograd function computing
  ``x @ (W + scatter(v))ᵀ`` in one matmul of the layer's size. The delta is folded into ``W``'s own storage at its
  ``nnz`` positions for the one matmul (forward, and again for the input gradient), and the original entries, read
  just before, are written back right after it (also on an exception; one process-wide lock, so threads never
  interleave folds): O(nnz) extra work and memory instead of a weight-sized copy, ``W`` bit-identical afterwards
  (tested), autograd's version counter of ``W`` untouched. A weight that cannot be written as a flat view (a
  non-contiguous, meta or tensor-subclass weight) gets a transient copy instead. The value gradient is a sampled
  matmul (SDDMM): for each index pair ``(r, c)``, ``sum_t grad_out[t, r] * x[t, c]``, without any weight-sized
  gradient (``_sparse.EntryPattern.sample``). ``gradient_method="dense"`` in the config selects the documented
  fallback ``(grad_outᵀ x)[r, c]`` (one transient weight-sized buffer).
* ``entries`` on a bf16/fp16 base, or under ``torch.autocast`` (which would run the folded matmul in bf16/fp16):
  ``base_layer(x) + x @ scatter(v)ᵀ``, the delta's contribution computed sparsely
  (``_SparseDelta``: O(nnz * tokens) in fp32, ``_sparse.EntryPattern``; no second matmul of the layer's size).
  Folding the delta into a half-precision ``W`` would round away every delta below half of ``W``'s rounding step; in
  the separate pass the delta is rounded relative to itself, so the output and the input gradient equal
  ``(W + delta)`` applied in fp64 within the dtype's rounding.
* ``entries`` on a quantised base (bitsandbytes 4/8-bit): ``base_layer(x) + x @ scatter(v)ᵀ`` likewise, so the
  quantised kernel is used for the frozen part.
* ``rows``/``cols``/``whole``: plain autograd on small tensors, ``y = base_layer(x)`` then
  ``y[..., rows] += x @ Vᵀ``, ``y += x[..., cols] @ Vᵀ`` or ``y += x @ Vᵀ``. No weight-sized temporary for rows and
  columns; a ``Layer()`` mask trains the whole weight, so its delta is weight-sized by definition.

Merging adds the delta into the base weight in place, touching only the masked positions (entries outside the mask
stay bit-identical). Merging into a bf16/fp16 weight rounds ``W + delta`` to that dtype: deltas below half the
weight's rounding step are lost; ``merge_rounding_loss`` counts them and a warning says so. Merging into a
bitsandbytes 4-bit weight dequantises, adds and re-quantises the **whole** tensor, which is lossy: ship such adapters
unmerged. Measurements of these paths are in ``docs/tuner.md`` (from ``benchmarks/set_adapter.py``).
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .._layout import SET_KINDS, check_indices
from .._sparse import EntryPattern, compute_dtype

__all__ = ["SafetyLayer", "SafetyLinear", "sampled_matmul", "values_shape"]

#: Held while an entry-wise delta is folded into a base weight in place (`_folded`): one fold at a time per process, so
#: two threads running the same layer never see (or restore) each other's fold.
_FOLD_LOCK = threading.Lock()


def sampled_matmul(
    grad_out: torch.Tensor, x: torch.Tensor, flat_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Entries of ``grad_outᵀ @ x`` at the given flat positions, without forming the full product (SDDMM).

    Args:
        grad_out: ``(T, d_out)`` output gradient (tokens flattened).
        x: ``(T, d_in)`` input.
        flat_indices: 1-D **sorted** integer tensor of flat positions ``r * d_in + c`` into a ``(d_out, d_in)`` matrix.
        in_features: ``d_in``.

    Returns:
        A 1-D tensor ``g`` with ``g[k] = sum_t grad_out[t, r_k] * x[t, c_k]`` (fp32 for half-precision operands).
        Memory is O(nnz + T * chunk), never O(d_out * d_in). See `EntryPattern.sample`.
    """
    pattern = EntryPattern(flat_indices, grad_out.shape[1], in_features)
    return pattern.sample(grad_out.t().contiguous(), x.t().contiguous())


@contextmanager
def _folded(weight: torch.Tensor, pattern: EntryPattern, values: torch.Tensor):
    """``W + scatter(values)`` for the duration of the block, written into ``weight``'s storage at the ``nnz`` masked
    positions only, then the original entries, read just before, written back (bit-exact, also on an exception);
    yields the folded weight. Falls back to a transient weight-sized copy where ``weight`` cannot be written as a flat
    view (a non-contiguous, meta or tensor-subclass weight)."""
    data = weight.data  # a fresh version counter: the fold does not invalidate autograd's saved references to W
    idx = pattern.flat
    if not (data.is_contiguous() and type(data) is torch.Tensor and data.device.type != "meta"):
        yield data.reshape(-1).clone().index_add_(0, idx, values.to(data.dtype)).view(data.shape)
        return
    flat = data.view(-1)
    with _FOLD_LOCK:
        saved = flat.index_select(0, idx)
        try:
            # scatter_ with unique indices is a plain copy: each masked entry becomes exactly fl(W + v)
            flat.scatter_(0, idx, saved + values.to(data.dtype))
            yield data
        finally:
            flat.scatter_(0, idx, saved)


class _FoldedDeltaLinear(torch.autograd.Function):
    """``x @ (W + scatter(v))ᵀ`` in one matmul of the layer's size, for float32/float64 base weights.

    The delta is folded into ``W`` in place at its ``nnz`` positions for the one matmul and the original entries are
    written back from a saved copy (`_folded`): O(nnz) extra work and memory instead of a weight-sized copy, and ``W``
    is bit-identical afterwards. Backward folds again for ``grad_x = g (W + scatter(v))``; the value gradient is the
    SDDMM ``(gᵀ x)`` at the entries (`EntryPattern.sample`), or with ``method="dense"`` the full ``gᵀ x`` gathered.
    Saved for backward: ``x`` (which the matmul needs anyway), ``v`` and a reference to the frozen ``W`` (no copy).
    """

    @staticmethod
    def forward(ctx, x, values, weight, pattern, method):
        with _folded(weight, pattern, values) as merged:
            y = F.linear(x.to(weight.dtype), merged)
        ctx.save_for_backward(x, values)
        ctx.weight, ctx.pattern, ctx.method = weight, pattern, method
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values = ctx.saved_tensors
        weight, pattern = ctx.weight, ctx.pattern
        dtype = weight.dtype
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        grad_x = grad_v = grad_w = None
        if ctx.needs_input_grad[0]:
            with _folded(weight, pattern, values) as merged:
                grad_x = (g2 @ merged).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_v = _value_gradient(g2, x2, pattern, ctx.method).to(values.dtype)
        if ctx.needs_input_grad[2]:
            # Only reached when a user unfreezes the base weight on purpose.
            grad_w = (g2.t() @ x2).to(weight.dtype)
        return grad_x, grad_v, grad_w, None, None


class _SparseDelta(torch.autograd.Function):
    """``x @ scatter(v)ᵀ``, the delta's contribution alone, in O(nnz · tokens): `EntryPattern.rows_product` on
    ``xᵀ`` in forward, `EntryPattern.cols_product` on ``gᵀ`` and the SDDMM in backward; no weight-sized tensor.

    For bases where folding would round the delta away (bf16/fp16) or cannot be done (quantised): computed in fp32
    (fp64 for fp64), so each delta is rounded relative to itself, never to ``W``; the caller adds it to the base
    output. Saved for backward: ``x`` and ``v``.
    """

    @staticmethod
    def forward(ctx, x, values, pattern, method):
        dtype = compute_dtype(x.dtype, values.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out = pattern.rows_product(values.to(dtype), x2.t().contiguous())  # (d_out, tokens)
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.method = pattern, method
        return out.t().reshape(*x.shape[:-1], out.shape[0])

    @staticmethod
    def backward(ctx, grad_c):
        x, values = ctx.saved_tensors
        pattern = ctx.pattern
        dtype = compute_dtype(x.dtype, values.dtype)
        g2 = grad_c.reshape(-1, grad_c.shape[-1]).to(dtype)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = pattern.cols_product(values.to(dtype), g2.t().contiguous()).t()
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_v = _value_gradient(g2, x2, pattern, ctx.method).to(values.dtype)
        return grad_x, grad_v, None, None


def _value_gradient(g2: torch.Tensor, x2: torch.Tensor, pattern: EntryPattern, method: str) -> torch.Tensor:
    """``(g2ᵀ x2)`` at the pattern's entries: sampled (default) or ``"dense"`` (the full product, then gathered)."""
    if method == "dense":
        return (g2.t() @ x2).reshape(-1).index_select(0, pattern.flat)
    return pattern.sample(g2.t().contiguous(), x2.t().contiguous())


def values_shape(kind: str, n: int, shape: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the trainable deltas of ``n`` indices of ``kind`` on a ``(d_out, d_in)`` weight."""
    out_features, in_features = shape
    return {"entries": (n,), "rows": (n, in_features), "cols": (out_features, n)}.get(
        kind, (out_features, in_features)
    )


def _nan_message(adapter_name: str) -> str:
    # worded like PEFT's other tuners (peft/tuners/lora/layer.py), which callers and PEFT's test battery match on
    return f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError):  # devices without autocast support
        return False


def _fold_keeps_delta(weight_dtype: torch.dtype, values_dtype: torch.dtype) -> bool:
    """Whether ``W + delta`` can be formed in the weight's dtype without rounding the delta away (fp32/fp64 only)."""
    return weight_dtype in (torch.float32, torch.float64) and weight_dtype.itemsize >= values_dtype.itemsize


class SafetyLayer(BaseTunerLayer):
    """Mixin holding the per-adapter SET state of one wrapped module (see the module docstring for the layout)."""

    adapter_layer_names = ("safety_values",)
    other_param_names = ("safety_indices", "safety_kind", "safety_gradient_method")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.safety_values = nn.ParameterDict({})
        # persistent=True: PEFT's BufferDict defaults to non-persistent, which would silently drop the indices from
        # adapter_model.safetensors (peft's BufferDict defaults to persistent=False).
        self.safety_indices = BufferDict({}, persistent=True)
        self.safety_kind: dict[str, str] = {}
        self.safety_gradient_method: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        #: adapter -> (non-zero deltas rounded away, non-zero deltas) of its last merge into a bf16/fp16 weight
        self.merge_rounding_loss: dict[str, tuple[int, int]] = {}
        from peft.utils.quantization_utils import resolve_quantization_backend

        base = self.get_base_layer()
        self.quantization_backend = resolve_quantization_backend(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            in_features, out_features = _get_in_out_features(base)
        self.in_features = in_features
        self.out_features = out_features

    def update_layer(
        self,
        adapter_name: str,
        *,
        kind: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        values_dtype: torch.dtype = torch.float32,
        gradient_method: str = "sampled",
        inference_mode: bool = False,
    ) -> None:
        """Create (or replace) the delta of ``adapter_name`` on this module.

        Args:
            adapter_name: the adapter's name.
            kind: a storage kind (``SET_KINDS``).
            indices: 1-D sorted unique integer tensor in the unit of ``kind``.
            init_weights: zero deltas (identity) if True, small random deltas otherwise.
            values_dtype: dtype of the trainable deltas.
            gradient_method: ``"sampled"`` or ``"dense"`` (entries only).
            inference_mode: create the deltas frozen.

        Raises:
            ValueError: for an unknown kind, or indices that break the index rule of ``_layout.check_indices``
                (1-D, non-empty, strictly increasing, inside the weight).
        """
        if kind not in SET_KINDS:
            raise ValueError(f"Unknown storage kind {kind!r}; expected one of {list(SET_KINDS)}.")
        indices = torch.as_tensor(indices)
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices for adapter {adapter_name!r} must be integers, got {indices.dtype}.")
        shape = (self.out_features, self.in_features)
        check_indices(indices.to(torch.int64), kind, shape, f"indices of adapter {adapter_name!r} ({kind})")
        weight = self.get_base_layer().weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        # int64 only when a weight has >= 2**31 entries (same rule as SafetyMask).
        index_dtype = torch.int64 if self.out_features * self.in_features >= 2**31 else torch.int32
        self.safety_indices[adapter_name] = indices.to(device=device, dtype=index_dtype)
        self.__dict__.get("_entry_patterns", {}).pop(adapter_name, None)
        size = values_shape(kind, indices.numel(), shape)
        if init_weights:
            values = torch.zeros(size, dtype=values_dtype, device=device)
        else:
            values = (torch.randn(size, dtype=torch.float32, device=device) * 0.02).to(values_dtype)
        self.safety_values[adapter_name] = nn.Parameter(values)
        self.safety_kind[adapter_name] = kind
        self.safety_gradient_method[adapter_name] = gradient_method
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if values_dtype == torch.float32:
            # _move_adapter_to_device_of_base_layer casts float adapter tensors to the base dtype (e.g. bf16); keep
            # fp32 deltas fp32 so small updates are not rounded away.
            self.safety_values[adapter_name].data = self.safety_values[adapter_name].data.float()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def resize_adapter_(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Replace the indices of ``adapter_name`` with ``indices`` of another size, re-creating its values.

        Used when loading a checkpoint whose mask differs in size from the placeholder. The values parameter is
        re-created only when its shape changes (a new parameter object invalidates optimizer references).
        """
        kind = self.safety_kind[adapter_name]
        shape = values_shape(kind, indices.numel(), (self.out_features, self.in_features))
        old = self.safety_values[adapter_name]
        self.safety_indices[adapter_name] = indices.to(self.safety_indices[adapter_name].device)
        self.__dict__.get("_entry_patterns", {}).pop(adapter_name, None)
        if tuple(old.shape) != shape:
            self.safety_values[adapter_name] = nn.Parameter(
                torch.zeros(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` delta of ``adapter_name`` in the values' dtype (for inspection and merging)."""
        values = self.safety_values[adapter_name]
        idx = self.safety_indices[adapter_name].to(torch.int64)
        shape = (self.out_features, self.in_features)
        kind = self.safety_kind[adapter_name]
        delta = torch.zeros(shape, dtype=values.dtype, device=values.device)
        if kind == "entries":
            delta.view(-1).index_add_(0, idx, values.detach())
        elif kind == "rows":
            delta[idx] = values.detach()
        elif kind == "cols":
            delta[:, idx] = values.detach()
        else:
            delta.copy_(values.detach())
        return delta

    def _masked_values(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """A copy of ``weight`` at the masked positions of ``adapter_name`` (shaped like its values)."""
        idx = self.safety_indices[adapter_name].to(device=weight.device, dtype=torch.int64)
        kind = self.safety_kind[adapter_name]
        if kind == "entries":
            return weight.reshape(-1).index_select(0, idx)
        if kind == "rows":
            return weight.index_select(0, idx)
        if kind == "cols":
            return weight.index_select(1, idx)
        return weight.clone()

    def _apply_delta_(self, weight: torch.Tensor, adapter_name: str, sign: float) -> None:
        """Add ``sign * delta`` to ``weight`` in place, touching only the masked positions."""
        values = self.safety_values[adapter_name].detach().to(weight.dtype)
        if sign < 0:
            values = -values
        idx = self.safety_indices[adapter_name].to(device=weight.device, dtype=torch.int64)
        kind = self.safety_kind[adapter_name]
        if kind == "entries":
            weight.view(-1).index_add_(0, idx, values)
        elif kind == "rows":
            weight.index_add_(0, idx, values)
        elif kind == "cols":
            weight.index_add_(1, idx, values)
        else:
            weight.add_(values)


class SafetyLinear(nn.Module, SafetyLayer):
    """A SET adapter on an ``nn.Linear`` (or a bitsandbytes ``Linear4bit``/``Linear8bitLt``) base layer.

    Args:
        base_layer: the module to wrap.
        adapter_name: name of the first adapter.
        kind / indices / init_weights / values_dtype / gradient_method / inference_mode: see
            ``SafetyLayer.update_layer``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        SafetyLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas into the base weight.

        Args:
            safe_merge: compute on a copy and check for non-finite values before writing.
            adapter_names: adapters to merge (default: the active ones).

        Raises:
            ValueError: if ``safe_merge`` finds NaN/inf in the merged weight.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.safety_values:
                continue
            if self.quantization_backend is not None:
                # Dequantise, add, re-quantise: lossy for 4-bit (the whole tensor is re-quantised).
                weight = self.get_base_weight().clone()
                self._apply_delta_(weight, name, +1.0)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(_nan_message(name))
                self.set_base_weight(weight)
            else:
                base = self.get_base_layer().weight
                before = None if _fold_keeps_delta(base.dtype, torch.float32) else self._masked_values(base.data, name)
                if safe_merge:
                    weight = base.data.clone()
                    self._apply_delta_(weight, name, +1.0)
                    if not torch.isfinite(weight).all():
                        raise ValueError(_nan_message(name))
                    base.data.copy_(weight)
                else:
                    self._apply_delta_(base.data, name, +1.0)
                if before is not None:
                    self._record_rounding_loss(name, before, self._masked_values(base.data, name))
            self.merged_adapters.append(name)

    def _record_rounding_loss(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        values = self.safety_values[name].detach().to(after.device)
        nonzero = values != 0
        lost = int((nonzero & (after == before)).sum())
        self.merge_rounding_loss[name] = (lost, int(nonzero.sum()))
        if lost:
            warnings.warn(
                f"Merging a SAFETY adapter into {str(before.dtype).removeprefix('torch.')} base weights rounded "
                "away deltas smaller than half the weight's rounding step (the layer's `merge_rounding_loss` counts "
                "them). The unmerged adapter applies them without this loss: keep the adapter unmerged, or merge "
                "into a float32 copy of the base model.",
                UserWarning,
                stacklevel=3,
            )

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight (exact up to fp rounding of ``W + d - d``)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.safety_values:
                continue
            if self.quantization_backend is not None:
                weight = self.get_base_weight().clone()
                self._apply_delta_(weight, name, -1.0)
                self.set_base_weight(weight)
            else:
                self._apply_delta_(self.get_base_layer().weight.data, name, -1.0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(
                "Mixed-batch inference (adapter_names=...) is not supported by SAFETY adapters; use "
                "set_adapter(...) to switch adapters."
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.safety_values]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)

        base = self.get_base_layer()
        entries = [a for a in active if self.safety_kind[a] == "entries"]
        others = [a for a in active if self.safety_kind[a] != "entries"]
        fold_first = (
            bool(entries)
            and self.quantization_backend is None
            and not args
            and not kwargs
            and _fold_keeps_delta(base.weight.dtype, self.safety_values[entries[0]].dtype)
            and not _autocast_on(x.device.type)  # autocast would run the folded matmul in bf16/fp16: deltas lost
        )
        if fold_first:
            # Fold the first entry-wise delta into the frozen matmul (one matmul, no separate pass). Only for
            # fp32/fp64 weights: in bf16/fp16, W + delta would round the delta away wherever it is below half the
            # weight's rounding step, so there the delta takes the sparse pass below (rounded relative to itself).
            first = entries.pop(0)
            result = _FoldedDeltaLinear.apply(
                x,
                self.safety_values[first],
                base.weight,
                self._entry_pattern(first),
                self.safety_gradient_method[first],
            )
            if base.bias is not None:
                result = result + base.bias.to(result.dtype)
        else:
            result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in entries:
            with torch.autocast(device_type=x.device.type, enabled=False):  # computed in fp32 whatever autocast says
                delta = _SparseDelta.apply(
                    x, self.safety_values[name], self._entry_pattern(name), self.safety_gradient_method[name]
                )
            result = result + delta.to(out_dtype)
        for name in others:
            values = self.safety_values[name]
            idx = self.safety_indices[name].to(torch.int64)
            xd = x.to(values.dtype)
            kind = self.safety_kind[name]
            if kind == "rows":
                result = result.index_add(-1, idx, F.linear(xd, values).to(out_dtype))
            elif kind == "cols":
                result = result + F.linear(xd.index_select(-1, idx), values).to(out_dtype)
            else:
                result = result + F.linear(xd, values).to(out_dtype)
        return result

    def _entry_pattern(self, adapter_name: str) -> EntryPattern:
        """The cached index structure of an entry-wise adapter (rebuilt when its indices move or are overwritten)."""
        idx = self.safety_indices[adapter_name]
        key = (idx.device, idx.data_ptr(), idx._version, idx.numel())
        cache = self.__dict__.setdefault("_entry_patterns", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, EntryPattern(idx, self.out_features, self.in_features))
            cache[adapter_name] = cached
        return cached[1]

    def __repr__(self) -> str:
        return "safety." + super().__repr__()
