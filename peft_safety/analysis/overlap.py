"""Compare and describe masks: IoU matrices, stability across data sets or seeds, per-layer distributions, plots.

IoU is computed in **weight entries**, globally: ``sum_t |A_t & B_t| / sum_t |A_t | B_t|`` over tensors ``t`` (not a
mean of per-tensor IoUs), as the mask-comparison literature specifies (Li et al. 2026; see ``docs/analysis.md``). Masks
of different granularities are compared on the weight entries they cover.

Plots of these reports live in `peft_safety.analysis.plots`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mask import SafetyMask, module_type_of
from ..vocab import layer_index

__all__ = [
    "LayerDistribution",
    "StabilityReport",
    "iou_matrix",
    "layer_distribution",
    "overlap_report",
    "stability",
]

_NO_LAYER = "(none)"


def _check_masks(masks: Any, minimum: int = 1) -> tuple[list[str], list[SafetyMask]]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict label -> SafetyMask, got {type(masks).__name__}.")
    if len(masks) < minimum:
        raise ValueError(f"need at least {minimum} mask(s) to compare, got {len(masks)}.")
    labels, values = [], []
    for label, m in masks.items():
        if not isinstance(m, SafetyMask):
            raise TypeError(f"masks[{label!r}] must be a SafetyMask, got {type(m).__name__}.")
        labels.append(str(label))
        values.append(m)
    return labels, values


def _pair_counts(a: SafetyMask, b: SafetyMask) -> dict[str, tuple[int, int]]:
    """``{name: (intersection, union)}`` in weight entries."""
    return a.overlap_counts(b)


def _ratio(inter: int, union: int) -> float:
    return inter / union if union else 1.0  # two empty sets are identical


def _group_counts(counts: Mapping[str, tuple[int, int]], key: Callable[[str], Any]) -> dict[Any, tuple[int, int]]:
    out: dict[Any, list[int]] = {}
    for name, (i, u) in counts.items():
        acc = out.setdefault(key(name), [0, 0])
        acc[0] += i
        acc[1] += u
    return {k: (v[0], v[1]) for k, v in out.items()}


def _layer_key(name: str) -> int | str:
    layer = layer_index(name)
    return _NO_LAYER if layer is None else layer


def _sort_keys(keys: Iterable[Any]) -> list[Any]:
    # integer layers first in numeric order, then the "(none)" group
    return sorted(keys, key=lambda k: (0, k, "") if isinstance(k, int) else (1, 0, str(k)))


def iou_matrix(
    masks: Mapping[str, SafetyMask], *, per_module: bool = False
) -> tuple[list[str], torch.Tensor | dict[str, torch.Tensor]]:
    """Pairwise IoU of several masks, in weight entries.

    Args:
        masks: ``{label: mask}`` (e.g. one mask per identification data set or seed), at least one.
        per_module: if ``True``, one matrix per module type (``self_attn.q_proj``, ``mlp.down_proj``, ...,
            see :func:`peft_safety.mask.module_type_of`) instead of the global matrix.

    Returns:
        ``(labels, matrix)``: the labels in order and a symmetric ``(K, K)`` float64 tensor with ones on the diagonal,
        or ``(labels, {module type: matrix})``. Two masks that are both empty (in a module) have IoU 1.

    Raises:
        TypeError: if ``masks`` is not a dict of :class:`SafetyMask`.
        ValueError: with no mask, or when two masks disagree on a parameter's shape (different models).

    Example:
        >>> labels, m = iou_matrix({"advbench": mask_a, "harmbench": mask_b})  # doctest: +SKIP
        >>> float(m[0, 1])  # doctest: +SKIP
        0.31
    """
    labels, values = _check_masks(masks)
    k = len(values)
    if not per_module:
        out = torch.eye(k, dtype=torch.float64)
        for i, j in itertools.combinations(range(k), 2):
            counts = _pair_counts(values[i], values[j])
            inter = sum(c[0] for c in counts.values())
            union = sum(c[1] for c in counts.values())
            out[i, j] = out[j, i] = _ratio(inter, union)
        return labels, out
    modules = sorted({module_type_of(n) for m in values for n in m.shapes})
    mats = {mod: torch.eye(k, dtype=torch.float64) for mod in modules}
    for i, j in itertools.combinations(range(k), 2):
        grouped = _group_counts(_pair_counts(values[i], values[j]), module_type_of)
        for mod in modules:
            mats[mod][i, j] = mats[mod][j, i] = _ratio(*grouped.get(mod, (0, 0)))
    return labels, mats


@dataclass
class StabilityReport:
    """How much several masks agree (e.g. masks identified on different data sets, or with different seeds).

    All sizes are in weight entries. ``core`` is the intersection of every mask, ``union`` their union.

    Attributes:
        labels: the mask labels, in order.
        sizes: ``{label: entries}`` of each mask.
        pairwise: ``{"a|b": IoU}`` for every pair of labels.
        mean_iou: mean pairwise IoU (1.0 for a single mask).
        min_iou: smallest pairwise IoU.
        core: entries in every mask.
        union: entries in at least one mask.
        core_fraction: ``core / union`` (the IoU of all masks at once; 1.0 when the union is empty).
        per_layer: ``{layer: {"mean_iou", "min_iou", "core", "union", "core_fraction"}}``, layer ``"(none)"`` for
            parameters outside the decoder layers.
        per_module: the same per module type.
    """

    labels: list[str]
    sizes: dict[str, int]
    pairwise: dict[str, float]
    mean_iou: float
    min_iou: float
    core: int
    union: int
    core_fraction: float
    per_layer: dict[Any, dict[str, float]] = field(default_factory=dict)
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (layer keys become strings)."""
        return {
            "labels": list(self.labels),
            "sizes": dict(self.sizes),
            "pairwise": dict(self.pairwise),
            "mean_iou": self.mean_iou,
            "min_iou": self.min_iou,
            "core": self.core,
            "union": self.union,
            "core_fraction": self.core_fraction,
            "per_layer": {str(k): dict(v) for k, v in self.per_layer.items()},
            "per_module": {k: dict(v) for k, v in self.per_module.items()},
        }

    def __str__(self) -> str:
        lines = [
            f"masks: {len(self.labels)}  mean IoU: {self.mean_iou:.4f}  min IoU: {self.min_iou:.4f}  "
            f"core: {self.core:,}  union: {self.union:,}  core/union: {self.core_fraction:.4f}",
            "",
        ]
        for title, rows in (("layer", self.per_layer), ("module", self.per_module)):
            body = [
                (str(key), f"{r['mean_iou']:.4f}", f"{r['min_iou']:.4f}", f"{int(r['core']):,}", f"{int(r['union']):,}",
                 f"{r['core_fraction']:.4f}")
                for key, r in rows.items()
            ]  # fmt: skip
            lines += _table((title, "mean IoU", "min IoU", "core", "union", "core/union"), body)
            lines.append("")
        return "\n".join(lines).rstrip()


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r)))

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def _same_granularity(values: Sequence[SafetyMask]) -> bool:
    for a, b in itertools.combinations(values, 2):
        for name in set(a.names) & set(b.names):
            if a.granularity_of(name) != b.granularity_of(name):
                return False
    return True


