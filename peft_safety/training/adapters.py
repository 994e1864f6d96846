"""The two adapter protections, thin wrappers over the tuner's PEFT types, and the choice of a mask's protection.

* `SetAdapter`: SET, train only the mask's entries through a ``SAFETY`` sparse-delta adapter (`SafetyConfig`, built
  into the model by TRL's own PEFT wrapping).
* `MaskedLora`: SPA with LoRA or QLoRA, a ``SAFETY_LORA`` adapter whose update is exactly zero on the mask (built here
  with the tuner's `get_masked_lora_model`).
* `mask_protection`: which protection keeps a mask's guarantee for a mode and a ``peft_config`` (the table in
  ``docs/trainer.md``); the trainer asks it once and never branches on the answer.

Both adapters prove their guarantee the same way (`verify`): each adapted layer runs on an identity input next to its
base layer, and every entry that must stay unchanged must have an effective update of exactly zero
(`peft_safety.analysis.mask_drift`).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .freeze import Freezer
from .protection import FreezeReport, FreezeViolationError, MaskProtection

__all__ = ["MaskedLora", "SetAdapter", "mask_protection"]


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class _AdapterProtection(MaskProtection):
    """What the two adapters share: the model they measure, and the check of the effective update.

    An adapter registers no hooks: its guarantee is the adapted model itself, which stays what training produced, so
    `remove` has nothing to undo and `verify` still works after training.
    """

    def on_wrapped(self, model: nn.Module) -> None:
        self._model = model

    def install(self, model: nn.Module, optimizer: Any = None) -> _AdapterProtection:
        self._model = model
        return self

    def verify(self, *, strict: bool = True) -> FreezeReport:
        """Run every adapted layer on an identity input: the effective update must be exactly zero on every entry
        that must stay unchanged (the mask in ``"freeze"`` mode, the rest of each covered tensor in ``"train_only"``
        mode), so a layer whose forward leaks through the mask is caught even when its merge helper would mask the
        delta."""
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.verify() needs the adapted model; the trainer passes it.")
        from ..analysis.probes import mask_drift

        drift = mask_drift(self._model, None, self.mask, mode=self.mode, strict=False)
        frozen = "masked" if self.mode == "freeze" else "unmasked"
        report = FreezeReport(
            changed={n: int(r["violations"]) for n, r in drift["per_parameter"].items() if r["violations"]},
            max_abs_diff={n: float("nan") for n, r in drift["per_parameter"].items() if r["violations"]},
            checked_entries=sum(int(r[f"{frozen}_numel"]) for r in drift["per_parameter"].values()),
            checked_parameters=len(drift["per_parameter"]),
            metrics={
                "safety/masked_drift": float(drift["masked_relative"]),
                "safety/unmasked_drift": float(drift["unmasked_relative"]),
                "safety/violations": float(drift["violations"]),
            },
        )
        if strict and not report.ok:
            raise FreezeViolationError(
                f"{int(drift['violations'])} entries that must stay unchanged moved (mode {self.mode!r}, "
                f"{self.name}): {report.changed}."
            )
        return report


class SetAdapter(_AdapterProtection):
    """SET: train only the mask's entries, as a ``SAFETY`` sparse-delta adapter (`peft_safety.tuner.SafetyConfig`).

    Args:
        mask: the `SafetyMask`.
        log_drift: log the drift of the masked and the other entries (`Protection.metrics`).
    """

    name = "set"

    def __init__(self, mask: Any, *, log_drift: bool = False) -> None:
        super().__init__(mask, "train_only", log_drift=log_drift)

    def prepare_model(self, model: nn.Module, peft_config: Any = None, args: Any = None) -> tuple[nn.Module, Any]:
        """The `SafetyConfig` TRL wraps the model with: built from the mask, or the given one with the mask filled
        in when it has none."""
        from ..tuner import SafetyConfig

        if peft_config is None:
            peft_config = SafetyConfig(mask=self.mask, task_type="CAUSAL_LM")
        elif peft_config.mask is None:
            peft_config.mask = self.mask
        return model, peft_config

    def on_wrapped(self, model: nn.Module) -> None:
        """TRL casts every trainable parameter of a quantised model to bf16; keep the sparse deltas in fp32 so that
        small updates are not rounded away (before ``accelerator.prepare`` builds DDP's buckets)."""
        super().on_wrapped(model)
        if _is_quantized(model):
            for name, p in model.named_parameters():
                if p.requires_grad and "safety_values" in name:
                    p.data = p.data.float()


class MaskedLora(_AdapterProtection):
    """SPA with LoRA or QLoRA: a ``SAFETY_LORA`` adapter whose update is exactly zero on the mask's entries.

    Args:
        mask: the `SafetyMask` of entries to keep unchanged.
        log_drift: log the drift of the masked and the other entries (`Protection.metrics`).

    Raises (in `prepare_model`):
        ValueError: DoRA, a LoRA init that moves weights before training, a mask entry on ``lm_head``, or no mask
            entry in any module LoRA trains.
    """

    name = "masked_lora"

    def __init__(self, mask: Any, *, log_drift: bool = False) -> None:
        super().__init__(mask, "freeze", log_drift=log_drift)

    def prepare_model(self, model: nn.Module, peft_config: Any = None, args: Any = None) -> tuple[nn.Module, Any]:
        """Build the masked LoRA from ``peft_config`` (a ``LoraConfig``); TRL then gets the PEFT model and no
        config. A `SafetyLoraConfig` keeps its own forward method; any other ``LoraConfig`` gets the default
        (``entries_method="auto"``)."""
        from ..tuner import get_masked_lora_model

        self._check(model, peft_config)
        if getattr(args, "gradient_checkpointing", False):
            model.enable_input_require_grads()
        entries_method = getattr(peft_config, "entries_method", "auto")
        self._model = get_masked_lora_model(model, peft_config, self.mask, entries_method=entries_method)
        return self._model, None

    def _check(self, model: nn.Module, cfg: Any) -> None:
        mask = self.mask
        if cfg.use_dora:
            raise ValueError(
                "use_dora=True cannot keep the mask's entries unchanged: DoRA rescales whole rows through its "
                "magnitude vector, moving protected entries. Use plain LoRA (use_dora=False) with a safety mask."
            )
        if cfg.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={cfg.init_lora_weights!r} starts LoRA with a non-zero update (or rewrites the "
                "base weight), which moves masked entries before training. Use init_lora_weights=True with a mask."
            )
        lm_head = [n for n in mask.names if n.split(".")[0] == "lm_head" or ".lm_head." in n]
        if lm_head:
            raise ValueError(
                f"The mask has entries on {lm_head}: LoRA cannot protect lm_head, because TRL rejects adapters on "
                "lm_head and its fused loss reads lm_head.weight directly. Drop them (mask.filter(lambda n: "
                "'lm_head' not in n)) and keep lm_head frozen, or use full fine-tuning (no peft_config), where the "
                "Freezer masks lm_head.weight's gradient."
            )
        from peft.tuners.tuners_utils import check_target_module_exists

        targeted = set()
        resolved = cfg
        if cfg.target_modules is None:
            # PEFT fills in per-architecture defaults inside get_peft_model; resolve them the same way here
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

            model_type = getattr(getattr(model, "config", None), "model_type", None)
            resolved = copy.copy(cfg)
            resolved.target_modules = set(defaults.get(model_type, ()))
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for module_name, module in model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if cfg.target_modules == "all-linear":
                # PEFT's "all-linear" is every Linear except the output layer (a plain string, not a regex)
                hit = module is not output_layer
            else:
                hit = bool(check_target_module_exists(resolved, module_name))
            if hit:
                targeted.add(f"{module_name}.weight")
        if not targeted & set(mask.names):
            raise ValueError(
                f"No mask entry lies in a module LoRA trains (target_modules={cfg.target_modules!r}; mask covers "
                f"e.g. {list(mask.names)[:3]}): the mask would protect nothing. Target the masked modules, or use "
                "full fine-tuning."
            )


def mask_protection(mask: Any, mode: str, peft_config: Any = None, args: Any = None) -> MaskProtection:
    """The protection that keeps ``mask``'s guarantee in ``mode`` for this ``peft_config``:

    | mode | ``peft_config`` | protection |
    |---|---|---|
    | ``"train_only"`` | `None` or a `SafetyConfig` | `SetAdapter` |
    | ``"train_only"`` + ``args.safety_train_only_full_weights`` | `None` | `Freezer` on the complement |
    | ``"freeze"`` | a ``LoraConfig`` (also QLoRA) | `MaskedLora` |
    | ``"freeze"`` | `None` | `Freezer` (full fine-tuning) |

    Args:
        mask: the `SafetyMask`.
        mode: ``"freeze"`` or ``"train_only"``.
        peft_config: the adapter config given to the trainer, or `None`.
        args: the `SafetySFTConfig` (``safety_train_only_full_weights``, ``safety_log_drift``).

    Raises:
        ValueError: a combination that cannot keep the guarantee (LoRA with ``"train_only"``, a SET config with
            ``"freeze"``, another adapter type).
    """
    from peft import LoraConfig

    from ..tuner import SafetyConfig

    log_drift = bool(getattr(args, "safety_log_drift", False))
    if mode == "train_only":
        if isinstance(peft_config, LoraConfig):
            raise ValueError(
                "safety_mode='train_only' trains only the mask's entries, which LoRA cannot express: drop "
                "peft_config (a SET adapter is built from the mask) or pass SafetyConfig(mask=...). For SPA with "
                "LoRA use safety_mode='freeze'."
            )
        if isinstance(peft_config, SafetyConfig) or (
            peft_config is None and not getattr(args, "safety_train_only_full_weights", False)
        ):
            return SetAdapter(mask, log_drift=log_drift)
        if peft_config is not None:
            raise ValueError(
                f"safety_mode='train_only' supports SafetyConfig or no peft_config, got {type(peft_config).__name__}."
            )
        return Freezer(mask, "train_only", log_drift=log_drift, fingerprint_check="ignore")
    if isinstance(peft_config, SafetyConfig):
        raise ValueError(
            "A SafetyConfig (SET adapter) trains the mask's entries; it cannot freeze them. Use "
            "safety_mode='train_only' with it, or a LoraConfig / full fine-tuning with safety_mode='freeze'."
        )
    if peft_config is None:
        # "ignore": the trainer checked the mask against the base weights when it was built (safety_fingerprint_check);
        # at install the weights may already be a resumed checkpoint's, whose trained entries changed the fingerprints
        return Freezer(mask, "freeze", log_drift=log_drift, fingerprint_check="ignore")
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"safety_mode='freeze' supports LoraConfig (LoRA / QLoRA) or full fine-tuning (no peft_config), got "
            f"{type(peft_config).__name__}: other adapters cannot guarantee a zero update on the mask."
        )
    return MaskedLora(mask, log_drift=log_drift)
