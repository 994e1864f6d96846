"""``SafetyModel``: the PEFT tuner that wraps exactly the ``nn.Linear`` modules a ``SafetyMask`` touches (SET).

Which modules: those the mask has entries on (``mask_to_layout``, which also checks the mask against the model and the
config's filters). How a saved adapter is rebuilt: from ``mask_layout`` (checked against the model before any
placeholder exists), then ``_remap_adapter_state_dict_for_load`` checks the checkpoint's tensors and resizes the
placeholders to them; transformers' ``model.load_adapter``, which bypasses that hook, gets the same checks at the first
forward (`peft_safety.tuner._load_check`). Provenance (base fingerprints, Hub id) is recorded on creation and checked
on load. A model holds SAFETY adapters only (`peft_safety.tuner._mixing`).
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from ...vocab import base_name
from .._layout import SET_KINDS, check_indices, check_layout, check_layout_modules, storage_of
from .._load_check import PendingLoadCheck, adapter_layers, resolve_pending
from .._mixing import own_configs, refuse_foreign_configs
from ..peft_type import SAFETY_PREFIX, SafetyPeftType
from ..provenance import adapter_file, check_base, check_weights_digest, record_base
from .config import SafetyConfig
from .layer import SafetyLayer, SafetyLinear, values_shape

__all__ = ["SafetyModel", "mask_to_layout"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WHAT = "This SAFETY adapter"


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
    from ...mask import fingerprint_tensor

    layout: dict[str, dict[str, Any]] = {}
    indices_by_module: dict[str, torch.Tensor] = {}
    module_keys: dict[str, str] = {}
    fingerprints = mask.fingerprints
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
        kind, idx = storage_of(mask.granularity_of(name), mask[name], name)
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


# "<module>.safety_indices" (checkpoint key) or "<module>.safety_indices.<adapter>" (model key after remapping)
_SAFETY_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<attr>safety_indices|safety_values)(?:\.(?P<adapter>[^.]+))?$")


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

    prefix: str = SAFETY_PREFIX
    tuner_layer_cls = SafetyLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        refuse_foreign_configs(model, adapter_name, SafetyPeftType.SAFETY.value)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # a model holds SAFETY adapters only: another type's config is refused, with the hint, wherever it is added
        own_configs(self, SafetyConfig, SafetyPeftType.SAFETY.value)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        loading = self.peft_config[adapter_name].mask is None
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if loading:
            # transformers' load_adapter loads the weights without PEFT's load hook: check them on first use
            layers = {k: m for k, m in adapter_layers(model, adapter_name).items() if isinstance(m, SafetyLayer)}
            PendingLoadCheck(model, adapter_name, layers, _SET_ATTRS, type(self)._check_loaded)

    def add_weighted_adapter(self, adapters: list[str], *args: Any, **kwargs: Any) -> None:
        """Not available for SET adapters (PEFT offers it for LoRA-like tuners only)."""
        raise NotImplementedError(
            f"add_weighted_adapter({adapters!r}) is not available for SAFETY (SET) adapters. To apply several SET "
            "adapters at once, merge them into the base one after the other (model.merge_and_unload("
            "adapter_names=[...])), or activate them together (model.base_model.set_adapter([...]))."
        )

    def _prepare_adapter_config(self, peft_config: SafetyConfig, model_config: dict) -> SafetyConfig:
        if not isinstance(peft_config, SafetyConfig):
            raise TypeError(
                f"SafetyModel needs a SafetyConfig, got {type(peft_config).__name__}. A SAFETY (SET) adapter cannot "
                "share a model with adapters of another PEFT type (PeftMixedModel accepts PEFT's built-in types "
                "only). Merge the SET adapter first (base = peft_model.merge_and_unload()), then add the other "
                "adapter to the merged model."
            )
        # No default target modules: the mask decides which modules are wrapped.
        return peft_config

    def _prepare_model(self, peft_config: SafetyConfig, model: nn.Module) -> None:
        if peft_config.mask is not None:
            layout, indices = mask_to_layout(peft_config.mask, model, peft_config)
            peft_config.mask_layout = layout
            peft_config._safety_indices = indices  # not a dataclass field: never serialised
            # provenance: the base weights this adapter is trained on, and where they can be loaded from
            record_base(peft_config, model, [f"{key}.weight" for key in layout])
        else:
            # Loading a saved adapter: the layout comes from adapter_config.json. It is checked against the model
            # before any placeholder is allocated; the placeholders are replaced by the checkpoint's tensors (see
            # _remap_adapter_state_dict_for_load), which are checked there.
            peft_config.mask_layout = check_layout(peft_config.mask_layout, kinds=SET_KINDS)
            check_layout_modules(peft_config.mask_layout, model, what=_WHAT)
            check_base(peft_config, model, what=_WHAT)
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
            indices = torch.arange(int(info["n"]))  # a placeholder (checked size); the checkpoint's indices replace it
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
                "adapter cannot be stacked on it. Merge the other adapter first (merge_and_unload()), then add the "
                "SAFETY adapter to the merged model."
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
        """Check the checkpoint's tensors, map their keys to the model and resize placeholders of another size.

        Everything is checked before the first placeholder is resized: the weights belong to the config (digest),
        every wrapped module has its index and value tensors, every SAFETY tensor in the file belongs to a wrapped
        module, indices follow the index rule (``_layout.check_indices``), values are finite floating point with the
        shape the indices imply (`_check_tensors`).

        The values parameter is re-created only when its shape differs, so that optimizer references (the Trainer
        may resume after creating the optimizer) stay valid whenever possible.
        """
        resolve_pending(model, adapter_name)
        check_weights_digest(config, state_dict, what="The SAFETY adapter")
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = {key: m for key, m in adapter_layers(model, adapter_name).items() if isinstance(m, SafetyLayer)}
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in remapped.items():
            match = _SAFETY_KEY_RE.match(key)
            if match is None or match.group("adapter") not in (None, adapter_name):
                continue
            found.setdefault(base_name(match.group("module")), {})[match.group("attr")] = value
        _check_tensors(config, found, layers, adapter_name)
        for module_key, module in layers.items():
            idx = found[module_key]["safety_indices"]
            if idx.shape != module.safety_indices[adapter_name].shape:
                module.resize_adapter_(adapter_name, idx.to(module.safety_indices[adapter_name].dtype))
        return remapped

    @staticmethod
    def _check_loaded(model: nn.Module, adapter_name: str, found: dict, missing: list[str]) -> None:
        """The checks of `_remap_adapter_state_dict_for_load` on what a loader without PEFT's hook put into the
        layers (`peft_safety.tuner._load_check.PendingLoadCheck`)."""
        from peft.utils import get_peft_model_state_dict

        config = model.peft_config[adapter_name]
        layers = {key: m for key, m in adapter_layers(model, adapter_name).items() if isinstance(m, SafetyLayer)}
        _check_tensors(config, found, layers, adapter_name, missing=missing)
        if getattr(config, "weights_digest", None) is not None:
            state = get_peft_model_state_dict(model, adapter_name=adapter_name)
            if any(t.device.type == "meta" for t in state.values()):
                warnings.warn(
                    f"The weights digest of adapter {adapter_name!r} was not checked: some of its tensors are offloaded "
                    "(on the meta device). Load it with PeftModel.from_pretrained to check it.",
                    UserWarning,
                    stacklevel=2,
                )
                return
            check_weights_digest(config, state, what="The SAFETY adapter")


_SET_ATTRS = ("safety_indices", "safety_values")


def _check_tensors(
    config: SafetyConfig,
    found: dict[str, dict[str, torch.Tensor]],
    layers: dict[str, SafetyLayer],
    adapter_name: str,
    missing: list[str] = (),
) -> None:
    """A checkpoint's (or the loaded layers') SET tensors agree with ``config``: every SAFETY tensor belongs to a
    wrapped module, every wrapped module has its indices and values, indices follow the index rule, values are finite
    floating point with the shape the indices imply.

    Raises:
        ValueError: naming the file, the module and the problem.
    """
    weights = adapter_file(config, "adapter_model.safetensors")
    cfg_file = adapter_file(config, "adapter_config.json")
    unknown = sorted(set(found) - set(layers))
    if unknown:
        raise ValueError(
            f"{weights} has SAFETY deltas for module {unknown[0]!r}, which {cfg_file}'s mask_layout does not list (or "
            f"this model lacks){_more(unknown)}: loading would drop them silently. The config does not belong to "
            "these weights: save the adapter again."
        )
    absent = sorted(set(missing))
    for module_key in layers:
        absent += [
            f"{module_key}.{attr}"
            for attr in ("safety_indices", "safety_values")
            if attr not in found.get(module_key, {}) and f"{module_key}.{attr}" not in absent
        ]
    if absent:
        raise ValueError(
            f"SAFETY tensor '{absent[0]}' is missing from {weights}{_more(absent)}, although {cfg_file}'s mask_layout "
            "lists its module: the layer keeps the placeholder it was built with. The weights file is incomplete or "
            "belongs to another adapter, or no weights were loaded at all: load the adapter with "
            "PeftModel.from_pretrained / load_adapter, or save it again."
        )
    for module_key, module in layers.items():
        kind = module.safety_kind[adapter_name]
        shape = (module.out_features, module.in_features)
        idx = found[module_key]["safety_indices"]
        check_indices(idx, kind, shape, f"{weights}: SAFETY tensor '{module_key}.safety_indices'")
        values = found[module_key]["safety_values"]
        _check_values(values, values_shape(kind, idx.numel(), shape), f"{module_key}.safety_values", weights)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_values(values: Any, wanted: tuple[int, ...], name: str, weights: str) -> None:
    where = f"{weights}: SAFETY tensor {name!r}"
    if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where} must be a floating-point tensor, got {got}; the weights file is damaged.")
    if tuple(values.shape) != tuple(wanted):
        raise ValueError(
            f"{where} has shape {tuple(values.shape)}, but its indices need shape {tuple(wanted)}; the weights file "
            "is damaged."
        )
    if values.device.type != "meta" and not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"{where} contains NaN or infinite deltas: the adapter would turn this module's outputs non-finite. The "
            "weights file is damaged or training diverged; load an earlier checkpoint."
        )
