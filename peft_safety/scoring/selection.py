"""Turn :class:`~peft_safety.scoring.scores.Scores` into a :class:`~peft_safety.mask.SafetyMask`.

Three scopes pick the units (entries of the score tensors) with the highest scores:

* ``"global"``: the top ``k`` over every tensor at once. The exact ``k``-th value is found by a radix select on the
  fp32 bit patterns (two passes of 16-bit histograms whose bins are permuted into value order), tensor by tensor and
  chunk by chunk; a third pass keeps what beats it. The scores are never concatenated and the extra memory is a few
  chunk-sized buffers plus the selected indices.
* ``"per_tensor"``: the top ``k_t`` of each tensor on its own (same exact algorithm, one tensor at a time).
* ``"per_row"``: the top ``k_r`` of each row of each 2-D ``Weight()`` score (Wanda's comparison group: one output
  row, over its input entries).

Ties are broken deterministically: among equal scores, the unit of the tensor that comes first in the order of the
scores wins, and inside a tensor (or a row) the lower flat index wins. The selection therefore equals the first ``k``
entries of a *stable* descending sort of the concatenated scores (``largest=False``: ascending), which is what the
property tests check.

Counting rule for fractions: ``k = floor(fraction * n + 1/2)`` (round half up) where ``n`` is the number of units in
the group (all tensors, one tensor, one row), computed exactly on the decimal the caller wrote (``0.58 * 25 = 14.5``
gives 15, although the float product is ``14.499999999999998``). Round half up instead of Python's ``round`` (half
to even) so that the count grows monotonically with ``fraction``; instead of ``floor`` so that ``0.29 * 100`` (the
float product is ``28.999...``) gives 29 and not 28.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from ..errors import SafetyError, SafetyTypeError
from ..vocab import check_fraction, did_you_mean

__all__ = [
    "SCOPES",
    "TIE_BREAK",
    "count_for_fraction",
    "isolate",
    "select",
    "select_and_save",
    "topk_indices",
    "topk_indices_per_row",
]

#: the scopes :func:`select` accepts
SCOPES: tuple[str, ...] = ("global", "per_tensor", "per_row")

#: the tie-break rule, recorded in the mask's provenance
TIE_BREAK = "equal scores: earlier tensor in scores order first, then lower flat index"

# Scores are processed in chunks of this many entries (4 MiB of fp32): every temporary buffer of the selection is
# proportional to the chunk, not to the tensor, so peak extra memory stays far below the largest tensor's scores.
_CHUNK = 1 << 20


def count_for_fraction(fraction: float, n: int) -> int:
    """Number of units a fraction selects out of ``n``: ``floor(fraction * n + 1/2)`` (round half up), computed
    exactly on the decimal value of ``fraction`` (its shortest ``repr``), not on the rounded float product.

    Args:
        fraction: a float in ``(0, 1]``.
        n: the number of units in the group.

    Returns:
        The count, between ``0`` and ``n``.

    Example:
        >>> count_for_fraction(0.01, 250), count_for_fraction(0.29, 100)
        (3, 29)
    """
    # on the decimal the caller wrote (the float's shortest repr), exactly: 0.58 * 25 is 14.5 and rounds up to 15,
    # where the float product 14.499999999999998 would floor to 14
    return min(n, math.floor(Fraction(repr(float(fraction))) * n + Fraction(1, 2)))


def _oriented(chunk: torch.Tensor, largest: bool) -> torch.Tensor:
    """The chunk as fp32 where larger is better (negated for ``largest=False``), with ``-0.0`` folded into ``+0.0``.

    ``x + 0.0`` and ``0.0 - x`` are exact and both turn ``-0.0`` into ``+0.0`` (round to nearest), so the two zeros,
    which compare equal as floats and must tie, get the same bit pattern.
    """
    return chunk + 0.0 if largest else 0.0 - chunk


def _order_key(bits: int) -> int:
    """The order-preserving signed key of an fp32 bit pattern (given as a signed int32): non-negative floats keep
    their bits; negative floats flip every bit but the sign, so more negative values get smaller keys. The map is its
    own inverse."""
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def _raw_high_to_key(device: torch.device) -> torch.Tensor:
    """Raw high 16 bits of an fp32 (sign, exponent, top of the mantissa; offset by 32768) -> position in value order:
    a permutation of the 65536 histogram bins."""
    high = torch.arange(-32768, 32768, dtype=torch.int64, device=device)
    return torch.where(high >= 0, high, high ^ 0x7FFF) + 32768


def _chunks(tensor: torch.Tensor, chunk: int) -> Iterable[tuple[int, torch.Tensor]]:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        yield start, flat[start : start + chunk]


def _count_into(hist: torch.Tensor, buckets: torch.Tensor) -> None:
    """``hist[b] += 1`` for every ``b`` in ``buckets``. ``bincount`` is fastest on large chunks, but it allocates the
    full 65536-bin result each call; for small chunks a scatter-add into the accumulator is ~40x cheaper."""
    if buckets.numel() >= hist.numel() // 4:
        hist += torch.bincount(buckets, minlength=hist.numel()).to(hist.device)
    elif buckets.numel():
        hist.index_add_(0, buckets.to(hist.device), torch.ones(buckets.shape, dtype=hist.dtype, device=hist.device))


def _best_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bucket ``b`` such that at least ``k`` counts lie in buckets ``>= b``, and the count above ``b``.

    Done in numpy on the host: 65536 bins are too few to gain from torch's thread pool, which only adds latency when
    the cores are busy.
    """
    h = hist.cpu().numpy()
    at_or_above = h[::-1].cumsum()[::-1]  # non-increasing in the bucket index
    bucket = int(np.count_nonzero(at_or_above >= k)) - 1
    return bucket, int(at_or_above[bucket] - h[bucket])


