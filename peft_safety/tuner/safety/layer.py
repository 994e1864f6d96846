"""SET layers: a frozen ``nn.Linear`` (dense or bitsandbytes-quantised) plus trainable deltas at a mask's entries.

How a module's mask entries are stored depends on the storage kind (``peft_safety.tuner._layout``):

| kind | ``safety_indices`` (int32, persistent) | ``safety_values`` (trainable) |
|---|---|---|
| ``"entries"`` | sorted flat indices ``i * d_in + j`` | 1-D, one value per entry |
| ``"rows"`` | sorted row indices | ``(n_rows, d_in)`` dense rows |
| ``"cols"`` | sorted column indices | ``(d_out, n_cols)`` dense columns |
| ``"whole"`` | ``[0]`` | ``(d_out, d_in)``: the whole weight is trainable |

Forward, for an input ``x`` and frozen weight ``W``:

* ``entries`` on a float32/float64 base: ``_SparseDeltaLinear``, a custom autograd function computing
  ``x @ (W + scatter(v))ᵀ``. The merged weight is a transient buffer (one weight-sized temporary per layer during
  forward and again during backward) that is **not** saved for backward; the value gradient is a sampled matmul
  (SDDMM): for each index pair ``(r, c)``, ``sum_t grad_out[t, r] * x[t, c]``, computed in chunks so that the working
  set stays bounded and no weight-sized gradient is ever built. ``gradient_method="dense"`` in the config selects the
  documented fallback ``(grad_outᵀ x)[r, c]`` (one transient weight-sized buffer).
* ``entries`` on a bf16/fp16 base: ``base_layer(x) + x @ scatter(v)ᵀ`` (the same function without a base weight).
  Folding the delta into a half-precision ``W`` would round away every delta below half of ``W``'s rounding step; in
  the separate pass the delta is rounded relative to itself, so the output equals ``(W + delta) x`` within the dtype's
  matmul error, for one more matmul of the layer's size.
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

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn

from .._layout import SET_KINDS, check_indices

__all__ = ["SafetyLayer", "SafetyLinear", "sampled_matmul", "values_shape"]

# Working-set bound of the chunked sampled matmul, in elements of each gathered operand (4M fp32 = 16 MiB).
_SDDMM_CHUNK_ELEMENTS = 1 << 22


def sampled_matmul(
    grad_out: torch.Tensor, x: torch.Tensor, flat_indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Entries of ``grad_outᵀ @ x`` at the given flat positions, without forming the full product (SDDMM).

    Uses ``torch.sparse.sampled_addmm`` with a CSR pattern built from the (sorted) indices where the kernel exists
    (fp32/fp64; faster than the gather path on CPU, see ``benchmarks/set_adapter.py``), otherwise a chunked gather:
    two ``(chunk, T)`` gathers with ``chunk * T <= 4M`` elements and one batched dot product per entry.

    Args:
        grad_out: ``(T, d_out)`` output gradient (tokens flattened).
        x: ``(T, d_in)`` input.
        flat_indices: 1-D **sorted** integer tensor of flat positions ``r * d_in + c`` into a ``(d_out, d_in)`` matrix.
        in_features: ``d_in``.

    Returns:
        A 1-D fp32 tensor ``g`` with ``g[k] = sum_t grad_out[t, r_k] * x[t, c_k]``. Memory is O(nnz + T * chunk),
        never O(d_out * d_in).
    """
    idx = flat_indices.to(torch.int64)
    rows = torch.div(idx, in_features, rounding_mode="floor")
    cols = idx - rows * in_features
    if grad_out.dtype in (torch.float32, torch.float64) and x.dtype == grad_out.dtype and idx.numel():
        try:
            return _sampled_addmm(grad_out, x, rows, cols, in_features).to(torch.float32)
        except (RuntimeError, NotImplementedError):  # no kernel for this device/dtype: use the gather path
            pass
    return _gather_sddmm(grad_out, x, rows, cols)


def _sampled_addmm(grad_out, x, rows, cols, in_features):
    out_features = grad_out.shape[1]
    # Sorted flat indices are in CSR order, so the column array is `cols` as is.
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta" and invariant-check notices
        pattern = torch.sparse_csr_tensor(
            crow,
            cols,
            torch.zeros(rows.numel(), dtype=grad_out.dtype, device=grad_out.device),
            (out_features, in_features),
        )
        return torch.sparse.sampled_addmm(pattern, grad_out.t(), x, beta=0.0).values()


