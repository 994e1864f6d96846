"""``SafetyLoraConfig``: the PEFT config of a masked-LoRA (SPA) adapter, PEFT type ``SAFETY_LORA``.

A masked LoRA is a LoRA adapter whose update is exactly zero on a ``SafetyMask`` (see ``layer.py``). Saved as plain
``LORA`` it would reload as an unmasked LoRA, so it has a PEFT type of its own: ``adapter_config.json`` says
``"peft_type": "SAFETY_LORA"`` and lists, per masked module, how its mask is stored (``mask_layout``); the indices
themselves are persistent buffers (``lora_safety_rows`` / ``lora_safety_cols`` / ``lora_safety_entries``) in
``adapter_model.safetensors``. The adapter folder alone therefore restores the masks, through every PEFT loading path
(``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, ``load_adapter``), once ``peft_safety`` is imported.
Without that import PEFT fails with ``KeyError: 'SAFETY_LORA'``: it cannot load the adapter as an unmasked LoRA.

This module is pure data: the layout is computed from the mask and validated (``peft_safety.tuner._layout``, before
anything sized by it is allocated). The mask is an init-only argument kept off the dataclass fields, so ``to_dict()``
and ``save_pretrained`` never see it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from ...vocab import check_choice
from .._layout import LORA_KINDS, check_layout, storage_of
from ..peft_type import SafetyPeftType
from ..provenance import ProvenanceConfigMixin, mask_attribute, refuse_file_mask

__all__ = ["ENTRIES_METHODS", "SPARSE_MAX_DENSITY", "SafetyLoraConfig", "check_entries_method", "check_lora_options"]

#: How a ``Weight()``-masked layer removes its masked entries in forward. ``"auto"`` (default) picks ``"sparse"`` on
#: CPU up to :data:`SPARSE_MAX_DENSITY` and ``"dense"`` above or off the CPU. ``"sparse"`` (LoRA's factored path minus
#: a sparse correction, no weight-sized tensor) is exact on the mask up to fp32 rounding of the update (it subtracts
#: two differently rounded products); ``"dense"`` (the masked dense delta) is bit-exact in forward in every dtype.
#: Merging is bit-exact whatever the method.
ENTRIES_METHODS = ("dense", "sparse", "auto")

#: ``"auto"`` uses the sparse correction for entry masks covering at most this fraction of their weight: the CPU
#: crossover measured by ``benchmarks/masked_lora.py`` (table in docs/tuner.md).
SPARSE_MAX_DENSITY = 0.1

# initialisations whose B starts at zero: the adapter starts as the identity, so no protected entry moves at init
_ZERO_B_INITS = (True, "gaussian")


def check_lora_options(config: LoraConfig) -> None:
    """Refuse the LoRA options that cannot keep masked entries frozen (DoRA, other LoRA variants, non-zero-B
    initialisations, LoRA biases).

    Raises:
        TypeError: not a ``LoraConfig``.
        ValueError: the offending option, with the fix.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"A masked LoRA is built from a peft.LoraConfig, got {type(config).__name__}.")
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
    # Masked LoRA is itself a LoRA variant (``layer.MaskedLoraVariant``), and PEFT runs one variant per adapter.
    for f in dataclasses.fields(config):
        if f.metadata.get("is_lora_variant") and getattr(config, f.name, None):
            raise ValueError(
                f"{f.name}={getattr(config, f.name)!r} turns on another LoRA variant, whose forward and merge would "
                f"replace the masked ones and move protected entries. Leave {f.name} unset with a safety mask."
            )


def check_entries_method(entries_method: Any) -> str:
    """Validate ``entries_method`` (one of :data:`ENTRIES_METHODS`).

    Raises:
        TypeError: not a string.
        ValueError: not one of the methods.
    """
    if not isinstance(entries_method, str):
        raise TypeError(f"entries_method must be a string, got {type(entries_method).__name__}.")
    return check_choice(
        entries_method,
        ENTRIES_METHODS,
        where="entries_method",
        help=f"'auto' (default: the sparse correction on CPU up to {SPARSE_MAX_DENSITY:.0%} mask density, exact up to "
        "fp32 rounding in forward), 'sparse', or 'dense' (bit-exact training forward on the mask)",
    )


def _exclude_modules(config: LoraConfig, keys: list[str]) -> None:
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