def _kth_key(tensors: Sequence[torch.Tensor], k: int, largest: bool, chunk: int) -> tuple[float, int]:
    """Exact ``k``-th best value over all tensors (in the oriented space of :func:`_oriented`), and how many units are
    strictly better.

    The fp32 bit patterns are histogrammed directly and the 65536 bins are then permuted into the order of the values
    (see :func:`_order_key`), which is cheaper than encoding every value. Pass 1 counts the high 16 bits (sign,
    exponent, top of the mantissa) and finds the bucket holding the ``k``-th best; pass 2 counts the low 16 bits of
    the values inside that bucket, which pins the exact value. Counts are int64, summed over tensors and chunks.
    """
    device = tensors[0].device
    raw = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        for _, c in _chunks(t, chunk):
            bits = _oriented(c, largest).view(torch.int32)
            _count_into(raw, (bits >> 16) + 32768)
    high = torch.zeros_like(raw)
    high[_raw_high_to_key(device)] = raw
    bucket, above = _best_bucket(high, k)
    key_high = bucket - 32768
    raw_high = key_high ^ 0x7FFF if key_high < 0 else key_high  # the bucket's high 16 bits as stored in the floats

    low = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        for _, c in _chunks(t, chunk):
            bits = _oriented(c, largest).view(torch.int32)
            inside = bits[(bits >> 16) == raw_high]
            _count_into(low, inside & 0xFFFF)
    if raw_high < 0:  # negative floats: a larger low half of the bit pattern is a smaller value
        low = low.flip(0)
    low_bits, above_low = _best_bucket(low, k - above)
    key = (key_high << 16) | low_bits
    return _bits_to_float(_order_key(key)), above + above_low


def _index_dtype(n: int) -> torch.dtype:
    return torch.int32 if n < 2**31 else torch.int64


