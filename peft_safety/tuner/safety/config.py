"""``SafetyConfig``: the PEFT config of peft-safety's sparse-delta adapter (SET, mode ``"train_only"``).

Pure data, like PEFT's tuner configs: the options, their checks, and the mask the adapter is built from. The mask is
an init-only argument kept off the dataclass fields (SHiRA keeps its runtime ``mask_fn`` off them the same way), so
``to_dict()`` / ``save_pretrained`` never see it; the saved folder describes the adapter with ``mask_layout`` and the
index tensors in its weights file.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from ...vocab import check_choice, check_mode
from .._layout import SET_KINDS
from ..peft_type import SafetyPeftType
from ..provenance import ProvenanceConfigMixin, mask_attribute, refuse_file_mask

__all__ = ["GRADIENT_METHODS", "VALUES_DTYPES", "SafetyConfig"]

#: Accepted ``values_dtype`` strings (kept as strings so the config stays JSON-serialisable).
VALUES_DTYPES = ("float32", "bfloat16", "float16")

#: How the value gradient of entry-wise deltas is computed (see ``layer.py``).
GRADIENT_METHODS = ("sampled", "dense")


@dataclass
class SafetyConfig(ProvenanceConfigMixin, PeftConfig):
    """Configuration of a SET adapter: trainable deltas at the entries of a ``SafetyMask``, the base model frozen.

    Only the ``nn.Linear`` modules the mask touches are wrapped. Each wrapped module stores the mask's indices in a
    persistent int32 buffer (``safety_indices``) and the trainable deltas in ``safety_values``; both are written into
    ``adapter_model.safetensors``, so a saved adapter is self-contained: reloading it never needs the mask file.

    The mask is not written to ``adapter_config.json``; the file keeps ``mask_source`` (the path or Hub id the mask
    came from, when known) and ``mask_layout`` (for each wrapped module: how its indices are stored and how many there
    are), which is what ``PeftModel.from_pretrained`` needs to rebuild the layers.

    Args:
        mask: a ``SafetyMask``, or a local path / Hub repo id that ``SafetyMask.from_pretrained`` can load (loaded at
            once). `None` only when loading a saved adapter (then ``mask_layout`` describes the layers). Readable and
            settable afterwards as ``config.mask``; never serialised.
        mode: ``"train_only"`` (SET). ``"freeze"`` (SPA) is not an adapter: see the error message for where it lives.
        target_modules / exclude_modules / layers_to_transform / layers_pattern: PEFT's usual module filters. They do
            not select a subset of the mask: a mask entry on a module the filters reject is an error (restrict the
            mask instead, ``mask.restrict(names)``), so that no selected entry is silently dropped.
        init_weights: `True` starts every delta at zero (the adapter is the identity); `False` draws small random
            deltas (for tests).
        values_dtype: dtype of the trainable deltas.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from peft_safety import SafetyConfig
    >>> model = get_peft_model(base_model, SafetyConfig(mask=mask))      # doctest: +SKIP
    >>> model.save_pretrained("set-adapter")                              # doctest: +SKIP
    ```
    """

    mask_source: str | None = field(
        default=None,
        metadata={
            "help": "Where the mask came from (path or Hub repo id). Filled from `mask` when it is a string, or from "
            "the mask's provenance; informational only."
        },
    )
    mask_layout: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Filled by the tuner: for each wrapped module, {'kind': 'entries'|'rows'|'cols'|'whole', "
            "'n': number of indices, 'shape': [out, in]}. Lets from_pretrained rebuild the layers without the mask. "
            "Do not set by hand."
        },
    )
    mode: Literal["train_only"] = field(
        default="train_only",
        metadata={
            "help": "'train_only' (SET): train only the mask's entries. 'freeze' (SPA) is handled by "
            "SafetySFTTrainer / SafetyLoraConfig, not by this adapter.",
            "choices": ["train_only"],
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Optional filter: module names (suffix match) or a regex (full match). None means every module "
            "the mask touches. A mask entry outside the filter is an error."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that must not be adapted (suffix match or regex). Mask entries there are an error."
        },
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Read by PEFT's generic matching code; must stay None. Fused 3-D expert parameters are not "
            "supported by SET (exclude them from the mask)."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Optional filter: decoder layer indices that may be adapted (with `layers_pattern`)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers'), used with `layers_to_transform`."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved with the adapter (PEFT's usual meaning)."},
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={"help": "PEFT's trainable-token option; read by TRL when it adds chat-template tokens."},
    )
    bias: Literal["none"] = field(
        default="none", metadata={"help": "Bias terms are never trained by SET.", "choices": ["none"]}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: deltas start at zero, so the adapter is the identity. False: small random deltas "
            "(std 0.02), for tests."
        },
    )
    values_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the trainable deltas, whatever the base dtype: 'float32' (default) stays float32 on "
            "bf16/fp16 bases even with autocast_adapter_dtype=False (on purpose: small deltas would round away). "
            "'bfloat16'/'float16' deltas are upcast to float32 by PEFT unless autocast_adapter_dtype=False.",
            "choices": list(VALUES_DTYPES),
        },
    )
    gradient_method: Literal["sampled", "dense"] = field(
        default="sampled",
        metadata={
            "help": "How the gradient of entry-wise deltas is computed. 'sampled': a chunked sampled matmul "
            "(grad_out[:, rows] * x[:, cols] summed over tokens at the index pairs), never materialising a "
            "weight-sized gradient. 'dense': grad_outᵀ·x then gather (the documented fallback; one transient "
            "weight-sized buffer per layer, sometimes faster at high density).",
            "choices": list(GRADIENT_METHODS),
        },
    )
    mask: InitVar[Any] = None

    def __post_init__(self, mask: Any) -> None:
        refuse_file_mask(self, mask)
        super().__post_init__()
        self.peft_type = SafetyPeftType.SAFETY
        check_mode(self.mode)
        if self.mode == "freeze":
            raise ValueError(
                "SafetyConfig(mode='freeze') is not an adapter: freezing the mask's entries happens while training "
                "the model itself. Use SafetySFTTrainer(args=SafetySFTConfig(safety_mask=..., "
                "safety_mode='freeze'), peft_config=LoraConfig(...) or None), SafetyLoraConfig(mask=...) for LoRA, "
                "or apply_mask_(model, mask, mode='freeze') for full fine-tuning."
            )
        check_choice(self.values_dtype, VALUES_DTYPES, where="values_dtype")
        check_choice(self.gradient_method, GRADIENT_METHODS, where="gradient_method")
        if self.bias != "none":
            # TypeError, as PEFT's other tuners without bias training raise for `bias=...` (e.g. ShiraConfig,
            # IA3Config: "unexpected keyword argument 'bias'"); the field exists only so that saved configs load.
            raise TypeError(
                f"SafetyConfig does not support bias={self.bias!r}: SET never trains biases (only 'none' is "
                "accepted). To train biases as well, list their modules in modules_to_save or unfreeze them by hand."
            )
        if self.target_parameters:
            raise ValueError(
                f"SafetyConfig does not support target_parameters={self.target_parameters!r}: SET wraps nn.Linear "
                "modules only. Remove fused expert parameters from the mask (mask.filter(...)) instead."
            )
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be a bool, got {type(self.init_weights).__name__}.")
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = list(self.exclude_modules)
        self._init_mask(
            mask,
            kinds=SET_KINDS,
            allow_empty=False,
            how="pass mask=SafetyMask(...) or mask='path/or/hub-id' of a saved mask",
        )


# `mask` is an init-only argument (never a field, so never serialised); as an attribute it reads and replaces the mask.
SafetyConfig.mask = mask_attribute("SafetyConfig", lambda config, mask: None)  # type: ignore[assignment]
