"""`AlignmentDelta`: the alignment direction ``V = W_aligned - W_base`` of every weight, for Safe LoRA and RESTA.

Safe LoRA (`peft_safety.posthoc.safe_lora_project`) projects a LoRA update onto it; RESTA
(`peft_safety.posthoc.add_safety_vector`) adds it back to a fine-tuned model. It can be built from

* a (base, aligned) model pair (`AlignmentDelta.from_models`): the difference of every parameter both have;
* any alignment delta (`AlignmentDelta.from_deltas`): a dict ``{weight name: delta tensor}``;
* an adapter (`AlignmentDelta.from_adapter`): the update of every adapted layer, read through the tuner layer's public
  ``get_delta_weight``. For a SET adapter (PEFT type ``SAFETY``) that is its sparse delta (the trainable values
  scattered at the layer's ``safety_indices``), so "SET, then Safe LoRA against the SET direction" works with an
  aligned model that differs from its base only by the SET adapter; a LoRA adapter gives ``scaling * B A``.

Names are the base names of the weights (`peft_safety.vocab.base_name`: ``model.layers.0.self_attn.q_proj.weight``,
the same inside a PEFT wrapper). Deltas are kept on the CPU in ``dtype`` (fp32 by default); weights whose delta is
exactly zero are left out (they carry no direction). Memory: one tensor per weight that changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..vocab import base_name, did_you_mean

__all__ = ["AlignmentDelta"]


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT's rule on the module path (the name without its last component): a list entry matches the path or its
    suffix after a dot; a string is a regex matched in full."""
    if patterns is None:
        return True
    module = name.rsplit(".", 1)[0]
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None or re.fullmatch(patterns, name) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


