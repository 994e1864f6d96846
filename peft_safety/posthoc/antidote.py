"""Antidote (Huang et al., ICML 2025): after fine-tuning, prune the weights that Wanda scores highest on harmful data.

Antidote is post-hoc and agnostic to how the model was fine-tuned: score the fine-tuned weights with Wanda
(``|W_ij| * ||X_j||_2``, Wei et al.'s pruning score, with the activations of harmful (prompt, harmful answer) rows),
and set the top ``fraction`` to zero. What it prunes, as in the public code (``git-disl/Antidote``: ``train.py``
``--optimizer antidote``, ``trainer.py`` ``AntidoteTrainer.save_mask``, ``utils.py`` ``prune_wanda_outlier`` and
``find_layers``):

* a LoRA fine-tune (the paper's main setting): the **LoRA factors** of the fine-tuning adapter, ``lora_A`` and
  ``lora_B`` of every adapted module (``find_layers`` keeps the ``nn.Linear`` modules whose name contains ``lora``);
  ``lora_A``'s input is the layer input, ``lora_B``'s is ``lora_A``'s output, so the update ``B A`` is pruned where
  harmful activations flow through it. Not the merged weights;
* full fine-tuning: the ``q_proj``, ``k_proj`` and ``v_proj`` weights (``find_layers(..., full_finetuning="True")``);
  ``target_modules`` chooses others;
* per output row (Wanda's comparison group): in each row of each pruned matrix, the
  ``width - floor(width * (1 - fraction))`` entries with the highest score (the reference sorts each row and keeps
  ``int(width * sparsity_ratio)`` entries, ``sparsity_ratio = 1 - dense_ratio``); not a global ranking;
* the activations of every token of the harmful rows (prompt and answer: the reference runs the bare ``input_ids``),
  averaged over rows: a `CalibrationSet` with ``loss="full_text"`` (padding excluded). The reference's script prunes
  ``dense_ratio = 0.1``.

Ties inside a row go to the lower column index (the reference's stable ascending sort prunes the higher one); with
continuous scores this never matters.

The scores come from the library's Wanda scorer (`peft_safety.scoring.activation.wanda`), the selection from its
per-row top-k (`peft_safety.scoring.selection.topk_indices_per_row`), and the result is a `SafetyMask` of what was
pruned (``Weight()`` granularity, fingerprints of the weights before pruning): ship it next to the model, inspect it
(``mask.summary()``), or undo the pruning exactly with
``peft_safety.rewind_(pruned_model, original_model, mask)`` (the original values at the mask's entries are written
back; the original is the fine-tuned model or adapter as it was before pruning).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..mask import SafetyMask, Weight, fingerprint_tensor
from ..scoring import SCORERS, resolve_targets, score
from ..scoring.calibration import CalibrationSet
from ..scoring.selection import topk_indices_per_row
from ..vocab import base_name, check_fraction

__all__ = ["ANTIDOTE_FULL_TARGETS", "antidote", "antidote_row_count"]

#: the modules Antidote prunes in a fully fine-tuned model (its ``find_layers(..., full_finetuning="True")``)
ANTIDOTE_FULL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")


def antidote_row_count(width: int, fraction: float) -> int:
    """Entries pruned in a row of ``width`` entries: ``width - floor(width * (1 - fraction))`` (Antidote's count)."""
    return width - int(width * (1.0 - fraction))


def _lora_layers(model: nn.Module, adapter_name: str) -> None:
    """Check that ``model`` is a plain-LoRA PEFT model with ``adapter_name`` whose factors can be pruned."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is None:
        raise ValueError(
            f"antidote: the PEFT model has no adapter {adapter_name!r} (it has {sorted(model.peft_config)})."
        )
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        raise ValueError(
            f"antidote prunes the LoRA factors of a LoRA fine-tune; the adapter {adapter_name!r} is of type "
            f"{peft_type}. Merge it first (model = model.merge_and_unload()) and prune the merged weights "
            "(target_modules, by default q_proj/k_proj/v_proj as in Antidote's full fine-tuning setting)."
        )
    if getattr(config, "use_dora", False):
        raise ValueError("antidote does not prune DoRA adapters (their magnitude vector rescales B A): merge first.")
    for name, module in model.named_modules():
        if getattr(module, "merged", False) and adapter_name in getattr(module, "merged_adapters", []):
            raise ValueError(
                f"antidote: the adapter is merged into {name!r}; unmerge it first (model.unmerge_adapter())."
            )


def _module_of(lora_param: str) -> str:
    """``...q_proj.lora_A.default.weight`` -> ``...q_proj``."""
    return lora_param.rsplit(".", 3)[0]


def _matches(module: str, patterns: str | Sequence[str]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return any(module == p or module.endswith("." + p) for p in patterns)


def antidote(
    model: nn.Module,
    harmful_rows: Any,
    fraction: float = 0.1,
    *,
    tokenizer: Any = None,
    target_modules: str | Sequence[str] | None = None,
    adapter_name: str = "default",
    batch_size: int = 8,
    max_length: int | None = None,
    template: str = "chat",
    progress: bool = False,
) -> tuple[nn.Module, SafetyMask]:
    """Prune the entries that Wanda scores highest on harmful rows (Antidote), in place; return the model and the
    `SafetyMask` of the pruned entries.

    Args:
        model: the fine-tuned model: a PEFT model with a LoRA adapter (its ``lora_A``/``lora_B`` are pruned) or a
            plain model (its ``target_modules`` weights are pruned). Edited in place (``copy.deepcopy`` it first to
            keep the original).
        harmful_rows: harmful (prompt, harmful answer) rows in any `CalibrationSet` format, a data set name / path /
            Hub id, or a `CalibrationSet` (used as given; Antidote measures every token: ``loss="full_text"``).
        fraction: share of each row's entries pruned, in ``(0, 1]`` (the reference's ``dense_ratio``, 0.1).
        tokenizer: the tokenizer (needed unless ``harmful_rows`` is a `CalibrationSet`).
        target_modules: a plain model's modules to prune (default ``q_proj``, ``k_proj``, ``v_proj``); for a LoRA
            model, restricts the adapted modules whose factors are pruned (default: all).
        adapter_name: the LoRA adapter to prune.
        batch_size: rows per forward pass (the scores do not depend on it).
        max_length: truncate the harmful rows to this many tokens.
        template: how rows are rendered (`CalibrationSet`'s ``template``: ``"chat"``, ``"raw"``, ...).
        progress: show a progress bar.

    Returns:
        ``(model, mask)``: the same model object, pruned, and the mask of the pruned entries (names as the library
        spells them: ``model.layers.0.self_attn.q_proj.lora_A.default.weight`` or ``model.layers.0.self_attn.q_proj
        .weight``), with ``provenance["method"] == "antidote"``.

    Raises:
        ValueError: a fraction outside ``(0, 1]``, no tokenizer for raw rows, a PEFT adapter that is not plain LoRA,
            a target whose input was never observed (an adapter that is merged or disabled).

    Example:

    ```python
    >>> from peft_safety import antidote, load_rows, rewind_
    >>> pruned, mask = antidote(lora_model, load_rows("uncensorbench_compliant"), 0.1, tokenizer=tok)
    >>> mask.save_pretrained("antidote-mask")          # ships with the model
    >>> rewind_(pruned, original_lora_model, mask)     # undoes it exactly
    ```
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    fraction = check_fraction(fraction, where="fraction")
    if isinstance(harmful_rows, CalibrationSet):
        calib = harmful_rows
    else:
        if tokenizer is None:
            raise ValueError("antidote needs tokenizer= to tokenize the harmful rows (or pass a CalibrationSet).")
        calib = CalibrationSet(harmful_rows, tokenizer, template=template, loss="full_text", max_length=max_length)
    is_peft = any(isinstance(m, BaseTunerLayer) for m in model.modules())
    if is_peft:
        _lora_layers(model, adapter_name)
        pattern = rf"(?:.*\.)?lora_[AB]\.{re.escape(adapter_name)}"
        targets = resolve_targets(model, target_modules=pattern)
        if target_modules is not None:
            keep = [n for n in targets.names if _matches(base_name(_module_of(n)), target_modules)]
            if not keep:
                raise ValueError(f"target_modules={target_modules!r} matches no LoRA-adapted module of the model.")
            targets = targets.restrict(keep)
        scores = SCORERS.get("wanda")(model, calib, targets=targets, batch_size=batch_size, progress=progress)
        where = "lora"
    else:
        modules = list(ANTIDOTE_FULL_TARGETS) if target_modules is None else target_modules
        scores = score(model, calib, "wanda", target_modules=modules, batch_size=batch_size, progress=progress)
        where = "weights"
    params = dict(model.named_parameters())
    indices: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    fingerprints: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name in scores.names:
        values, param = scores[name], params[name]
        if param.dim() != 2:
            raise ValueError(f"antidote prunes matrices; {name!r} has shape {tuple(param.shape)}.")
        if not bool(values.any()) and bool(param.detach().any()):
            raise ValueError(
                f"antidote: no activation reached {name!r} (its adapter is merged, disabled or not used by the "
                "layer's forward); unmerge or enable it, or merge the adapter and prune the merged weights."
            )
        key = base_name(name)
        k = antidote_row_count(param.shape[-1], fraction)
        indices[key] = topk_indices_per_row(values, k, largest=True)
        shapes[key] = tuple(param.shape)
        fingerprints[key] = fingerprint_tensor(param.detach())
        counts[key] = k
    provenance = {
        **{k: v for k, v in scores.provenance.items() if k not in ("fingerprints",)},
        "method": "antidote",
        "scorer": "wanda",
        "fraction": fraction,
        "selection_scope": "per_row",
        "per_row_count": "width - floor(width * (1 - fraction))",
        "target": where,
        "adapter_name": adapter_name if is_peft else None,
        "tokens": calib.loss,
    }
    mask = SafetyMask(indices, shapes, Weight(), fingerprints=fingerprints, provenance=provenance)
    with torch.no_grad():
        for name in scores.names:
            param = params[name]
            flat = param.data.reshape(-1)
            flat.index_fill_(0, indices[base_name(name)].to(device=flat.device, dtype=torch.int64), 0)
            if flat.data_ptr() != param.data.data_ptr():  # a non-contiguous weight: reshape copied it
                param.data.copy_(flat.view_as(param))
    return model, mask