def _targets_lm_head(config: LoraConfig, module_key: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules in (None, "all-linear"):
        # PEFT's "all-linear" never includes the output layer; None defers to PEFT's per-model defaults (attention)
        return False
    result = check_target_module_exists(config, module_key)
    return bool(result) and type(result).__name__ != "_ExcludedModule"


@dataclass
class SafetyLoraConfig(ProvenanceConfigMixin, LoraConfig):
    """A ``LoraConfig`` whose update is exactly zero on a ``SafetyMask`` (SPA with LoRA; PEFT type ``SAFETY_LORA``).

    Every ``LoraConfig`` option keeps its meaning, except those that cannot keep masked entries frozen (refused:
    ``use_dora`` and every other LoRA variant, ``lora_bias``, ``init_lora_weights`` other than ``True``/``"gaussian"``).
    ``Layer()``-masked modules are added to ``exclude_modules``; every other masked ``nn.Linear`` gets a masked LoRA
    layer. Build it from the LoRA options directly (``SafetyLoraConfig(r=16, ..., mask=mask)``) or from an existing
    ``LoraConfig`` (:meth:`from_lora_config`).

    Args:
        mask: the ``SafetyMask`` of entries to keep frozen, or a path / Hub id of a saved mask. Not written to
            ``adapter_config.json`` (the indices are saved as buffers in ``adapter_model.safetensors``); `None` when
            loading a saved adapter. Readable and settable afterwards as ``config.mask``.
        mask_layout: filled from the mask: per masked module ``{"kind", "n", "shape"}``. Do not set by hand.
        mask_source: where the mask came from (path or Hub id), when known; informational.
        entries_method: forward of ``Weight()`` masks: ``"auto"`` (default), ``"sparse"`` or ``"dense"`` (bit-exact).
        base_fingerprints: fingerprints of the masked base weights, recorded when the adapter is created and
            checked when it is loaded (see ``fingerprint_check``). The base's Hub id goes into
            ``base_model_name_or_path`` (and ``revision``), its kind into ``base_model_source``.
        weights_digest: digest of the saved weights, written by ``save_pretrained``; a mismatch on load (interrupted
            save) is an error.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from peft_safety.tuner import SafetyLoraConfig
    >>> model = get_peft_model(base_model, SafetyLoraConfig(r=16, target_modules="all-linear", mask=mask))  # doctest: +SKIP
    >>> model.save_pretrained("spa-adapter")    # adapter_config.json: "peft_type": "SAFETY_LORA"    # doctest: +SKIP
    ```
    """

    mask_layout: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Filled from the mask: for each masked module, {'kind': 'rows'|'cols'|'entries', 'n': number of "
            "indices, 'shape': [d_out, d_in]}. Lets from_pretrained rebuild the masked layers. Do not set by hand."
        },
    )
    mask_source: str | None = field(
        default=None,
        metadata={"help": "Where the mask came from (path or Hub id), from the mask's provenance; informational."},
    )
    entries_method: str = field(
        default="auto",
        metadata={
            "help": "Forward of Weight()-masked layers. 'auto' (default): 'sparse' on CPU up to SPARSE_MAX_DENSITY of "
            "the weight, else 'dense'. 'sparse': LoRA's factored path minus a sparse correction, no weight-sized "
            "tensor, exact on the mask up to fp32 rounding in forward. 'dense': the masked dense delta, a bit-exact "
            "training forward in every dtype. Merge is bit-exact always.",
            "choices": list(ENTRIES_METHODS),
        },
    )
    mask: InitVar[Any] = None

    def __post_init__(self, mask: Any) -> None:
        refuse_file_mask(self, mask)
        super().__post_init__()
        self.peft_type = SafetyPeftType.SAFETY_LORA
        check_lora_options(self)
        check_entries_method(self.entries_method)
        self._init_mask(
            mask,
            kinds=LORA_KINDS,
            allow_empty=True,  # a mask of Layer() entries only leaves its modules out of LoRA and stores nothing
            how="pass mask=SafetyMask(...), or build it with SafetyLoraConfig.from_lora_config(lora_config, mask)",
        )

    @classmethod
    def from_lora_config(cls, lora_config: LoraConfig, mask: Any, *, entries_method: str = "auto") -> SafetyLoraConfig:
        """A ``SafetyLoraConfig`` with every option of ``lora_config`` whose LoRA update is exactly zero on ``mask``.

        Args:
            lora_config: the LoRA config to protect (not modified). A ``SafetyLoraConfig`` is re-masked with ``mask``.
            mask: the ``SafetyMask`` of entries to keep frozen.
            entries_method: forward mechanism for ``Weight()`` masks. ``"auto"`` (default): ``"sparse"`` on CPU when
                the mask covers at most :data:`SPARSE_MAX_DENSITY` of the weight, else ``"dense"``; ``"sparse"``:
                LoRA's factored path minus a sparse correction at the masked entries (exact up to fp32 rounding in
                forward); ``"dense"``: the dense masked delta, a bit-exact training forward. Merging is bit-exact on
                every path.

        Returns:
            A new config; pass it to ``get_peft_model`` (or use ``get_masked_lora_model``, which also checks the
            result), or as ``peft_config`` to a trainer.

        Raises:
            TypeError: a non-``LoraConfig`` or non-``SafetyMask`` argument, or a non-string ``entries_method``.
            ValueError: an unknown ``entries_method``, DoRA or another LoRA variant, LoRA bias, a non-zero-B
                initialisation, mask entries on an ``lm_head`` the config targets, or masked parameters targeted
                through ``target_parameters``.

        Example:

        ```python
        >>> cfg = SafetyLoraConfig.from_lora_config(LoraConfig(r=16, target_modules="all-linear"), mask)  # doctest: +SKIP
        >>> model = get_peft_model(base_model, cfg)                                                       # doctest: +SKIP
        ```
        """
        from ...mask import SafetyMask

        check_lora_options(lora_config)
        check_entries_method(entries_method)
        if not isinstance(mask, SafetyMask):
            raise TypeError(f"SafetyLoraConfig.from_lora_config expects a SafetyMask, got {type(mask).__name__}.")
        options = {
            f.name: copy.deepcopy(getattr(lora_config, f.name))
            for f in dataclasses.fields(LoraConfig)
            if f.init and f.name != "peft_type"
        }
        return cls(**options, mask=mask, entries_method=entries_method)


