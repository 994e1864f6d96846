"""SET as a repair after fine-tuning: bring refusal back to a fine-tuned model without undoing its task.

A user fine-tuned an aligned model (LoRA, then merged) and it lost refusal. `repair` runs a short utility-aware SET on
the *fine-tuned* weights, training only the entries of a safety mask scored on the *aligned* model (saved before
fine-tuning: the entries where the aligned model keeps its safety), on refusal rows mixed with utility rows (by
default the fine-tuned model's own answers to benign prompts: what it does now is what is kept, the task included),
optionally with a KL term to the fine-tuned model on those answers. The result is a ``SAFETY`` adapter on top of the
merged model.

What ties the pieces together, checked rather than assumed:

* the mask fits the fine-tuned model (parameter names and shapes);
* with ``aligned_model``, the mask's fingerprints must match it (the mask was scored on that model), and a fine-tuned
  model identical to it on the masked tensors is reported (nothing to repair: that is hardening);
* the mask the adapter is built from carries the fine-tuned weights' fingerprints (the aligned ones, as a digest, move
  to its provenance under ``repair_of``), and the saved adapter records the base it was trained on like any SET
  adapter: loading it on another base (the aligned model, another fine-tune) fails the base-fingerprint check.

See ``docs/set.md`` ("SET as a repair") for the recipe beside safety replay and realignment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import SafetyError, SafetyTypeError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_REPAIR_ROWS", "fingerprint_digest", "repair", "repair_mask"]

#: the refusal rows a repair trains on by default
DEFAULT_REPAIR_ROWS = "uncensorbench_refusal"


def fingerprint_digest(fingerprints: dict[str, Any]) -> str:
    """A short sha256 of ``{name: fingerprint}`` (order-independent): which weights a mask was scored on."""
    blob = json.dumps(sorted((str(k), str(v)) for k, v in fingerprints.items())).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def repair_mask(mask: Any, model: nn.Module, *, aligned_model: nn.Module | None = None) -> Any:
    """The mask to repair ``model`` with: checked, and re-fingerprinted to ``model``'s weights.

    Args:
        mask: a `SafetyMask` (or a folder / file / Hub id of one) scored on the aligned model.
        model: the fine-tuned (merged) model.
        aligned_model: the aligned model the mask was scored on; when given, the mask's fingerprints must match it.

    Returns:
        A copy of the mask whose fingerprints are ``model``'s, with ``provenance["repair_of"]`` recording the digest of
        the aligned fingerprints.

    Raises:
        ValueError: the mask does not fit ``model`` (names, shapes), or does not match ``aligned_model``, or has no
            fingerprints to check against it.
    """
    from ..mask import SafetyMask, fingerprints_of

    if not isinstance(mask, SafetyMask):
        if not isinstance(mask, (str, os.PathLike)):
            raise SafetyTypeError(
                f"mask must be a SafetyMask or a folder / file / Hub id of one, got {type(mask).__name__}."
            )
        mask = SafetyMask.from_pretrained(mask)
    mask.validate(model, fingerprint_check="ignore")  # names and shapes
    names = list(mask.shapes)
    if aligned_model is not None:
        if not mask.fingerprints:
            raise SafetyError(
                "The mask records no weight fingerprints, so it cannot be checked against the aligned model: score it "
                "again (score() records them), or call repair without aligned_model."
            )
        try:
            mask.validate(aligned_model, fingerprint_check="error")
        except ValueError as err:
            raise SafetyError(
                f"The mask was not scored on this aligned model ({err}). A repair trains the entries that keep the "
                "aligned model safe: score the mask on the aligned model you fine-tuned from."
            ) from err
    current = fingerprints_of(model, names)
    recorded = {n: fp for n, fp in mask.fingerprints.items() if n in current}
    if recorded and all(current[n] == fp for n, fp in recorded.items()):
        logger.warning(
            "The model's weights match the mask's fingerprints on every masked tensor: this is the model the mask was "
            "scored on, not a fine-tuned copy. The run hardens it (SET on the aligned model) rather than repairing it."
        )
    aligned = {"fingerprint_digest": fingerprint_digest(mask.fingerprints)} if mask.fingerprints else {}
    base = mask.provenance.get("base_model")
    if isinstance(base, str):
        aligned["base_model"] = base
    return mask.with_fingerprints(current, replace=True, provenance={"repair_of": aligned or {"unchecked": True}})


def repair(
    model: nn.Module,
    tokenizer: Any,
    mask: Any,
    *,
    output_dir: str | os.PathLike,
    aligned_model: nn.Module | None = None,
    refusal_rows: Any = DEFAULT_REPAIR_ROWS,
    n_rows: int | None = 128,
    utility_dataset: Any = "self",
    utility_ratio: float = 1.0,
    kl_weight: float = 0.0,
    max_steps: int = 60,
    learning_rate: float = 1e-3,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int = 0,
    callbacks: Sequence[Any] | None = None,
    save: bool = True,
    **config: Any,
) -> Any:
    """Repair a fine-tuned model with utility-aware SET on a mask scored on the aligned model (module docstring).

    Args:
        model: the fine-tuned model with any LoRA merged (a plain ``PreTrainedModel``).
        tokenizer: its tokenizer (with a chat template: the rows are conversational).
        mask: a `SafetyMask` scored on the aligned model, or a folder / file / Hub id of one.
        output_dir: where the ``SAFETY`` adapter (with its mask and card) is saved.
        aligned_model: the aligned model, to check that the mask was scored on it (recommended).
        refusal_rows: harmful prompts with refusals: a named offline set (default ``uncensorbench_refusal``), a file,
            a Hub id or rows.
        n_rows: how many refusal rows (the first ``n_rows`` in a seeded order; `None`: all).
        utility_dataset: `SafetySFTConfig.safety_utility_dataset` (default ``"self"``: the fine-tuned model's own
            answers), or rows.
        utility_ratio: utility rows per refusal row (> 0 keeps the task; 0 is plain SET).
        kl_weight: `SafetySFTConfig.safety_kl_weight`.
        max_steps: optimizer steps of the repair run.
        learning_rate: learning rate of the mask's entries.
        batch_size: per-device batch size.
        max_length: training sequence length.
        seed: seed of the run and of the row order.
        callbacks: trainer callbacks (e.g. a `DevSelectCallback` to choose the step on a dev split).
        save: save the adapter to ``output_dir``.
        **config: further `SafetySFTConfig` fields (``logging_steps``, ``use_cpu``, ...).

    Returns:
        The trained `SafetySFTTrainer` (``trainer.model`` is the repaired ``PeftModel``).

    Raises:
        ValueError: see `repair_mask`; a model that is already a ``PeftModel`` (merge the fine-tuning adapter first).
    """
    from datasets import Dataset
    from peft import PeftModel

    from ..sources.datasets import load_rows
    from .config import SafetySFTConfig
    from .replay import _as_pair
    from .trainer import SafetySFTTrainer

    if isinstance(model, PeftModel):
        raise SafetyError(
            "repair trains a SAFETY adapter on the fine-tuned weights: merge the fine-tuning adapter first "
            "(model = peft_model.merge_and_unload()) and pass the merged model."
        )
    checked = repair_mask(mask, model, aligned_model=aligned_model)
    if isinstance(refusal_rows, str):
        rows = load_rows(refusal_rows, n=n_rows, seed=seed, normalize=False)
    else:
        rows = list(refusal_rows.to_list() if hasattr(refusal_rows, "to_list") else refusal_rows)
        rows = rows[:n_rows] if n_rows is not None else rows
    pairs = [_as_pair(r, i) for i, r in enumerate(rows)]
    if not pairs:
        raise SafetyError(f"No refusal rows to repair with ({refusal_rows!r}).")
    train = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
        for p, r in pairs
    ])  # fmt: skip
    defaults = {
        "logging_steps": max(1, max_steps // 10), "save_strategy": "no", "report_to": [], "lr_scheduler_type": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "gradient_accumulation_steps": 1,
    }  # fmt: skip
    defaults.update(config)
    utility_rows = None if isinstance(utility_dataset, str) or utility_dataset is None else utility_dataset
    args = SafetySFTConfig(
        output_dir=os.fspath(output_dir),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        safety_mode="train_only",
        safety_utility_ratio=float(utility_ratio),
        safety_utility_dataset=utility_dataset if utility_rows is None and utility_ratio else None,
        safety_kl_weight=float(kl_weight),
        **defaults,
    )
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=train, processing_class=tokenizer, safety_mask=checked,
        callbacks=list(callbacks or []), safety_utility_dataset=utility_rows,
    )  # fmt: skip
    trainer.train()
    if save:
        trainer.save_model(os.fspath(output_dir))
    return trainer
