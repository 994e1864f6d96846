"""``SafetySFTTrainer``: TRL's ``SFTTrainer`` with a safety mask, for SET and SPA, and any other protection.

The trainer holds a list of protections (``peft_safety.training.protection``) and calls each one's hooks at fixed
points of TRL's loop; it never branches on which protections it holds. A mask gives one, chosen by
`peft_safety.training.adapters.mask_protection`:

| ``safety_mode`` | ``peft_config`` | what trains | protection |
|---|---|---|---|
| ``"train_only"`` | ``None`` | the mask's entries (SET) | `SetAdapter`: a `SafetyConfig` sparse-delta adapter built from the mask |
| ``"train_only"`` | ``SafetyConfig`` | the mask's entries (SET) | `SetAdapter` with that adapter (its mask defaults to the trainer's) |
| ``"train_only"`` + ``safety_train_only_full_weights`` | ``None`` | the mask's entries, in the full weights | `Freezer` on the complement |
| ``"freeze"`` | ``LoraConfig`` (also on a bnb 4-/8-bit base: QLoRA) | LoRA, zero update on the mask (SPA) | `MaskedLora` |
| ``"freeze"`` | ``None`` | every weight except the mask's entries (SPA) | `Freezer`, installed after ``accelerator.prepare`` |

With ``"train_only"``, utility rows (``safety_utility_ratio``, on by default; ``safety_kl_weight``) add
`SafetyUtility`. Safety replay (``safety_replay_ratio``) adds `SafetyReplay`, Lisa (``safety_lisa_*``) adds `Lisa`, Booster
(``safety_booster_*``) adds `Booster`; ``SafetySFTTrainer(protections=[...])`` adds others.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("SafetySFTTrainer needs trl: install it with `pip install 'peft-safety[trl]'`.") from err

from ..vocab import check_mode
from .adapters import _is_quantized, mask_protection
from .callbacks import ProtectionCallback, RefusalEvalCallback
from .freeze import Freezer, _named_params
from .protection import Protection

logger = logging.getLogger(__name__)

__all__ = ["SafetySFTTrainer"]


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


def _shape_view(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{base name: tensor}`` for mask validation; quantised weights are described by a meta tensor of their
    logical shape (their packed storage has another shape, and fingerprints of quantised values never match)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in _named_params(model).items():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is None and type(p).__name__ == "Int8Params":
            shape = p.shape
        out[name] = torch.empty(tuple(shape), device="meta") if shape is not None else p
    return out


def _checked_mask(mask: Any, model: Any, args: Any) -> Any:
    """``mask`` validated against the base ``model`` (names, shapes, fingerprints by ``safety_fingerprint_check``);
    a mask without fingerprints records those of the weights it is applied to (saved with it)."""
    from peft import PeftModel

    from ..mask import fingerprints_of

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a model id/path or a PreTrainedModel, got {type(model).__name__}.")
    if isinstance(model, PeftModel):
        raise ValueError(
            "SafetySFTTrainer with a mask needs the base model, not a PeftModel: pass the base model and the "
            "adapter config as peft_config= (LoraConfig for 'freeze', SafetyConfig or nothing for 'train_only')."
        )
    fingerprint_check = getattr(args, "safety_fingerprint_check", "error")
    if _is_quantized(model) and fingerprint_check == "error":
        fingerprint_check = "ignore"  # quantised weights never match a full-precision fingerprint
    view = _shape_view(model)
    mask.validate(view, fingerprint_check=fingerprint_check)
    missing = [n for n in mask.shapes if n not in mask.fingerprints]
    if missing and not _is_quantized(model):
        mask = mask.with_fingerprints(fingerprints_of(view, missing))
    return mask


def _check_mask_after_trl(
    mask: Any, model: Any, args: Any, components: Sequence[Protection], cause: BaseException | None = None
) -> None:
    """The mask still fits ``model`` after ``SFTTrainer.__init__``, which may change shapes after the mask was checked:
    ``chat_template_path`` naming a tokenizer copies its chat template and tokens and resizes the embeddings (and a
    tied or untied ``lm_head``). Refused here, at construction, instead of failing late in ``train()``. The parameters
    with mask entries are compared, and every parameter the mask declares when a `Freezer` protects it (in
    ``"train_only"`` mode it freezes a declared parameter without entries whole).

    Raises:
        ValueError: naming the parameters whose shape changed and the ways out (``from cause`` when given).
    """
    if mask is None or not isinstance(model, nn.Module):
        return
    current = _shape_view(model)
    names = set(mask.shapes) if any(isinstance(c, Freezer) for c in components) else set(mask.names)
    changed = {n: (tuple(mask.shapes[n]), tuple(current[n].shape)) for n in sorted(names) if n in current}
    changed = {n: shapes for n, shapes in changed.items() if shapes[0] != shapes[1]}
    if not changed:
        return
    name, (old, new) = next(iter(changed.items()))
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    template = getattr(args, "chat_template_path", None)
    why = (
        f"chat_template_path={template!r} copies that tokenizer's chat template and added tokens and resizes the "
        "embeddings"
        if template
        else "the trainer changed the model"
    )
    message = (
        f"TRL changed {name!r} from {old} to {new}{more} while building the trainer ({why}), after the mask was "
        "checked: the mask describes the old shapes. Resize first and compute the mask on the resized model "
        f"(model, tokenizer, _ = trl.clone_chat_template(model, tokenizer, {template or '<path>'!r}), then score and "
        "select), or pass a .jinja chat template file (no new tokens, no resize), or leave those parameters out of "
        f"the mask (mask.filter(lambda name: name not in {sorted(changed)!r}))."
    )
    if cause is not None:
        raise ValueError(message) from cause
    raise ValueError(message)


def _configured_defenses(args: Any, replay_rows: Any, harmful_rows: Any) -> list[Protection]:
    """The protections the ``safety_lisa_*`` and ``safety_booster_*`` fields ask for (none by default)."""
    from .config import check_defense_fields

    check_defense_fields(args)
    out: list[Protection] = []
    if getattr(args, "safety_lisa_alignment_steps", 0):
        from .lisa import Lisa

        out.append(Lisa.from_args(args, rows=replay_rows))
    if getattr(args, "safety_booster_lambda", 0.0):
        from .booster import Booster

        out.append(Booster.from_args(args, rows=harmful_rows))
    elif harmful_rows is not None:
        raise ValueError(
            "SafetySFTTrainer(safety_booster_harmful_dataset=...) was given but safety_booster_lambda is 0: set "
            "safety_booster_lambda (the reference uses 5) or drop the harmful rows."
        )
    return out


def _overrides(component: Protection, hook: str) -> bool:
    return getattr(type(component), hook) is not getattr(Protection, hook)


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
        safety_replay_dataset: refusal rows (a list of dicts or a ``datasets.Dataset``) to mix into the training set
            at ``args.safety_replay_ratio``, overriding ``args.safety_replay_dataset``; with Lisa on
            (``args.safety_lisa_alignment_steps``), the rows of its alignment states.
        safety_booster_harmful_dataset: harmful rows for Booster (``args.safety_booster_lambda``), overriding
            ``args.safety_booster_harmful_dataset``.
        safety_utility_dataset: utility rows for SET (a list of dicts or a ``datasets.Dataset``), overriding
            ``args.safety_utility_dataset`` (see `peft_safety.training.utility`).
        protections: further `Protection` objects (``peft_safety.training.protection``), appended to `protections`
            after the replay, the mask's protection and the defenses the config's fields turn on (Lisa, Booster);
            each one's hooks run at their point of the loop.

    The mode comes from ``args.safety_mode`` (``"freeze"`` or ``"train_only"``; required with a mask). See the module
    docstring for the table of modes, and ``docs/trainer.md`` for the logged metrics.

    Attributes:
        protections: the list of protections, in the order their hooks run.

    Raises:
        ValueError: mask without a mode, unknown mode, a mask for another model, DoRA or a non-zero LoRA init with a
            mask, a mask entry on ``lm_head`` with LoRA, no mask entry in any trained module, ``train_only`` with a
            LoRA config or ``freeze`` with a SET config.
        TypeError: a mask of the wrong type, a protection that is not a `Protection`.

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
        safety_booster_harmful_dataset: Any = None,
        protections: Sequence[Protection] | None = None,
        safety_utility_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        bound = inspect.signature(SFTTrainer.__init__).bind(self, *args, **kwargs)
        params = dict(bound.arguments)
        params.pop("self")
        # every form of `args` SFTTrainer accepts (None, a TrainingArguments, an SFTConfig) becomes a SafetySFTConfig,
        # so the safety_* fields always exist (with their defaults)
        training_args = params["args"] = _as_safety_config(params.get("args"), params.get("model"))
        components: list[Protection] = []
        lisa_on = bool(getattr(training_args, "safety_lisa_alignment_steps", 0))
        if not lisa_on and (safety_replay_dataset is not None or getattr(training_args, "safety_replay_ratio", 0.0)):
            from .replay import SafetyReplay  # safety replay: mix refusal rows into the training set

            components.append(SafetyReplay(safety_replay_dataset))
        # the defenses configured by fields (Lisa, Booster) run after the mask's protection
        defenses = _configured_defenses(training_args, safety_replay_dataset, safety_booster_harmful_dataset)
        extra = list(protections or ())
        for component in extra:
            if not isinstance(component, Protection):
                raise TypeError(
                    f"protections must be Protection objects (peft_safety.training.protection), got "
                    f"{type(component).__name__}."
                )
        mask_source = safety_mask if safety_mask is not None else getattr(training_args, "safety_mask", None)
        mode = getattr(training_args, "safety_mode", None)
        self.safety_mask = None
        self.safety_mode = mode
        self.protections = components
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
            check_mode(mode, where="safety_mode")
            self.safety_mask = _load_mask(mask_source)
        restore_init_kwargs = None
        prepares_model = self.safety_mask is not None or any(_overrides(c, "prepare_model") for c in extra)
        if prepares_model and isinstance(params.get("model"), str):
            # the mask is checked against the loaded weights before TRL wraps them: load the model here, exactly as
            # SFTTrainer would (TRL's loader, model_init_kwargs, float32 default, trust_remote_code)
            params["model"], params["processing_class"] = _load_model_like_trl(
                params["model"], training_args, params.get("quantization_config"), params.get("processing_class")
            )
            params["quantization_config"] = None
            restore_init_kwargs = training_args.model_init_kwargs
            training_args.model_init_kwargs = None  # used already: keeps SFTTrainer from warning they are ignored
        if self.safety_mask is not None:
            self.safety_mask = _checked_mask(self.safety_mask, params.get("model"), training_args)
            components.append(mask_protection(self.safety_mask, mode, params.get("peft_config"), training_args))
            from .utility import SafetyUtility  # utility-aware SET (on by default with train_only)

            utility = SafetyUtility.from_args(
                training_args,
                model=params.get("model"),
                tokenizer=params.get("processing_class"),
                rows=safety_utility_dataset,
            )
            if utility is not None:
                components.append(utility)
        elif safety_utility_dataset is not None:
            raise ValueError(
                "SafetySFTTrainer(safety_utility_dataset=...) needs a safety mask and safety_mode='train_only' (SET)."
            )
        components.extend(defenses)
        components.extend(extra)
        for component in components:
            params["train_dataset"] = component.prepare_dataset(params.get("train_dataset"), training_args)
        if prepares_model:
            from transformers import set_seed

            # as SFTTrainer before it wraps a model in PEFT: adapter weights are initialised randomly, so the seed
            # must be set before an adapter exists (else its init depends on what the process did before)
            set_seed(training_args.seed)
            for component in components:
                params["model"], params["peft_config"] = component.prepare_model(
                    params.get("model"), params.get("peft_config"), training_args
                )
        callbacks = list(params.get("callbacks") or [])
        if components:
            callbacks.append(ProtectionCallback(self))
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
            try:
                super().__init__(**params)
            except Exception as err:
                # TRL may have resized the model before failing on the mask (a SET adapter on lm_head): say why
                _check_mask_after_trl(self.safety_mask, params.get("model"), training_args, components, cause=err)
                raise
            _check_mask_after_trl(self.safety_mask, self.model, training_args, components)
        except BaseException:
            for component in components:
                component.remove()
            raise
        finally:
            if restore_init_kwargs is not None:
                training_args.model_init_kwargs = restore_init_kwargs
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RefusalEvalCallback) and callback.trainer is None:
                callback.trainer = self  # its metrics join the trainer's log (DevSelectCallback passed as a callback)
        for component in components:
            component.on_wrapped(self.model)
        for component in components:
            component.prepare_batches(self._protection_loader)

    def _protection_loader(self, rows: Any, *, name: str, seed: int):
        """The ``make_loader`` of `Protection.prepare_batches`: ``rows`` (a list of dicts or a ``datasets.Dataset``
        in the training set's format) prepared as the training set is (TRL's ``_prepare_dataset`` with the same
        processing class and options, unless ``skip_prepare_dataset``), collated by the trainer's collator at the
        per-device batch size, in a random order drawn from ``seed`` (a generator of its own: the training set's
        order and every other random stream are untouched), through ``accelerator.prepare`` (each process gets its
        share under DDP)."""
        from datasets import Dataset
        from torch.utils.data import RandomSampler

        dataset = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
        if not getattr(self, "_skip_prepare_dataset", False):
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing, None, name)
        generator = torch.Generator().manual_seed(int(seed))
        return self._get_dataloader(
            dataset=dataset,
            description=name,
            batch_size=self._train_batch_size,
            sampler_fn=lambda ds: RandomSampler(ds, generator=generator),
            is_training=True,
        )

    @property
    def freezer(self) -> Freezer | None:
        """The installed `Freezer` (full fine-tuning with a mask), or `None`."""
        return next((c for c in self.protections if isinstance(c, Freezer) and c.installed), None)

    # ------------------------------------------------------------------ training loop hooks
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        # after accelerator.prepare and the checkpoint load: hooks see the final (wrapped, sharded) parameters
        for component in self.protections:
            component.install(model, self.optimizer)
        return model, train_dataloader

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        # every protection is asked (each sees every step); the first that answers supplies this step's batches
        sources = [c.batch_source(self.state.global_step) for c in self.protections]
        source = next((s for s in sources if s is not None), None)
        return super().get_batch_samples(epoch_iterator if source is None else source, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        extras = [e for e in (c.extra_loss(model, inputs) for c in self.protections) if e is not None]
        if not extras:
            return result
        extra = sum(extras)
        # each term is at the scale of one micro-batch's loss: when the loss is already normalised over the whole
        # accumulated batch (num_items_in_batch), Trainer.training_step does not divide it by the accumulation steps,
        # so the terms are divided here (as TRL does for the MoE aux loss); otherwise training_step divides the sum
        if self.loss_is_scaled_for_ga is not None:
            scaled_for_ga = self.loss_is_scaled_for_ga
        else:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if scaled_for_ga:
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    def _clip_grad_norm(self, model):
        for component in self.protections:
            component.before_clip(model)  # e.g. FSDP1: the Freezer masks gradients hooks cannot reach
        return super()._clip_grad_norm(model)

    def train(self, *args: Any, **kwargs: Any):
        try:
            output = super().train(*args, **kwargs)
            if getattr(self.args, "safety_verify", True):
                self.verify_safety()
            return output
        finally:
            for component in self.protections:
                component.remove()

    def verify_safety(self) -> dict[str, float]:
        """Check every protection's guarantee now (during or at the end of training) and return the numbers; raises
        `FreezeViolationError` if one is violated.

        Full-weight modes (`Freezer`): every frozen entry bit-identical to its value at the start of training. Adapter
        modes: the adapter's *effective* update is exactly zero on every frozen entry (LoRA SPA) or outside the mask
        (SET), measured by running each adapted layer and its base layer on an identity input, so a layer whose
        forward leaks through the mask is caught even when its merge helper would mask the delta.
        """
        metrics: dict[str, float] = {}
        for component in self.protections:
            for key, value in component.verify(strict=True).to_metrics().items():
                metrics[key] = metrics.get(key, 0) + value if key == "checked_entries" else value
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # added before the log is dispatched, so log_history and every report_to integration receive them, in the same
        # entry as loss / grad_norm / learning_rate
        if (self.safety_mask is not None or self.protections) and not any(k.startswith("eval_") for k in logs):
            logs.update(self.safety_metrics())
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RefusalEvalCallback) and callback.trainer is self:
                logs.update(callback.pop_pending())
        super().log(logs, *args, **kwargs)

    def safety_metrics(self) -> dict[str, float]:
        """The ``safety/*`` metrics logged at each logging step (documented in ``docs/trainer.md``): the mask's and
        the trainable entries, then every protection's `Protection.metrics`."""
        metrics: dict[str, float] = {}
        if self.safety_mask is not None:
            metrics["safety/trainable_entries"] = float(
                sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            )
            metrics["safety/mask_entries"] = float(self.safety_mask.numel())
        for component in self.protections:
            metrics.update(component.metrics())
        return metrics

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            # what the protections need next to the weights (the mask travels with every save: checkpoints, the final
            # model, Trainer.push_to_hub's upload), and the folder's card (PEFT's adapter card, if any) updated to
            # describe both and the import they need
            folder = output_dir if output_dir is not None else self.args.output_dir
            for component in self.protections:
                component.save_pretrained(folder)
            if self.safety_mask is not None or self.safety_evidence():
                self._write_safety_card(folder)

    def safety_evidence(self) -> list[dict[str, Any]]:
        """The evaluation records of the callbacks that give them (`DevSelectCallback.evidence`: refusal and
        over-refusal with intervals, judge and prompt sets), for the card of the saved adapter."""
        records: list[dict[str, Any]] = []
        for callback in self.callback_handler.callbacks if hasattr(self, "callback_handler") else ():
            evidence = getattr(callback, "evidence", None)
            if callable(evidence):
                records.extend(evidence())
        return records

    def _write_safety_card(self, folder: str) -> None:
        from ..mask.cards import write_card
        from ..mask.evidence import write_evidence

        evidence = self.safety_evidence()
        if evidence:
            write_evidence(
                folder, evidence
            )  # travels with the weights: a later push or write_card puts it on the card
        write_card(folder, mask=self.safety_mask, mode=self.safety_mode, evidence=evidence or None)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if (self.safety_mask is None and not self.safety_evidence()) or not self.is_world_process_zero():
            return
        if os.path.isdir(self.args.output_dir):
            # TRL rewrote README.md from its template: put the peft-safety section (and front matter) back
            self._write_safety_card(self.args.output_dir)

    def __del__(self) -> None:  # pragma: no cover - best effort if train() was interrupted before its finally
        for component in getattr(self, "protections", ()):
            component.remove()