def topk_indices(
    tensors: Sequence[torch.Tensor], k: int, *, largest: bool = True, chunk: int = _CHUNK
) -> list[torch.Tensor]:
    """Exact top-``k`` units over several tensors, without concatenating them.

    The result equals the first ``k`` positions of ``torch.sort(torch.cat([t.flatten() for t in tensors]),
    descending=largest, stable=True)``, split back per tensor. Pass 1 and 2 find the exact ``k``-th best value
    (see :func:`_kth_key`); pass 3 keeps, per tensor, every unit strictly better than it plus the first units equal to
    it, in tensor order then flat-index order, until ``k`` units are chosen.

    Memory: a few buffers of ``chunk`` entries (int32 keys, booleans, int64 positions) plus the returned indices; the
    tensors are read, never copied whole. Time: three reads of every score.

    Args:
        tensors: fp32 tensors (any shape, finite values; contiguous, or each is copied once to flatten it).
        k: how many units to select, ``1 <= k <= total number of entries``.
        largest: ``True`` for the highest scores, ``False`` for the lowest.
        chunk: entries processed at once (memory/speed trade-off).

    Returns:
        One sorted 1-D index tensor per input tensor (flat indices; int32, int64 for tensors of ``>= 2**31``
        entries), possibly empty.

    Raises:
        ValueError: if ``k`` is out of range.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is out of range: there are {total} units; use 1 <= k <= {total}.")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1.")
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"topk_indices needs float32 tensors, got {t.dtype}; convert with .float() first.")
    threshold, above = _kth_key(tensors, k, largest, chunk)
    # back from the oriented space to the scores: "better than t" is "> t", or "< -t" for the smallest
    threshold = threshold if largest else -threshold
    ties_left = k - above
    out: list[torch.Tensor] = []
    for t in tensors:
        parts: list[torch.Tensor] = []
        for start, c in _chunks(t, chunk):
            keep = c > threshold if largest else c < threshold  # float comparison: -0.0 == +0.0 as required
            if ties_left > 0:
                eq = (c == threshold).nonzero().flatten()
                if eq.numel():
                    take = eq[:ties_left]
                    keep[take] = True
                    ties_left -= take.numel()
            idx = keep.nonzero().flatten()
            if idx.numel():
                parts.append(idx + start)
        dtype = _index_dtype(t.numel())
        out.append(torch.cat(parts).to(dtype) if parts else torch.empty(0, dtype=dtype, device=t.device))
    return out


def topk_indices_per_row(tensor: torch.Tensor, k: int, *, largest: bool = True, chunk: int = _CHUNK) -> torch.Tensor:
    """Top-``k`` entries of every row of a score tensor (rows = all dimensions but the last), as flat indices.

    Ties inside a row go to the lower column index (a stable sort of each row). Rows are processed a block at a time
    so the sort buffers stay near ``chunk`` entries.

    Args:
        tensor: fp32 scores with at least 2 dimensions; rows are ``tensor.reshape(-1, tensor.shape[-1])``.
        k: entries to keep per row, ``0 <= k <= row length``.
        largest: ``True`` for the highest scores.
        chunk: entries processed at once.

    Returns:
        A sorted 1-D tensor of flat indices into ``tensor.reshape(-1)``.

    Raises:
        ValueError: if the tensor has fewer than 2 dimensions or ``k`` exceeds the row length.
    """
    if tensor.dim() < 2:
        raise ValueError(
            f"per-row selection needs a score tensor with at least 2 dimensions, got shape {tuple(tensor.shape)}."
        )
    width = tensor.shape[-1]
    if not 0 <= k <= width:
        raise ValueError(f"k={k} per row is out of range for rows of {width} entries; use 0 <= k <= {width}.")
    dtype = _index_dtype(tensor.numel())
    if k == 0 or tensor.numel() == 0:
        return torch.empty(0, dtype=dtype, device=tensor.device)
    rows = tensor.reshape(-1, width)
    block = max(1, chunk // width)
    parts: list[torch.Tensor] = []
    for r0 in range(0, rows.shape[0], block):
        sub = rows[r0 : r0 + block]
        # canonicalise -0.0 so that it ties with +0.0 exactly as float comparison does
        order = torch.sort(sub + 0.0, dim=1, descending=largest, stable=True).indices[:, :k]
        order, _ = order.sort(dim=1)
        base = (torch.arange(r0, r0 + sub.shape[0], device=tensor.device) * width).unsqueeze(1)
        parts.append((order + base).reshape(-1))
    return torch.cat(parts).to(dtype)


def _check_count_args(fraction: Any, k: Any) -> tuple[float | None, int | None]:
    """Validate ``fraction`` / ``k`` and return them as plain Python ``float`` / ``int`` (numpy scalars accepted)."""
    if (fraction is None) == (k is None):
        raise SafetyError(
            "Give exactly one of fraction= (share of units, in (0, 1]) or k= (number of units), "
            f"got fraction={fraction!r} and k={k!r}."
        )
    if fraction is not None:
        fraction = check_fraction(fraction, where="fraction")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise SafetyTypeError(f"k must be an int >= 1, got {type(k).__name__} {k!r}.")
        k = int(k)
        if k < 1:
            raise SafetyError(f"k={k} must be >= 1.")
    return fraction, k


def _as_scores(scores: Any):
    from .score_files import ScoreFiles
    from .scores import Scores

    if isinstance(scores, (Scores, ScoreFiles)):
        return scores
    if isinstance(scores, Mapping):
        return Scores(scores)
    raise TypeError(
        f"scores must be a Scores, a ScoreFiles or a mapping of name -> tensor, got {type(scores).__name__}."
    )


def _is_distributed(scores: Any) -> bool:
    """Scores whose tensors are not all in this process's memory: sharded over ranks, or in files on disk."""
    from .score_files import ScoreFiles

    return isinstance(scores, ScoreFiles) or bool(getattr(scores, "is_sharded", False))


