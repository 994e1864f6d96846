"""Data-free baseline scorers: ``random`` (a random mask at the same density) and ``magnitude`` (``|W|``).

Both ignore the calibration data (``calib`` may be `None`) and return ``Weight()`` `Scores`, so `select` with the
same ``fraction`` and ``scope`` gives a control mask of exactly the same size as a real scorer's mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import register_scorer
from .targets import Targets

__all__ = ["magnitude", "random_scores"]


@register_scorer("random")
def random_scores(model: nn.Module, calib: Any = None, *, targets: Targets, seed: int = 0, **_: Any) -> Any:
    """Seeded uniform scores in ``[0, 1)`` for every target entry (fp32, generated on the CPU so the result does not
    depend on the device).

    Args:
        model: the model (only shapes are read).
        calib: ignored.
        targets: eligible parameters.
        seed: the same seed and targets always give bit-identical scores.

    Returns:
        `Scores` (``Weight()``); provenance ``method="random"``, ``seed``.
    """
    from .scores import Scores

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    generator = torch.Generator().manual_seed(seed)
    values = {name: torch.rand(info.shape, generator=generator) for name, info in targets.items()}
    return Scores(values, shapes=targets.shapes, provenance={"method": "random", "seed": seed, "sign": "nonnegative"})


@register_scorer("magnitude")
def magnitude(model: nn.Module, calib: Any = None, *, targets: Targets, **_: Any) -> Any:
    """``|W|`` in fp32 for every target entry.

    Returns:
        `Scores` (``Weight()``); provenance ``method="magnitude"``.
    """
    from .scores import Scores

    params = targets.parameters(model)
    values = {name: params[name].detach().abs().float() for name in targets}
    return Scores(values, shapes=targets.shapes, provenance={"method": "magnitude", "sign": "nonnegative"})