def _entries_by(mask: SafetyMask, key: Callable[[str], Any]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for name, idx in mask:
        g = mask.granularity_of(name)
        out[key(name)] = out.get(key(name), 0) + int(idx.numel()) * g.unit_numel(mask.shapes[name])
    return out


def stability(masks: Mapping[str, SafetyMask]) -> StabilityReport:
    """Agreement of several masks: mean/min pairwise IoU, core (intersection of all) and union, per layer and module.

    The numbers behind "masks identified on different data sets show only low to moderate overlap" (Li et al. 2026):
    report ``mean_iou`` together with the ``core`` and ``union`` sizes.

    Args:
        masks: ``{label: mask}``, at least one. Masks whose granularities differ are compared on weight entries
            (through :meth:`SafetyMask.to_weight`).

    Returns:
        A :class:`StabilityReport`.

    Raises:
        TypeError: if ``masks`` is not a dict of :class:`SafetyMask`.
        ValueError: with no mask, or when masks disagree on a parameter's shape.
    """
    labels, values = _check_masks(masks)
    if not _same_granularity(values):
        values = [m.to_weight() for m in values]
    sizes = {lab: m.numel() for lab, m in zip(labels, values)}
    core_mask, union_mask = values[0], values[0]
    for m in values[1:]:
        core_mask = core_mask & m
        union_mask = union_mask | m

    pairwise: dict[str, float] = {}
    layer_pairs: dict[Any, list[float]] = {}
    module_pairs: dict[str, list[float]] = {}
    for i, j in itertools.combinations(range(len(values)), 2):
        counts = _pair_counts(values[i], values[j])
        pairwise[f"{labels[i]}|{labels[j]}"] = _ratio(
            sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        )
        for store, key in ((layer_pairs, _layer_key), (module_pairs, module_type_of)):
            grouped = _group_counts(counts, key)
            for g in {key(n) for m in (values[i], values[j]) for n in m.shapes}:
                store.setdefault(g, []).append(_ratio(*grouped.get(g, (0, 0))))

    def breakdown(pairs: dict[Any, list[float]], key: Callable[[str], Any]) -> dict[Any, dict[str, float]]:
        core_by, union_by = _entries_by(core_mask, key), _entries_by(union_mask, key)
        groups = set(pairs) | {key(n) for m in values for n in m.shapes}
        out = {}
        for g in _sort_keys(groups):
            ious = pairs.get(g, [1.0])
            c, u = core_by.get(g, 0), union_by.get(g, 0)
            out[g] = {
                "mean_iou": sum(ious) / len(ious),
                "min_iou": min(ious),
                "core": c,
                "union": u,
                "core_fraction": _ratio(c, u),
            }
        return out

    ious = list(pairwise.values()) or [1.0]
    core, union = core_mask.numel(), union_mask.numel()
    return StabilityReport(
        labels=labels,
        sizes=sizes,
        pairwise=pairwise,
        mean_iou=sum(ious) / len(ious),
        min_iou=min(ious),
        core=core,
        union=union,
        core_fraction=_ratio(core, union),
        per_layer=breakdown(layer_pairs, _layer_key),
        per_module=breakdown(module_pairs, module_type_of),
    )


def overlap_report(masks: Mapping[str, SafetyMask], *, as_dict: bool = False) -> str | dict[str, Any]:
    """IoU matrix and stability report of several masks, as a text table (default) or a JSON-serialisable dict.

    Args:
        masks: ``{label: mask}``, at least one.
        as_dict: return ``{"labels", "iou", "stability"}`` instead of text.

    Returns:
        The report.
    """
    labels, matrix = iou_matrix(masks)
    report = stability(masks)
    if as_dict:
        return {"labels": labels, "iou": matrix.tolist(), "stability": report.to_dict()}
    body = [[lab, *(f"{float(v):.4f}" for v in matrix[i])] for i, lab in enumerate(labels)]
    lines = ["IoU (weight entries, global)", *_table(["mask", *labels], body), ""]
    sizes = [[lab, f"{report.sizes[lab]:,}", f"{m.density:.4%}"] for lab, m in zip(labels, masks.values())]
    lines += _table(["mask", "entries", "density"], sizes)
    lines += ["", str(report)]
    return "\n".join(lines)


@dataclass
class LayerDistribution:
    """Selected entries per decoder layer and module type of one mask.

    Attributes:
        layers: row labels: layer indices in order, then ``"(none)"`` for parameters outside the decoder layers.
        modules: column labels (module types).
        numel: ``(len(layers), len(modules))`` int64 tensor of selected weight entries.
        total: the same shape, eligible weight entries (0 where no parameter of that type exists).
    """

    layers: list[Any]
    modules: list[str]
    numel: torch.Tensor
    total: torch.Tensor

    @property
    def density(self) -> torch.Tensor:
        """``numel / total`` as float64; NaN where the layer has no parameter of that module type."""
        total = self.total.double()
        return torch.where(self.total > 0, self.numel.double() / total.clamp(min=1), torch.full_like(total, math.nan))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN densities become ``None``)."""
        dens = [[None if math.isnan(v) else v for v in row] for row in self.density.tolist()]
        return {
            "layers": [str(x) for x in self.layers],
            "modules": list(self.modules),
            "numel": self.numel.tolist(),
            "total": self.total.tolist(),
            "density": dens,
        }

    def __str__(self) -> str:
        dens = self.density
        body = [
            [str(layer), *("-" if math.isnan(float(v)) else f"{float(v):.4%}" for v in dens[i])]
            for i, layer in enumerate(self.layers)
        ]
        return "\n".join(_table(["layer", *self.modules], body))


def layer_distribution(mask: SafetyMask) -> LayerDistribution:
    """Density of a mask per decoder layer and module type: the table behind "V and middle-layer MLPs" claims.

    Args:
        mask: the mask.

    Returns:
        A :class:`LayerDistribution` (``str()`` of it is a table of densities).
    """
    if not isinstance(mask, SafetyMask):
        raise TypeError(f"layer_distribution expects a SafetyMask, got {type(mask).__name__}.")
    shapes = mask.shapes
    layers = _sort_keys({_layer_key(n) for n in shapes})
    modules = sorted({module_type_of(n) for n in shapes})
    row = {k: i for i, k in enumerate(layers)}
    col = {k: i for i, k in enumerate(modules)}
    numel = torch.zeros(len(layers), len(modules), dtype=torch.int64)
    total = torch.zeros_like(numel)
    selected = mask.indices
    for name, shape in shapes.items():
        r, c = row[_layer_key(name)], col[module_type_of(name)]
        total[r, c] += math.prod(shape)
        if name in selected:
            numel[r, c] += int(selected[name].numel()) * mask.granularity_of(name).unit_numel(shape)
    return LayerDistribution(layers=layers, modules=modules, numel=numel, total=total)


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