def _group_counts(
    scores: Any, *, fraction: float | None, k: int | None, scope: str
) -> tuple[int | None, dict[str, int]]:
    """How many units each group selects: ``(global count, {})`` for ``"global"``, ``(None, {name: count})`` per
    tensor or per row (names selecting nothing are left out). The checks and messages of every kind of scores."""
    if not isinstance(scope, str):
        raise SafetyTypeError(f"scope must be a str, got {type(scope).__name__}.")
    if scope not in SCOPES:
        raise SafetyError(f"Unknown scope {scope!r}.{did_you_mean(scope, SCOPES)}")
    names = list(scores.names)
    if not names:
        raise SafetyError("scores is empty: there is nothing to select from.")
    if scope == "global":
        total = scores.numel()
        if k is not None and k > total:
            raise SafetyError(f"k={k} is larger than the number of units ({total}); use k <= {total} or fraction=.")
        n = k if k is not None else count_for_fraction(fraction, total)
        if n == 0:
            raise SafetyError(
                f"fraction={fraction} of {total} units selects no unit; use a larger fraction or k= instead."
            )
        return n, {}
    from ..mask.granularity import Weight
    from .units import expected_score_shape

    counts: dict[str, int] = {}
    for nm in names:
        gran = scores.granularity_of(nm)
        shape = expected_score_shape(scores.shapes[nm], gran, nm)
        if scope == "per_tensor":
            n_t = math.prod(shape)
            if k is not None and k > n_t:
                raise SafetyError(
                    f"k={k} per tensor is larger than the {n_t} units of {nm!r}; use a smaller k, fraction=, "
                    "or scores.restrict(...) to drop small tensors."
                )
            counts[nm] = k if k is not None else count_for_fraction(fraction, n_t)
        else:  # per_row
            if gran != Weight() or len(shape) < 2:
                raise SafetyError(
                    f"scope='per_row' needs Weight() scores with at least 2 dimensions, but {nm!r} has "
                    f"{gran} scores of shape {tuple(shape)}; use scope='per_tensor' or "
                    "'global', or scores.restrict(...) to the matrices."
                )
            width = shape[-1]
            if k is not None and k > width:
                raise SafetyError(
                    f"k={k} per row is larger than the rows of {nm!r} ({width} entries); use a smaller k or fraction=."
                )
            counts[nm] = k if k is not None else count_for_fraction(fraction, width)
    return None, {nm: c for nm, c in counts.items() if c > 0}


