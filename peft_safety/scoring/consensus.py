"""Consensus masks: keep only the entries that several identifications agree on.

A mask found from one calibration set depends on that set: masks from different harmful-prompt sources, or from
resamples of one source, overlap only partly (the 2026 study of safety-region identification reports low IoU
between single-source masks). A *consensus* mask keeps the entries selected in at least ``k`` of ``n`` masks:
``k = n`` is the intersection, ``k = 1`` the union, a majority in between. Entries that survive are the ones an
identification method finds regardless of which prompts it saw.

* `consensus`: masks -> the entries selected in at least ``min_agreement`` of them (plus `agreement_counts`, the
  per-entry vote counts behind it).
* `consensus_mask`: several `Scores` -> select each at one fraction -> `consensus`.
* `bootstrap_row_indices` and `bootstrap_masks`: build ``n`` masks from bootstrap resamples of one calibration set
  (rows drawn with replacement, seeded), to feed `consensus`.

The consensus of masks at fraction ``s`` holds at most ``s`` of the entries (fewer the less the masks agree); its
provenance records ``min_agreement``, the number of masks and their provenance.

Example:

```python
>>> import torch
>>> from peft_safety.mask import SafetyMask
>>> shapes = {"w": (2, 4)}
>>> masks = [SafetyMask({"w": torch.tensor(i)}, shapes) for i in ([0, 1, 2], [1, 2, 3], [2, 5])]
>>> consensus(masks, min_agreement=2)["w"].tolist()
[1, 2]
```
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..mask import SafetyMask
from ..vocab import check_fraction

__all__ = ["agreement_counts", "bootstrap_masks", "bootstrap_row_indices", "consensus", "consensus_mask"]


def _resolve_agreement(min_agreement: int | float, n: int) -> int:
    """``min_agreement`` as a count: an int ``k`` in ``[1, n]``, or a float share in ``(0, 1]`` -> ``ceil(share * n)``."""
    if isinstance(min_agreement, bool):
        raise TypeError("min_agreement must be an int (a count) or a float (a share of the masks), not a bool.")
    if isinstance(min_agreement, int):
        if not 1 <= min_agreement <= n:
            raise ValueError(f"min_agreement={min_agreement} must be between 1 and the number of masks ({n}).")
        return min_agreement
    if isinstance(min_agreement, float):
        if not 0.0 < min_agreement <= 1.0:
            raise ValueError(f"min_agreement={min_agreement} as a share must be in (0, 1].")
        # a small tolerance so that 2/3 of 3 masks is 2, not 3, despite floating point
        return max(1, math.ceil(min_agreement * n - 1e-9))
    raise TypeError(f"min_agreement must be an int or a float, got {type(min_agreement).__name__}.")


def _check_masks(masks: Sequence[SafetyMask]) -> list[SafetyMask]:
    if isinstance(masks, SafetyMask) or not isinstance(masks, Sequence):
        raise TypeError("masks must be a list of SafetyMask (at least two).")
    masks = list(masks)
    for i, m in enumerate(masks):
        if not isinstance(m, SafetyMask):
            raise TypeError(f"masks[{i}] must be a SafetyMask, got {type(m).__name__}.")
    if len(masks) < 2:
        raise ValueError(f"A consensus needs at least two masks, got {len(masks)}.")
    first = masks[0]
    for i, m in enumerate(masks[1:], start=1):
        for name, shape in m.shapes.items():
            if name in first.shapes and first.shapes[name] != shape:
                raise ValueError(
                    f"{name!r} has shape {first.shapes[name]} in masks[0] and {shape} in masks[{i}]; a consensus "
                    "needs masks of the same model."
                )
            if name in first.shapes and first.granularity_of(name) != m.granularity_of(name):
                raise ValueError(
                    f"{name!r} has granularity {first.granularity_of(name)!r} in masks[0] and "
                    f"{m.granularity_of(name)!r} in masks[{i}]; convert them all with .to_weight() first."
                )
    return masks


def agreement_counts(masks: Sequence[SafetyMask]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per parameter, every unit selected by at least one mask and how many masks select it.

    Returns:
        ``{name: (units, votes)}``: sorted unique unit indices (int64) and the number of masks (int64) that hold each.
    """
    masks = _check_masks(masks)
    names: list[str] = []
    for m in masks:
        names.extend(n for n in m.names if n not in names)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        # each mask's indices are unique, so counting occurrences in the concatenation counts masks
        parts = [m[name].to(torch.int64) for m in masks if name in m.names]
        units, votes = torch.unique(torch.cat(parts), sorted=True, return_counts=True)
        out[name] = (units, votes.to(torch.int64))
    return out


