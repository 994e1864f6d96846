"""``SafetyModel``: the PEFT tuner that wraps exactly the ``nn.Linear`` modules a ``SafetyMask`` touches (SET)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear

__all__ = ["SafetyModel", "mask_to_layout"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _granularity_to_kind(granularity: Any, indices: torch.Tensor, name: str) -> tuple[str, torch.Tensor]:
    """Map a mask granularity and its indices to the layer's storage kind and indices (see ``layer.py``)."""
    from ..mask import Head, Layer, Neuron, Weight

    if isinstance(granularity, Weight):
        return "entries", indices
    if isinstance(granularity, Neuron):
        return ("rows" if granularity.axis == 0 else "cols"), indices
    if isinstance(granularity, Head):
        head_dim = int(granularity.head_dim)
        offsets = torch.arange(head_dim, dtype=torch.int64)
        expanded = (indices.to(torch.int64)[:, None] * head_dim + offsets[None, :]).reshape(-1)
        return ("rows" if granularity.axis == 0 else "cols"), expanded
    if isinstance(granularity, Layer):
        return "dense", torch.zeros(1, dtype=torch.int32)
    raise TypeError(f"Unsupported granularity {granularity!r} for parameter {name!r}.")


def _resolve_mask(mask: Any):
    from ..mask import SafetyMask

    if isinstance(mask, SafetyMask):
        return mask
    if isinstance(mask, str):
        return SafetyMask.from_pretrained(mask)
    raise TypeError(f"SafetyConfig.mask must be a SafetyMask or a path / Hub id, got {type(mask).__name__}.")


def _base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _filter_config(config: SafetyConfig, module_keys: list[str]) -> SafetyConfig:
    """A shallow copy of ``config`` whose ``target_modules`` defaults to the mask's modules (by last name component).

    Suffix names (not full keys) keep PEFT's ``layers_to_transform`` logic active: PEFT skips it on exact-key matches.
    """
    probe = copy.copy(config)
    if probe.target_modules is None:
        probe.target_modules = sorted({k.rsplit(".", 1)[-1] for k in module_keys})
    return probe


