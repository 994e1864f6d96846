"""RESTA (Bhardwaj et al., ACL 2024, "Language Models are Homer Simpson!"): add the safety vector back.

After fine-tuning, add a scaled copy of the alignment direction to the fine-tuned weights:

    W <- W + scale * (W_aligned - W_base)

for every weight the `AlignmentDelta` covers. The paper's "safety vector" is the difference between an aligned model
and its unaligned base; a fine-tune that eroded alignment gets it back. (The paper also tries dropping and rescaling
the fine-tuning delta with DARE before the add-back; that step is not part of this function.)

The model must be a plain model: on a PEFT model the vector would land in the frozen base weights and be lost when only
the adapter is saved, so merge the adapter first (``model = model.merge_and_unload()``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..analysis.probes import named_parameters_by_base_name
from .alignment import AlignmentDelta, _is_peft

__all__ = ["add_safety_vector"]


def add_safety_vector(model: nn.Module, alignment: AlignmentDelta, scale: float = 1.0) -> nn.Module:
    """Add ``scale * (W_aligned - W_base)`` to every weight of ``model`` that ``alignment`` covers, in place.

    Args:
        model: a plain (merged) model with the alignment's weight names.
        alignment: the safety vector (`AlignmentDelta`).
        scale: the multiplier of the vector (1.0 adds it once; the paper tunes it on held-out data).

    Returns:
        The same model. Each weight ``W`` becomes ``W + (scale * V).to(W.dtype)``, computed on ``W``'s device.

    Raises:
        ValueError: a PEFT model (merge it first), a weight the model lacks or has with another shape (checked for
            every weight before anything is written), a non-finite scale.
        TypeError: an ``alignment`` that is not an `AlignmentDelta`.

    Example:

    ```python
    >>> vector = AlignmentDelta.from_models(base_model, aligned_model)
    >>> model = add_safety_vector(finetuned.merge_and_unload(), vector, scale=0.5)
    ```
    """
    if not isinstance(alignment, AlignmentDelta):
        raise TypeError(
            f"alignment must be an AlignmentDelta (from_models, from_deltas or from_adapter), got "
            f"{type(alignment).__name__}."
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}.")
    if _is_peft(model):
        raise ValueError(
            "add_safety_vector needs a plain model: this one has PEFT adapter layers, and a vector added to their "
            "frozen base weights would not be saved with the adapter. Merge first: model = model.merge_and_unload()."
        )
    params = named_parameters_by_base_name(model)
    targets = []
    for name, delta in alignment.items():
        param = params.get(name)
        if param is None:
            raise ValueError(
                f"The safety vector covers {name!r}, which the model does not have: it comes from another "
                "architecture (or the model is wrapped; pass the merged model)."
            )
        if tuple(param.shape) != tuple(delta.shape):
            raise ValueError(
                f"The safety vector of {name!r} has shape {tuple(delta.shape)}, the model's weight "
                f"{tuple(param.shape)}."
            )
        if not param.is_floating_point():
            raise ValueError(f"{name!r} is not a floating-point weight ({param.dtype}); dequantize the model first.")
        targets.append((param, delta))
    with torch.no_grad():
        for param, delta in targets:
            param.add_((scale * delta.to(param.device)).to(param.dtype))
    return model