class AlignmentDelta(Mapping[str, torch.Tensor]):
    """``{weight name: W_aligned - W_base}`` for the weights alignment changed (see the module docstring).

    Args:
        deltas: ``{weight name: delta}``; names are turned into base names, tensors are copied to the CPU in
            ``dtype``, all-zero deltas are dropped.
        dtype: the dtype the deltas are kept in.
        provenance: a JSON-able description of where the direction comes from.

    Raises:
        TypeError: deltas that are not a mapping of floating-point tensors.
        ValueError: two names for the same base name, or no non-zero delta at all.
    """

    def __init__(
        self,
        deltas: Mapping[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(deltas, Mapping):
            raise TypeError(f"deltas must be a dict {{weight name: tensor}}, got {type(deltas).__name__}.")
        self._deltas: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            if not isinstance(name, str):
                raise TypeError(f"delta names must be strings, got {name!r}.")
            if not torch.is_tensor(delta) or not delta.is_floating_point():
                raise TypeError(f"The delta of {name!r} must be a floating-point tensor, got {type(delta).__name__}.")
            key = base_name(name)
            if key in self._deltas:
                raise ValueError(f"Two deltas name the same weight {key!r} (one of them is {name!r}).")
            value = delta.detach().to(device="cpu", dtype=dtype)
            if bool(value.any()):
                self._deltas[key] = value
        if not self._deltas:
            raise ValueError(
                "The alignment delta is zero everywhere: the aligned weights equal the base weights (or the adapter "
                "has not been trained)."
            )
        self.provenance: dict[str, Any] = dict(provenance or {})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_deltas(cls, deltas: Mapping[str, torch.Tensor], **kwargs: Any) -> AlignmentDelta:
        """From any alignment delta: ``{weight name: delta tensor}``."""
        kwargs.setdefault("provenance", {"source": "deltas"})
        return cls(deltas, **kwargs)

    @classmethod
    def from_models(
        cls,
        base: nn.Module,
        aligned: nn.Module,
        *,
        target_modules: str | Sequence[str] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> AlignmentDelta:
        """``W_aligned - W_base`` for every floating-point parameter of ``aligned`` (or of ``target_modules``).

        Args:
            base: the unaligned model.
            aligned: the aligned model (same architecture and parameter names).
            target_modules: restrict to these modules (names or suffixes, e.g. ``["q_proj", "v_proj"]``, or a
                regex matched in full against the module path), as PEFT matches ``target_modules``.
            dtype: the dtype of the kept deltas (the difference is computed in fp32 or the weights' wider dtype).

        Raises:
            ValueError: a model with adapter layers injected (merge it, or use `from_adapter`), a parameter of
                ``aligned`` that ``base`` lacks or has with another shape, nothing selected.
        """
        for label, model in (("base", base), ("aligned", aligned)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{label} must be a torch.nn.Module, got {type(model).__name__}.")
            if _is_peft(model):
                raise ValueError(
                    f"The {label} model has PEFT adapter layers injected: merge them first "
                    "(model = model.merge_and_unload()), or build the direction from the adapter alone with "
                    "AlignmentDelta.from_adapter(peft_model)."
                )
        base_params = dict(base.named_parameters())
        deltas: dict[str, torch.Tensor] = {}
        for name, param in aligned.named_parameters():
            if not param.is_floating_point() or not _matches(name, target_modules):
                continue
            other = base_params.get(name)
            if other is None:
                raise ValueError(
                    f"The aligned model has parameter {name!r}, which the base model lacks; the two models must share "
                    f"an architecture.{did_you_mean(name, base_params, available=False)}"
                )
            if tuple(other.shape) != tuple(param.shape):
                raise ValueError(
                    f"Parameter {name!r} has shape {tuple(param.shape)} in the aligned model and {tuple(other.shape)} "
                    "in the base model: the two models must share an architecture."
                )
            wide = torch.promote_types(torch.promote_types(param.dtype, other.dtype), torch.float32)
            deltas[name] = param.detach().to("cpu", wide) - other.detach().to("cpu", wide)
        if not deltas:
            raise ValueError(f"target_modules={target_modules!r} selects no parameter of the aligned model.")
        return cls(deltas, dtype=dtype, provenance={"source": "models", "target_modules": _jsonable(target_modules)})

    @classmethod
    def from_adapter(
        cls, peft_model: nn.Module, adapter_name: str = "default", *, dtype: torch.dtype = torch.float32
    ) -> AlignmentDelta:
        """The update an adapter applies to each adapted weight: a SET adapter's sparse delta, LoRA's
        ``scaling * B A``, read through each tuner layer's ``get_delta_weight(adapter_name)``.

        Raises:
            ValueError: a model without adapter layers, or none holding ``adapter_name``.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        deltas: dict[str, torch.Tensor] = {}
        names: set[str] = set()
        for module_name, module in peft_model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            holders = [getattr(module, attr, {}) for attr in module.adapter_layer_names]
            names.update(k for h in holders if hasattr(h, "keys") for k in h)
            if not holders or not hasattr(holders[0], "keys") or adapter_name not in holders[0]:
                continue
            with torch.no_grad():
                deltas[f"{module_name}.weight"] = module.get_delta_weight(adapter_name).detach()
        if not deltas:
            hint = f" It has adapters {sorted(names)}." if names else " It has no adapter layer."
            raise ValueError(f"No adapter layer of the model holds the adapter {adapter_name!r}.{hint}")
        config = getattr(peft_model, "peft_config", {}).get(adapter_name)
        peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "")))
        return cls(deltas, dtype=dtype, provenance={"source": "adapter", "peft_type": peft_type})

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._deltas[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    @property
    def names(self) -> tuple[str, ...]:
        """The weight names, in order."""
        return tuple(self._deltas)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(d.shape) for n, d in self._deltas.items()}

    def numel(self) -> int:
        """Entries over every kept delta."""
        return sum(d.numel() for d in self._deltas.values())

    def nonzero(self) -> int:
        """Non-zero entries over every kept delta (a SET direction is sparse)."""
        return sum(int(torch.count_nonzero(d)) for d in self._deltas.values())

    def __repr__(self) -> str:
        return (
            f"AlignmentDelta({len(self)} weights, {self.numel():,} entries, {self.nonzero():,} non-zero, "
            f"source={self.provenance.get('source')!r})"
        )


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
