"""``SafetyModel``: the PEFT tuner that wraps exactly the ``nn.Linear`` modules a ``SafetyMask`` touches (SET)."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from .config import SafetyConfig
from .layer import KINDS, SafetyLayer, SafetyLinear
from .provenance import (
    base_model_reference,
    check_base_fingerprints,
    fingerprint_base,
    override_policy,
    state_dict_digest,
)

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


_LAYOUT_KEYS = {"kind", "n", "shape"}
# "<module>.safety_indices" (checkpoint key) or "<module>.safety_indices.<adapter>" (model key after remapping)
_SAFETY_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<attr>safety_indices|safety_values)(?:\.(?P<adapter>[^.]+))?$")
_OVERRIDE_HINT = (
    "base_fingerprint_check='warn' (or 'ignore') to PeftModel.from_pretrained / SafetyConfig.from_pretrained, or load "
    "inside `with peft_safety.tuner.provenance.fingerprint_check_override('warn'):`"
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unit_limit(kind: str, shape: tuple[int, int]) -> int:
    """How many indices a module of ``shape`` can hold for ``kind`` (and the exclusive upper bound of each index)."""
    return {"entries": shape[0] * shape[1], "rows": shape[0], "cols": shape[1], "dense": 1}[kind]


def validate_layout(layout: Any, model: nn.Module) -> None:
    """Check a ``mask_layout`` read from ``adapter_config.json`` against ``model``, before anything is allocated.

    Every entry must name an ``nn.Linear`` of ``model`` (possibly already wrapped by a SAFETY layer), with
    ``shape == [out_features, in_features]``, a known ``kind`` and an integer ``n`` within what that module can hold
    (so every placeholder the tuner then allocates is bounded by the model, not by the file).

    Raises:
        ValueError: naming the module, the field and the remedy.
    """
    where = "adapter_config.json's mask_layout"
    if not isinstance(layout, dict) or not layout:
        raise ValueError(
            f"{where} must be a non-empty object {{module name: {{'kind', 'n', 'shape'}}}}, got {type(layout).__name__}"
            ". The adapter folder is damaged or was not written by peft-safety: save the adapter again."
        )
    for key, info in layout.items():
        if not isinstance(key, str) or not isinstance(info, dict) or set(info) != _LAYOUT_KEYS:
            raise ValueError(
                f"{where} entry {key!r} must be an object with exactly the keys 'kind', 'n' and 'shape', got {info!r}. "
                "The adapter folder is damaged: save the adapter again."
            )
        kind, n, shape = info["kind"], info["n"], info["shape"]
        if kind not in KINDS:
            raise ValueError(f"{where}[{key!r}]['kind'] = {kind!r} is not one of {list(KINDS)}; the file is damaged.")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise ValueError(
                f"{where}[{key!r}]['shape'] = {shape!r} is not [out_features, in_features]; the file is damaged."
            )
        try:
            module = model.get_submodule(key)
        except AttributeError:
            module = None
        base = _base_of(module) if module is not None else None
        if not isinstance(base, nn.Linear):
            found = "is not in this model" if module is None else f"is a {type(base).__name__}, not an nn.Linear"
            raise ValueError(
                f"{where} names module {key!r}, which {found}: the adapter was made for another model "
                "architecture. Load it on the base model it was trained on (see base_model_name_or_path)."
            )
        here = [base.out_features, base.in_features]
        if shape != here:
            raise ValueError(
                f"{where}[{key!r}] has shape {shape}, but this model's {key!r} has shape {here}: the adapter was made "
                "for another model. Load it on the base model it was trained on."
            )
        limit = _unit_limit(kind, (shape[0], shape[1]))
        if not _is_int(n) or not 0 <= n <= limit:
            raise ValueError(
                f"{where}[{key!r}]['n'] = {n!r} is invalid: a {kind!r} adapter on a {shape[0]}x{shape[1]} weight holds "
                f"an integer number of indices between 0 and {limit}. The file is damaged: save the adapter again."
            )


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
            # provenance: the base weights this adapter is trained on, and where they can be loaded from
            peft_config.base_fingerprints = fingerprint_base(model, [f"{key}.weight" for key in layout]) or None
            ref = base_model_reference(model)
            peft_config.base_model_source = ref["source"]
            if ref["source"] == "hub":
                peft_config.base_model_name_or_path = ref["base_model"]
                if peft_config.revision is None:
                    peft_config.revision = ref["revision"]
        else:
            # Loading a saved adapter: the layout comes from adapter_config.json. It is checked against the model
            # before any placeholder is allocated; the placeholders are replaced by the checkpoint's tensors (see
            # _remap_adapter_state_dict_for_load), which are checked there.
            validate_layout(peft_config.mask_layout, model)
            check_base_fingerprints(
                model,
                peft_config.base_fingerprints,
                policy=override_policy(peft_config.base_fingerprint_check),
                what="This SAFETY adapter",
                recorded_base=peft_config.base_model_name_or_path,
                override=_OVERRIDE_HINT,
            )
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
        """Check the checkpoint's tensors, map their keys to the model and resize placeholders of another size.

        Everything is checked before the first placeholder is resized: the weights belong to the config (digest),
        every wrapped module has its index and value tensors, every SAFETY tensor in the file belongs to a wrapped
        module, indices are 1-D integers, strictly increasing (sorted, no duplicates) and inside the weight, values
        are floating point with the shape the indices imply.

        The values parameter is re-created only when its shape differs, so that optimizer references (the Trainer
        may resume after creating the optimizer) stay valid whenever possible.
        """
        digest = getattr(config, "weights_digest", None)
        if digest is not None:
            got = state_dict_digest(state_dict)
            if got != digest:
                raise ValueError(
                    f"The SAFETY adapter's adapter_config.json and its weights do not belong together (weights digest "
                    f"{got}, the config records {digest}): a save was probably interrupted after writing the weights "
                    "and before writing the config. Save the adapter again (or restore both files from the same save)."
                )
            config.weights_digest = None  # checked: the in-memory config now describes the model, not a file
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers: dict[str, SafetyLayer] = {}
        for name, module in model.named_modules():
            if isinstance(module, SafetyLayer) and adapter_name in module.safety_indices:
                layers[name.removeprefix("base_model.model.")] = module
        found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
        for key, value in remapped.items():
            match = _SAFETY_KEY_RE.match(key)
            if match is None or match.group("adapter") not in (None, adapter_name):
                continue
            module_key = match.group("module").removeprefix("base_model.model.")
            found.setdefault(module_key, {})[match.group("attr")] = (key, value)
        unknown = sorted(set(found) - set(layers))
        if unknown:
            raise ValueError(
                f"The SAFETY checkpoint has deltas for module {unknown[0]!r}, which adapter_config.json's mask_layout "
                f"does not list (or this model lacks){_more(unknown)}: loading would drop them silently. The config "
                "does not belong to these weights: save the adapter again."
            )
        checked: dict[str, torch.Tensor] = {}
        for module_key, module in layers.items():
            tensors = found.get(module_key, {})
            kind = module.safety_kind[adapter_name]
            shape = (module.out_features, module.in_features)
            for attr in ("safety_indices", "safety_values"):
                if attr not in tensors:
                    raise ValueError(
                        f"SAFETY checkpoint tensor '{module_key}.{attr}' is missing, although adapter_config.json's "
                        f"mask_layout lists {module_key!r}: the weights file is incomplete or belongs to another "
                        "adapter. Save the adapter again."
                    )
            _, idx = tensors["safety_indices"]
            _, values = tensors["safety_values"]
            checked[module_key] = _check_indices(idx, kind, shape, f"{module_key}.safety_indices")
            _check_values(values, kind, shape, checked[module_key].numel(), f"{module_key}.safety_values")
        for module_key, module in layers.items():
            idx = checked[module_key]
            if idx.shape != module.safety_indices[adapter_name].shape:
                module.resize_adapter_(adapter_name, idx.to(module.safety_indices[adapter_name].dtype))
        return remapped


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_indices(idx: Any, kind: str, shape: tuple[int, int], name: str) -> torch.Tensor:
    where = f"SAFETY checkpoint tensor {name!r}"
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"{where} is not a tensor ({type(idx).__name__}); the weights file is damaged.")
    if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ValueError(f"{where} must hold integer indices, got dtype {idx.dtype}; the weights file is damaged.")
    if idx.ndim != 1:
        raise ValueError(f"{where} must be 1-D, got shape {tuple(idx.shape)}; the weights file is damaged.")
    limit = _unit_limit(kind, shape)
    if idx.numel() > limit:
        raise ValueError(
            f"{where} holds {idx.numel()} indices, more than a {kind!r} adapter on a {shape[0]}x{shape[1]} weight can "
            f"({limit}); the weights file is damaged or belongs to another model."
        )
    if kind == "dense":
        if idx.numel() != 1 or int(idx[0]) != 0:
            raise ValueError(f"{where} of a whole-weight ('dense') adapter must be [0]; the weights file is damaged.")
        return idx
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= limit:
            raise ValueError(
                f"{where} has indices in [{low}, {high}], outside [0, {limit}) for a {kind!r} adapter on a "
                f"{shape[0]}x{shape[1]} weight: the weights file is damaged or belongs to another model."
            )
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(
                f"{where} must be sorted in strictly increasing order (no duplicates): unsorted or repeated indices "
                "give wrong value gradients and double-counted deltas. The weights file is damaged: save the adapter "
                "again."
            )
    return idx


def _check_values(values: Any, kind: str, shape: tuple[int, int], n: int, name: str) -> None:
    where = f"SAFETY checkpoint tensor {name!r}"
    if not isinstance(values, torch.Tensor) or not values.dtype.is_floating_point:
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{where} must be a floating-point tensor, got {got}; the weights file is damaged.")
    wanted = {"entries": (n,), "rows": (n, shape[1]), "cols": (shape[0], n), "dense": shape}[kind]
    if tuple(values.shape) != tuple(wanted):
        raise ValueError(
            f"{where} has shape {tuple(values.shape)}, but its {n} {kind} indices on a {shape[0]}x{shape[1]} weight "
            f"need shape {tuple(wanted)}; the weights file is damaged."
        )
