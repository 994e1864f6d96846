"""Safe LoRA (Hsu et al., NeurIPS 2024): project a LoRA update onto the alignment direction where it strays.

For each LoRA-adapted layer with weight ``W``, let ``V = W_aligned - W_base`` (an `AlignmentDelta`) and

    C = V V^T / ||V||_F

(the normalisation of the public code, ``IBM/SafeLoRA`` ``model.py`` ``get_aligned_matrix``: ``torch.mm(vec,
vec.t()) / torch.norm(vec)``, the Frobenius norm; the version proposed to PEFT, ``huggingface/peft#2201``, takes
``V = W_base - W_aligned``, which gives the same ``C``). With the LoRA update ``dW = B A``, the similarity of the
layer is the cosine between the flattened ``C dW`` and ``dW``; the update of a layer is replaced by ``C dW``

* where that similarity is at most ``threshold`` (``select_layers_type="threshold"``, ``cos <= threshold``), or
* for the ``top_k`` layers of lowest similarity (``select_layers_type="number"``, ``num_proj_layers``).

The replacement is written into the LoRA factors: ``B <- C B``, exact since ``C (B A) = (C B) A`` (the reference
does the same: it replaces ``lora_B`` by ``P @ lora_B``), so the result is still a LoRA adapter that saves and loads
through PEFT. ``C B`` is computed as ``V (V^T B) / ||V||_F`` and the similarity through ``r x r`` Gram matrices, so
``C`` (``d_out x d_out``) is never formed; both in fp64.

Differences from the reference: it rounds the cosine to 5 decimals before comparing (here: not rounded), and its
``number`` mode projects every layer whose cosine is at most the ``k``-th smallest (ties included; here exactly
``k`` layers, ties broken by layer order). Layers without an alignment delta (or with a zero one) and layers whose
update is zero are left as they are and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..vocab import base_name, is_int
from .alignment import AlignmentDelta

__all__ = ["SafeLoraLayer", "SafeLoraReport", "safe_lora_project"]


@dataclass
class SafeLoraLayer:
    """One LoRA layer as Safe LoRA saw it.

    Attributes:
        name: the adapted weight (``model.layers.0.self_attn.q_proj.weight``).
        cosine: cosine similarity between ``C dW`` and ``dW`` (`None` when skipped).
        projected: whether ``B`` was replaced by ``C B``.
        skipped: why the layer was left alone (``"no alignment delta"``, ``"zero update"``), else `None`.
    """

    name: str
    cosine: float | None
    projected: bool = False
    skipped: str | None = None


@dataclass
class SafeLoraReport:
    """What `safe_lora_project` did: every LoRA layer, in model order, and the selection rule."""

    layers: list[SafeLoraLayer] = field(default_factory=list)
    threshold: float | None = None
    top_k: int | None = None

    @property
    def projected(self) -> list[str]:
        """The weights whose update was projected."""
        return [layer.name for layer in self.layers if layer.projected]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "top_k": self.top_k,
            "layers": [vars(layer) for layer in self.layers],
        }


def _lora_modules(peft_model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    config = getattr(peft_model, "peft_config", None)
    if not isinstance(config, dict) or adapter_name not in config:
        raise TypeError(
            "safe_lora_project needs a PEFT model with a LoRA adapter (peft.PeftModel); got "
            f"{type(peft_model).__name__}"
            + (f" without an adapter {adapter_name!r}" if isinstance(config, dict) else "")
            + "."
        )
    cfg = config[adapter_name]
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if peft_type != "LORA":
        raise ValueError(
            f"safe_lora_project projects a LoRA adapter; {adapter_name!r} is of type {peft_type}. (A masked "
            "SAFETY_LORA adapter applies its mask after B A, so C (B A) is not what it would compute.)"
        )
    if getattr(cfg, "use_dora", False):
        raise ValueError("safe_lora_project does not support DoRA (its magnitude vector rescales C B A).")
    if getattr(cfg, "fan_in_fan_out", False):
        raise ValueError("safe_lora_project needs fan_in_fan_out=False (the update must be B A, not its transpose).")
    modules = []
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        if adapter_name in getattr(module, "merged_adapters", []):
            raise ValueError(f"The adapter is merged into {name!r}: unmerge it first (peft_model.unmerge_adapter()).")
        modules.append((name, module))
    if not modules:
        raise ValueError(f"No LoRA layer holds the adapter {adapter_name!r}.")
    return modules


def safe_lora_project(
    peft_model: nn.Module,
    alignment: AlignmentDelta,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    adapter_name: str = "default",
) -> tuple[nn.Module, SafeLoraReport]:
    """Project the LoRA update of the least aligned layers onto the alignment direction (Safe LoRA), in place.

    Args:
        peft_model: a PEFT model with a LoRA adapter (unmerged).
        alignment: the alignment direction (`AlignmentDelta`: from a (base, aligned) pair, any delta, or a SET
            adapter).
        threshold: project every layer whose cosine similarity between ``C dW`` and ``dW`` is at most this (the
            reference's default is 0.5).
        top_k: project the ``top_k`` layers of lowest similarity instead (the reference's default is 10).
        adapter_name: the LoRA adapter to project.

    Returns:
        ``(peft_model, report)``: the same model, its ``lora_B`` replaced by ``C B`` on the projected layers, and a
        `SafeLoraReport` with every layer's similarity.

    Raises:
        ValueError: neither or both of ``threshold`` / ``top_k``, an adapter that is not plain, unmerged LoRA, an
            alignment delta whose shape differs from its layer's weight.
        TypeError: a model that is not a PEFT model, an ``alignment`` that is not an `AlignmentDelta`.

    Example:

    ```python
    >>> alignment = AlignmentDelta.from_models(base_model, aligned_model, target_modules=["q_proj", "v_proj"])
    >>> model, report = safe_lora_project(lora_model, alignment, threshold=0.5)
    >>> model.save_pretrained("safe-lora")        # still a LoRA adapter
    ```
    """
    if (threshold is None) == (top_k is None):
        raise ValueError("safe_lora_project takes exactly one of threshold= (e.g. 0.5) or top_k= (e.g. 10).")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise TypeError(f"threshold must be a number (a cosine similarity in [-1, 1]), got {threshold!r}.")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    if not isinstance(alignment, AlignmentDelta):
        raise TypeError(
            f"alignment must be an AlignmentDelta (from_models, from_deltas or from_adapter), got "
            f"{type(alignment).__name__}."
        )
    report = SafeLoraReport(threshold=None if threshold is None else float(threshold), top_k=top_k)
    updates: list[tuple[SafeLoraLayer, nn.Parameter, torch.Tensor]] = []
    for module_name, module in _lora_modules(peft_model, adapter_name):
        name = base_name(module_name) + ".weight"
        delta = alignment.get(name)
        if delta is None:
            report.layers.append(SafeLoraLayer(name, None, skipped="no alignment delta"))
            continue
        lora_b = module.lora_B[adapter_name].weight
        lora_a = module.lora_A[adapter_name].weight
        shape = (lora_b.shape[0], lora_a.shape[1])
        if tuple(delta.shape) != shape:
            raise ValueError(
                f"The alignment delta of {name!r} has shape {tuple(delta.shape)}, its LoRA update {shape}: the "
                "alignment direction comes from another architecture."
            )
        with torch.no_grad():
            v = delta.to(device=lora_b.device, dtype=torch.float64)
            b = lora_b.detach().double()
            a = lora_a.detach().double()
            gram = a @ a.T  # <X A, Y A>_F = sum((X G) * Y) with G = A A^T
            dw_norm2 = ((b @ gram) * b).sum()
            if float(dw_norm2) == 0.0:
                report.layers.append(SafeLoraLayer(name, None, skipped="zero update"))
                continue
            cb = v @ (v.T @ b) / torch.linalg.norm(v)  # C B without forming C
            cb_gram = cb @ gram
            cosine = float((cb_gram * b).sum() / torch.sqrt((cb_gram * cb).sum() * dw_norm2))
        layer = SafeLoraLayer(name, cosine)
        report.layers.append(layer)
        updates.append((layer, lora_b, cb))
    if threshold is not None:
        chosen = {id(layer) for layer, _, _ in updates if layer.cosine <= threshold}
    else:
        order = sorted(range(len(updates)), key=lambda i: updates[i][0].cosine)  # stable: ties keep layer order
        chosen = {id(updates[i][0]) for i in order[:top_k]}
    with torch.no_grad():
        for layer, lora_b, cb in updates:
            if id(layer) in chosen:
                lora_b.copy_(cb.to(lora_b.dtype))
                layer.projected = True
    return peft_model, report