def _select_indices(
    scores: Any,
    *,
    fraction: float | None,
    k: int | None,
    scope: str,
    largest: bool,
) -> dict[str, torch.Tensor]:
    """The selected unit indices per name (names with no selected unit are left out)."""
    fraction, k = _check_count_args(fraction, k)
    n, counts = _group_counts(scores, fraction=fraction, k=k, scope=scope)
    names = list(scores.names)
    if scope == "global":
        picked = topk_indices([scores[nm] for nm in names], n, largest=largest)
        return {nm: idx for nm, idx in zip(names, picked) if idx.numel()}
    if scope == "per_tensor":
        return {nm: topk_indices([scores[nm]], kt, largest=largest)[0] for nm, kt in counts.items()}
    return {nm: topk_indices_per_row(scores[nm], kr, largest=largest) for nm, kr in counts.items()}


def _apply_exclude(indices: dict[str, torch.Tensor], scores: Any, exclude: Any) -> dict[str, torch.Tensor]:
    from ..mask import SafetyMask

    if not isinstance(exclude, SafetyMask):
        raise TypeError(f"exclude must be a SafetyMask, got {type(exclude).__name__}.")
    out: dict[str, torch.Tensor] = {}
    for nm, idx in indices.items():
        if nm not in exclude.names:  # no entry to remove; shapes/granularity of empty parameters do not matter
            out[nm] = idx
            continue
        if tuple(exclude.shapes[nm]) != tuple(scores.shapes[nm]):
            raise ValueError(
                f"exclude mask has shape {tuple(exclude.shapes[nm])} for {nm!r} but the scores are for shape "
                f"{tuple(scores.shapes[nm])}; the two come from different models."
            )
        g_sel, g_exc = scores.granularity_of(nm), exclude.granularity_of(nm)
        if g_sel != g_exc:
            raise ValueError(
                f"exclude mask has granularity {g_exc} for {nm!r} but the selection has {g_sel}; convert both to "
                "the same unit first, e.g. exclude.to_weight() together with Weight() scores."
            )
        drop = exclude[nm].to(device=idx.device, dtype=idx.dtype)
        idx = idx[~torch.isin(idx, drop)]
        if idx.numel():
            out[nm] = idx
    return out


def _build_mask(indices: dict[str, torch.Tensor], scores: Any, provenance: dict[str, Any]):
    from ..mask import SafetyMask

    granularity = {nm: scores.granularity_of(nm) for nm in scores.names}
    fingerprints = getattr(scores, "fingerprints", None) or {}
    return SafetyMask(
        indices={nm: idx.cpu() for nm, idx in indices.items()},
        shapes={nm: tuple(scores.shapes[nm]) for nm in scores.names},
        granularity=granularity,
        # the weights the scores were computed on: mask.validate(model) rejects a model with other weights
        fingerprints={nm: fp for nm, fp in fingerprints.items() if nm in scores.shapes},
        provenance=provenance,
    )


