"""Masked LoRA for SPA (mode ``"freeze"``): a LoRA adapter whose update is exactly zero on a ``SafetyMask``.

The mechanism depends on the mask's granularity, always the cheapest one that is **exact with any optimizer**:

| granularity | mechanism | extra cost per step |
|---|---|---|
| ``Layer()`` | the module is added to ``exclude_modules``: LoRA never adapts it | none |
| ``Neuron(axis=0)``, ``Head(axis=0)`` | rows ``i`` of ``lora_B`` enter forward and merge as zeros (``B.index_fill(0, rows, 0)``) | an index fill on a ``(d_out, r)`` tensor |
| ``Neuron(axis=1)``, ``Head(axis=1)`` | columns ``j`` of ``lora_A`` enter forward and merge as zeros (and start at zero) | an index fill on an ``(r, d_in)`` tensor |
| ``Weight()`` | forward: LoRA's factored path minus a sparse correction ``x @ Dᵀ``, ``D = (B A) * scaling`` at the masked entries only (``entries_method="sparse"``); or the dense delta with the masked entries filled with zero (``"dense"``). Merge: always the masked dense delta | sparse: O(nnz * (tokens + r)); dense: one ``(d_out, d_in)`` delta and matmul |

Masking the *effective* weights inside forward (rather than zeroing gradients and re-zeroing after each optimizer
step) means the guarantee does not depend on the optimizer: the masked rows/columns never reach the output or the
merged weight, whatever AdamW decay, momentum or a foreign optimizer state does to the stored tensors. Their gradient
is zero as a side effect, so with AdamW they also stay at their initial zeros, which keeps even a plain-LoRA reload of
a rows/columns adapter exact. No low-rank parametrisation can keep arbitrary entries at zero, hence the correction for
``Weight()`` masks: ``y = base(x) + s * x Aᵀ Bᵀ - x Dᵀ`` with ``D[i, j] = s * B[i] . A[:, j]`` on the mask, built
by a sampled matmul (SDDMM) and applied with CSR products in a hand-written autograd function
(``_MaskedEntryCorrection``), so no weight-sized tensor exists in forward or backward. It equals the dense masked
delta up to fp rounding; ``entries_method="auto"`` uses it up to :data:`SPARSE_MAX_DENSITY` mask density and the
dense delta above (measured crossover, docs/tuner.md). Merging always uses the masked dense delta, so merged masked
entries are bit-identical.

Refused, with a clear error: DoRA (rescales whole rows through its magnitude vector), LoRA biases, initialisations
with a non-zero ``B`` (``init_lora_weights`` other than ``True``/``"gaussian"``: pissa, olora, eva, corda, loftq,
orthogonal, ...), ``lm_head`` targets (TRL rejects ``lm_head`` adapters), and ``target_parameters`` over masked
parameters (fused MoE experts).

The masks are stored per layer in persistent buffers (``lora_safety_rows`` / ``lora_safety_cols`` /
``lora_safety_entries``), so they are written into ``adapter_model.safetensors``. PEFT does not serialise custom LoRA
layer classes: reload with :func:`load_masked_lora`, which rebuilds the masked layers from those buffers.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

__all__ = [
    "ENTRIES_METHODS",
    "SPARSE_MAX_DENSITY",
    "SafetyLoraLinear",
    "check_masked_lora_model",
    "get_masked_lora_model",
    "load_masked_lora",
    "mask_lora_config",
]

_MASK_KINDS = ("rows", "cols", "entries")
_BUFFER = {kind: f"lora_safety_{kind}" for kind in _MASK_KINDS}
_ZERO_B_INITS = (True, "gaussian")

#: How a ``Weight()``-masked layer removes its masked entries in forward: ``"auto"`` picks ``"sparse"`` up to
#: :data:`SPARSE_MAX_DENSITY` and ``"dense"`` above it.
ENTRIES_METHODS = ("auto", "sparse", "dense")

#: ``"auto"`` uses the sparse correction for entry masks covering at most this fraction of their weight. The sparse
#: path costs O(nnz * tokens) and the dense masked delta O(d_out * d_in * tokens), both memory-bound differently;
#: ``benchmarks/masked_lora.py --sweep`` measured the crossover on CPU (see docs/tuner.md).
SPARSE_MAX_DENSITY = 0.1


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
    ``grad_A = s * (Gᵀ @ B)ᵀ`` with ``G`` the sparse matrix of ``g``. Computed in fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, pattern, scaling):
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


class SafetyLoraLinear(LoraLinear):
    """A LoRA ``Linear`` whose delta is zero on the mask's rows, columns or entries (see the module docstring).

    Do not instantiate directly: :func:`mask_lora_config` registers a subclass bound to a mask through
    ``LoraConfig._register_custom_module``. Modules without mask entries behave exactly like ``peft``'s LoRA
    ``Linear``.
    """

    #: ``{module key: {"rows"|"cols"|"entries": int tensor}}``, set on the subclass made by ``_layer_class``.
    _safety_masks: dict[str, dict[str, torch.Tensor]] = {}

    #: Forward mechanism of entry masks, one of :data:`ENTRIES_METHODS` (class default set by ``mask_lora_config``;
    #: assign on an instance to override one layer). Both give the same output up to fp rounding; merge always uses
    #: the exact masked dense delta.
    entries_method: str = "auto"

    other_param_names = (*LoraLinear.other_param_names, *_BUFFER.values())

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        # The buffers must exist before LoraLinear.__init__ calls update_layer; nn.Module is not initialised yet, so
        # record the target name on the class-independent kwargs and create the buffers lazily in update_layer.
        self._pending_target = kwargs.get("target_name", "")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_pending_target" and "_parameters" not in self.__dict__:
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        for attr in _BUFFER.values():
            if not hasattr(self, attr) or not isinstance(getattr(self, attr), BufferDict):
                # persistent=True: PEFT's BufferDict defaults to non-persistent, which would drop the mask on save.
                setattr(self, attr, BufferDict({}, persistent=True))
        target = kwargs.get("target_name") or getattr(self, "_pending_target", "")
        self._safety_target = target
        masks = type(self)._safety_masks.get(_strip_peft_prefix(target), {})
        device = self.lora_A[adapter_name].weight.device
        for kind, idx in masks.items():
            getattr(self, _BUFFER[kind])[adapter_name] = idx.to(device=device, dtype=torch.int32)
        if "cols" in masks:
            # A is Kaiming-initialised, so masked columns are not zero by default; zero them so the stored adapter
            # is clean too (forward and merge mask them regardless).
            with torch.no_grad():
                self.lora_A[adapter_name].weight.index_fill_(1, masks["cols"].to(device=device, dtype=torch.int64), 0)
        if "rows" in masks:
            with torch.no_grad():
                self.lora_B[adapter_name].weight.index_fill_(0, masks["rows"].to(device=device, dtype=torch.int64), 0)

    def _mask_of(self, adapter_name: str) -> tuple[str, torch.Tensor] | None:
        for kind, attr in _BUFFER.items():
            buffers = getattr(self, attr, None)
            if buffers is not None and adapter_name in buffers:
                return kind, buffers[adapter_name].to(torch.int64)
        return None

    def entries_path(self, adapter_name: str) -> str | None:
        """The forward path an entry-masked adapter takes: ``"sparse"``, ``"dense"``, or None without entry mask.

        ``"auto"`` resolves to ``"sparse"`` when the mask covers at most :data:`SPARSE_MAX_DENSITY` of the weight.

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
        density = mask[1].numel() / max(1, self.out_features * self.in_features)
        return "sparse" if density <= SPARSE_MAX_DENSITY else "dense"

    def _entry_pattern(self, adapter_name: str) -> _EntryPattern:
        """The cached CSR structure of the adapter's entry mask (rebuilt if the buffer moved or was overwritten)."""
        idx = self.lora_safety_entries[adapter_name]
        key = (idx.device, idx.data_ptr(), idx._version, idx.numel())
        cache = self.__dict__.setdefault("_entry_patterns", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
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
            if path == "sparse":
                # Factored LoRA minus what it adds at the masked entries: no (d_out, d_in) tensor at all.
                weight_a = self.lora_A[name].weight
                weight_b = self.lora_B[name].weight
                xd = dropout(xa)
                lora_out = F.linear(F.linear(xd, weight_a), weight_b) * scaling
                correction = _MaskedEntryCorrection.apply(xd, weight_a, weight_b, self._entry_pattern(name), scaling)
                result = result + (lora_out - correction).to(result_dtype)
            elif path == "dense":
                idx = self._mask_of(name)[1]
                weight_a = self.lora_A[name].weight
                weight_b = self.lora_B[name].weight
                delta = (weight_b @ weight_a) * scaling
                delta = delta.reshape(-1).index_fill(0, idx.to(delta.device), 0).view_as(delta)
                result = result + F.linear(dropout(xa), delta).to(result_dtype)
            else:
                weight_a, weight_b = self._masked_factors(name)
                result = result + (F.linear(F.linear(dropout(xa), weight_a), weight_b) * scaling).to(result_dtype)
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "safety_masked_" + super().__repr__()


def _strip_peft_prefix(key: str) -> str:
    for prefix in ("base_model.model.",):
        key = key.removeprefix(prefix)
    return key


def _layer_class(masks: dict[str, dict[str, torch.Tensor]], entries_method: str) -> type[SafetyLoraLinear]:
    """A ``SafetyLoraLinear`` subclass bound to ``masks`` (PEFT instantiates custom layers by class)."""
    attrs = {"_safety_masks": masks, "entries_method": entries_method, "__module__": __name__}
    return type("SafetyLoraLinear", (SafetyLoraLinear,), attrs)


def _check_entries_method(entries_method: Any) -> None:
    if not isinstance(entries_method, str):
        raise TypeError(f"entries_method must be a string, got {type(entries_method).__name__}.")
    if entries_method not in ENTRIES_METHODS:
        raise ValueError(
            f"entries_method={entries_method!r} is not one of {ENTRIES_METHODS}: use 'auto' (sparse correction up to "
            f"{SPARSE_MAX_DENSITY:.0%} mask density, dense masked delta above), or force 'sparse' or 'dense'."
        )


def _check_lora_config(config: LoraConfig) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"mask_lora_config expects a peft.LoraConfig, got {type(config).__name__}.")
    if config.use_dora:
        raise ValueError(
            "use_dora=True cannot keep masked entries frozen: DoRA rescales whole rows through its magnitude vector, "
            "so every protected entry moves. Use plain LoRA (use_dora=False) with a safety mask."
        )
    if config.init_lora_weights not in _ZERO_B_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} starts LoRA with a non-zero update (or rewrites the base "
            "weights), which moves protected entries before training. Use init_lora_weights=True or 'gaussian'."
        )
    if config.lora_bias:
        raise ValueError("lora_bias=True adds a trainable bias to every output, masked rows included; use False.")


