"""What one score entry stands for: the shape of a parameter's score tensor under a granularity.

Shared by `Scores` (in memory) and `ScoreFiles` (on disk), which check the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..mask.granularity import Granularity, Layer, Weight, is_granularity

__all__ = ["GranularitySpec", "expected_score_shape", "granularity_map"]

GranularitySpec = Granularity | Mapping[str, Granularity] | None


def expected_score_shape(shape: Iterable[int], granularity: Granularity, name: str = "parameter") -> tuple[int, ...]:
    """Shape of the score tensor of one parameter under ``granularity``.

    ``Weight()``: the parameter's shape; ``Neuron``/``Head``: ``(num_units,)`` (rows or columns, numbered per expert
    for fused 3-D expert tensors; see :mod:`peft_safety.mask.granularity`); ``Layer()``: ``()``.

    Raises:
        ValueError: when the granularity cannot address a parameter of this shape.
        TypeError: when ``granularity`` is not a granularity.
    """
    shape = tuple(int(s) for s in shape)
    if not is_granularity(granularity):
        raise TypeError(
            f"{name!r}: {granularity!r} is not a granularity; use Weight(), Neuron(axis), Head(head_dim) or Layer()."
        )
    granularity.check_shape(shape, name)
    if isinstance(granularity, Weight):
        return shape
    if isinstance(granularity, Layer):
        return ()
    return (granularity.num_units(shape),)


def granularity_map(names: Iterable[str], granularity: GranularitySpec) -> dict[str, Granularity]:
    names = list(names)
    if granularity is None:
        return dict.fromkeys(names, Weight())
    if is_granularity(granularity):
        return dict.fromkeys(names, granularity)
    if isinstance(granularity, Mapping):
        missing = [n for n in names if n not in granularity]
        if missing:
            raise ValueError(f"granularity has no entry for {missing[:3]}; give one granularity or one per name.")
        out = {}
        for n in names:
            g = granularity[n]
            if not is_granularity(g):
                raise TypeError(f"granularity[{n!r}] must be a Granularity (e.g. Weight()), got {type(g).__name__}.")
            out[n] = g
        return out
    raise TypeError(
        f"granularity must be a Granularity or a mapping name -> Granularity, got {type(granularity).__name__}."
    )