def consensus(
    masks: Sequence[SafetyMask], min_agreement: int | float = 1.0, *, provenance: Mapping[str, Any] | None = None
) -> SafetyMask:
    """The entries selected in at least ``min_agreement`` of ``masks``.

    Args:
        masks: two or more masks of the same model (same shapes and granularity per parameter).
        min_agreement: an int ``k`` (entries in at least ``k`` masks) or a float share of the masks
            (``ceil(share * n)``); ``1.0`` (default) is the intersection, ``1`` the union, ``0.5`` a majority.
        provenance: extra provenance entries for the result.

    Returns:
        A `SafetyMask` over the union of the masks' parameters, with the provenance keys the masks share plus
        ``operation="consensus"``, ``min_agreement`` (the count), ``n_masks`` and ``operands``.

    Raises:
        TypeError: not a list of masks, or a bad ``min_agreement`` type.
        ValueError: fewer than two masks, ``min_agreement`` out of range, shapes or granularities that differ.
    """
    masks = _check_masks(masks)
    k = _resolve_agreement(min_agreement, len(masks))
    shapes: dict[str, tuple[int, ...]] = {}
    gran: dict[str, Any] = {}
    fps: dict[str, str] = {}
    for i, m in enumerate(masks):
        for name, shape in m.shapes.items():
            if name not in shapes:
                shapes[name], gran[name] = shape, m.granularity_of(name)
        for name, fp in m.fingerprints.items():
            if fps.setdefault(name, fp) != fp:
                raise ValueError(
                    f"{name!r} has different fingerprints in masks[0..{i}]: the masks were computed on different "
                    "weights. Build them on the same model."
                )
    indices = {name: units[votes >= k] for name, (units, votes) in agreement_counts(masks).items()}
    provs = [m.provenance for m in masks]
    common = {
        key: v for key, v in provs[0].items() if key != "library_version" and all(p.get(key) == v for p in provs)
    }
    common.update({"operation": "consensus", "min_agreement": k, "n_masks": len(masks), "operands": provs})
    common.pop("sparsity", None)  # the consensus holds fewer entries than each operand
    common.update(dict(provenance or {}))
    return SafetyMask(indices, shapes, gran, fingerprints=fps or None, provenance=common)


def consensus_mask(
    scores_list: Sequence[Any],
    *,
    fraction: float,
    min_agreement: int | float = 1.0,
    scope: str = "global",
    exclude: SafetyMask | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> SafetyMask:
    """Select each of several `Scores` at one fraction, then keep the entries they agree on.

    Args:
        scores_list: two or more `Scores` of the same model (e.g. one per identification data set or resample).
        fraction: the share of units each single mask selects (``select(..., fraction=fraction)``).
        min_agreement: as in `consensus`.
        scope: selection scope of each single mask (``"global"``, ``"per_tensor"``, ``"per_row"``).
        exclude: a mask removed from each single mask (e.g. a utility mask: ``safety - utility``).
        provenance: extra provenance for the result.

    Returns:
        The consensus `SafetyMask` (at most ``fraction`` of the units); its provenance has ``selection_fraction``.
    """
    from .selection import select

    if isinstance(scores_list, Mapping) or not isinstance(scores_list, Sequence):
        raise TypeError("scores_list must be a list of Scores (one per data set or resample).")
    fraction = check_fraction(fraction)
    masks = [select(s, fraction=fraction, scope=scope, exclude=exclude) for s in scores_list]
    extra = {"selection_fraction": fraction, "selection_scope": scope, **dict(provenance or {})}
    return consensus(masks, min_agreement, provenance=extra)


def bootstrap_row_indices(n_rows: int, n_resamples: int, seed: int = 0) -> list[list[int]]:
    """Row indices of ``n_resamples`` bootstrap resamples (``n_rows`` draws with replacement each), seeded.

    Resample ``i`` uses ``random.Random(f"{seed}:{i}")``, so resample ``i`` is the same whatever ``n_resamples``.
    """
    for label, v in (("n_rows", n_rows), ("n_resamples", n_resamples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive int, got {v!r}.")
    out = []
    for i in range(n_resamples):
        rng = random.Random(f"{seed}:{i}")
        out.append(sorted(rng.randrange(n_rows) for _ in range(n_rows)))
    return out


def bootstrap_masks(
    model: Any,
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    method: str = "snip",
    fraction: float = 0.01,
    n_resamples: int = 5,
    seed: int = 0,
    scope: str = "global",
    exclude: SafetyMask | None = None,
    calibration_kwargs: Mapping[str, Any] | None = None,
    score_kwargs: Mapping[str, Any] | None = None,
    make_calibration: Callable[[list[dict[str, Any]]], Any] | None = None,
) -> list[SafetyMask]:
    """Score ``n_resamples`` bootstrap resamples of ``rows`` and select each at ``fraction``.

    Cost: ``n_resamples`` scoring passes over ``len(rows)`` rows each (one pass each for gradient scorers).

    Args:
        model: the model to score (no PEFT layers injected).
        rows: the calibration rows (e.g. refusal rows).
        tokenizer: its tokenizer.
        method: the scorer (see `peft_safety.scoring.score`).
        fraction: share of units each mask selects.
        n_resamples: number of resamples (>= 2).
        seed: seed of the resampling (`bootstrap_row_indices`).
        scope: selection scope.
        exclude: a mask removed from each selection.
        calibration_kwargs: keyword arguments of `CalibrationSet` (template, max_length, ...).
        score_kwargs: keyword arguments of `score` (batch_size, target_modules, ...); ``progress`` defaults to off.
        make_calibration: ``rows -> CalibrationSet`` to use instead of ``CalibrationSet(rows, tokenizer, **kwargs)``.

    Returns:
        ``n_resamples`` masks; their provenance records ``resample`` (index), ``resample_seed`` and ``resample_rows``.
    """
    from . import score
    from .calibration import CalibrationSet
    from .selection import select

    fraction = check_fraction(fraction)
    rows = list(rows)
    if not rows:
        raise ValueError("bootstrap_masks needs at least one row.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an int >= 2 (a consensus needs two masks), got {n_resamples!r}.")
    skw = {"progress": False, **dict(score_kwargs or {})}
    masks = []
    for i, idx in enumerate(bootstrap_row_indices(len(rows), n_resamples, seed)):
        sample = [rows[j] for j in idx]
        calib = (make_calibration(sample) if make_calibration is not None
                 else CalibrationSet(sample, tokenizer, **dict(calibration_kwargs or {})))  # fmt: skip
        scores = score(model, calib, method, **skw)
        masks.append(
            select(scores, fraction=fraction, scope=scope, exclude=exclude,
                   provenance={"resample": i, "resample_seed": seed, "resample_rows": len(sample)})
        )  # fmt: skip
    return masks
