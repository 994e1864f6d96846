"""Plots of masks and of the safety-layer angle gap (the ``[plot]`` extra: ``pip install peft-safety[plot]``).

matplotlib is imported inside the plotting functions only, and figures are drawn on an Agg canvas without touching
pyplot's global state. Every plot is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import SafetyImportError
from ..mask import SafetyMask
from .overlap import iou_matrix, layer_distribution

__all__ = ["plot_angle_gap", "plot_iou_matrix", "plot_layer_heatmap"]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise SafetyImportError(
            "Plotting needs matplotlib, which is not installed: pip install peft-safety[plot]"
        ) from err
    # a bare Figure renders with the Agg canvas on savefig and never touches pyplot's global figure manager
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig: Any, path: str | os.PathLike) -> str:
    from .._io import atomic_path

    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_layer_heatmap(mask: SafetyMask, path: str | os.PathLike, *, title: str | None = None) -> str:
    """Heat map of a mask's density, decoder layers x module types, saved as a PNG (atomically).

    Args:
        mask: the mask.
        path: the PNG file to write.
        title: figure title; default: the mask's method and density.

    Returns:
        The path written.

    Raises:
        ImportError: without matplotlib (``pip install peft-safety[plot]``).
    """
    dist = layer_distribution(mask)
    dens = dist.density.numpy()
    fig = _figure(2.4 + 0.9 * len(dist.modules), max(3.0, 1.6 + 0.28 * len(dist.layers)))
    ax = fig.add_subplot()
    image = ax.imshow(dens, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(dist.modules)), labels=dist.modules, rotation=45, ha="right")
    ax.set_yticks(range(len(dist.layers)), labels=[str(x) for x in dist.layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="density")
    method = mask.provenance.get("method")
    default = f"{method + ': ' if method else ''}mask density {mask.density:.3%}"
    ax.set_title(title or default)
    return _save_png(fig, path)


def plot_iou_matrix(masks: Mapping[str, SafetyMask], path: str | os.PathLike, *, title: str | None = None) -> str:
    """Annotated heat map of the pairwise IoU of several masks, saved as a PNG (atomically).

    Args:
        masks: ``{label: mask}``.
        path: the PNG file to write.
        title: figure title.

    Returns:
        The path written.

    Raises:
        ImportError: without matplotlib (``pip install peft-safety[plot]``).
    """
    labels, matrix = iou_matrix(masks)
    k = len(labels)
    fig = _figure(2.0 + 0.8 * k, 1.6 + 0.7 * k)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    ax.set_xticks(range(k), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels=labels)
    for i in range(k):
        for j in range(k):
            v = float(matrix[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="black" if v > 0.6 else "white", fontsize=9)
    fig.colorbar(image, ax=ax, label="IoU (weight entries)")
    ax.set_title(title or "mask overlap (IoU)")
    return _save_png(fig, path)


def plot_angle_gap(
    gaps: Sequence[float] | torch.Tensor,
    path: str | os.PathLike,
    *,
    safety_layers: tuple[int, int] | None = None,
    title: str | None = None,
) -> str:
    """Per-layer angle gap between normal-malicious and normal-normal hidden states (Li et al. 2025), as a PNG.

    Args:
        gaps: a 1-D sequence of per-layer angle gaps in degrees (the safety-layers scorer's output).
        path: the PNG file to write.
        safety_layers: optional ``(start, end)`` layer range (``end`` exclusive) to shade.
        title: figure title.

    Returns:
        The path written.

    Raises:
        ValueError: empty, non-1-D or non-finite gaps; a bad ``safety_layers`` range.
        ImportError: without matplotlib (``pip install peft-safety[plot]``).
    """
    values = torch.as_tensor(gaps, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(
            f"gaps must be a non-empty 1-D sequence (one value per layer), got shape {tuple(values.shape)}."
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"gaps has {int((~torch.isfinite(values)).sum())} non-finite value(s); expected degrees.")
    if safety_layers is not None:
        start, end = safety_layers
        if not 0 <= start < end <= values.numel():
            raise ValueError(
                f"safety_layers={safety_layers!r} must satisfy 0 <= start < end <= {values.numel()} (end exclusive)."
            )
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    layers = list(range(values.numel()))
    ax.plot(layers, values.tolist(), marker="o", markersize=3, linewidth=1.5)
    if safety_layers is not None:
        ax.axvspan(safety_layers[0] - 0.5, safety_layers[1] - 0.5, alpha=0.2, color="tab:red", label="safety layers")
        ax.legend(loc="best")
    ax.set_xlabel("layer")
    ax.set_ylabel("angle gap (degrees)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "hidden-state angle gap: normal-malicious minus normal-normal")
    return _save_png(fig, path)