def _apply_mask(self: SafetyLoraConfig, mask: Any) -> None:
    """Compute ``mask_layout``, the in-memory indices and the excluded modules from ``mask``."""
    layer_keys: list[str] = []
    layout: dict[str, dict[str, Any]] = {}
    indices: dict[str, dict[str, torch.Tensor]] = {}
    for name in mask.names:
        module_key, _, attr = name.rpartition(".")
        if module_key.rsplit(".", 1)[-1] == "lm_head" and _targets_lm_head(self, module_key):
            raise ValueError(
                f"The mask has entries on {name!r} and the LoRA config targets lm_head. TRL's SFTTrainer rejects "
                "lm_head adapters, and a LoRA layer there cannot keep its entries frozen under TRL's fused loss. "
                "Leave lm_head out of target_modules (it then stays frozen), or protect it with full fine-tuning "
                "(SafetySFTTrainer with safety_mode='freeze' and peft_config=None, or apply_mask_(model, mask, "
                "mode='freeze'))."
            )
        if attr != "weight":
            targeted = self.target_parameters and any(name.endswith(p) for p in self.target_parameters)
            if targeted:
                raise ValueError(
                    f"The mask has entries on {name!r}, which the LoRA config adapts through target_parameters. "
                    "Masked LoRA supports nn.Linear modules only: drop it from target_parameters (it then stays "
                    "frozen) or protect it with full fine-tuning (safety_mode='freeze', peft_config=None)."
                )
            continue  # not an nn.Linear weight and not targeted: LoRA never changes it
        shape = tuple(mask.shapes[name])
        kind, idx = storage_of(mask.granularity_of(name), mask[name], name)
        if kind == "whole":
            layer_keys.append(module_key)  # the whole weight is protected: LoRA leaves the module out
            continue
        if len(shape) != 2:
            raise ValueError(
                f"The mask's {name!r} has shape {shape}; masked LoRA supports 2-D nn.Linear weights only."
            )
        layout[module_key] = {"kind": kind, "n": int(idx.numel()), "shape": [int(shape[0]), int(shape[1])]}
        indices[module_key] = {kind: idx.to(torch.int32)}
    _exclude_modules(self, layer_keys)
    self.mask_layout = check_layout(layout, kinds=LORA_KINDS, allow_empty=True)
    self._safety_indices = indices


# `mask` is an init-only argument (never a field, so never serialised); as an attribute it reads and replaces the mask.
SafetyLoraConfig.mask = mask_attribute("SafetyLoraConfig", _apply_mask)  # type: ignore[assignment]
