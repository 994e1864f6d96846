"""``SafetyLoraLinear``: PEFT's LoRA ``Linear`` with a mask per adapter, its forward and merge run by `MaskedLoraVariant`.

The layer holds what is data: each adapter's mask, in a persistent int32 buffer per storage kind
(``lora_safety_rows`` / ``lora_safety_cols`` / ``lora_safety_entries``, written into ``adapter_model.safetensors``).
It validates a buffer (``_layout.check_indices``: dtype, 1-D, range, sorted and unique) the first time it uses it after
every change, so a corrupt or never-loaded buffer fails loudly on every loading path, including the ones that bypass
``SafetyLoraModel``'s checkpoint checks (transformers' ``load_adapter``).

For every adapter with a mask on this module, ``resolve_lora_variant`` returns `MaskedLoraVariant` (``variant.py``),
and PEFT's inherited ``forward`` / ``merge`` / ``unmerge`` hand that adapter to it. Adapters without a mask here behave
exactly like PEFT's LoRA ``Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from ...vocab import base_name
from .._layout import check_indices
from .._sparse import EntryPattern
from .config import SPARSE_MAX_DENSITY, SafetyLoraConfig, check_entries_method
from .variant import BUFFERS, MaskedLoraVariant, mask_delta, sparse_forward_bound

__all__ = ["SafetyLoraLinear", "is_masked_layer"]


class SafetyLoraLinear(LoraLinear):
    """A LoRA ``Linear`` whose update is zero on each adapter's mask (rows, columns or entries of the weight).

    Built by :class:`~peft_safety.tuner.safety_lora.model.SafetyLoraModel` for every ``nn.Linear`` a
    ``SafetyLoraConfig`` targets (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included). Each adapter reads its mask
    from its config: the in-memory indices of a config built from a ``SafetyMask``, or, when loading, an int32
    placeholder of the size ``mask_layout`` declares (filled with ``-1`` until the adapter weights are loaded into it; a
    placeholder that is used is an error).
    """

    #: Forward mechanism of entry masks, one of ``ENTRIES_METHODS`` (set from the config; assign on an instance to
    #: override one layer). ``"dense"`` is bit-exact on the mask; ``"sparse"`` (and ``"auto"`` where it picks it) is
    #: exact up to fp32 rounding in forward (`forward_tolerance`). Merging is bit-exact on every path.
    entries_method: str = "auto"

    other_param_names = (*LoraLinear.other_param_names, *BUFFERS.values())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        self._safety_target = base_name(kwargs.get("target_name") or "")
        self.config_masks(config)  # checked before anything sized by the config is allocated
        if isinstance(config, SafetyLoraConfig):
            self.entries_method = check_entries_method(config.entries_method)
        for attr in BUFFERS.values():
            if not isinstance(getattr(self, attr, None), BufferDict):
                # persistent=True: PEFT's BufferDict defaults to non-persistent, which would drop the mask on save.
                setattr(self, attr, BufferDict({}, persistent=True))
            if adapter_name in getattr(self, attr):
                del getattr(self, attr)[adapter_name]
        # an adapter added again under the same name starts afresh: no variant, no validated-buffer or pattern cache
        self.lora_variant.pop(adapter_name, None)
        self.__dict__.get("_entry_patterns", {}).pop(adapter_name, None)
        for kind in BUFFERS:
            self.__dict__.get("_checked_masks", {}).pop((adapter_name, kind), None)
        # PEFT builds the factors, resolves the variant (`resolve_lora_variant`) and calls its `init` (the mask buffer)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant | None:
        """`MaskedLoraVariant` when the adapter's config masks this module, else PEFT's own choice (vanilla LoRA)."""
        if self.config_masks(config):
            return MaskedLoraVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def config_masks(self, config: Any) -> dict[str, torch.Tensor]:
        """The mask this module gets from ``config``: ``{kind: int32 indices}``, empty when it masks nothing here.

        The in-memory indices of a config built from a mask, or a ``-1`` placeholder of the size ``mask_layout``
        declares (the adapter weights are loaded into it).

        Raises:
            ValueError: the layout's shape differs from this module's (another model), checked before allocating.
        """
        if not isinstance(config, SafetyLoraConfig):
            return {}
        target = getattr(self, "_safety_target", "")
        entry = (config.mask_layout or {}).get(target)
        if entry is None:
            return {}
        shape = (int(self.out_features), int(self.in_features))
        if tuple(entry["shape"]) != shape:
            raise ValueError(
                f"The masked-LoRA adapter's mask for {target!r} is for a {entry['shape'][0]}x{entry['shape'][1]} "
                f"weight, but this model's module is {shape[0]}x{shape[1]}: the adapter belongs to another base model."
            )
        in_memory = getattr(config, "_safety_indices", {}).get(target)
        if in_memory:
            return dict(in_memory)
        return {entry["kind"]: torch.full((entry["n"],), -1, dtype=torch.int32)}

    def real_device(self) -> torch.device:
        """The device of the base layer's real (non-meta) tensors, where the masks live."""
        base = self.get_base_layer()
        for tensor in (*base.parameters(recurse=False), *base.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
        return torch.device("cpu")

    def _mask_of(self, adapter_name: str) -> tuple[str, torch.Tensor] | None:
        """``(kind, int64 indices)`` of the adapter's mask, validated once per buffer version; None without mask."""
        for kind, attr in BUFFERS.items():
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
            f"{getattr(self, '_safety_target', '') or type(self).__name__}.{BUFFERS[kind]} (adapter {adapter_name!r})"
        )
        check_indices(idx, kind, (self.out_features, self.in_features), where)
        checked[(adapter_name, kind)] = key

    def entries_path(self, adapter_name: str) -> str | None:
        """The forward path an entry-masked adapter takes: ``"sparse"``, ``"dense"``, or None without entry mask.

        ``"auto"`` resolves to ``"sparse"`` on CPU when the mask covers at most :data:`SPARSE_MAX_DENSITY` of the
        weight, and to ``"dense"`` otherwise (always off the CPU, where the CSR kernels are slower than the dense
        masked delta).

        Raises:
            ValueError: if ``entries_method`` is not one of ``ENTRIES_METHODS``.
        """
        mask = self._mask_of(adapter_name)
        if mask is None or mask[0] != "entries":
            return None
        method = check_entries_method(self.entries_method)
        if method != "auto":
            return method
        if self.lora_A[adapter_name].weight.device.type != "cpu":
            return "dense"
        density = mask[1].numel() / max(1, self.out_features * self.in_features)
        return "sparse" if density <= SPARSE_MAX_DENSITY else "dense"

    def _entry_pattern(self, adapter_name: str) -> EntryPattern:
        """The cached index structure of the adapter's entry mask (rebuilt if the buffer moved or was overwritten)."""
        idx = self.lora_safety_entries[adapter_name]
        key = (idx.device, idx.data_ptr(), idx._version, idx.numel())
        cache = self.__dict__.setdefault("_entry_patterns", {})
        cached = cache.get(adapter_name)
        if cached is None or cached[0] != key:
            self._check_buffer(adapter_name, "entries", idx)
            cached = (key, EntryPattern(idx, self.out_features, self.in_features))
            cache[adapter_name] = cached
        return cached[1]

    def forward_tolerance(self) -> torch.Tensor | None:
        """How far the training forward's effective update may be from exactly zero on the mask, per weight entry.

        None when every active, unmerged adapter's forward is bit-exact on its mask (rows, columns, the ``"dense"``
        entry path, adapters without a mask). Otherwise a float ``(d_out, d_in)`` tensor: the sum over the adapters
        on the ``"sparse"`` path of :func:`~peft_safety.tuner.safety_lora.variant.sparse_forward_bound` (a rounding
        bound derived from the compute dtype's epsilon and the magnitude ``s·|B|·|A|`` of the update), in the unit of
        an identity-input measurement (``analysis.mask_drift``, ``verify_safety``). The merged delta is bit-exact on
        the mask whatever this says.
        """
        bound = None
        out_dtype = self.get_base_layer().weight.dtype
        if not out_dtype.is_floating_point:  # quantised storage: the layer computes in its compute dtype
            out_dtype = getattr(self.get_base_layer(), "compute_dtype", None) or torch.float32
        for adapter in self.active_adapters:
            if adapter not in self.lora_A or adapter in self.merged_adapters:
                continue
            if self.entries_path(adapter) != "sparse":
                continue
            term = sparse_forward_bound(
                self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter], out_dtype
            )
            bound = term if bound is None else bound + term
        return bound

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
        """``(B A) * scaling`` with the masked rows, columns or entries exactly zero (what merging adds)."""
        delta = super().get_delta_weight(adapter)
        mask = self._mask_of(adapter)
        return delta if mask is None else mask_delta(delta, *mask)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.utils.quantization_utils import resolve_quantization_backend

        if resolve_quantization_backend(self.get_base_layer()) is not None:
            raise ValueError(
                "Merging a masked LoRA adapter into a quantised (bitsandbytes) base re-quantises the whole weight and "
                "moves the protected entries. Keep the adapter unmerged, or load the base in bf16/fp32 and merge there."
            )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def __repr__(self) -> str:
        return "safety_masked_" + super().__repr__()


def is_masked_layer(module: nn.Module, adapter_name: str) -> bool:
    """Whether ``module`` is a masked LoRA layer holding a mask for ``adapter_name``."""
    return isinstance(module, SafetyLoraLinear) and any(
        adapter_name in getattr(module, attr, {}) for attr in BUFFERS.values()
    )