def select(
    scores: Any,
    *,
    fraction: float | None = None,
    k: int | None = None,
    scope: str = "global",
    exclude: Any = None,
    largest: bool = True,
    granularity: Any = None,
    provenance: Mapping[str, Any] | None = None,
):
    """Select the units with the highest (or lowest) scores and return them as a :class:`SafetyMask`.

    Args:
        scores: a :class:`~peft_safety.scoring.scores.Scores` (or a mapping ``name -> tensor`` of ``Weight()`` scores).
        fraction: share of units to select, in ``(0, 1]``, counted per group as ``floor(fraction * n + 1/2)``
            (group = all units for ``"global"``, one tensor for ``"per_tensor"``, one row for ``"per_row"``). Scores
            that carry their scorer's rule (``scores.rule``: safety neurons, safety layers) are selected by that rule
            when neither ``fraction`` nor ``k`` is given.
        k: number of units to select per group instead of a fraction. Exactly one of ``fraction`` / ``k``.
        scope: ``"global"``, ``"per_tensor"`` or ``"per_row"`` (2-D ``Weight()`` scores only; the rows are the
            output channels, Wanda's comparison group).
        exclude: a :class:`SafetyMask` whose units are removed after selection (Wei et al.'s set difference
            ``safety - utility``). Its granularity must equal the scores' for every shared parameter.
        largest: ``True`` selects the highest scores, ``False`` the lowest.
        granularity: optional granularity (or ``{name: granularity}``) to re-interpret the scores with; by default
            the scores' own. ``Neuron``/``Layer`` scores give ``Neuron``/``Layer`` masks.
        provenance: extra provenance entries for the mask (override those derived from the scores).

    Returns:
        A :class:`SafetyMask` whose ``shapes`` list every scored parameter. Its provenance holds the scores'
        provenance plus ``selection_scope``, ``selection_fraction``, ``selection_k`` (units selected before
        ``exclude``), ``selection_largest``, ``selection_tie_break`` and, with a fraction, ``sparsity``.

    Raises:
        ValueError: neither or both of ``fraction``/``k``; ``fraction`` outside ``(0, 1]``; ``k`` larger than a
            group; unknown ``scope``; ``per_row`` on non-matrix scores; ``exclude`` of another granularity/shape.
        TypeError: wrong argument types.

    Example:
        >>> import torch
        >>> from peft_safety.scoring.scores import Scores
        >>> s = Scores({"a": torch.tensor([[0.1, 0.9], [0.5, 0.5]])})
        >>> select(s, k=2)["a"].tolist()
        [1, 2]
    """
    scores = _as_scores(scores)
    rule = getattr(scores, "rule", None)
    if rule is not None and fraction is None and k is None:  # the scorer's own selection (scores.SelectionRule)
        return rule.select(
            scores, scope=scope, exclude=exclude, largest=largest, granularity=granularity, provenance=provenance
        )
    if granularity is not None:
        scores = scores.with_granularity(granularity)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}.")
    fraction, k = _check_count_args(fraction, k)  # plain Python numbers from here on (JSON provenance)
    if _is_distributed(scores):
        return _select_distributed(
            scores, fraction=fraction, k=k, scope=scope, exclude=exclude, largest=largest, provenance=provenance
        )
    indices = _select_indices(scores, fraction=fraction, k=k, scope=scope, largest=largest)
    n_selected = sum(int(i.numel()) for i in indices.values())
    if exclude is not None:
        indices = _apply_exclude(indices, scores, exclude)
    n_kept = sum(int(i.numel()) for i in indices.values())
    prov = _selection_provenance(scores, scope, fraction, k, largest, n_selected, n_kept, exclude, provenance)
    return _build_mask(indices, scores, prov)


def _selection_provenance(
    scores: Any,
    scope: str,
    fraction: float | None,
    k: int | None,
    largest: bool,
    n_selected: int,
    n_kept: int,
    exclude: Any,
    provenance: Mapping[str, Any] | None,
) -> dict[str, Any]:
    prov: dict[str, Any] = dict(scores.provenance)
    prov.update(
        {
            "selection_scope": scope,
            "selection_fraction": fraction,
            "selection_k": n_selected if k is None else k,
            "selection_largest": largest,
            "selection_tie_break": TIE_BREAK,
        }
    )
    if fraction is not None:
        prov["sparsity"] = fraction
    if exclude is not None:
        prov["selection_exclude"] = dict(getattr(exclude, "provenance", {}) or {})
        prov["selection_excluded"] = n_selected - n_kept
    if provenance:
        prov.update(provenance)
    return prov