def _gather_sddmm(grad_out, x, rows, cols):
    # Transposed, contiguous operands make each gathered row a contiguous run of T values.
    gT = grad_out.t().contiguous()
    xT = x.t().contiguous()
    tokens = max(1, gT.shape[1])
    chunk = max(1, _SDDMM_CHUNK_ELEMENTS // tokens)
    out = torch.empty(rows.numel(), dtype=torch.float32, device=grad_out.device)
    for start in range(0, rows.numel(), chunk):
        stop = min(start + chunk, rows.numel())
        a = gT.index_select(0, rows[start:stop])
        b = xT.index_select(0, cols[start:stop])
        # bmm of (k,1,T) x (k,T,1): one dot product per entry; low precision is upcast so sums accumulate in fp32.
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        out[start:stop] = torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return out


def _scatter_dense(
    values: torch.Tensor, flat_indices: torch.Tensor, shape: tuple[int, int], base: torch.Tensor | None
):
    """``base + scatter(values)`` (or a zero matrix plus the scatter) as a new dense ``shape`` tensor."""
    idx = flat_indices.to(torch.int64)
    if base is None:
        flat = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    else:
        flat = base.reshape(-1).clone()
    flat.index_add_(0, idx, values.to(flat.dtype))
    return flat.view(shape)


class _SparseDeltaLinear(torch.autograd.Function):
    """``x @ (W + scatter(v))ᵀ`` (or ``x @ scatter(v)ᵀ`` when ``weight`` is None) without saving the merged weight.

    Saved for backward: ``x`` (which the base matmul needs anyway), ``v``, the indices and a reference to ``W``
    (a frozen parameter: no copy). The merged weight is rebuilt in backward only when the input needs a gradient.
    """

    @staticmethod
    def forward(ctx, x, values, flat_indices, weight, out_features, in_features, method):
        shape = (out_features, in_features)
        dtype = weight.dtype if weight is not None else x.dtype
        merged = _scatter_dense(values.to(dtype), flat_indices, shape, weight)
        y = F.linear(x.to(dtype), merged)
        del merged
        ctx.save_for_backward(x, values, flat_indices, weight)
        ctx.shape = shape
        ctx.method = method
        ctx.dtype = dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values, flat_indices, weight = ctx.saved_tensors
        out_features, in_features = ctx.shape
        grad_x = grad_v = grad_w = None
        g2 = grad_y.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features).to(ctx.dtype)
        if ctx.needs_input_grad[0]:
            merged = _scatter_dense(values.to(ctx.dtype), flat_indices, ctx.shape, weight)
            grad_x = (g2.to(ctx.dtype) @ merged).reshape(x.shape).to(x.dtype)
            del merged
        if ctx.needs_input_grad[1]:
            if ctx.method == "dense":
                full = g2.t().to(ctx.dtype) @ x2
                grad_v = full.reshape(-1).index_select(0, flat_indices.to(torch.int64))
                del full
            else:
                grad_v = sampled_matmul(g2.to(ctx.dtype), x2, flat_indices, in_features)
            grad_v = grad_v.to(values.dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            # Only reached when a user unfreezes the base weight on purpose.
            grad_w = (g2.t().to(ctx.dtype) @ x2).to(weight.dtype)
        return grad_x, grad_v, None, grad_w, None, None, None


def values_shape(kind: str, n: int, shape: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the trainable deltas of ``n`` indices of ``kind`` on a ``(d_out, d_in)`` weight."""
    out_features, in_features = shape
    return {"entries": (n,), "rows": (n, in_features), "cols": (out_features, n)}.get(
        kind, (out_features, in_features)
    )


def _nan_message(adapter_name: str) -> str:
    # worded like PEFT's other tuners (peft/tuners/lora/layer.py), which callers and PEFT's test battery match on
    return f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"


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
        if kind == "entries":
            return _scatter_dense(values.detach(), idx, shape, None)
        delta = torch.zeros(shape, dtype=values.dtype, device=values.device)
        if kind == "rows":
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
        fuse_first = (
            bool(entries)
            and self.quantization_backend is None
            and not args
            and not kwargs
            and _fold_keeps_delta(base.weight.dtype, self.safety_values[entries[0]].dtype)
        )
        if fuse_first:
            # Fold the first entry-wise delta into the frozen matmul (no separate x @ Dᵀ pass). Only for fp32/fp64
            # weights: in bf16/fp16, W + delta would round the delta away wherever it is below half the weight's
            # rounding step, so there the delta takes the separate pass below (its own rounding is relative to
            # the delta, not to W).
            first = entries.pop(0)
            result = _SparseDeltaLinear.apply(
                x,
                self.safety_values[first],
                self.safety_indices[first],
                base.weight,
                self.out_features,
                self.in_features,
                self.safety_gradient_method[first],
            )
            if base.bias is not None:
                result = result + base.bias.to(result.dtype)
        else:
            result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in entries:
            result = result + _SparseDeltaLinear.apply(
                x,
                self.safety_values[name],
                self.safety_indices[name],
                None,
                self.out_features,
                self.in_features,
                self.safety_gradient_method[name],
            ).to(out_dtype)
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

    def __repr__(self) -> str:
        return "safety." + super().__repr__()
