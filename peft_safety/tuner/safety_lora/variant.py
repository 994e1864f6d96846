"""``MaskedLoraVariant``: masked LoRA's forward and merge, plugged into PEFT's LoRA layer as a LoRA variant.

PEFT 0.21 lets a LoRA layer hand an adapter's forward and merge to a ``LoraVariant`` (``peft/tuners/lora/layer.py``:
``resolve_lora_variant`` picks it in ``update_layer``, then ``init``, ``forward``, ``merge_safe`` / ``merge_unsafe`` /
``unmerge``; DoRA and aLoRA plug in the same way). Masked LoRA fits that hook: ``SafetyLoraLinear`` resolves this
variant for every adapter that has a mask on its module, and PEFT's own ``Linear.forward`` / ``merge`` /
``unmerge`` (mixed-batch inference included) call it. Two things stay outside the variant, in ``layer.py``:

* the mask buffers' validation and caches (a buffer is data PEFT loads, not a variant's state), and the masked
  ``get_delta_weight``, which every other PEFT path that asks a layer for its delta must see;
* refusing to merge into a quantised base: PEFT's vanilla path (adapters without a mask on that module) would
  re-quantise the whole weight too, so the refusal belongs to the layer, not to one adapter's variant.

The mechanism depends on the mask's storage kind, always the cheapest one that is **exact with any optimizer**:

| kind | forward | merge |
|---|---|---|
| ``rows`` | rows of ``lora_B`` enter as zeros (``B.index_fill(0, rows, 0)``) | the masked delta |
| ``cols`` | columns of ``lora_A`` enter as zeros (and start at zero) | the masked delta |
| ``entries``, ``entries_method="dense"`` (default, bit-exact) | the dense delta ``(B A) * s`` with the masked entries zeroed, by an autograd function that rebuilds it in backward instead of keeping it | the masked delta |
| ``entries``, ``"sparse"`` (opt-in) | LoRA's factored path minus a sparse correction ``x @ Dᵀ`` at the masked entries | the masked delta |

Every default path zeroes the masked rows, columns or entries of the update *before* they meet the input, so the
output there is ``base + 0``: bit-exact in fp32, bf16 and fp16 and under autocast. The sparse path subtracts two
differently rounded computations of the same number and leaves residues of about one ulp of the update on the mask,
so it is opt-in and ``verify_safety`` counts those residues as violations. Masking the *effective* factors rather
than gradients makes the guarantee independent of the optimizer and its state. Measurements: ``docs/tuner.md``
(from ``benchmarks/masked_lora.py``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant

from .._layout import LORA_KINDS

__all__ = ["BUFFERS", "MaskedLoraVariant", "mask_delta"]

#: The persistent buffer that holds an adapter's mask on a layer, per storage kind (saved in adapter_model.safetensors).
BUFFERS = {kind: f"lora_safety_{kind}" for kind in LORA_KINDS}


class _EntryPattern:
    """The fixed sparsity structure of an entry mask, as CSR index arrays of ``D`` and of ``Dᵀ``.

    Built once per layer and adapter from the mask buffer (cached on the layer): every step only fills in new values.
    """

    def __init__(self, flat_indices: torch.Tensor, out_features: int, in_features: int) -> None:
        # unique() also sorts: sorted flat indices are in CSR (row-major) order, and a duplicate would be subtracted
        # twice by the sparse product (the dense path's index_fill is idempotent, so both paths agree on any buffer).
        flat = torch.unique(flat_indices.to(torch.int64))
        rows = torch.div(flat, in_features, rounding_mode="floor")
        cols = flat - rows * in_features
        self.shape = (out_features, in_features)
        self.nnz = flat.numel()
        self.crow = _crow(rows, out_features)
        self.cols = cols
        # Dᵀ in CSR order: sort the entries by (column, row); the permutation maps D's values to Dᵀ's.
        self.perm_t = torch.argsort(cols * out_features + rows)
        self.crow_t = _crow(cols, in_features)
        self.rows_t = rows[self.perm_t]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``D`` as a ``(d_out, d_in)`` CSR tensor with ``values`` in sorted flat order."""
        return _csr(self.crow, self.cols, values, self.shape)

    def matrix_t(self, values: torch.Tensor) -> torch.Tensor:
        """``Dᵀ`` as a ``(d_in, d_out)`` CSR tensor, for ``D``'s ``values`` in sorted flat order."""
        return _csr(self.crow_t, self.rows_t, values[self.perm_t], (self.shape[1], self.shape[0]))

    def sample(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The entries of ``left @ right`` at the pattern (SDDMM), in sorted flat order, without the full product."""
        pattern = self.matrix(torch.zeros(self.nnz, dtype=left.dtype, device=left.device))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            return torch.sparse.sampled_addmm(pattern, left, right, beta=0.0).values()


def _crow(major: torch.Tensor, size: int) -> torch.Tensor:
    crow = torch.zeros(size + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.bincount(major, minlength=size).cumsum(0)
    return crow


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The CPU CSR kernels exist for fp32/fp64 only; lower precisions are computed (and accumulated) in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _MaskedEntryCorrection(torch.autograd.Function):
    """``c = x @ Dᵀ`` with ``D`` sparse on the mask and ``D[i, j] = s * (B @ A)[i, j]``: what LoRA adds at the masked
    entries, so ``base(x) + s * x Aᵀ Bᵀ - c`` is the masked-delta forward without any ``(d_out, d_in)`` tensor.

    Forward: the values by SDDMM of ``B`` and ``A`` (O(nnz * r)), then one CSR product (O(nnz * tokens)). Backward,
    hand-written so that nothing weight-sized appears either: ``grad_x = grad_c @ D`` (CSR product with ``Dᵀ``), the
    value gradient ``g = (grad_cᵀ x)`` sampled at the mask (SDDMM), then ``grad_B = s * G @ Aᵀ`` and
    ``grad_A = s * (Gᵀ @ B)ᵀ`` with ``G`` the sparse matrix of ``g``. Computed in fp32 (fp64 for fp64 inputs) with autocast off, then cast back.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, pattern, scaling):
        with torch.autocast(device_type=x.device.type, enabled=False):
            # the CPU CSR kernels have no bf16/fp16 (``addmm_out_sparse_csr_impl_mkl``): never let autocast lower them
            return _MaskedEntryCorrection._forward(ctx, x, weight_a, weight_b, pattern, scaling)

    @staticmethod
    def _forward(ctx, x, weight_a, weight_b, pattern, scaling):
        dtype = _compute_dtype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        values = pattern.sample(b, a) * scaling
        # (D @ xᵀ)ᵀ: the CSR kernel wants the sparse operand on the left.
        c = torch.sparse.mm(pattern.matrix(values), x2.t()).t()
        ctx.save_for_backward(x, weight_a, weight_b, values)
        ctx.pattern = pattern
        ctx.scaling = scaling
        return c.reshape(*x.shape[:-1], c.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_c):
        with torch.autocast(device_type=grad_c.device.type, enabled=False):
            return _MaskedEntryCorrection._backward(ctx, grad_c)

    @staticmethod
    def _backward(ctx, grad_c):
        x, weight_a, weight_b, values = ctx.saved_tensors
        pattern, scaling = ctx.pattern, ctx.scaling
        dtype = values.dtype
        g2 = grad_c.reshape(-1, grad_c.shape[-1]).to(dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(pattern.matrix_t(values), g2.t()).t()
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_values = pattern.sample(g2.t(), x2) * scaling
            if ctx.needs_input_grad[2]:
                grad_b = torch.sparse.mm(pattern.matrix(grad_values), weight_a.to(dtype).t()).to(weight_b.dtype)
            if ctx.needs_input_grad[1]:
                grad_a = (
                    torch.sparse.mm(pattern.matrix_t(grad_values), weight_b.to(dtype))
                    .t()
                    .contiguous()
                    .to(weight_a.dtype)
                )
        return grad_x, grad_a, grad_b, None, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type``, or None."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, AttributeError):  # devices without autocast support
        return None
    return None


def _masked_delta(weight_a: torch.Tensor, weight_b: torch.Tensor, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    delta = (weight_b @ weight_a) * scaling
    return delta.reshape(-1).index_fill(0, idx, 0).view_as(delta)


class _MaskedDenseDelta(torch.autograd.Function):
    """``y = x @ Mᵀ`` with ``M = (B A) * s`` and the masked entries of ``M`` exactly zero (bit-exact on the mask).

    The same numbers as ``F.linear(x, masked_delta)`` under autograd, but the weight-sized ``M`` is not kept for
    backward: it is rebuilt there from ``A`` and ``B`` (one ``(d_out, r) @ (r, d_in)`` product), so a model with many
    masked layers holds no extra weight-sized tensor per layer between forward and backward. Under autocast the inputs
    are cast to the autocast dtype once and everything runs in it (the masked zeros are zeros in every dtype).
    Backward: ``grad_x = g @ M``, ``G = gᵀ x`` with the masked entries zeroed, ``grad_B = s G Aᵀ``,
    ``grad_A = s Bᵀ G``.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, idx, scaling):
        delta = _masked_delta(weight_a, weight_b, idx, scaling)
        ctx.save_for_backward(x, weight_a, weight_b, idx)
        ctx.scaling = scaling
        return F.linear(x, delta)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight_a, weight_b, idx = ctx.saved_tensors
        scaling = ctx.scaling
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            grad_y = grad_y.to(x.dtype)
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = grad_y @ _masked_delta(weight_a, weight_b, idx, scaling)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                g2 = grad_y.reshape(-1, grad_y.shape[-1])
                grad_m = g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)
                grad_m = grad_m.reshape(-1).index_fill(0, idx, 0).view_as(grad_m) * scaling
                if ctx.needs_input_grad[2]:
                    grad_b = (grad_m @ weight_a.t().to(grad_m.dtype)).to(weight_b.dtype)
                if ctx.needs_input_grad[1]:
                    grad_a = (weight_b.t().to(grad_m.dtype) @ grad_m).to(weight_a.dtype)
        return grad_x, grad_a, grad_b, None, None


def _dense_masked_forward(x, weight_a, weight_b, idx, scaling):
    """Run :class:`_MaskedDenseDelta` in one dtype: the autocast dtype when autocast is on, else ``x``'s (with the
    factors cast to it, as ``F.linear`` would require)."""
    device_type = x.device.type
    dtype = _autocast_dtype(device_type) or x.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        return _MaskedDenseDelta.apply(x.to(dtype), weight_a.to(dtype), weight_b.to(dtype), idx, scaling)


def mask_delta(delta: torch.Tensor, kind: str, idx: torch.Tensor) -> torch.Tensor:
    """``delta`` (a ``(d_out, d_in)`` LoRA update) with the masked rows, columns or entries set to exactly zero."""
    idx = idx.to(delta.device)
    if kind == "rows":
        return delta.index_fill(0, idx, 0)
    if kind == "cols":
        return delta.index_fill(1, idx, 0)
    return delta.reshape(-1).index_fill(0, idx, 0).view_as(delta)


class MaskedLoraVariant(LoraVariant):
    """The LoRA variant of an adapter with a mask on its module: forward and merge exactly zero on the mask.

    The methods are static, as PEFT's variants are; they read the adapter's mask through the layer
    (``SafetyLoraLinear._mask_of``, which validates the buffer), so a buffer loaded by any path is checked before use.
    """

    def supports_lora_conversion(self) -> bool:
        # converting to vanilla LoRA would drop the mask: the converted adapter would move protected entries
        return False

    @staticmethod
    def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
        """Store the adapter's mask in the layer's buffer and zero the stored masked factors.

        The mask comes from the adapter's config (``kwargs["config"]``): the indices of a config built from a
        ``SafetyMask``, or a ``-1`` placeholder of the declared size that the adapter weights are loaded into.
        """
        masks = module.config_masks(kwargs["config"])
        # The masks are data, never "empty weights": keep them on the base weight's device even when PEFT creates the
        # LoRA factors on the meta device (low_cpu_mem_usage=True).
        device = module.real_device()
        for kind, idx in masks.items():
            getattr(module, BUFFERS[kind])[adapter_name] = idx.to(device=device, dtype=torch.int32)
        weight_a, weight_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        with torch.no_grad():
            # A is Kaiming-initialised, so masked columns are not zero by default; zero them so the stored adapter is
            # clean too (forward and merge mask them regardless). Factors on meta are loaded later: nothing to do.
            if "cols" in masks and weight_a.device.type != "meta" and int(masks["cols"].min()) >= 0:
                weight_a.index_fill_(1, masks["cols"].to(device=weight_a.device, dtype=torch.int64), 0)
            if "rows" in masks and weight_b.device.type != "meta" and int(masks["rows"].min()) >= 0:
                weight_b.index_fill_(0, masks["rows"].to(device=weight_b.device, dtype=torch.int64), 0)

    @staticmethod
    def forward(
        module: Any, *, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """``result`` plus the adapter's update, exactly zero on the mask (``x`` is already cast to the factors' dtype)."""
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        weight_a = module.lora_A[active_adapter].weight
        weight_b = module.lora_B[active_adapter].weight
        path = module.entries_path(active_adapter)
        if path == "dense":
            idx = module._mask_of(active_adapter)[1].to(weight_a.device)
            update = _dense_masked_forward(dropout(x), weight_a, weight_b, idx, scaling)
        elif path == "sparse":
            # Factored LoRA minus what it adds at the masked entries: no (d_out, d_in) tensor at all (not bit-exact).
            xd = dropout(x)
            lora_out = F.linear(F.linear(xd, weight_a), weight_b) * scaling
            pattern = module._entry_pattern(active_adapter)
            update = lora_out - _MaskedEntryCorrection.apply(xd, weight_a, weight_b, pattern, scaling)
        else:
            weight_a, weight_b = module._masked_factors(active_adapter)
            update = F.linear(F.linear(dropout(x), weight_a), weight_b) * scaling
        return result + update.to(result.dtype)

    @staticmethod
    def merge_safe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """A new tensor ``W + masked delta`` (PEFT checks it for non-finite values before writing it)."""
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """``W += masked delta`` in place (masked entries get ``+ 0``: bit-identical)."""
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module: Any, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """``W - masked delta`` (masked entries get ``- 0``: bit-identical)."""
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)