def mask_to_layout(
    mask: Any, model: nn.Module, config: SafetyConfig
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Check ``mask`` against ``model`` and ``config`` and compute what each wrapped module stores.

    Args:
        mask: the ``SafetyMask``.
        model: the (possibly already adapted) base model.
        config: the adapter config (its module filters are checked against the mask).

    Returns:
        ``(layout, indices)``: ``layout[module_key] = {"kind", "n", "shape"}`` (JSON-serialisable, stored in the
        config) and ``indices[module_key]`` the layer's index tensor.

    Raises:
        ValueError: a mask parameter missing from the model, with another shape or fingerprint, not an ``nn.Linear``
            weight (embeddings, norms, fused 3-D MoE experts), or excluded by the config's filters.
    """
    from ..mask import fingerprint_tensor

    layout: dict[str, dict[str, Any]] = {}
    indices_by_module: dict[str, torch.Tensor] = {}
    module_keys: dict[str, str] = {}
    fingerprints = getattr(mask, "fingerprints", None) or {}
    for name in mask.names:
        module_key, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_key) if module_key else model
        except AttributeError:
            module = None
        base = _base_of(module) if module is not None else None
        param = getattr(base, attr, None) if base is not None else None
        if not isinstance(param, torch.Tensor):
            raise ValueError(
                f"The mask has entries on {name!r}, which this model does not have: the mask was built for another "
                "model. Build the mask on this model, or restrict it to this model's parameters (mask.restrict(...))."
            )
        if param.ndim >= 3:
            raise ValueError(
                f"SET cannot adapt {name!r} (shape {tuple(param.shape)}): it is a fused MoE expert parameter, not "
                "an nn.Linear weight, and SafetyConfig wraps nn.Linear modules only. Remove the experts from the "
                "mask, e.g. mask.filter(lambda name: '.experts.' not in name), or use SPA / full fine-tuning "
                "for them."
            )
        if attr != "weight" or not isinstance(base, nn.Linear):
            raise ValueError(
                f"SET cannot adapt {name!r}: it belongs to a {type(base).__name__}, and SafetyConfig wraps "
                "nn.Linear weights only. Remove it from the mask (mask.restrict(...) / mask.filter(...))."
            )
        shape = (base.out_features, base.in_features)
        expected = tuple(mask.shapes[name])
        if expected != shape:
            raise ValueError(
                f"The mask was built for another model: {name!r} has shape {expected} in the mask but {shape} here. "
                "Build the mask on this model."
            )
        wanted_fp = fingerprints.get(name)
        if wanted_fp is not None and base.weight.dtype.is_floating_point and base.weight.device.type != "meta":
            got = fingerprint_tensor(base.weight)
            if got != wanted_fp:
                raise ValueError(
                    f"The mask was built for another model: the fingerprint of {name!r} differs ({wanted_fp!r} in "
                    f"the mask, {got!r} here). Use the base model the mask was computed on, or rebuild the mask "
                    "(check that the model was loaded from the same checkpoint and revision)."
                )
        kind, idx = _granularity_to_kind(mask.granularity_of(name), mask[name], name)
        layout[module_key] = {"kind": kind, "n": int(idx.numel()), "shape": list(shape)}
        indices_by_module[module_key] = idx
        module_keys[module_key] = name

    probe = _filter_config(config, list(layout))
    for module_key, name in module_keys.items():
        result = check_target_module_exists(probe, module_key)
        if isinstance(result, _ExcludedModule) or not result:
            raise ValueError(
                f"The mask has entries on {name!r}, but the config's filters exclude module {module_key!r} "
                f"(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}, "
                f"layers_to_transform={config.layers_to_transform!r}, modules_to_save={config.modules_to_save!r}). "
                "SET never drops mask entries silently: restrict the mask (mask.restrict(...)) or widen the filters."
            )
    if not layout:
        raise ValueError("The mask has no entries: there is nothing to train. Select a non-empty mask.")
    return layout, indices_by_module


class SafetyModel(BaseTuner):
    """The SET tuner: trainable deltas at a ``SafetyMask``'s entries, everything else frozen.

    Created by ``peft.get_peft_model(model, SafetyConfig(mask=...))``; do not instantiate it directly. Only the
    ``nn.Linear`` modules with mask entries are replaced by ``SafetyLinear``. Saved adapters contain the indices
    (``safety_indices``) and values (``safety_values``) of every wrapped module, so ``PeftModel.from_pretrained`` needs
    no mask file, but it does need ``import peft_safety`` first (PEFT has no plugin discovery).

    Example:

    ```python
    >>> import peft_safety  # registers the SAFETY type
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_safety.SafetyConfig(mask=mask))   # doctest: +SKIP
    >>> model.print_trainable_parameters()                                          # doctest: +SKIP
    ```
    """

    prefix: str = "safety_"
    tuner_layer_cls = SafetyLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: SafetyConfig, model_config: dict) -> SafetyConfig:
        if not isinstance(peft_config, SafetyConfig):
            raise TypeError(f"SafetyModel needs a SafetyConfig, got {type(peft_config).__name__}.")
        # No default target modules: the mask decides which modules are wrapped.
        return peft_config

    def _prepare_model(self, peft_config: SafetyConfig, model: nn.Module) -> None:
        if peft_config.mask is not None:
            mask = _resolve_mask(peft_config.mask)
            layout, indices = mask_to_layout(mask, model, peft_config)
            peft_config.mask_layout = layout
            peft_config._safety_indices = indices  # not a dataclass field: never serialised
        else:
            # Loading a saved adapter: the layout comes from adapter_config.json; placeholder indices are replaced
            # by the checkpoint's (see _remap_adapter_state_dict_for_load).
            peft_config._safety_indices = {}

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # PeftModel.forward silently drops `adapter_names` for tuners without this hook; refuse instead of running
        # the batch through the wrong adapter.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "Mixed-batch inference (adapter_names=...) is not supported by SAFETY adapters; use "
                "set_adapter(...) to switch adapters."
            )
        yield

    @staticmethod
    def _check_target_module_exists(peft_config: SafetyConfig, key: str) -> bool:
        return key in (peft_config.mask_layout or {})

    def _create_and_replace(
        self,
        peft_config: SafetyConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        info = peft_config.mask_layout[current_key]
        indices = getattr(peft_config, "_safety_indices", {}).get(current_key)
        if indices is None:
            n = int(info["n"])
            indices = torch.zeros(1, dtype=torch.int32) if info["kind"] == "dense" else torch.arange(n)
        kwargs = {
            "kind": info["kind"],
            "indices": indices,
            "init_weights": peft_config.init_weights,
            "values_dtype": _DTYPES[peft_config.values_dtype],
            "gradient_method": peft_config.gradient_method,
            "inference_mode": peft_config.inference_mode,
        }
        if isinstance(target, SafetyLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"Module {current_key!r} is already wrapped by another PEFT method ({type(target).__name__}); a SAFETY "
                "adapter cannot be stacked on it."
            )
        if not isinstance(target, nn.Linear):
            raise TypeError(f"SET supports nn.Linear modules only; {current_key!r} is a {type(target).__name__}.")
        new_module = SafetyLinear(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            # An added (not yet active) adapter must not become trainable.
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SafetyConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model and resize placeholders whose saved mask has another size.

        The values parameter is re-created only when its shape differs, so that optimizer references (the Trainer
        may resume after creating the optimizer) stay valid whenever possible.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".safety_indices.{adapter_name}"
        for name, module in model.named_modules():
            if not isinstance(module, SafetyLayer) or adapter_name not in module.safety_indices:
                continue
            saved = remapped.get(name + suffix)
            if saved is None:
                saved = remapped.get(f"{name}{suffix}".removeprefix("base_model.model."))
            if saved is None:
                continue
            if saved.dtype.is_floating_point:
                raise ValueError(f"Checkpoint indices {name + suffix!r} are not integers (dtype {saved.dtype}).")
            if saved.shape != module.safety_indices[adapter_name].shape:
                module.resize_adapter_(adapter_name, saved.to(module.safety_indices[adapter_name].dtype))
        return remapped
