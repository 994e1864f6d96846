"""``SafetyLoraModel``: PEFT's LoRA tuner with masked layers, for the ``SAFETY_LORA`` PEFT type (SPA with LoRA).

Everything LoRA does (target matching, adapters, merge/unmerge, save/load, ``low_cpu_mem_usage``) is inherited from
``peft.tuners.lora.LoraModel``. This class only

* builds a :class:`~peft_safety.tuner.lora.SafetyLoraLinear` for every targeted ``nn.Linear`` (bitsandbytes
  ``Linear4bit``/``Linear8bitLt`` included), whose mask comes from the adapter's ``SafetyLoraConfig``;
* checks, before injecting, that every module the saved ``mask_layout`` names exists in the model with the recorded
  shape (so nothing sized by the file is allocated for the wrong model and no module's mask is dropped silently);
* validates the ``lora_safety_*`` tensors of a checkpoint (presence, dtype, rank, size, range, sorted and unique)
  before PEFT loads them (``_remap_adapter_state_dict_for_load``: ``PeftModel.from_pretrained``, ``load_adapter``,
  ``set_peft_model_state_dict``); paths that bypass it (transformers' ``model.load_adapter``) are covered by each
  layer checking its buffer on first use;
* records the base model's fingerprints and Hub id when an adapter is created from a mask, and checks them when a
  saved adapter is loaded (``base_fingerprint_check``: error by default).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .lora import _BUFFER, SafetyLoraLinear, _strip_peft_prefix, validate_mask_indices
from .peft_type import SAFETY_LORA_PREFIX
from .provenance import (
    base_model_reference,
    check_base_fingerprints,
    fingerprint_base,
    override_policy,
    state_dict_digest,
)
from .spa_config import SafetyLoraConfig

__all__ = ["SafetyLoraModel"]


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        out.setdefault(_strip_peft_prefix(key), module)
    return out


class SafetyLoraModel(LoraModel):
    """The tuner of ``SAFETY_LORA`` adapters: LoRA whose update is exactly zero on the adapter's mask.

    Created by ``get_peft_model(model, SafetyLoraConfig(...))`` (or :func:`~peft_safety.tuner.lora.mask_lora_config`)
    and by PEFT's loaders for folders whose ``adapter_config.json`` says ``"peft_type": "SAFETY_LORA"``.
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
                "adapter next to a masked one would move the protected entries. Build it with mask_lora_config(cfg, "
                "mask), or load it into a separate model."
            )
        super()._check_new_adapter_config(config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        _check_layout_against_model(config, model)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        _check_layers_carry_masks(config, model, adapter_name)
        _provenance(config, model, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        if isinstance(config, SafetyLoraConfig):
            digest = config.weights_digest
            if digest is not None:
                got = state_dict_digest(state_dict)
                if got != digest:
                    raise ValueError(
                        f"The SAFETY_LORA adapter's adapter_config.json and its weights do not belong together (weights "
                        f"digest {got}, the config records {digest}): a save was probably interrupted after writing the "
                        "weights and before writing the config. Save the adapter again (or restore both files from the "
                        "same save)."
                    )
                config.weights_digest = None  # checked: the in-memory config now describes the model, not a file
            _check_checkpoint_masks(config, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_layout_against_model(config: SafetyLoraConfig, model: nn.Module) -> None:
    """Every module of ``mask_layout`` exists in ``model`` as an ``nn.Linear`` of the recorded shape."""
    modules = _modules(model)
    for key, entry in (config.mask_layout or {}).items():
        module = modules.get(key)
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, nn.Linear):
            what = "does not have it" if module is None else f"has a {type(base).__name__} there"
            raise ValueError(
                f"The masked-LoRA adapter masks {key!r}, but this model {what}: the adapter belongs to another base "
                "model (or a mask entry names a non-Linear module). Load it on the base model it was trained on."
            )
        shape = [int(base.out_features), int(base.in_features)]
        if shape != list(entry["shape"]):
            raise ValueError(
                f"The masked-LoRA adapter's mask for {key!r} is for a {entry['shape'][0]}x{entry['shape'][1]} weight, "
                f"but this model's module is {shape[0]}x{shape[1]}: the adapter belongs to another base model."
            )


def _check_layers_carry_masks(config: SafetyLoraConfig, model: nn.Module, adapter_name: str) -> None:
    """A targeted module the layout masks must be a masked layer for this adapter (never a silent plain LoRA)."""
    modules = _modules(model)
    for key in config.mask_layout or {}:
        module = modules.get(key)
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "lora_A", {}):
            continue  # not targeted by this adapter: LoRA never changes that module
        has_mask = isinstance(module, SafetyLoraLinear) and any(
            adapter_name in getattr(module, attr) for attr in _BUFFER.values()
        )
        if not has_mask:
            raise ValueError(
                f"{key!r} carries adapter {adapter_name!r} without its mask ({type(module).__name__}): masked LoRA "
                "needs nn.Linear targets. Remove the module from target_modules or from the mask."
            )


def _check_checkpoint_masks(config: SafetyLoraConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """The checkpoint's ``lora_safety_*`` tensors match ``mask_layout`` exactly and are valid index tensors."""
    found: dict[str, tuple[str, str]] = {}
    for key in state_dict:
        for kind, attr in _BUFFER.items():
            if key.endswith("." + attr):
                module = _strip_peft_prefix(key[: -len(attr) - 1])
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
        validate_mask_indices(idx, kind, tuple(entry["shape"]), where)
    missing = sorted(set(layout) - set(found))
    if missing:
        raise ValueError(
            f"The checkpoint has no mask tensor for {missing[:3]} ({len(missing)} module(s)) although mask_layout lists "
            "them: the weights file is incomplete (interrupted save?) or from another adapter. Re-save the adapter."
        )


def _provenance(config: SafetyLoraConfig, model: nn.Module, adapter_name: str) -> None:
    """Record the base's fingerprints and Hub id on an adapter created from a mask; check them when loading one."""
    names = [f"{key}.weight" for key in config.mask_layout or {}]
    if not names:
        return
    if config._safety_indices and config.base_fingerprints is None:
        # created from a mask now (a saved adapter carries its fingerprints, or was saved before they existed)
        config.base_fingerprints = fingerprint_base(model, names) or None
        ref = base_model_reference(model)
        config.base_model_source = ref["source"]
        if ref["source"] == "hub":
            config.base_model_name_or_path = ref["base_model"]
            if config.revision is None:
                config.revision = ref["revision"]
        return
    check_base_fingerprints(
        model,
        config.base_fingerprints,
        policy=override_policy(config.base_fingerprint_check),
        what=f"This SAFETY_LORA adapter ({adapter_name!r})",
        recorded_base=config.base_model_name_or_path,
        override="base_fingerprint_check='warn' (or 'ignore') to PeftModel.from_pretrained / load_masked_lora, or "
        "load inside `with peft_safety.tuner.provenance.fingerprint_check_override('warn'):`",
    )