def select_and_save(
    scores: Any,
    save_directory: str | os.PathLike,
    *,
    fraction: float | None = None,
    k: int | None = None,
    scope: str = "global",
    exclude: Any = None,
    largest: bool = True,
    granularity: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """`select` and write the mask to ``save_directory/safety_mask.safetensors``; the arguments are `select`'s.

    For sharded `Scores` (a collective call: every rank calls it with the same arguments) and for `ScoreFiles`, the
    indices go to the file one tensor at a time as they are selected, so the writing process never holds the whole
    mask; the file holds the same header entries and data bytes as the one ``select(...).save_pretrained(
    save_directory)`` writes. For in-memory scores it is exactly that.

    Returns:
        The path of the written file (on every rank).
    """
    scores = _as_scores(scores)
    if granularity is not None:
        scores = scores.with_granularity(granularity)
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}.")
    fraction, k = _check_count_args(fraction, k)
    if _is_distributed(scores):
        return _select_distributed(
            scores,
            fraction=fraction,
            k=k,
            scope=scope,
            exclude=exclude,
            largest=largest,
            provenance=provenance,
            save_directory=save_directory,
        )
    mask = select(scores, fraction=fraction, k=k, scope=scope, exclude=exclude, largest=largest, provenance=provenance)
    return mask.save_pretrained(save_directory)


