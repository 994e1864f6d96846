"""``SafetySFTTrainer``: TRL's ``SFTTrainer`` with a safety mask, for SET and SPA.

| ``safety_mode`` | ``peft_config`` | what trains | mechanism |
|---|---|---|---|
| ``"train_only"`` | ``None`` | the mask's entries (SET) | a `SafetyConfig` sparse-delta adapter built from the mask |
| ``"train_only"`` | ``SafetyConfig`` | the mask's entries (SET) | that adapter (its mask defaults to the trainer's) |
| ``"train_only"`` + ``safety_train_only_full_weights`` | ``None`` | the mask's entries, in the full weights | `Freezer` on the complement |
| ``"freeze"`` | ``LoraConfig`` (also on a bnb 4-/8-bit base: QLoRA) | LoRA, zero update on the mask (SPA) | the tuner's masked LoRA |
| ``"freeze"`` | ``None`` | every weight except the mask's entries (SPA) | `Freezer`, installed after ``accelerator.prepare`` |
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("SafetySFTTrainer needs trl: install it with `pip install 'peft-safety[trl]'`.") from err

from .callbacks import FreezerCallback, RefusalEvalCallback, mask_drift_metrics
from .freeze import Freezer, FreezeViolationError, canonical_name, dense_frozen_masks

logger = logging.getLogger(__name__)

__all__ = ["SafetySFTTrainer"]

_MODES = ("freeze", "train_only")


def _load_mask(value: Any):
    from ..mask import SafetyMask

    if isinstance(value, SafetyMask):
        return value
    if isinstance(value, (str, os.PathLike)):
        return SafetyMask.from_pretrained(value)
    raise TypeError(
        f"safety_mask must be a SafetyMask, a folder, a safety_mask.safetensors file or a Hub repo id; got "
        f"{type(value).__name__}."
    )


def _is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _shape_view(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{canonical name: tensor}`` for mask validation; quantised weights are described by a meta tensor of their
    logical shape (their packed storage has another shape, and fingerprints of quantised values never match)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is None and type(p).__name__ == "Int8Params":
            shape = p.shape
        out.setdefault(canonical_name(name), torch.empty(tuple(shape), device="meta") if shape is not None else p)
    return out


def _as_safety_config(args: Any, model: Any):
    """``args`` as a `SafetySFTConfig`, the way ``SFTTrainer`` turns ``None`` or a ``TrainingArguments`` into an
    ``SFTConfig``: ``None`` gives ``SafetySFTConfig("<model name>-SFT")``; a ``TrainingArguments`` or ``SFTConfig``
    keeps every value it has, and the ``safety_*`` fields take their defaults."""
    from transformers import TrainingArguments

    from .config import SafetySFTConfig

    if isinstance(args, SafetySFTConfig):
        return args
    if args is None:
        if isinstance(model, str):
            name = model
        else:
            from trl.trainer.utils import get_config_model_id

            name = get_config_model_id(model.config)
        return SafetySFTConfig(f"{name.rstrip('/').split('/')[-1]}-SFT")
    if not isinstance(args, TrainingArguments):
        raise TypeError(
            f"args must be a SafetySFTConfig, an SFTConfig, a TrainingArguments or None, got {type(args).__name__}."
        )
    # the raw field values: to_dict() would replace every *_token field (hub_token, and SFTConfig's eos_token and
    # pad_token) by a placeholder such as "<EOS_TOKEN>"
    names = {f.name for f in dataclasses.fields(SafetySFTConfig) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
    return SafetySFTConfig(**values)


def _load_model_like_trl(model_id: str, args: Any, quantization_config: Any, processing_class: Any):
    """Load ``model_id`` as ``SFTTrainer.__init__`` does (trl/trainer/sft_trainer.py, "Model" block): TRL's
    ``create_model_from_path`` (float32 unless ``dtype`` says otherwise), ``args.model_init_kwargs``, the trainer's
    ``quantization_config``, no device map under multi-GPU/DeepSpeed, ``trust_remote_code`` from the config.
    Returns ``(model, processing_class)``; the processing class is loaded (same revision) when none was given."""
    from transformers import AutoProcessor, set_seed
    from trl.trainer.utils import create_model_from_path

    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ValueError(
                "quantization_config was given both to the trainer and in args.model_init_kwargs; set it in one place "
                "(the trainer argument)."
            )
        init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # distributed training needs the whole model on each process's device
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    set_seed(args.seed)  # as SFTTrainer: seeded before the model exists
    model = create_model_from_path(model_id, **init_kwargs)
    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            model_id, revision=init_kwargs.get("revision"), trust_remote_code=init_kwargs["trust_remote_code"]
        )
    return model, processing_class


class SafetySFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` that keeps a `SafetyMask`'s guarantee: SET (train only the mask) or SPA (freeze the mask).

    Accepts every `SFTTrainer` argument, plus:

    Args:
        safety_mask: a `SafetyMask` object, overriding ``args.safety_mask`` (a path or Hub id).
        safety_evaluator: optional callable ``(model, tokenizer) -> dict[str, float]`` run every
            ``args.safety_eval_steps`` steps by `RefusalEvalCallback` (for example a refusal-rate evaluation); its
            results are logged with a ``safety/`` prefix.

    The mode comes from ``args.safety_mode`` (``"freeze"`` or ``"train_only"``; required with a mask). See the module
    docstring for the table of modes, and ``docs/trainer.md`` for the logged metrics.

    Raises:
        ValueError: mask without a mode, unknown mode, a mask for another model, DoRA or a non-zero LoRA init with a
            mask, a mask entry on ``lm_head`` with LoRA, no mask entry in any trained module, ``train_only`` with a
            LoRA config or ``freeze`` with a SET config.
        TypeError: a mask of the wrong type.

    Example:

    ```python
    >>> from peft import LoraConfig
    >>> from peft_safety import SafetySFTConfig, SafetySFTTrainer
    >>> args = SafetySFTConfig("out", safety_mask="my-mask", safety_mode="freeze")
    >>> trainer = SafetySFTTrainer(model, args=args, train_dataset=ds, peft_config=LoraConfig(r=16))
    >>> trainer.train()          # the LoRA update is exactly zero on the mask's entries
    ```
    """

    _tag_names = ["trl", "sft", "peft-safety"]

    def __init__(
        self,
        *args: Any,
        safety_mask: Any = None,
        safety_evaluator: Any = None,
        safety_replay_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(SFTTrainer.__init__).bind(self, *args, **kwargs)
        params = dict(bound.arguments)
        params.pop("self")
        # every form of `args` SFTTrainer accepts (None, a TrainingArguments, an SFTConfig) becomes a SafetySFTConfig,
        # so the safety_* fields always exist (with their defaults)
        training_args = params["args"] = _as_safety_config(params.get("args"), params.get("model"))
        if safety_replay_dataset is not None or getattr(training_args, "safety_replay_ratio", 0.0):
            from .replay import apply_replay  # safety replay: mix refusal rows into the training set

            params["train_dataset"] = apply_replay(params.get("train_dataset"), safety_replay_dataset, training_args)
        mask_source = safety_mask if safety_mask is not None else getattr(training_args, "safety_mask", None)
        mode = getattr(training_args, "safety_mode", None)
        self.safety_mask = None
        self.safety_mode = mode
        self.freezer: Freezer | None = None
        self._safety_mechanism = "none"
        self._switched_off: list[nn.Parameter] = []
        self._drift_reference: dict[str, torch.Tensor] | None = None
        restore_init_kwargs = None
        if mask_source is None:
            if mode is not None:
                raise ValueError(
                    f"safety_mode={mode!r} was given without a mask: set safety_mask (path or Hub id) in the config or "
                    "pass SafetySFTTrainer(safety_mask=...)."
                )
        else:
            if mode is None:
                raise ValueError(
                    "A safety mask was given but safety_mode is not set: use safety_mode='freeze' (SPA: keep the "
                    "mask's entries unchanged) or safety_mode='train_only' (SET: train only the mask's entries)."
                )
            if mode not in _MODES:
                raise ValueError(f"Unknown safety_mode {mode!r}; use 'freeze' or 'train_only'.")
            self.safety_mask = _load_mask(mask_source)
            if isinstance(params.get("model"), str):
                # the mask is checked against the loaded weights before TRL wraps them: load the model here, exactly
                # as SFTTrainer would (TRL's loader, model_init_kwargs, float32 default, trust_remote_code)
                model_id = params["model"]
                params["model"], processor = _load_model_like_trl(
                    model_id, training_args, params.get("quantization_config"), params.get("processing_class")
                )
                params["processing_class"] = processor
                params["quantization_config"] = None
                restore_init_kwargs = training_args.model_init_kwargs
                training_args.model_init_kwargs = None  # used already: keeps SFTTrainer from warning they are ignored
            from transformers import set_seed

            # as SFTTrainer before it wraps a model in PEFT: adapter weights are initialised randomly, so the seed
            # must be set before the masked LoRA exists (else its init depends on what the process did before)
            set_seed(training_args.seed)
            params["model"], params["peft_config"] = self._prepare_model(
                params.get("model"), params.get("peft_config"), training_args, params
            )
        callbacks = list(params.get("callbacks") or [])
        if self._safety_mechanism == "freezer":
            callbacks.append(FreezerCallback(self))
        eval_steps = getattr(training_args, "safety_eval_steps", None)
        if eval_steps:
            if safety_evaluator is None:
                raise ValueError(
                    f"safety_eval_steps={eval_steps} needs an evaluator: pass SafetySFTTrainer(safety_evaluator=fn), "
                    "fn(model, tokenizer) -> dict of metrics (e.g. a refusal-rate evaluation)."
                )
            callbacks.append(RefusalEvalCallback(safety_evaluator, eval_steps, trainer=self))
        params["callbacks"] = callbacks or None
        try:
            super().__init__(**params)
        finally:
            if restore_init_kwargs is not None:
                training_args.model_init_kwargs = restore_init_kwargs
        if self._safety_mechanism == "set" and _is_quantized(self.model):
            # SFTTrainer casts every trainable parameter of a quantised model to bf16 (trl/trainer/sft_trainer.py, quantised models); keep the
            # sparse deltas in fp32 so small updates are not rounded away
            for name, p in self.model.named_parameters():
                if p.requires_grad and "safety_values" in name:
                    p.data = p.data.float()

    # ------------------------------------------------------------------ model preparation
    def _prepare_model(self, model: Any, peft_config: Any, args: Any, params: Mapping[str, Any]):
        from peft import LoraConfig, PeftModel

        from ..tuner import SafetyConfig

        mask, mode = self.safety_mask, self.safety_mode
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a model id/path or a PreTrainedModel, got {type(model).__name__}.")
        fingerprint = getattr(args, "safety_fingerprint_check", "error")
        if _is_quantized(model) and fingerprint == "error":
            fingerprint = "ignore"  # quantised weights never match a full-precision fingerprint
        if isinstance(model, PeftModel):
            raise ValueError(
                "SafetySFTTrainer with a mask needs the base model, not a PeftModel: pass the base model and the "
                "adapter config as peft_config= (LoraConfig for 'freeze', SafetyConfig or nothing for 'train_only')."
            )
        mask.validate(_shape_view(model), fingerprint=fingerprint)
        # provenance: a mask without fingerprints records those of the base weights it is applied to (saved with it)
        from ..mask import fingerprints_of

        missing = [n for n in mask.shapes if n not in mask.fingerprints]
        if missing and not _is_quantized(model):
            self.safety_mask = mask = mask.with_fingerprints(fingerprints_of(_shape_view(model), missing))

        if mode == "train_only":
            if isinstance(peft_config, LoraConfig):
                raise ValueError(
                    "safety_mode='train_only' trains only the mask's entries, which LoRA cannot express: drop "
                    "peft_config (a SET adapter is built from the mask) or pass SafetyConfig(mask=...). For SPA with "
                    "LoRA use safety_mode='freeze'."
                )
            if peft_config is None and not getattr(args, "safety_train_only_full_weights", False):
                peft_config = SafetyConfig(mask=mask, task_type="CAUSAL_LM")
            if isinstance(peft_config, SafetyConfig):
                if peft_config.mask is None:
                    peft_config.mask = mask
                self._safety_mechanism = "set"
                return model, peft_config
            if peft_config is not None:
                raise ValueError(
                    f"safety_mode='train_only' supports SafetyConfig or no peft_config, got {type(peft_config).__name__}."
                )
            self._switch_off_whole_tensors(model)
            self._safety_mechanism = "freezer"
            return model, None

        # mode == "freeze"
        if isinstance(peft_config, SafetyConfig):
            raise ValueError(
                "A SafetyConfig (SET adapter) trains the mask's entries; it cannot freeze them. Use "
                "safety_mode='train_only' with it, or a LoraConfig / full fine-tuning with safety_mode='freeze'."
            )
        if peft_config is None:
            self._switch_off_whole_tensors(model)
            self._safety_mechanism = "freezer"
            return model, None
        if not isinstance(peft_config, LoraConfig):
            raise ValueError(
                f"safety_mode='freeze' supports LoraConfig (LoRA / QLoRA) or full fine-tuning (no peft_config), got "
                f"{type(peft_config).__name__}: other adapters cannot guarantee a zero update on the mask."
            )
        self._check_lora(model, peft_config)
        try:
            from ..tuner import get_masked_lora_model
        except ImportError as err:
            raise ImportError(
                "SPA with LoRA needs peft_safety.tuner.lora.get_masked_lora_model (the masked LoRA), which this install "
                "lacks; upgrade peft-safety."
            ) from err
        if getattr(args, "gradient_checkpointing", False):
            model.enable_input_require_grads()
        # a SafetyLoraConfig keeps its own forward method; any other LoraConfig gets the bit-exact default
        model = get_masked_lora_model(
            model, peft_config, mask, entries_method=getattr(peft_config, "entries_method", "dense")
        )
        self._safety_mechanism = "lora"
        return model, None

    def _check_lora(self, model: nn.Module, cfg: Any) -> None:
        mask = self.safety_mask
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

    def _switch_off_whole_tensors(self, model: nn.Module) -> None:
        """Tensors frozen whole leave the optimizer and DDP before they are built: zero memory, zero time."""
        params = {}
        for name, p in model.named_parameters():
            params.setdefault(canonical_name(name), p)
        for name, frozen in dense_frozen_masks(self.safety_mask, self.safety_mode):
            p = params.get(name)
            if p is not None and p.requires_grad and bool(frozen.all()):
                p.requires_grad_(False)
                self._switched_off.append(p)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if trainable == 0:
            raise ValueError(
                "The mask leaves no trainable entry in the model (every covered tensor is frozen whole and nothing "
                "else trains). Check safety_mode and the mask."
            )

    # ------------------------------------------------------------------ training loop hooks
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._safety_mechanism == "freezer":
            # after accelerator.prepare and the checkpoint load: hooks see the final (wrapped, sharded) parameters
            if self.freezer is not None:
                self.freezer.remove()
            self.freezer = Freezer(self.safety_mask, self.safety_mode).install(model, self.optimizer)
        if self.args.safety_log_drift and self._safety_mechanism == "freezer" and self._drift_reference is None:
            self._drift_reference = {
                name: p.detach().to("cpu", copy=True)
                for name, p in self._covered_params().items()
                if name in set(self.safety_mask.shapes)
            }
        return model, train_dataloader

    def _clip_grad_norm(self, model):
        if self.freezer is not None and self.freezer.needs_grad_mask_call:
            self.freezer.mask_grads_()  # FSDP1: hooks do not fire on the flat parameter's views
        return super()._clip_grad_norm(model)

    def train(self, *args: Any, **kwargs: Any):
        try:
            output = super().train(*args, **kwargs)
            if self.safety_mask is not None and getattr(self.args, "safety_verify", True):
                self.verify_safety()
            return output
        finally:
            if self.freezer is not None:
                self.freezer.remove()
                self.freezer = None

    def verify_safety(self) -> dict[str, float]:
        """Check the guarantee now and return the numbers; raises `FreezeViolationError` if it is violated.

        Full-weight modes: every frozen entry bit-identical to its value at the start of training. Adapter modes:
        the adapter's *effective* update is exactly zero on every frozen entry (LoRA SPA) or outside the mask (SET),
        measured by running each adapted layer and its base layer on an identity input (`mask_drift_metrics`), so a
        layer whose forward leaks through the mask is caught even when its merge helper would mask the delta.
        """
        if self.freezer is not None:
            report = self.freezer.verify()
            return {"checked_entries": report.checked_entries}
        metrics = mask_drift_metrics(self.model, self.safety_mask, self.safety_mode, reference=self._drift_reference)
        if metrics.get("safety/violations", 0):
            raise FreezeViolationError(
                f"{int(metrics['safety/violations'])} entries that must stay unchanged moved "
                f"(mode {self.safety_mode!r}, mechanism {self._safety_mechanism!r})."
            )
        return metrics

    def _covered_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for name, p in self.model.named_parameters():
            out.setdefault(canonical_name(name), p)
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # added before the log is dispatched, so log_history and every report_to integration receive them, in the same
        # entry as loss / grad_norm / learning_rate
        if self.safety_mask is not None and not any(k.startswith("eval_") for k in logs):
            logs.update(self.safety_metrics())
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RefusalEvalCallback) and callback.trainer is self:
                logs.update(callback.pop_pending())
        super().log(logs, *args, **kwargs)

    def safety_metrics(self) -> dict[str, float]:
        """The ``safety/*`` metrics logged at each logging step (documented in ``docs/trainer.md``)."""
        metrics: dict[str, float] = {
            "safety/trainable_entries": float(sum(p.numel() for p in self.model.parameters() if p.requires_grad)),
            "safety/mask_entries": float(self.safety_mask.numel()),
        }
        if self.freezer is not None:
            metrics["safety/frozen_entries"] = float(self.freezer.num_frozen)
            metrics["safety/freezer_bytes"] = float(self.freezer.memory_bytes)
        if getattr(self.args, "safety_log_drift", False):
            drift = mask_drift_metrics(self.model, self.safety_mask, self.safety_mode, reference=self._drift_reference)
            metrics.update({k: v for k, v in drift.items() if k != "safety/violations"})
        return metrics

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.safety_mask is not None and self.args.should_save:
            # the mask travels with every save (checkpoints, the final model, Trainer.push_to_hub's upload), and the
            # folder's card (PEFT's adapter card, if any) is updated to describe both and the import they need
            folder = output_dir if output_dir is not None else self.args.output_dir
            self.safety_mask.save_pretrained(folder)
            self._write_safety_card(folder)

    def _write_safety_card(self, folder: str) -> None:
        from ..mask.cards import write_card

        write_card(folder, mask=self.safety_mask, mode=self.safety_mode)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if self.safety_mask is None or not self.is_world_process_zero():
            return
        if os.path.isdir(self.args.output_dir):
            # TRL rewrote README.md from its template: put the peft-safety section (and front matter) back
            self._write_safety_card(self.args.output_dir)

    def __del__(self) -> None:  # pragma: no cover - best effort if train() was interrupted before its finally
        freezer = getattr(self, "freezer", None)
        if freezer is not None:
            freezer.remove()
