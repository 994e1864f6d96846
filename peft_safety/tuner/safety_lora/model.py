"""``SafetyLoraModel``: PEFT's LoRA tuner with masked layers, for the ``SAFETY_LORA`` PEFT type (SPA with LoRA).

Everything LoRA does (target matching, adapters, merge/unmerge, save/load, ``low_cpu_mem_usage``) is inherited from
``peft.tuners.lora.LoraModel``. This class only

* builds a :class:`~peft_safety.tuner.safety_lora.layer.SafetyLoraLinear` for every targeted ``nn.Linear``
  (bitsandbytes ``Linear4bit``/``Linear8bitLt`` included), whose mask comes from the adapter's ``SafetyLoraConfig``;
* checks, before injecting, that every module the saved ``mask_layout`` names exists in the model with the recorded
  shape (so nothing sized by the file is allocated for the wrong model and no module's mask is dropped silently);
* validates the ``lora_safety_*`` tensors of a checkpoint (presence, dtype, rank, size, range, sorted and unique)
  before PEFT loads them (``_remap_adapter_state_dict_for_load``: ``PeftModel.from_pretrained``, ``load_adapter``,
  ``set_peft_model_state_dict``); paths that bypass it (transformers' ``model.load_adapter``) are covered by each
  layer checking its buffer on first use;
* records the base model's fingerprints and Hub id when an adapter is created from a mask, and checks them when a
  saved adapter is loaded (``fingerprint_check``: error by default).

`get_masked_lora_model` is the one function for code that holds a ``LoraConfig`` and a mask (the trainer does): the
config with the mask applied, ``get_peft_model``, and a check that every LoRA layer on a masked module masks it.
Loading needs no function of ours: ``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM`` after
``import peft_safety``.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...vocab import base_name
from .._layout import LORA_KINDS, base_modules, check_indices, check_layout, check_layout_modules
from ..peft_type import SAFETY_LORA_PREFIX
from ..provenance import check_base, check_weights_digest, record_base
from .config import SafetyLoraConfig
from .layer import SafetyLoraLinear, is_masked_layer
from .variant import BUFFERS

__all__ = ["SafetyLoraModel", "check_masked_lora_model", "get_masked_lora_model"]


class SafetyLoraModel(LoraModel):
    """The tuner of ``SAFETY_LORA`` adapters: LoRA whose update is exactly zero on the adapter's mask.

    Created by ``get_peft_model(model, SafetyLoraConfig(...))`` and by PEFT's loaders for folders whose
    ``adapter_config.json`` says ``"peft_type": "SAFETY_LORA"``.
    """

    prefix: str = SAFETY_LORA_PREFIX

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
        config.mask_layout = check_layout(config.mask_layout, kinds=LORA_KINDS, allow_empty=True)
        check_layout_modules(config.mask_layout, model, what="This SAFETY_LORA adapter")
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        _check_layers_carry_masks(config, model, adapter_name)
        _provenance(config, model, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if isinstance(config, SafetyLoraConfig):
            check_weights_digest(config, state_dict, what="The SAFETY_LORA adapter")
            _check_checkpoint_masks(config, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


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


def _check_checkpoint_masks(config: SafetyLoraConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """The checkpoint's ``lora_safety_*`` tensors match ``mask_layout`` exactly and are valid index tensors."""
    found: dict[str, tuple[str, str]] = {}
    for key in state_dict:
        for kind, attr in BUFFERS.items():
            if key.endswith("." + attr):
                module = base_name(key[: -len(attr) - 1])
                if module in found:
                    raise ValueError(
                        f"The checkpoint has two mask tensors for {module!r} ({found[module][1]}, {key})."
                    )
                found[module] = (kind, key)
    layout = config.mask_layout or {}
    for module, (kind, key) in found.items():
        entry = layout.get(module)
        if entry is None:
            raise ValueError(
                f"The checkpoint holds a mask for {module!r} ({key}) that adapter_config.json's mask_layout does not "
                "list: the config and the weights come from different saves (an interrupted or mixed save). Re-save "
                "the adapter."
            )
        if entry["kind"] != kind:
            raise ValueError(f"{key}: mask_layout says {entry['kind']!r} for {module!r}, the checkpoint has {kind!r}.")
        idx = state_dict[key]
        where = f"checkpoint tensor {key}"
        if isinstance(idx, torch.Tensor) and idx.dim() == 1 and idx.numel() != entry["n"]:
            raise ValueError(
                f"{where}: {idx.numel()} indices, but mask_layout declares n={entry['n']} for {module!r}: the config "
                "and the weights come from different saves. Re-save the adapter."
            )
        check_indices(idx, kind, tuple(entry["shape"]), where)
    missing = sorted(set(layout) - set(found))
    if missing:
        raise ValueError(
            f"The checkpoint has no mask tensor for {missing[:3]} ({len(missing)} module(s)) although mask_layout lists "
            "them: the weights file is incomplete (interrupted save?) or from another adapter. Re-save the adapter."
        )


def _provenance(config: SafetyLoraConfig, model: nn.Module, adapter_name: str) -> None:
    """Record the base's fingerprints and Hub id on an adapter created from a mask; check them when loading one."""
    names = [f"{key}.weight" for key in config.mask_layout or {}]
    if config.mask is not None:  # created from a mask now
        record_base(config, model, names)
    elif names:
        check_base(config, model, what=f"This SAFETY_LORA adapter ({adapter_name!r})")


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
    model: nn.Module, lora_config: LoraConfig, mask: Any, *, entries_method: str = "dense", **kwargs: Any
) -> PeftModel:
    """``get_peft_model(model, SafetyLoraConfig.from_lora_config(lora_config, mask))``, checked.

    The mask is validated against the model first (shapes, and fingerprints on floating-point weights), and the result
    with :func:`check_masked_lora_model`.

    Args:
        model: the base model.
        lora_config: the LoRA config to protect (not modified).
        mask: the ``SafetyMask`` of entries to keep frozen.
        entries_method: ``"dense"`` (default, bit-exact), ``"sparse"`` or ``"auto"``: see
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
