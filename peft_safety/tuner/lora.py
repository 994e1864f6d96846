"""Masked LoRA for SPA (mode ``"freeze"``): a LoRA adapter whose update is exactly zero on a ``SafetyMask``.

Masked LoRA adapters have a PEFT type of their own, ``SAFETY_LORA`` (``SafetyLoraConfig``, ``spa_config.py``; tuner
``SafetyLoraModel``, ``spa_model.py``): the saved folder restores the masks through every PEFT loading path once
``peft_safety`` is imported, and a plain ``peft`` refuses it instead of loading it as unmasked LoRA.

The mechanism depends on the mask's granularity, always the cheapest one that is **exact with any optimizer**:

| granularity | mechanism | extra cost per step |
|---|---|---|
| ``Layer()`` | the module is added to ``exclude_modules``: LoRA never adapts it | none |
| ``Neuron(axis=0)``, ``Head(axis=0)`` | rows ``i`` of ``lora_B`` enter forward and merge as zeros (``B.index_fill(0, rows, 0)``) | an index fill on a ``(d_out, r)`` tensor |
| ``Neuron(axis=1)``, ``Head(axis=1)`` | columns ``j`` of ``lora_A`` enter forward and merge as zeros (and start at zero) | an index fill on an ``(r, d_in)`` tensor |
| ``Weight()`` | ``entries_method="dense"`` (default, bit-exact): the dense delta ``(B A) * s`` with the masked entries set to zero, in forward (a hand-written autograd function that recomputes the delta in backward instead of keeping it) and merge. ``"sparse"`` (opt-in): LoRA's factored path minus a sparse correction ``x @ Dᵀ`` at the masked entries | dense: one ``(d_out, d_in)`` delta and matmul; sparse: O(nnz * (tokens + r)) |

Exactness. Every default path leaves the *effective* update of the layer (``layer(I) - base(I)`` on an identity
input, and the merged weight) bit-identical to zero on the mask, in fp32, bf16 and fp16 and under autocast: masked
rows, columns or entries of the delta are zeros *before* they meet the input, so the output there is ``base + 0``.
The sparse path subtracts two differently rounded computations of the same number, so it leaves residues of about one
ulp of the update on the masked entries (measured: up to 1.2e-7 on a third of the masked entries); it is therefore
opt-in, and ``verify_safety`` counts those residues as violations. Merging uses the masked dense delta on every path.

Masking the *effective* weights inside forward (rather than zeroing gradients and re-zeroing after each optimizer
step) means the guarantee does not depend on the optimizer: the masked rows/columns never reach the output or the
merged weight, whatever AdamW decay, momentum or a foreign optimizer state does to the stored tensors.

Refused, with a clear error: DoRA (rescales whole rows through its magnitude vector), LoRA biases, initialisations
with a non-zero ``B`` (``init_lora_weights`` other than ``True``/``"gaussian"``: pissa, olora, eva, corda, loftq,
orthogonal, ...), ``lm_head`` targets (TRL rejects ``lm_head`` adapters), and ``target_parameters`` over masked
parameters (fused MoE experts).

The masks are stored per layer in persistent int32 buffers (``lora_safety_rows`` / ``lora_safety_cols`` /
``lora_safety_entries``), written into ``adapter_model.safetensors``. A layer validates its buffer (dtype, 1-D, range,
sorted and unique) the first time it uses it after every change, so a corrupt or unloaded buffer fails loudly on every
loading path; :class:`~peft_safety.tuner.spa_model.SafetyLoraModel` also validates the file's tensors before loading.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .._files import check_adapter_folder
from .peft_type import SafetyPeftType
from .spa_config import (
    ENTRIES_METHODS,
    MASK_KINDS,
    SPARSE_MAX_DENSITY,
    SafetyLoraConfig,
    check_entries_method,
    check_lora_options,
    layout_limit,
)

__all__ = [
    "ENTRIES_METHODS",
    "SPARSE_MAX_DENSITY",
    "SafetyLoraLinear",
    "check_masked_lora_model",
    "get_masked_lora_model",
    "is_legacy_masked_lora",
    "load_masked_lora",
    "mask_lora_config",
    "validate_mask_indices",
]

_BUFFER = {kind: f"lora_safety_{kind}" for kind in MASK_KINDS}


def validate_mask_indices(idx: Any, kind: str, shape: tuple[int, int], where: str) -> None:
    """Check a mask index tensor read from a file or a buffer: integer dtype, 1-D, non-empty, every value in range,
    strictly increasing (sorted and unique).

    Args:
        idx: the tensor.
        kind: ``"rows"``, ``"cols"`` or ``"entries"``.
        shape: ``(d_out, d_in)`` of the weight it masks.
        where: what to name in the message (module, buffer, adapter, file).

    Raises:
        TypeError: not an integer tensor.
        ValueError: wrong rank, empty, out of range, unsorted or duplicated, or the ``-1`` placeholder of a buffer the
            adapter weights were never loaded into.
    """
    fix = "Re-save the adapter from its training run; a file edited or truncated by hand cannot be trusted."
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{where}: mask indices must be an int32/int64 tensor, got {got}. {fix}")
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"{where}: mask indices must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}. {fix}")
    limit = layout_limit(kind, shape)
    if idx.numel() > limit:
        raise ValueError(
            f"{where}: {idx.numel()} {kind} indices for a {shape[0]}x{shape[1]} weight (max {limit}). {fix}"
        )
    if idx.device.type == "meta":
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo == -1 and hi == -1:
        raise ValueError(
            f"{where}: the mask buffer still holds its placeholder: the adapter weights were never loaded into it. "
            "Load masked-LoRA adapters with PeftModel.from_pretrained / load_masked_lora after `import peft_safety`."
        )
    if lo < 0 or hi >= limit:
        raise ValueError(
            f"{where}: mask index out of range [0, {limit}) for the {kind} of a {shape[0]}x{shape[1]} weight "
            f"(min {lo}, max {hi}). The adapter belongs to another model, or the file is corrupt. {fix}"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{where}: mask indices must be sorted and unique. {fix}")


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


class SafetyLoraLinear(LoraLinear):
    """A LoRA ``Linear`` whose delta is zero on the mask's rows, columns or entries (see the module docstring).

    Built by :class:`~peft_safety.tuner.spa_model.SafetyLoraModel` for every ``nn.Linear`` a ``SafetyLoraConfig``
    targets (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included). Each adapter reads its mask from its config:
    the in-memory indices of a config built from a ``SafetyMask``, or, when loading, an int32 placeholder of the size
    ``mask_layout`` declares (filled with ``-1`` until the adapter weights are loaded into it; a placeholder that is
    used is an error). Modules without mask entries behave exactly like ``peft``'s LoRA ``Linear``.
    """

    #: Forward mechanism of entry masks, one of :data:`ENTRIES_METHODS` (set from the config; assign on an instance to
    #: override one layer). ``"dense"`` is bit-exact on the mask; ``"sparse"``/``"auto"`` only up to fp rounding.
    entries_method: str = "dense"

    other_param_names = (*LoraLinear.other_param_names, *_BUFFER.values())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        target = _strip_peft_prefix(kwargs.get("target_name") or "")
        base = self.get_base_layer()
        shape = (int(base.out_features), int(base.in_features))
        masks = _config_masks(config, target, shape)  # checked before anything sized by the config is allocated
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        for attr in _BUFFER.values():
            if not isinstance(getattr(self, attr, None), BufferDict):
                # persistent=True: PEFT's BufferDict defaults to non-persistent, which would drop the mask on save.
                setattr(self, attr, BufferDict({}, persistent=True))
            if adapter_name in getattr(self, attr):
                del getattr(self, attr)[adapter_name]
        self._safety_target = target
        if isinstance(config, SafetyLoraConfig):
            self.entries_method = config.entries_method
        # The masks are data, never "empty weights": keep them on the base weight's device even when PEFT creates the
        # LoRA factors on the meta device (low_cpu_mem_usage=True).
        device = _real_device(base)
        for kind, idx in masks.items():
            getattr(self, _BUFFER[kind])[adapter_name] = idx.to(device=device, dtype=torch.int32)
        weight_a, weight_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            # A is Kaiming-initialised, so masked columns are not zero by default; zero them so the stored adapter is
            # clean too (forward and merge mask them regardless). Factors on meta are loaded later: nothing to do.
            if "cols" in masks and weight_a.device.type != "meta" and int(masks["cols"].min()) >= 0:
                weight_a.index_fill_(1, masks["cols"].to(device=weight_a.device, dtype=torch.int64), 0)
            if "rows" in masks and weight_b.device.type != "meta" and int(masks["rows"].min()) >= 0:
                weight_b.index_fill_(0, masks["rows"].to(device=weight_b.device, dtype=torch.int64), 0)

    def _mask_of(self, adapter_name: str) -> tuple[str, torch.Tensor] | None:
        """``(kind, int64 indices)`` of the adapter's mask, validated once per buffer version; None without mask."""
        for kind, attr in _BUFFER.items():
            buffers = getattr(self, attr, None)
            if buffers is not None and adapter_name in buffers:
                idx = buffers[adapter_name]
                self._check_buffer(adapter_name, kind, idx)
                return kind, idx.to(torch.int64)
        return None

    def _check_buffer(self, adapter_name: str, kind: str, idx: torch.Tensor) -> None:
        key = (idx.device, idx.dtype, idx.data_ptr(), idx._version, tuple(idx.shape))
        checked = self.__dict__.setdefault("_checked_masks", {})
        if checked.get((adapter_name, kind)) == key:
            return
        where = (
            f"{getattr(self, '_safety_target', '') or type(self).__name__}.{_BUFFER[kind]} (adapter {adapter_name!r})"
        )
        validate_mask_indices(idx, kind, (self.out_features, self.in_features), where)
        checked[(adapter_name, kind)] = key

    def entries_path(self, adapter_name: str) -> str | None:
        """The forward path an entry-masked adapter takes: ``"sparse"``, ``"dense"``, or None without entry mask.

        ``"auto"`` resolves to ``"sparse"`` on CPU when the mask covers at most :data:`SPARSE_MAX_DENSITY` of the
        weight, and to ``"dense"`` otherwise (always off the CPU, where the CSR kernels are far slower).

        Raises:
            ValueError: if ``entries_method`` is not one of :data:`ENTRIES_METHODS`.
        """
        mask = self._mask_of(adapter_name)
        if mask is None or mask[0] != "entries":
            return None
        method = self.entries_method
        if method not in ENTRIES_METHODS:
            raise ValueError(f"entries_method={method!r} is not one of {ENTRIES_METHODS}.")
        if method != "auto":
            return method
        if self.lora_A[adapter_name].weight.device.type != "cpu":
            # measured on an H200 (4096x4096, 8192 tokens, bf16): the CSR correction takes 31 ms at 1% density and
            # 189 ms at 10%, the dense masked delta 2.2 ms: off the CPU, "auto" is always the dense (exact) path
            return "dense"
        density = mask[1].numel() / max(1, self.out_features * self.in_features)
        return "sparse" if density <= SPARSE_MAX_DENSITY else "dense"

    def _entry_pattern(self, adapter_name: str) -> _EntryPattern:
        """The cached CSR structure of the adapter's entry mask (rebuilt if the buffer moved or was overwritten)."""
        idx = self.lora_safety_entries[adapter_name]
        key = (idx.device, idx.data_ptr(), idx._version, idx.numel())
        cache = self.__dict__.setdefault("_entry_patterns", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
            self._check_buffer(adapter_name, "entries", idx)
            cached = (key, _EntryPattern(idx, self.out_features, self.in_features))
            cache[adapter_name] = cached
        return cached[1]

    def _masked_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` weights with masked columns of A / rows of B replaced by zeros (out of place, autograd-safe)."""
        weight_a = self.lora_A[adapter_name].weight
        weight_b = self.lora_B[adapter_name].weight
        mask = self._mask_of(adapter_name)
        if mask is not None:
            kind, idx = mask
            if kind == "rows":
                weight_b = weight_b.index_fill(0, idx.to(weight_b.device), 0)
            elif kind == "cols":
                weight_a = weight_a.index_fill(1, idx.to(weight_a.device), 0)
        return weight_a, weight_b

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``(B A) * scaling`` with the masked rows, columns or entries exactly zero (used by merge)."""
        delta = super().get_delta_weight(adapter)
        mask = self._mask_of(adapter)
        if mask is None:
            return delta
        kind, idx = mask
        idx = idx.to(delta.device)
        if kind == "rows":
            return delta.index_fill(0, idx, 0)
        if kind == "cols":
            return delta.index_fill(1, idx, 0)
        return delta.reshape(-1).index_fill(0, idx, 0).view_as(delta)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.utils.quantization_utils import resolve_quantization_backend

        if resolve_quantization_backend(self.get_base_layer()) is not None:
            raise ValueError(
                "Merging a masked LoRA adapter into a quantised (bitsandbytes) base re-quantises the whole weight and "
                "moves the protected entries. Keep the adapter unmerged, or load the base in bf16/fp32 and merge there."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        masked = [a for a in active if self._mask_of(a) is not None]
        if self.disable_adapters or self.merged or not masked:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Mixed-batch inference (adapter_names=...) is not supported by masked LoRA layers; "
                "use set_adapter(...) instead."
            )
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in active:
            dropout = self.lora_dropout[name]
            scaling = self.scaling[name]
            xa = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            path = self.entries_path(name)
            weight_a = self.lora_A[name].weight
            weight_b = self.lora_B[name].weight
            if path == "dense":
                idx = self._mask_of(name)[1].to(weight_a.device)
                result = result + _dense_masked_forward(dropout(xa), weight_a, weight_b, idx, scaling).to(result_dtype)
            elif path == "sparse":
                # Factored LoRA minus what it adds at the masked entries: no (d_out, d_in) tensor at all (not bit-exact).
                xd = dropout(xa)
                lora_out = F.linear(F.linear(xd, weight_a), weight_b) * scaling
                correction = _MaskedEntryCorrection.apply(xd, weight_a, weight_b, self._entry_pattern(name), scaling)
                result = result + (lora_out - correction).to(result_dtype)
            else:
                weight_a, weight_b = self._masked_factors(name)
                result = result + (F.linear(F.linear(dropout(xa), weight_a), weight_b) * scaling).to(result_dtype)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "safety_masked_" + super().__repr__()


def _real_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _strip_peft_prefix(key: str) -> str:
    for prefix in ("base_model.model.",):
        key = key.removeprefix(prefix)
    return key


def _config_masks(config: Any, target: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The mask a layer at ``target`` (weight ``shape``) gets from ``config``: the in-memory indices of a config built
    from a mask, or a ``-1`` placeholder of the size ``mask_layout`` declares (the adapter weights are loaded into it).

    Raises:
        ValueError: the layout's shape differs from the module's (another model), checked before allocating.
    """
    if not isinstance(config, SafetyLoraConfig):
        return {}
    in_memory = config._safety_indices.get(target)
    entry = (config.mask_layout or {}).get(target)
    if entry is None:
        return {}
    if tuple(entry["shape"]) != shape:
        raise ValueError(
            f"The masked-LoRA adapter's mask for {target!r} is for a {entry['shape'][0]}x{entry['shape'][1]} weight, "
            f"but this model's module is {shape[0]}x{shape[1]}: the adapter belongs to another base model."
        )
    if in_memory:
        return dict(in_memory)
    return {entry["kind"]: torch.full((entry["n"],), -1, dtype=torch.int32)}


def _check_entries_method(entries_method: Any) -> None:
    check_entries_method(entries_method)


def mask_lora_config(lora_config: LoraConfig, mask: Any, *, entries_method: str = "dense") -> SafetyLoraConfig:
    """A ``SafetyLoraConfig`` with every option of ``lora_config`` whose LoRA update is exactly zero on ``mask``.

    Layer-masked modules are excluded from the adapter; every other masked ``nn.Linear`` gets a ``SafetyLoraLinear``
    that keeps masked rows, columns or entries of its delta at zero in forward and merge. The result has PEFT type
    ``SAFETY_LORA``: saved adapters restore their masks on every PEFT loading path (after ``import peft_safety``).

    Args:
        lora_config: the LoRA config to protect (not modified).
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: forward mechanism for ``Weight()`` masks. ``"dense"`` (default): the dense masked delta,
            bit-exact on the mask in every dtype; ``"sparse"``: LoRA's factored path minus a sparse correction at the
            masked entries (O(nnz) extra work, exact only up to fp rounding); ``"auto"``: sparse when the mask covers at
            most :data:`SPARSE_MAX_DENSITY` of the weight. Merging is exact either way.

    Returns:
        A new ``SafetyLoraConfig``; pass it to ``get_peft_model`` (or use :func:`get_masked_lora_model`, which also
        checks the result), or as ``peft_config`` to a trainer.

    Raises:
        TypeError: for a non-``LoraConfig`` or non-``SafetyMask`` argument, or a non-string ``entries_method``.
        ValueError: an unknown ``entries_method``, DoRA, LoRA bias, a non-zero-B initialisation, mask entries on an
            ``lm_head`` the config targets, or masked parameters targeted through ``target_parameters``.

    Example:

    ```python
    >>> cfg = mask_lora_config(LoraConfig(r=16, target_modules="all-linear"), mask)    # doctest: +SKIP
    >>> model = get_peft_model(base_model, cfg)                                         # doctest: +SKIP
    ```
    """
    from ..mask import SafetyMask

    check_lora_options(lora_config)
    check_entries_method(entries_method)
    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask_lora_config expects a SafetyMask, got {type(mask).__name__}.")
    options = {
        f.name: copy.deepcopy(getattr(lora_config, f.name))
        for f in dataclasses.fields(LoraConfig)
        if f.init and f.name != "peft_type"
    }
    if isinstance(lora_config, SafetyLoraConfig):
        options.update(mask_layout=None, mask_source=None, base_fingerprints=None, weights_digest=None)
    options.update(mask=mask, entries_method=entries_method)
    return SafetyLoraConfig(**options)


def check_masked_lora_model(peft_model: nn.Module, mask: Any) -> None:
    """Verify that every module of ``peft_model`` that carries a LoRA adapter and mask entries masks them.

    Args:
        peft_model: a model with LoRA layers (a ``PeftModel`` or a model with injected adapters).
        mask: the ``SafetyMask`` the adapter must respect.

    Raises:
        ValueError: if a LoRA layer sits on a masked module without masking it (e.g. an embedding or a layer
            created without the custom module registration), or a ``Layer()``-masked module got a LoRA adapter.
    """
    from ..mask import Layer

    modules = {_strip_peft_prefix(k): m for k, m in peft_model.named_modules()}
    for name in mask.names:
        module_key = name.rpartition(".")[0]
        module = modules.get(module_key)
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A") or not len(module.lora_A):
            continue
        if isinstance(mask.granularity_of(name), Layer):
            raise ValueError(f"{module_key!r} is Layer()-masked but carries a LoRA adapter; use mask_lora_config.")
        if not isinstance(module, SafetyLoraLinear) or any(module._mask_of(a) is None for a in module.lora_A):
            raise ValueError(
                f"{module_key!r} has mask entries and a LoRA adapter that does not mask them "
                f"({type(module).__name__}). Build the config with mask_lora_config(...) and load adapters with "
                "load_masked_lora(...); masked LoRA supports nn.Linear modules only."
            )


def get_masked_lora_model(
    model: nn.Module, lora_config: LoraConfig, mask: Any, *, entries_method: str = "dense", **kwargs: Any
) -> PeftModel:
    """``get_peft_model(model, mask_lora_config(lora_config, mask))``, checked with :func:`check_masked_lora_model`.

    Args:
        model: the base model.
        lora_config: the LoRA config to protect.
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: ``"dense"`` (default, bit-exact), ``"sparse"`` or ``"auto"``: see :func:`mask_lora_config`.
        **kwargs: passed to ``peft.get_peft_model`` (e.g. ``adapter_name``, ``low_cpu_mem_usage``).

    Returns:
        The ``PeftModel`` (its config is a ``SafetyLoraConfig``, PEFT type ``SAFETY_LORA``).

    Raises:
        ValueError: see :func:`mask_lora_config` and :func:`check_masked_lora_model`; also a mask that does not fit
            the model (``SafetyMask.validate``).
    """
    _check_mask_fits(mask, model)
    peft_model = get_peft_model(model, mask_lora_config(lora_config, mask, entries_method=entries_method), **kwargs)
    check_masked_lora_model(peft_model, mask)
    return peft_model


def _check_mask_fits(mask: Any, model: nn.Module) -> None:
    """``mask.validate(model)``, except that quantised ``nn.Linear`` weights are compared by their logical shape.

    bitsandbytes stores packed weights (e.g. ``(512, 1)`` uint8 for a 32x32 layer), which a plain shape check
    would reject; fingerprints are only checked on floating-point weights.
    """
    from ..mask import SafetyMask

    if not isinstance(mask, SafetyMask):
        raise TypeError(f"expected a SafetyMask, got {type(mask).__name__}.")
    state: dict[str, torch.Tensor] = {}
    quantised = False
    for module_name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        for attr, param in base.named_parameters(recurse=False):
            key = f"{_strip_peft_prefix(module_name)}.{attr}" if module_name else attr
            key = key.replace(".base_layer.", ".")
            if isinstance(base, nn.Linear) and attr == "weight" and not param.dtype.is_floating_point:
                quantised = True
                param = torch.empty((base.out_features, base.in_features), device="meta")
            state.setdefault(key, param)
    mask.validate(state, fingerprint="ignore" if quantised else "error")


_HUB_KWARGS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")


def _adapter_file(model_id: str, filename: str, kwargs: dict[str, Any]) -> str:
    subfolder = kwargs.get("subfolder")
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        path = os.path.join(local, filename)
        if not os.path.isfile(path):
            raise ValueError(f"{model_id!r} has no {filename}: not a (complete) PEFT adapter folder.")
        return path
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model_id, filename, **{k: v for k, v in kwargs.items() if k in _HUB_KWARGS})


def _read_legacy_masks(model: nn.Module, weights_file: str) -> dict[str, dict[str, torch.Tensor]]:
    """The ``lora_safety_*`` buffers of a masked-LoRA adapter saved as plain ``LORA`` (before ``SAFETY_LORA``),
    checked against the model from the safetensors header (dtype, rank, size) before any tensor is read."""
    from safetensors import safe_open

    linear_shapes = {
        _strip_peft_prefix(k): (m.get_base_layer() if isinstance(m, BaseTunerLayer) else m)
        for k, m in model.named_modules()
    }
    masks: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights_file, framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            for kind, attr in _BUFFER.items():
                if not key.endswith("." + attr):
                    continue
                module_key = _strip_peft_prefix(key[: -len(attr) - 1])
                where = f"{weights_file}: {key}"
                module = linear_shapes.get(module_key)
                if not isinstance(module, nn.Linear):
                    raise ValueError(
                        f"{where}: the adapter masks module {module_key!r}, which this model does not have as an "
                        "nn.Linear: the adapter belongs to another base model."
                    )
                shape = (int(module.out_features), int(module.in_features))
                meta = fh.get_slice(key)
                dtype, dims = meta.get_dtype(), meta.get_shape()
                if dtype not in ("I32", "I64") or len(dims) != 1 or not 1 <= dims[0] <= layout_limit(kind, shape):
                    raise ValueError(
                        f"{where}: expected a 1-D int32/int64 tensor of at most {layout_limit(kind, shape)} {kind} "
                        f"indices, the header declares {dtype} {dims}. The file is corrupt or belongs to another model."
                    )
                idx = fh.get_tensor(key)
                validate_mask_indices(idx, kind, shape, where)
                if module_key in masks:
                    raise ValueError(f"{where}: module {module_key!r} has more than one mask buffer.")
                masks[module_key] = {kind: idx.to(torch.int32)}
    return masks


def load_masked_lora(
    model: nn.Module,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    entries_method: str | None = None,
    base_fingerprint_check: str | None = None,
    **kwargs: Any,
) -> PeftModel:
    """Load a masked LoRA adapter (``SAFETY_LORA``, or a legacy ``LORA`` folder with ``lora_safety_*`` buffers).

    A ``SAFETY_LORA`` adapter also loads with a plain ``PeftModel.from_pretrained`` after ``import peft_safety``;
    this function adds the overrides below and reads adapters saved by peft-safety before the ``SAFETY_LORA`` type
    existed (``peft_type: "LORA"``), which PEFT would load as unmasked LoRA.

    Args:
        model: the base model.
        model_id: local folder or Hub repo id of the adapter.
        adapter_name: name to give the adapter.
        is_trainable: load the adapter trainable (to continue training with the same guarantee).
        entries_method: override the saved forward method of ``Weight()`` masks (``"dense"``, ``"sparse"``,
            ``"auto"``; see :func:`mask_lora_config`).
        base_fingerprint_check: override the saved policy for base weights that differ from the adapter's recorded
            fingerprints: ``"error"``, ``"warn"`` or ``"ignore"``.
        **kwargs: passed to ``PeftModel.from_pretrained`` (``subfolder``, ``revision``, ``low_cpu_mem_usage``...).

    Returns:
        The ``PeftModel``.

    Raises:
        ValueError: not a masked LoRA adapter (another type, or a ``LORA`` folder without ``lora_safety_*``
            buffers), an invalid mask in the file, or an unknown ``entries_method``.
    """
    from peft import PeftConfig

    if entries_method is not None:
        check_entries_method(entries_method)
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    local = check_adapter_folder(model_id, hub.get("subfolder"))  # names a damaged config or weights file
    if local is not None:
        peft_type = local.get("peft_type")
    else:
        with open(_adapter_file(model_id, "adapter_config.json", hub), encoding="utf-8") as fh:
            peft_type = json.load(fh).get("peft_type")
    if peft_type == SafetyPeftType.SAFETY_LORA.value:
        config = PeftConfig.from_pretrained(model_id, **{k: v for k, v in hub.items() if k != "local_files_only"})
    elif peft_type == "LORA":
        legacy = LoraConfig.from_pretrained(model_id, **{k: v for k, v in hub.items() if k != "local_files_only"})
        masks = _read_legacy_masks(model, _adapter_file(model_id, "adapter_model.safetensors", hub))
        if not masks:
            raise ValueError(
                f"{model_id!r} has no lora_safety_* buffers: it is not a masked LoRA adapter. Load it with "
                "PeftModel.from_pretrained."
            )
        options = {f.name: getattr(legacy, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
        options.pop("peft_type")
        options["mask_layout"] = {
            k: {"kind": kind, "n": int(idx.numel()), "shape": list(_linear_shape(model, k))}
            for k, m in masks.items()
            for kind, idx in m.items()
        }
        config = SafetyLoraConfig(**options)
        config._safety_indices = masks
    else:
        raise ValueError(
            f"{model_id!r} is a {peft_type} adapter, not a masked LoRA adapter (SAFETY_LORA). Load it with "
            "PeftModel.from_pretrained."
        )
    if entries_method is not None:
        config.entries_method = entries_method
    if base_fingerprint_check is not None:
        if base_fingerprint_check not in ("error", "warn", "ignore"):
            raise ValueError(
                f"base_fingerprint_check={base_fingerprint_check!r} is invalid; use 'error', 'warn' or 'ignore'."
            )
        config.base_fingerprint_check = base_fingerprint_check
    return PeftModel.from_pretrained(
        model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def is_legacy_masked_lora(model_id: str, **kwargs: Any) -> bool:
    """Whether ``model_id`` is a masked-LoRA adapter saved as plain ``LORA`` (``lora_safety_*`` buffers in its weights),
    which only :func:`load_masked_lora` loads with its masks. Reads the config and the safetensors header only."""
    from safetensors import safe_open

    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    try:
        with open(_adapter_file(model_id, "adapter_config.json", hub), encoding="utf-8") as fh:
            if json.load(fh).get("peft_type") != "LORA":
                return False
        weights = _adapter_file(model_id, "adapter_model.safetensors", hub)
    except (OSError, ValueError):
        return False
    with safe_open(weights, framework="pt") as fh:
        return any(key.endswith(tuple("." + attr for attr in _BUFFER.values())) for key in fh.keys())  # noqa: SIM118


def _linear_shape(model: nn.Module, module_key: str) -> tuple[int, int]:
    for key, module in model.named_modules():
        if _strip_peft_prefix(key) == module_key:
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            return int(base.out_features), int(base.in_features)
    raise ValueError(f"The adapter masks {module_key!r}, which this model does not have.")
