"""``SafetyLoraModel``: PEFT's LoRA tuner with masked layers, for the ``SAFETY_LORA`` PEFT type (SPA with LoRA).

Everything LoRA does (target matching, adapters, merge/unmerge, save/load, ``low_cpu_mem_usage``) is inherited from
``peft.tuners.lora.LoraModel``. This class only

* builds a :class:`~peft_safety.tuner.safety_lora.layer.SafetyLoraLinear` for every targeted ``nn.Linear``
  (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included), whose mask comes from the adapter's ``SafetyLoraConfig``;
* checks, before injecting, that every module the saved ``mask_layout`` names exists in the model with the recorded
  shape (so nothing sized by the file is allocated for the wrong model), and keeps in the layout exactly the masked
  modules that carry the adapter (a masked module LoRA does not adapt needs no mask: LoRA cannot change it);
* checks a checkpoint's tensors against ``adapter_config.json`` (weights digest; LoRA factors present exactly where the
  config places adapters; mask tensors of the declared kind and length that follow the index rule; finite factors)
  before PEFT loads them (``_remap_adapter_state_dict_for_load``: ``PeftModel.from_pretrained``, ``load_adapter``,
  ``set_peft_model_state_dict``), and on transformers' ``model.load_adapter``, which bypasses that hook, at the first
  forward (`peft_safety.tuner._load_check`);
* records the base model's fingerprints and Hub id when an adapter is created from a mask, and checks them when a
  saved adapter is loaded (``fingerprint_check``: error by default);
* keeps one PEFT type per model (`peft_safety.tuner._mixing`), removes PEFT's mixed-batch hooks after a refused call,
  and masks ``add_weighted_adapter``'s combination with the union of the combined masks.

`get_masked_lora_model` is the one function for code that holds a ``LoraConfig`` and a mask (the trainer does): the
config with the mask applied, ``get_peft_model``, and a check that every LoRA layer on a masked module masks it.
Loading needs no function of ours: ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM`` after
``import peft_safety``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...vocab import base_name
from .._layout import LORA_KINDS, base_modules, check_indices, check_layout, check_layout_modules
from .._load_check import PendingLoadCheck, adapter_layers, resolve_pending
from .._mixing import own_configs, refuse_foreign_configs
from ..peft_type import SAFETY_LORA_PREFIX, SafetyPeftType
from ..provenance import adapter_file, check_base, check_weights_digest, record_base
from .config import SafetyLoraConfig
from .layer import SafetyLoraLinear, is_masked_layer
from .variant import BUFFERS

__all__ = ["SafetyLoraModel", "check_masked_lora_model", "get_masked_lora_model"]


class SafetyLoraModel(LoraModel):
    """The tuner of ``SAFETY_LORA`` adapters: LoRA whose update is exactly zero on the adapter's mask.

    Created by ``get_peft_model(model, SafetyLoraConfig(...))`` and by PEFT's loaders for folders whose
    ``adapter_config.json`` says ``"peft_type": "SAFETY_LORA"``. Beyond ``LoraModel``:

    * a model holds adapters of this type only (`peft_safety.tuner._mixing`): another type's config is refused with
      what to do instead, on every path that adds one (``get_peft_model`` on a model that carries ours, transformers'
      ``load_adapter``);
    * the saved ``mask_layout`` lists the masked modules that carry this adapter's LoRA layers, and only those: a
      mask entry in a module LoRA does not adapt needs no protection in the adapter (LoRA cannot change that module);
    * loading checks every tensor of the checkpoint against ``adapter_config.json`` (weights digest, mask tensors,
      LoRA factors present exactly where the config places adapters, finite), on PEFT's loaders in
      ``_remap_adapter_state_dict_for_load`` and on transformers' ``load_adapter`` at the first forward
      (`peft_safety.tuner._load_check`);
    * a refused mixed-batch call (``adapter_names=...``) leaves no PEFT hook behind;
    * ``add_weighted_adapter`` protects the union of the combined adapters' masks.
    """

    prefix: str = SAFETY_LORA_PREFIX

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any) -> None:
        refuse_foreign_configs(model, adapter_name, SafetyPeftType.SAFETY_LORA.value)
        super().__init__(model, peft_config, adapter_name, **kwargs)
        own_configs(self, SafetyLoraConfig, SafetyPeftType.SAFETY_LORA.value)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear) and isinstance(lora_config, SafetyLoraConfig):
            kwargs.pop("device_map", None)
            return SafetyLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)

    def _check_new_adapter_config(self, config: Any) -> None:
        if not isinstance(config, SafetyLoraConfig):
            raise TypeError(
                f"A SAFETY_LORA model takes SafetyLoraConfig adapters only, got {type(config).__name__}: a plain LoRA "
                "adapter next to a masked one would move the protected entries. Build it with "
                "SafetyLoraConfig.from_lora_config(cfg, mask), or load it into a separate model."
            )
        super()._check_new_adapter_config(config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        union = self.__dict__.get("_weighted_union", {}).get(adapter_name)
        if union is not None:  # add_weighted_adapter: the combined adapter protects the union of the masks
            config.__dict__["_mask"] = None
            config.mask_layout, config._safety_indices, config.exclude_modules = union
            config.mask_source = config.weights_digest = None
        created = config.mask is not None or union is not None
        config.mask_layout = check_layout(config.mask_layout, kinds=LORA_KINDS, allow_empty=True)
        check_layout_modules(config.mask_layout, model, what="This SAFETY_LORA adapter")
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        layers = _lora_layers(model, adapter_name)
        # A masked module that LoRA does not adapt (not targeted, or left out) needs no mask in the adapter: LoRA
        # cannot change it. The layout keeps exactly the masked modules that carry this adapter, so that what is saved
        # and what a loader expects agree (and adapters saved before, which listed such modules, still load).
        config.mask_layout = {key: entry for key, entry in config.mask_layout.items() if key in layers}
        _check_layers_carry_masks(config, model, adapter_name)
        names = [f"{key}.weight" for key in config.mask_layout]
        if created:
            record_base(config, model, names)
        else:
            if names:
                check_base(config, model, what=f"This SAFETY_LORA adapter ({adapter_name!r})")
            # transformers' load_adapter loads the weights without PEFT's load hook: check them on first use
            PendingLoadCheck(model, adapter_name, layers, tuple(_ATTRS), type(self)._check_loaded)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if isinstance(config, SafetyLoraConfig):
            resolve_pending(model, adapter_name)
            check_weights_digest(config, state_dict, what="The SAFETY_LORA adapter")
            found = _group(state_dict)
            _check_tensors(config, found, _lora_layers(model, adapter_name), adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @staticmethod
    def _check_loaded(model: nn.Module, adapter_name: str, found: dict, missing: list[str]) -> None:
        """The checks of `_remap_adapter_state_dict_for_load` on what a loader without PEFT's hook put into the
        layers (`peft_safety.tuner._load_check.PendingLoadCheck`)."""
        from peft.utils import get_peft_model_state_dict

        config = model.peft_config[adapter_name]
        _check_tensors(config, found, _lora_layers(model, adapter_name), adapter_name, missing=missing)
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
            check_weights_digest(config, state, what="The SAFETY_LORA adapter")

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT's hooks for ``adapter_names=...``, removed again when the call raises (PEFT removes them only after
        a successful forward, so one refused call would make every later plain call fail the same way)."""
        if kwargs.get("adapter_names") is None and kwargs.get("alora_offsets") is None:
            with super()._enable_peft_forward_hooks(*args, **kwargs):
                yield
            return
        modules = list(self.modules())
        before = [set(m._forward_pre_hooks) for m in modules]
        try:
            with super()._enable_peft_forward_hooks(*args, **kwargs):
                yield
        except BaseException:
            for module, old in zip(modules, before, strict=True):
                for hook_id in set(module._forward_pre_hooks) - old:
                    del module._forward_pre_hooks[hook_id]
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
            raise

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args, **kwargs):
        """PEFT's ``add_weighted_adapter``, with the new adapter masked by the **union** of the combined adapters'
        masks: every entry one of them protects has an exactly zero update in the combination (whatever
        ``combination_type``; PEFT's low-rank combinations only approximate the weighted sum elsewhere).

        Per module, the union of two row masks is a row mask, of two column masks a column mask, anything else an
        entry mask. Modules an adapter leaves out of LoRA (``exclude_modules``, which holds every ``Layer()``-masked
        module) are left out of the combination too: a warning names those where another adapter had a LoRA update,
        which the combination drops.
        """
        if adapter_name in self.peft_config or any(a not in self.peft_config for a in adapters):
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        self.__dict__["_weighted_union"] = {adapter_name: _union(self.model, adapters, self.peft_config)}
        try:
            super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)
        finally:
            self.__dict__.pop("_weighted_union", None)
        if adapter_name not in self.peft_config:
            return None
        combined = adapter_layers(self.model, adapter_name)
        dropped = sorted(key for a in adapters for key in adapter_layers(self.model, a) if key not in combined)
        if dropped:
            warnings.warn(
                f"add_weighted_adapter({adapter_name!r}) leaves {sorted(set(dropped))} out of the combination: one of "
                f"{adapters} excludes them from LoRA (exclude_modules, e.g. a Layer() mask), so their updates from the "
                "other adapters are dropped to keep every protected entry unchanged.",
                UserWarning,
                stacklevel=2,
            )
        return None


#: LoRA's factor attributes and the mask buffers, as they appear in checkpoint keys.
_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_MASK_ATTRS = {attr: kind for kind, attr in BUFFERS.items()}
_ATTRS = set(_FACTORS) | set(_MASK_ATTRS)


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """``{module: layer}`` of the LoRA layers (linear or embedding) that hold ``adapter_name``."""
    return {
        key: layer
        for key, layer in adapter_layers(model, adapter_name).items()
        if adapter_name in getattr(layer, "lora_A", {}) or adapter_name in getattr(layer, "lora_embedding_A", {})
    }


def _group(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {attr: tensor}}`` of a checkpoint's LoRA factors and mask tensors (other keys left out)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        hits = [i for i, part in enumerate(parts) if part in _ATTRS]
        if not hits:
            continue
        i = hits[-1]
        module = base_name(".".join(parts[:i]))
        attr = parts[i] + (".weight" if parts[-1] == "weight" and parts[i] in ("lora_A", "lora_B") else "")
        found.setdefault(module, {})[attr] = value
    return found


def _needed(layer: nn.Module, adapter_name: str) -> tuple[str, ...]:
    if adapter_name in getattr(layer, "lora_A", {}):
        return ("lora_A.weight", "lora_B.weight")
    return ("lora_embedding_A", "lora_embedding_B")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _check_tensors(
    config: SafetyLoraConfig,
    found: dict[str, dict[str, torch.Tensor]],
    layers: dict[str, nn.Module],
    adapter_name: str,
    missing: list[str] = (),
) -> None:
    """A checkpoint's (or the loaded layers') LoRA factors and masks agree with ``config`` exactly.

    * weights for a module the config places no adapter on are refused (loading would drop them silently);
    * every module the config places an adapter on has both factors, and a masked one its mask tensor (a missing
      factor would stay at its random initialisation);
    * mask tensors: only for the modules ``mask_layout`` lists, of the kind and length it declares, valid index
      tensors (``_layout.check_indices``);
    * the factors are finite (non-finite factors turn the layer's outputs non-finite).

    Raises:
        ValueError: naming the file, the module and the problem.
    """
    weights = adapter_file(config, "adapter_model.safetensors")
    cfg_file = adapter_file(config, "adapter_config.json")
    layout = config.mask_layout or {}
    stray = sorted(m for m in found if m not in layers)
    if stray:
        held = ", ".join(sorted(found[stray[0]]))
        raise ValueError(
            f"{weights} holds {held} for module {stray[0]!r}{_more(stray)}, but {cfg_file} places no adapter there "
            f"(target_modules={_show(config.target_modules)}, exclude_modules={_show(config.exclude_modules)}, "
            f"layers_to_transform={config.layers_to_transform!r}): loading would drop those weights silently. The "
            "config was edited or belongs to other weights: restore it, or save the adapter again."
        )
    absent = sorted(set(missing))
    for module, layer in layers.items():
        needed = list(_needed(layer, adapter_name))
        if module in layout:
            needed.append(BUFFERS[layout[module]["kind"]])
        absent += [f"{module}.{attr}" for attr in needed if attr not in found.get(module, {})]
    if absent:
        absent = sorted(set(absent))
        raise ValueError(
            f"{weights} has no tensor {absent[0]!r}{_more(absent)}, although {cfg_file} places an adapter (and, for "
            "a masked module, its mask) there: the layer keeps the placeholder it was built with (random factors, an "
            "unloaded mask). The weights file is incomplete (an interrupted save?) or belongs to another adapter, or "
            "no weights were loaded at all: load the adapter with PeftModel.from_pretrained / load_adapter, or save "
            "it again."
        )
    for module, tensors in found.items():
        for attr, value in tensors.items():
            if attr in _MASK_ATTRS:
                _check_mask_tensor(layout, module, attr, value, weights, cfg_file)
            elif _non_finite(value):
                raise ValueError(
                    f"{weights}: tensor '{module}.{attr}' contains NaN or infinite values: the adapter would turn this "
                    "module's outputs non-finite. The weights file is damaged or training diverged; load an earlier "
                    "checkpoint."
                )