def _exclude(config: LoraConfig, keys: list[str]) -> None:
    """Add full module keys to ``config.exclude_modules`` (a list, or a regex string extended by alternation)."""
    if not keys:
        return
    current = config.exclude_modules
    if current is None:
        config.exclude_modules = sorted(keys)
    elif isinstance(current, str):
        config.exclude_modules = "|".join([f"(?:{current})", *(re.escape(k) for k in sorted(keys))])
    else:
        config.exclude_modules = sorted({*current, *keys})


def _granularity_kind(granularity: Any, idx: torch.Tensor, name: str) -> tuple[str | None, torch.Tensor | None]:
    from ..mask import Head, Layer, Neuron, Weight

    if isinstance(granularity, Layer):
        return None, None
    if isinstance(granularity, Weight):
        return "entries", idx
    if isinstance(granularity, Neuron):
        return ("rows" if granularity.axis == 0 else "cols"), idx
    if isinstance(granularity, Head):
        hd = int(granularity.head_dim)
        rows = (idx.to(torch.int64)[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
        return ("rows" if granularity.axis == 0 else "cols"), rows
    raise TypeError(f"Unsupported granularity {granularity!r} for {name!r}.")


def mask_lora_config(lora_config: LoraConfig, mask: Any, *, entries_method: str = "auto") -> LoraConfig:
    """A copy of ``lora_config`` whose LoRA update is exactly zero on ``mask`` (SPA with LoRA).

    Layer-masked modules are excluded from the adapter; every other masked ``nn.Linear`` gets a ``SafetyLoraLinear``
    (registered through ``LoraConfig._register_custom_module``) that keeps masked rows, columns or entries of its
    delta at zero in forward and merge.

    Args:
        lora_config: the LoRA config to protect (not modified).
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: forward mechanism for ``Weight()`` masks. ``"sparse"``: LoRA's factored path minus a sparse
            correction at the masked entries (O(nnz) extra work); ``"dense"``: the dense masked delta (one extra
            ``(d_out, d_in)`` matmul per layer); ``"auto"`` (default): sparse when the mask covers at most
            :data:`SPARSE_MAX_DENSITY` of the weight. Outputs agree up to fp rounding; merging is exact either way.

    Returns:
        A new ``LoraConfig``; pass it to ``get_peft_model`` (or use :func:`get_masked_lora_model`, which also checks
        the result), or as ``peft_config`` to a trainer.

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

    _check_lora_config(lora_config)
    _check_entries_method(entries_method)
    if not isinstance(mask, SafetyMask):
        raise TypeError(f"mask_lora_config expects a SafetyMask, got {type(mask).__name__}.")
    config = copy.deepcopy(lora_config)
    layer_keys: list[str] = []
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for name in mask.names:
        module_key, _, attr = name.rpartition(".")
        if module_key.rsplit(".", 1)[-1] == "lm_head" and _targets(config, module_key):
            raise ValueError(
                f"The mask has entries on {name!r} and the LoRA config targets lm_head. TRL's SFTTrainer rejects "
                "lm_head adapters, and a LoRA layer there cannot keep its entries frozen under TRL's fused loss. "
                "Leave lm_head out of target_modules (it then stays frozen), or protect it with full fine-tuning "
                "(SafetySFTTrainer with safety_mode='freeze' and peft_config=None, or apply_mask_(model, mask, "
                "mode='freeze'))."
            )
        if attr != "weight":
            targeted = config.target_parameters and any(name.endswith(p) for p in config.target_parameters)
            if targeted:
                raise ValueError(
                    f"The mask has entries on {name!r}, which the LoRA config adapts through target_parameters. "
                    "Masked LoRA supports nn.Linear modules only: drop it from target_parameters (it then stays "
                    "frozen) or protect it with full fine-tuning (safety_mode='freeze', peft_config=None)."
                )
            continue  # not an nn.Linear weight and not targeted: LoRA never changes it
        kind, idx = _granularity_kind(mask.granularity_of(name), mask[name], name)
        if kind is None:
            layer_keys.append(module_key)
        else:
            masks[module_key] = {kind: idx.to(torch.int32)}
    _exclude(config, layer_keys)
    if masks:
        config._register_custom_module({nn.Linear: _layer_class(masks, entries_method)})
    return config


def _targets(config: LoraConfig, module_key: str) -> bool:
    if config.target_modules in (None, "all-linear"):
        # PEFT's "all-linear" never includes the output layer; None defers to PEFT's per-model defaults (attention)
        return False
    result = check_target_module_exists(config, module_key)
    return bool(result) and type(result).__name__ != "_ExcludedModule"


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
    model: nn.Module, lora_config: LoraConfig, mask: Any, *, entries_method: str = "auto", **kwargs: Any
) -> PeftModel:
    """``get_peft_model(model, mask_lora_config(lora_config, mask))``, checked with :func:`check_masked_lora_model`.

    Args:
        model: the base model.
        lora_config: the LoRA config to protect.
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: ``"auto"``, ``"sparse"`` or ``"dense"``: see :func:`mask_lora_config`.
        **kwargs: passed to ``peft.get_peft_model`` (e.g. ``adapter_name``).

    Returns:
        The ``PeftModel``.

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


def load_masked_lora(
    model: nn.Module,
    model_id: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    *,
    entries_method: str = "auto",
    **kwargs: Any,
) -> PeftModel:
    """Load a masked LoRA adapter saved from :func:`mask_lora_config` / :func:`get_masked_lora_model`.

    PEFT does not serialise custom LoRA layer classes, so a plain ``PeftModel.from_pretrained`` would rebuild ordinary
    LoRA layers (and warn about unexpected ``lora_safety_*`` keys). This reads the masks back from
    ``adapter_model.safetensors``, re-registers the masked layer class and loads the adapter.

    Args:
        model: the base model.
        model_id: local folder or Hub repo id of the adapter.
        adapter_name: name to give the adapter.
        is_trainable: load the adapter trainable (to continue training with the same guarantee).
        entries_method: ``"auto"``, ``"sparse"`` or ``"dense"``: see :func:`mask_lora_config`.
        **kwargs: passed to ``PeftModel.from_pretrained`` and ``load_peft_weights`` (``subfolder``, ``revision``...).

    Returns:
        The ``PeftModel``.

    Raises:
        ValueError: if the adapter is not a LoRA adapter or has no ``lora_safety_*`` buffers, or for an unknown
            ``entries_method``.
    """
    from peft import PeftConfig

    _check_entries_method(entries_method)
    from peft.utils import load_peft_weights

    config = PeftConfig.from_pretrained(
        model_id, **{k: v for k, v in kwargs.items() if k in ("subfolder", "revision", "token")}
    )
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{model_id!r} is a {type(config).__name__} adapter, not a LoRA adapter.")
    state = load_peft_weights(model_id, **{k: v for k, v in kwargs.items() if k in ("subfolder", "revision", "token")})
    masks: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        for kind, attr in _BUFFER.items():
            if key.endswith("." + attr):
                masks.setdefault(_strip_peft_prefix(key[: -len(attr) - 1]), {})[kind] = tensor.to(torch.int32)
    if not masks:
        raise ValueError(
            f"{model_id!r} has no lora_safety_* buffers: it is not a masked LoRA adapter. Load it with "
            "PeftModel.from_pretrained."
        )
    config._register_custom_module({nn.Linear: _layer_class(masks, entries_method)})
    return PeftModel.from_pretrained(
        model, model_id, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )
