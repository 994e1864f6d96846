"""The checks of a loaded adapter's weights on the loaders that bypass PEFT's load hook (transformers'
``model.load_adapter``).

PEFT's loaders (``PeftModel.from_pretrained``, ``load_adapter``, ``AutoPeftModel*``, ``set_peft_model_state_dict``)
hand the checkpoint to the tuner's ``_remap_adapter_state_dict_for_load`` before loading it, where both tuners check
every tensor against ``adapter_config.json``. transformers' ``model.load_adapter`` injects the layers through PEFT
(``inject_adapter_in_model``) and then loads the file with its own loader, which never calls that hook. For that path
the tuner attaches a `PendingLoadCheck` to the layers of an adapter it builds from a saved layout: on the first forward
of any of them, the same checks run on the tensors the layers now hold (plus the weights digest and a check that every
tensor was replaced by the file's, i.e. none is still the placeholder the layer was built with). PEFT's own loaders
resolve the pending check in the load hook (`resolve_pending`), so it never runs twice.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..vocab import base_name

__all__ = ["PendingLoadCheck", "adapter_layers", "adapter_tensors", "resolve_pending"]

_REGISTRY = "_peft_safety_pending_loads"


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """``{base module name: tuner layer}`` of every PEFT tuner layer of ``model`` that holds ``adapter_name``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, nn.Module] = {}
    for key, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_tensors(module, adapter_name):
            out.setdefault(base_name(key), module)
    return out


def adapter_tensors(layer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``adapter_name`` on one tuner layer, under their checkpoint names (the adapter
    name left out: ``lora_A.weight``, ``lora_safety_rows``, ``safety_values``); the base layer's are not included."""
    out: dict[str, torch.Tensor] = {}
    items = [*layer.named_parameters(recurse=True), *layer.named_buffers(recurse=True)]
    for name, tensor in items:
        parts = name.split(".")
        if "base_layer" in parts or adapter_name not in parts:
            continue
        out[".".join(p for p in parts if p != adapter_name)] = tensor
    return out


def _state_of(tensor: torch.Tensor) -> tuple[Any, int, int]:
    return weakref.ref(tensor), tensor._version, tensor.data_ptr()


class PendingLoadCheck:
    """The checks of one adapter's loaded weights, run on the first forward of any of its layers.

    Args:
        model: the model the layers were injected into (kept as a weak reference; it holds ``peft_config``).
        adapter_name: the adapter.
        layers: ``{base module name: tuner layer}`` of the adapter's layers of the tuner's own type.
        attrs: the tuner's attributes (``lora_A``, ``lora_safety_rows``, ``safety_values``, ...): only these tensors are
            checked (other adapter tensors, such as trainable tokens, are PEFT's, and some are never saved).
        check: ``check(model, adapter_name, found, missing)`` with ``found`` the tensors the layers hold now
            (``{module: {attr: tensor}}``) and ``missing`` the ``"module.attr"`` names still holding the placeholder
            they were built with; raises when the weights are not acceptable.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str,
        layers: dict[str, nn.Module],
        attrs: tuple[str, ...],
        check: Callable[[nn.Module, str, dict[str, dict[str, torch.Tensor]], list[str]], None],
    ) -> None:
        self._attrs = frozenset(attrs)
        self._model = weakref.ref(model)
        self.adapter_name = adapter_name
        self._check = check
        self._layers = {key: weakref.ref(layer) for key, layer in layers.items()}
        self._placeholders = {
            f"{key}.{attr}": _state_of(tensor)
            for key, layer in layers.items()
            for attr, tensor in self._tensors(layer).items()
        }
        self._handles = []
        for layer in layers.values():
            layer.__dict__.setdefault(_REGISTRY, {})[adapter_name] = self
            self._handles.append(layer.register_forward_pre_hook(self._hook))

    def _tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        tensors = adapter_tensors(layer, self.adapter_name)
        return {attr: t for attr, t in tensors.items() if attr.split(".")[0] in self._attrs}

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.run()

    def run(self) -> None:
        """Check the layers' tensors now; on success the check is removed (it runs once), on failure it stays (every
        later forward raises again)."""
        model = self._model()
        if model is None:
            self.resolve()
            return
        found: dict[str, dict[str, torch.Tensor]] = {}
        missing: list[str] = []
        for key, ref in self._layers.items():
            layer = ref()
            if layer is None:
                continue
            for attr, tensor in self._tensors(layer).items():
                name = f"{key}.{attr}"
                old = self._placeholders.get(name)
                if old is not None and old[0]() is tensor and old[1:] == (tensor._version, tensor.data_ptr()):
                    missing.append(name)
                    continue
                found.setdefault(key, {})[attr] = tensor
        self._check(model, self.adapter_name, found, missing)
        self.resolve()

    def resolve(self) -> None:
        """Remove the check (the weights were checked, by this object or by PEFT's load hook)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for ref in self._layers.values():
            layer = ref()
            registry = layer.__dict__.get(_REGISTRY) if layer is not None else None
            if registry is not None and registry.get(self.adapter_name) is self:
                del registry[self.adapter_name]


def resolve_pending(model: nn.Module, adapter_name: str) -> None:
    """Drop the pending checks of ``adapter_name`` on ``model``: PEFT's load hook is checking the checkpoint itself."""
    for module in model.modules():
        pending = module.__dict__.get(_REGISTRY, {}).get(adapter_name)
        if pending is not None:
            pending.resolve()