def _show(value: Any) -> str:
    return repr(sorted(value)) if isinstance(value, (set, frozenset)) else repr(value)


def _non_finite(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.device.type == "meta":
        return False
    return not bool(torch.isfinite(value).all())


def _check_mask_tensor(layout: dict, module: str, attr: str, idx: Any, weights: str, cfg_file: str) -> None:
    kind = _MASK_ATTRS[attr]
    entry = layout.get(module)
    where = f"{weights}: tensor '{module}.{attr}'"
    if entry is None:
        raise ValueError(
            f"{where} is a mask for {module!r}, which {cfg_file}'s mask_layout does not list: the config and the "
            "weights come from different saves (an interrupted or mixed save). Re-save the adapter."
        )
    if entry["kind"] != kind:
        raise ValueError(
            f"{where}: mask_layout says {entry['kind']!r} for {module!r}, the weights file has {kind!r}: the config "
            "and the weights come from different saves. Re-save the adapter."
        )
    if isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.numel() != entry["n"]:
        raise ValueError(
            f"{where}: {idx.numel()} indices, but mask_layout declares n={entry['n']} for {module!r}: the config "
            "and the weights come from different saves. Re-save the adapter."
        )
    check_indices(idx, kind, tuple(entry["shape"]), where)


def _union(model: nn.Module, adapters: list[str], configs: dict) -> tuple[dict, dict, Any]:
    """``(mask_layout, in-memory indices, exclude_modules)`` of a combination of ``adapters``: per module the union of
    their masks, and the union of their exclusions."""
    from .._layout import unit_limit

    masks: dict[str, list[tuple[str, torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module_key, layer in _layers(model).items():
        if not isinstance(layer, SafetyLoraLinear):
            continue
        for adapter in adapters:
            mask = layer._mask_of(adapter) if adapter in layer.lora_A else None
            if mask is not None:
                masks.setdefault(module_key, []).append((mask[0], mask[1].cpu()))
                shapes[module_key] = (int(layer.out_features), int(layer.in_features))
    layout: dict[str, dict[str, Any]] = {}
    indices: dict[str, dict[str, torch.Tensor]] = {}
    for module_key, parts in masks.items():
        d_out, d_in = shapes[module_key]
        kinds = {kind for kind, _ in parts}
        if len(kinds) == 1:
            kind = kinds.pop()
            idx = torch.unique(torch.cat([i for _, i in parts]))
        else:
            kind = "entries"
            flats = []
            for part_kind, i in parts:
                if part_kind == "rows":
                    flats.append((i[:, None] * d_in + torch.arange(d_in)).reshape(-1))
                elif part_kind == "cols":
                    flats.append((torch.arange(d_out)[:, None] * d_in + i[None, :]).reshape(-1))
                else:
                    flats.append(i)
            idx = torch.unique(torch.cat(flats))
        if idx.numel() > unit_limit(kind, (d_out, d_in)):  # pragma: no cover - unique indices below the limit
            raise AssertionError(module_key)
        layout[module_key] = {"kind": kind, "n": int(idx.numel()), "shape": [d_out, d_in]}
        indices[module_key] = {kind: idx.to(torch.int32)}
    return layout, indices, _union_exclusions([configs[a].exclude_modules for a in adapters])


def _union_exclusions(values: list[Any]) -> Any:
    """The union of several ``exclude_modules`` values (None, a list of names matched as PEFT does, or a regex)."""
    names: set[str] = set()
    patterns: list[str] = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, str):
            patterns.append(value)
        else:
            names.update(value)
    if not patterns:
        return sorted(names) or None
    # PEFT matches a list entry as the whole key or a dotted suffix, a string as a full-match regex
    patterns += [rf"(?:.*\.)?{re.escape(name)}" for name in sorted(names)]
    return "|".join(f"(?:{p})" for p in patterns)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{base name: module}`` without looking through PEFT wrappers (the tuner layers themselves)."""
    out: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        out.setdefault(base_name(key), module)
    return out


def _check_layers_carry_masks(config: SafetyLoraConfig, model: nn.Module, adapter_name: str) -> None:
    """A targeted module the layout masks must be a masked layer for this adapter (never a silent plain LoRA)."""
    modules = _layers(model)
    for key in config.mask_layout or {}:
        module = modules.get(key)
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue  # not targeted by this adapter: LoRA never changes that module
        if not is_masked_layer(module, adapter_name):
            raise ValueError(
                f"{key!r} carries adapter {adapter_name!r} without its mask ({type(module).__name__}): masked LoRA "
                "needs nn.Linear targets. Remove the module from target_modules or from the mask."
            )


def check_masked_lora_model(peft_model: nn.Module, mask: Any) -> None:
    """Verify that every module of ``peft_model`` that carries a LoRA adapter and mask entries masks them.

    Args:
        peft_model: a model with LoRA layers (a ``PeftModel`` or a model with injected adapters).
        mask: the ``SafetyMask`` the adapter must respect.

    Raises:
        ValueError: if a LoRA layer sits on a masked module without masking it (e.g. a plain LoRA adapter, an
            embedding, or a layer created without the ``SAFETY_LORA`` type), or a ``Layer()``-masked module got a
            LoRA adapter.
    """
    from ...mask import Layer

    modules = _layers(peft_model)
    for name in mask.names:
        module_key = name.rpartition(".")[0]
        module = modules.get(module_key)
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A") or not len(module.lora_A):
            continue
        if isinstance(mask.granularity_of(name), Layer):
            raise ValueError(
                f"{module_key!r} is Layer()-masked but carries a LoRA adapter; build the config with "
                "SafetyLoraConfig(mask=...) or SafetyLoraConfig.from_lora_config(...), which leaves it out."
            )
        if not isinstance(module, SafetyLoraLinear) or any(module._mask_of(a) is None for a in module.lora_A):
            raise ValueError(
                f"{module_key!r} has mask entries and a LoRA adapter that does not mask them "
                f"({type(module).__name__}). Build the config with SafetyLoraConfig(mask=...) / "
                "SafetyLoraConfig.from_lora_config(...) and load adapters with PeftModel.from_pretrained after "
                "`import peft_safety`; masked LoRA supports nn.Linear modules only."
            )


def get_masked_lora_model(
    model: nn.Module, lora_config: LoraConfig, mask: Any, *, entries_method: str = "auto", **kwargs: Any
) -> PeftModel:
    """``get_peft_model(model, SafetyLoraConfig.from_lora_config(lora_config, mask))``, checked.

    The mask is validated against the model first (shapes, and fingerprints on floating-point weights), and the result
    with :func:`check_masked_lora_model`.

    Args:
        model: the base model.
        lora_config: the LoRA config to protect (not modified).
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: ``"auto"`` (default), ``"sparse"`` or ``"dense"`` (bit-exact forward): see
            ``SafetyLoraConfig.from_lora_config``.
        **kwargs: passed to ``peft.get_peft_model`` (e.g. ``adapter_name``, ``low_cpu_mem_usage``).

    Returns:
        The ``PeftModel`` (its config is a ``SafetyLoraConfig``, PEFT type ``SAFETY_LORA``).

    Raises:
        ValueError: see ``SafetyLoraConfig.from_lora_config`` and :func:`check_masked_lora_model`; also a mask that
            does not fit the model (``SafetyMask.validate``).
    """
    _check_mask_fits(mask, model)
    config = SafetyLoraConfig.from_lora_config(lora_config, mask, entries_method=entries_method)
    peft_model = get_peft_model(model, config, **kwargs)
    check_masked_lora_model(peft_model, mask)
    return peft_model


def _check_mask_fits(mask: Any, model: nn.Module) -> None:
    """``mask.validate(model)``, except that quantised ``nn.Linear`` weights are compared by their logical shape.

    bitsandbytes stores packed weights (e.g. ``(512, 1)`` uint8 for a 32x32 layer), which a plain shape check
    would reject; fingerprints are only checked on floating-point weights.
    """
    from ...mask import SafetyMask

    if not isinstance(mask, SafetyMask):
        raise TypeError(f"expected a SafetyMask, got {type(mask).__name__}.")
    state: dict[str, torch.Tensor] = {}
    quantised = False
    for module_name, base in base_modules(model).items():
        for attr, param in base.named_parameters(recurse=False):
            key = f"{module_name}.{attr}" if module_name else attr
            if isinstance(base, nn.Linear) and attr == "weight" and not param.dtype.is_floating_point:
                quantised = True
                param = torch.empty((base.out_features, base.in_features), device="meta")
            state.setdefault(key, param)
    mask.validate(state, fingerprint_check="ignore" if quantised else "error")