def _select_distributed(
    scores: Any,
    *,
    fraction: float | None,
    k: int | None,
    scope: str,
    exclude: Any,
    largest: bool,
    provenance: Mapping[str, Any] | None,
    save_directory: str | os.PathLike | None = None,
) -> Any:
    """`select` for scores that are sharded over ranks or stored in files (see `peft_safety.scoring.distributed`).

    Returns the `SafetyMask` on rank 0 and `None` on the other ranks, or the written path with ``save_directory``.
    """
    from . import distributed as dist_sel
    from .units import expected_score_shape

    comm = scores.selection_comm()
    n, counts = _group_counts(scores, fraction=fraction, k=k, scope=scope)
    names = list(scores.names)
    pieces = scores.selection_pieces()
    chunk = scores.selection_chunk
    score_shapes = {nm: expected_score_shape(scores.shapes[nm], scores.granularity_of(nm), nm) for nm in names}
    unit_numel = {tid: math.prod(score_shapes[nm]) for tid, nm in enumerate(names)}

    def merged(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return torch.empty(0, dtype=torch.int64)
        out = torch.cat([p.cpu() for p in parts]) if len(parts) > 1 else parts[0].cpu()
        return out.sort().values if len(parts) > 1 else out

    local: dict[str, torch.Tensor] = {}
    if scope == "global":
        flat = [p for nm in names for p in pieces.get(nm, [])]
        found = dist_sel.select_pieces(
            flat, n, largest=largest, comm=comm, tensor_numel=unit_numel, n_tensors=len(names), chunk=chunk
        )
        local = {names[tid]: merged(parts) for tid, parts in found.items()}
    elif scope == "per_tensor":
        for tid, nm in enumerate(names):
            if nm in counts:
                found = dist_sel.select_pieces(
                    pieces.get(nm, []),
                    counts[nm],
                    largest=largest,
                    comm=comm,
                    tensor_numel={tid: unit_numel[tid]},
                    n_tensors=len(names),
                    chunk=chunk,
                )
                local[nm] = merged(found.get(tid, []))
    else:
        for nm in names:
            if nm in counts:
                parts = dist_sel.select_rows(
                    pieces.get(nm, []),
                    score_shapes[nm],
                    counts[nm],
                    largest=largest,
                    comm=comm,
                    tensor=nm,
                    chunk=chunk,
                    topk_indices_per_row=topk_indices_per_row,
                )
                local[nm] = merged(parts)
    local = {nm: idx for nm, idx in local.items() if idx.numel()}
    totals = comm.sum_(torch.tensor([sum(int(i.numel()) for i in local.values()), 0], dtype=torch.int64))
    if exclude is not None:
        local = _apply_exclude(local, scores, exclude)
        totals[1] = sum(int(i.numel()) for i in local.values())
        comm.sum_(totals[1:])
    n_selected = int(totals[0])
    n_kept = int(totals[1]) if exclude is not None else n_selected
    prov = _selection_provenance(scores, scope, fraction, k, largest, n_selected, n_kept, exclude, provenance)
    mask_counts, stream = dist_sel.assemble(names, local, scores.shapes, comm)
    if save_directory is not None:
        from ..mask.serialization import MASK_FILENAME

        tensors = stream(dist_sel.file_order(mask_counts))
        if comm.rank == 0:
            fingerprints = {nm: fp for nm, fp in (scores.fingerprints or {}).items() if nm in scores.shapes}
            path = dist_sel.write_mask_stream(
                save_directory,
                shapes={nm: tuple(scores.shapes[nm]) for nm in names},
                granularity={nm: scores.granularity_of(nm) for nm in names},
                fingerprints=fingerprints,
                provenance=prov,
                counts=mask_counts,
                tensors=tensors,
            )
        else:
            for _ in tensors:
                pass
            path = os.path.join(os.fspath(save_directory), MASK_FILENAME)
        comm.barrier()
        return path
    indices = {}
    for nm, idx in stream(names):
        if idx is not None and idx.numel():
            indices[nm] = idx
    if comm.rank != 0:
        return None
    return _build_mask(indices, scores, prov)


def isolate(
    safety_scores: Any,
    utility_scores: Any,
    *,
    p: float,
    q: float,
    scope: str = "per_tensor",
    largest: bool = True,
):
    """Wei et al.'s utility-isolated mask: ``top-q(S_safety) - top-p(S_utility)``, per matrix by default.

    The units with high safety scores that are *not* among the top utility units: "relatively high safety importance
    and not in top utility" (Wei et al. 2024, §2.4 set difference). The resulting density is at most ``q``.

    Deviation from the reference code: the reference counts ``int(q * numel)`` (floor); here the count is
    ``floor(q * numel + 1/2)``, the rule of :func:`select` (at most one unit apart per matrix). Ties are broken as in
    :func:`select` (the reference uses ``torch.topk``, whose tie order is unspecified).

    Args:
        safety_scores: :class:`Scores` computed on safety (refusal) data.
        utility_scores: :class:`Scores` on utility data, over the same parameters with the same granularity.
        p: share of top utility units to remove, in ``(0, 1]``.
        q: share of top safety units to start from, in ``(0, 1]``.
        scope: ``"per_tensor"`` (Wei et al.), ``"global"`` or ``"per_row"``; the same for both selections.
        largest: ``True`` for the highest scores.

    Returns:
        A :class:`SafetyMask` with provenance ``isolation_p``, ``isolation_q`` and the utility scores' provenance
        under ``isolation_utility``.

    Raises:
        ValueError: when the two scores cover different parameters, shapes or granularities, or on bad ``p``/``q``.

    Example:
        >>> import torch
        >>> from peft_safety.scoring.scores import Scores
        >>> s = Scores({"w": torch.tensor([[4.0, 3.0], [2.0, 1.0]])})
        >>> u = Scores({"w": torch.tensor([[9.0, 0.0], [0.0, 0.0]])})
        >>> isolate(s, u, p=0.25, q=0.5)["w"].tolist()
        [1]
    """
    safety_scores = _as_scores(safety_scores)
    utility_scores = _as_scores(utility_scores)
    if list(safety_scores.names) != list(utility_scores.names):
        missing = sorted(set(safety_scores.names) ^ set(utility_scores.names))
        raise ValueError(
            "safety and utility scores must cover the same parameters in the same order; differing: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Use .restrict(names) on both."
        )
    for nm in safety_scores.names:
        if tuple(safety_scores[nm].shape) != tuple(utility_scores[nm].shape) or safety_scores.granularity_of(
            nm
        ) != utility_scores.granularity_of(nm):
            raise ValueError(
                f"safety and utility scores differ for {nm!r}: shape {tuple(safety_scores[nm].shape)} "
                f"{safety_scores.granularity_of(nm)} vs {tuple(utility_scores[nm].shape)} "
                f"{utility_scores.granularity_of(nm)}; score both with the same method and granularity."
            )
    p, q = check_fraction(p, where="p"), check_fraction(q, where="q")
    utility = select(utility_scores, fraction=p, scope=scope, largest=largest)
    return select(
        safety_scores,
        fraction=q,
        scope=scope,
        largest=largest,
        exclude=utility,
        provenance={
            "isolation_p": p,
            "isolation_q": q,
            "isolation_utility": dict(utility_scores.provenance),
        },
    )
