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

The mechanism depends on the mask's storage kind:

| kind | forward | merge |
|---|---|---|
| ``rows`` | rows of ``lora_B`` enter as zeros (``B.index_fill(0, rows, 0)``) | the masked delta |
| ``cols`` | columns of ``lora_A`` enter as zeros (and start at zero) | the masked delta |
| ``entries``, ``entries_method="sparse"`` (what ``"auto"``, the default, picks on CPU up to ``SPARSE_MAX_DENSITY``) | LoRA's factored path minus what it adds at the masked entries, ``s·(x Aᵀ) Bᵀ - x Dᵀ``, in fp32, no ``(d_out, d_in)`` tensor | the masked delta |
| ``entries``, ``"dense"`` (opt-in; ``"auto"`` off the CPU or above the density) | the dense delta ``(B A) * s`` with the masked entries zeroed, by an autograd function that rebuilds it in backward instead of keeping it | the masked delta |

Merging adds the masked delta, whose masked entries are exact zeros, on every path: a merged (or served) model is
bit-identical to the base on the mask whatever path trained it. The rows, columns and dense paths zero the masked part
of the update *before* it meets the input, so their training forward is ``base + 0`` on the mask too: bit-exact in
fp32, bf16 and fp16 and under autocast. The sparse path subtracts two differently rounded computations of the same
number, so its forward is exact on the mask only up to fp32 rounding of the update: :func:`sparse_forward_bound` is
the bound ``verify_safety`` / ``safety/violations`` hold it to (``analysis.mask_drift``), next to a bit-exact check of
the merged delta. Masking the *effective* factors rather than gradients makes the guarantee independent of the
optimizer and its state. Measurements: ``docs/tuner.md`` (from ``benchmarks/masked_lora.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant

from .._layout import LORA_KINDS
from .._sparse import compute_dtype

__all__ = ["BUFFERS", "MaskedLoraVariant", "mask_delta", "matmul_eps", "sparse_forward_bound"]

#: The persistent buffer that holds an adapter's mask on a layer, per storage kind (saved in adapter_model.safetensors).
BUFFERS = {kind: f"lora_safety_{kind}" for kind in LORA_KINDS}


class _MaskedFactoredLora(torch.autograd.Function):
    """LoRA's factored update minus what it adds at the masked entries: ``s·(x Aᵀ) Bᵀ - x Dᵀ`` with ``D`` sparse on
    the mask and ``D[k] = s·B[i_k]·A[:, j_k]``, so that the result is the masked-delta forward without any
    ``(d_out, d_in)`` tensor.

    All of it runs in fp32 (fp64 for fp64 operands, `_sparse.compute_dtype`) with autocast off: the two computations of
    a masked entry (the factored product and ``D[k]``) then differ only by fp32 rounding, whatever the layer's dtype,
    and the caller casts the result to the output dtype once.

    Forward: ``h = x Aᵀ`` (kept for backward, ``tokens x r``), ``D``'s values by SDDMM of ``B`` and ``A`` (O(nnz·r)),
    ``(x Dᵀ)ᵀ`` by `EntryPattern.rows_product` (O(nnz·tokens)), and one ``addmm`` for ``s·h Bᵀ - x Dᵀ``. Backward
    (nothing weight-sized either), with ``g`` the output gradient and ``gv = (gᵀ x)`` sampled at the mask:
    ``grad_x = s·(g B) A - g D``, ``grad_B = s·gᵀ h - s·Gv Aᵀ``, ``grad_A = s·(g B)ᵀ x - s·(Gvᵀ B)ᵀ``. Saved for
    backward: ``x`` itself (the caller's tensor, no copy), ``h`` and ``D``'s values.
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, pattern, scaling):
        dtype = compute_dtype(x.dtype, weight_a.dtype, weight_b.dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        h = x2 @ a.t()
        values = pattern.sample(b, a.t()) * scaling
        correction = pattern.rows_product(values, x2.t().contiguous())  # (d_out, tokens)
        # computed transposed, in the correction's storage (no strided copy); the caller's add reads it transposed
        update_t = torch.addmm(correction, b, h.t(), beta=-1, alpha=scaling)
        ctx.save_for_backward(x, weight_a, weight_b, h, values)
        ctx.pattern = pattern
        ctx.scaling = scaling
        return update_t.t().reshape(*x.shape[:-1], update_t.shape[0])

    @staticmethod
    def backward(ctx, grad_update):
        with torch.autocast(device_type=grad_update.device.type, enabled=False):
            return _MaskedFactoredLora._backward(ctx, grad_update)

    @staticmethod
    def _backward(ctx, grad_update):
        x, weight_a, weight_b, h, values = ctx.saved_tensors
        pattern, scaling = ctx.pattern, ctx.scaling
        dtype = values.dtype
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        g2 = grad_update.reshape(-1, grad_update.shape[-1]).to(dtype)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        gt = g2.t().contiguous()
        gh = g2 @ b
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x_t = torch.addmm(pattern.cols_product(values, gt), a.t(), gh.t(), beta=-1, alpha=scaling)
            grad_x = grad_x_t.t().reshape(x.shape).to(x.dtype)
        if need_a or need_b:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_values = pattern.sample(gt, x2.t().contiguous())
            if need_b:
                grad_b = torch.addmm(
                    pattern.rows_product(grad_values, a.t().contiguous()), g2.t(), h, beta=-scaling, alpha=scaling
                ).to(weight_b.dtype)
            if need_a:
                grad_a = torch.addmm(
                    pattern.cols_product(grad_values, b).t(), gh.t(), x2, beta=-scaling, alpha=scaling
                ).to(weight_a.dtype)
        return grad_x, grad_a, grad_b, None, None


def _sparse_masked_forward(x, weight_a, weight_b, pattern, scaling):
    """Run :class:`_MaskedFactoredLora` with autocast off (it computes in fp32 whatever the autocast dtype)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _MaskedFactoredLora.apply(x, weight_a, weight_b, pattern, scaling)


def matmul_eps(dtype: torch.dtype, device: torch.device) -> float:
    """The relative precision of a ``dtype`` matmul on ``device`` as torch is set up now: the dtype's machine epsilon,
    or bf16's where fp32 matmuls may run in reduced precision (TF32 or bf16: ``torch.set_float32_matmul_precision``
    other than ``"highest"``, or ``torch.backends.cuda.matmul.allow_tf32``)."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32:
        reduced = torch.get_float32_matmul_precision() != "highest"
        if device.type == "cuda":
            reduced = reduced or bool(torch.backends.cuda.matmul.allow_tf32)
        if reduced:
            eps = torch.finfo(torch.bfloat16).eps
    return eps


def sparse_forward_bound(
    weight_a: torch.Tensor, weight_b: torch.Tensor, scaling: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """The largest ``|effective update|`` the ``"sparse"`` forward may leave on a masked entry, per entry of the weight.

    On an identity input (how ``analysis.mask_drift`` measures a layer) a masked entry ``(i, j)`` gets the factored
    product ``s·Σ_r B[i, r] A[r, j]`` minus ``D[k]``, the same sum computed in another order: each is within
    ``gamma_(r+1) ≈ (r + 1)·ε/2`` of ``S = s·Σ_r |B[i, r] A[r, j]|`` (the standard dot-product error bound, one rounding more
    for the scaling), so their difference is within ``(r + 1)·ε·S``. Casting it to the layer's dtype rounds it relative
    to itself (down to that dtype's smallest subnormal ``τ``), and adding it to the base output and subtracting the base
    output again at most doubles it. The bound is twice that::

        bound[i, j] = 4 · ((r + 1) · ε · s · (|B| @ |A|)[i, j] + τ)

    with ``ε`` from :func:`matmul_eps` of the compute dtype (fp32, or fp64 for fp64 factors) and ``τ`` of
    ``out_dtype``. An unmasked update is of the order of ``S / sqrt(r)``: on fp32 that is about ``10⁴`` times the
    bound, so a forward that ignores the mask stands out.
    """
    dtype = compute_dtype(weight_a.dtype, weight_b.dtype)
    eps = matmul_eps(dtype, weight_a.device)
    out = torch.finfo(out_dtype)
    tiny = out.smallest_normal * out.eps  # the smallest subnormal of the output dtype
    magnitude = weight_b.detach().to(dtype).abs() @ weight_a.detach().to(dtype).abs()
    return magnitude.mul_((weight_a.shape[0] + 1) * eps * abs(float(scaling))).add_(tiny).mul_(4)


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
            # Factored LoRA minus what it adds at the masked entries: no (d_out, d_in) tensor at all (exact on the
            # mask up to fp32 rounding; merging stays bit-exact).
            pattern = module._entry_pattern(active_adapter)
            update = _sparse_masked_forward(dropout(x), weight_a, weight_b, pattern, scaling)
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
