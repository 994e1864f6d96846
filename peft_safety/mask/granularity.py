"""Granularity of a mask entry: one weight entry, one neuron (row or column), one attention head, or a whole parameter.

Granularities are small frozen dataclasses (in the spirit of torchao's ``PerTensor()`` / ``PerAxis(axis)``). Besides
describing the unit, each one knows how to map its unit indices onto a parameter of a given shape:

* `num_units(shape)`: how many units the parameter has;
* `unit_numel(shape)`: how many weight entries one unit covers;
* `to_flat_indices(indices, shape)`: the sorted flat (row-major) weight indices covered by some units, computed
  arithmetically so that no parameter-sized tensor is built;
* `unit_view(tensor)`: a 2-D view ``(num_units, unit_numel)`` of a parameter-shaped tensor, one row per unit
  (used for dense conversions of a single parameter).

Tensors with more than two dimensions (fused MoE experts, shape ``(E, d_out, d_in)``) are read as ``(L, R, C)`` with
``L = prod(shape[:-2])``: rows and columns are numbered per expert (row ``i`` of expert ``e`` is ``e * R + i``).
A 1-D tensor (a bias, a norm weight) is read as ``R`` rows of one column, a scalar as one row of one column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = ["Granularity", "Head", "Layer", "Neuron", "Weight", "granularity_from_dict"]


def _lrc(shape: Sequence[int]) -> tuple[int, int, int]:
    """(leading, rows, columns) of a parameter shape; see the module docstring."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, shape[0], 1
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _check_axis(cls_name: str, axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{cls_name}(axis=...) must be an int (0 = rows, 1 = columns), got {type(axis).__name__}")
    if axis not in (0, 1):
        raise ValueError(f"{cls_name}(axis={axis}) is invalid: use axis=0 (rows, output channels) or axis=1 (columns)")


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64)


class _Base:
    """Shared helpers; subclasses implement the per-unit arithmetic."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict, inverse of `granularity_from_dict`."""
        raise NotImplementedError  # pragma: no cover - every concrete class overrides it

    def check_shape(self, shape: Sequence[int], name: str = "parameter") -> None:
        """Raise a `ValueError` if this granularity cannot address a parameter of `shape`."""

    def num_units(self, shape: Sequence[int]) -> int:
        raise NotImplementedError  # pragma: no cover

    def unit_numel(self, shape: Sequence[int]) -> int:
        raise NotImplementedError  # pragma: no cover

    def to_flat_indices(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def from_unit_view(self, view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Inverse of `unit_view`: a ``(num_units, unit_numel)`` tensor back to the parameter's `shape`."""
        raise NotImplementedError  # pragma: no cover


@dataclass(frozen=True)
class Weight(_Base):
    """One weight entry. Indices are flat row-major indices into ``W.reshape(-1)`` (``i * d_in + j`` for a matrix).

    Example:

    ```python
    >>> Weight().to_flat_indices(torch.tensor([3, 5]), (4, 4)).tolist()
    [3, 5]
    ```
    """

    def to_dict(self) -> dict[str, Any]:
        return {"type": "weight"}

    def num_units(self, shape: Sequence[int]) -> int:
        return math.prod(tuple(shape))

    def unit_numel(self, shape: Sequence[int]) -> int:
        return 1

    def to_flat_indices(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return indices.to(torch.int64)

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(-1, 1)

    def from_unit_view(self, view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return view.reshape(tuple(shape))


@dataclass(frozen=True)
class Neuron(_Base):
    """One neuron: a row (``axis=0``, output channel: q, k, v, gate, up) or a column (``axis=1``, input channel: down, o).

    For tensors with more than two dimensions every expert is addressed on its own: with shape ``(E, R, C)``, row
    ``i`` of expert ``e`` is unit ``e * R + i`` (axis 0) and column ``j`` of expert ``e`` is unit ``e * C + j``
    (axis 1).

    Args:
        axis: 0 for rows, 1 for columns.

    Raises:
        TypeError: if `axis` is not an int.
        ValueError: if `axis` is not 0 or 1.

    Example:

    ```python
    >>> Neuron(axis=1).to_flat_indices(torch.tensor([1]), (3, 4)).tolist()  # column 1 of a 3 x 4 matrix
    [1, 5, 9]
    ```
    """

    axis: int = 0

    def __post_init__(self) -> None:
        _check_axis("Neuron", self.axis)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "neuron", "axis": self.axis}

    def check_shape(self, shape: Sequence[int], name: str = "parameter") -> None:
        if self.axis == 1 and len(tuple(shape)) < 2:
            raise ValueError(
                f"{name}: Neuron(axis=1) needs a tensor with at least 2 dimensions, got shape {tuple(shape)}; "
                "use Neuron(axis=0) or Weight() for 1-D parameters"
            )

    def num_units(self, shape: Sequence[int]) -> int:
        lead, rows, cols = _lrc(shape)
        return lead * (rows if self.axis == 0 else cols)

    def unit_numel(self, shape: Sequence[int]) -> int:
        _, rows, cols = _lrc(shape)
        return cols if self.axis == 0 else rows

    def to_flat_indices(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        _, rows, cols = _lrc(shape)
        u = indices.to(torch.int64)
        if u.numel() == 0:
            return _empty()
        if self.axis == 0:
            # the rows of the (L * R, C) view are contiguous blocks of C entries, already in sorted order
            return (u[:, None] * cols + torch.arange(cols, dtype=torch.int64)[None, :]).reshape(-1)
        expert, col = u // cols, u % cols
        flat = expert[:, None] * (rows * cols) + torch.arange(rows, dtype=torch.int64)[None, :] * cols + col[:, None]
        return flat.reshape(-1).sort().values

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        lead, rows, cols = _lrc(tensor.shape)
        if self.axis == 0:
            return tensor.reshape(lead * rows, cols)
        return tensor.reshape(lead, rows, cols).transpose(1, 2).reshape(lead * cols, rows)

    def from_unit_view(self, view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        lead, rows, cols = _lrc(shape)
        if self.axis == 0:
            return view.reshape(tuple(shape))
        return view.reshape(lead, cols, rows).transpose(1, 2).reshape(tuple(shape))


@dataclass(frozen=True)
class Head(_Base):
    """One attention head of `head_dim` consecutive rows (``axis=0``: q, and k/v with kv-head ids) or columns
    (``axis=1``: o).

    Head ``h`` covers rows (or columns) ``[h * head_dim, (h + 1) * head_dim)``. Tensors with more than two dimensions
    number heads per leading index, like `Neuron`.

    Args:
        head_dim: number of rows (or columns) per head, > 0. Read it from the model config (``config.head_dim``),
            never hard-code it.
        axis: 0 for rows, 1 for columns.

    Raises:
        TypeError: if `head_dim` or `axis` is not an int.
        ValueError: if `head_dim <= 0` or `axis` is not 0 or 1.
    """

    head_dim: int
    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int):
            raise TypeError(f"Head(head_dim=...) must be an int, got {type(self.head_dim).__name__}")
        if self.head_dim <= 0:
            raise ValueError(f"Head(head_dim={self.head_dim}) is invalid: head_dim must be > 0 (e.g. config.head_dim)")
        _check_axis("Head", self.axis)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "head", "head_dim": self.head_dim, "axis": self.axis}

    def check_shape(self, shape: Sequence[int], name: str = "parameter") -> None:
        shape = tuple(shape)
        if self.axis == 1 and len(shape) < 2:
            raise ValueError(
                f"{name}: Head(axis=1) needs a tensor with at least 2 dimensions, got shape {shape}; use axis=0"
            )
        _, rows, cols = _lrc(shape)
        size = rows if self.axis == 0 else cols
        if size % self.head_dim != 0:
            which = "rows" if self.axis == 0 else "columns"
            raise ValueError(
                f"{name}: {size} {which} (shape {shape}) are not divisible by head_dim={self.head_dim}; "
                "check head_dim (config.head_dim) and axis"
            )

    def num_units(self, shape: Sequence[int]) -> int:
        lead, rows, cols = _lrc(shape)
        return lead * (rows if self.axis == 0 else cols) // self.head_dim

    def unit_numel(self, shape: Sequence[int]) -> int:
        _, rows, cols = _lrc(shape)
        return self.head_dim * (cols if self.axis == 0 else rows)

    def to_flat_indices(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        u = indices.to(torch.int64)
        if u.numel() == 0:
            return _empty()
        # head u of expert e covers neuron units [u * head_dim, (u + 1) * head_dim) of the same axis, because
        # e * (R / head_dim) * head_dim + h * head_dim == u * head_dim
        neurons = (u[:, None] * self.head_dim + torch.arange(self.head_dim, dtype=torch.int64)[None, :]).reshape(-1)
        return Neuron(self.axis).to_flat_indices(neurons, shape)

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        neurons = Neuron(self.axis).unit_view(tensor)
        return neurons.reshape(neurons.shape[0] // self.head_dim, self.head_dim * neurons.shape[1])

    def from_unit_view(self, view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        neuron = Neuron(self.axis)
        return neuron.from_unit_view(view.reshape(neuron.num_units(shape), neuron.unit_numel(shape)), shape)


@dataclass(frozen=True)
class Layer(_Base):
    """The whole parameter: the single index ``0`` masks it entirely.

    A "layer mask" is the set of parameters of the chosen decoder layers, each with `Layer()` granularity.
    """

    def to_dict(self) -> dict[str, Any]:
        return {"type": "layer"}

    def num_units(self, shape: Sequence[int]) -> int:
        return 1

    def unit_numel(self, shape: Sequence[int]) -> int:
        return math.prod(tuple(shape))

    def to_flat_indices(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        if indices.numel() == 0:
            return _empty()
        return torch.arange(math.prod(tuple(shape)), dtype=torch.int64)

    def unit_view(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1)

    def from_unit_view(self, view: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return view.reshape(tuple(shape))


#: Any granularity.
Granularity = Union[Weight, Neuron, Head, Layer]  # noqa: UP007 - a runtime alias usable in isinstance on 3.10

_TYPES: dict[str, type] = {"weight": Weight, "neuron": Neuron, "head": Head, "layer": Layer}
_FIELDS: dict[str, tuple[str, ...]] = {"weight": (), "neuron": ("axis",), "head": ("head_dim", "axis"), "layer": ()}


def granularity_from_dict(d: Mapping[str, Any]) -> Granularity:
    """Rebuild a granularity from its `to_dict()` form.

    Args:
        d: a mapping such as ``{"type": "neuron", "axis": 1}``.

    Returns:
        The granularity instance.

    Raises:
        TypeError: if `d` is not a mapping.
        ValueError: if the type is unknown, a field is missing or unexpected, or a field value is invalid.

    Example:

    ```python
    >>> granularity_from_dict({"type": "head", "head_dim": 8, "axis": 0})
    Head(head_dim=8, axis=0)
    ```
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"granularity_from_dict expects a dict such as {{'type': 'weight'}}, got {type(d).__name__}")
    kind = d.get("type")
    if kind not in _TYPES:
        raise ValueError(f"Unknown granularity type {kind!r}; expected one of {sorted(_TYPES)}")
    fields = _FIELDS[kind]
    extra = sorted(set(d) - {"type", *fields})
    if extra:
        raise ValueError(f"Unexpected field(s) {extra} for granularity {kind!r}; allowed: {list(fields)}")
    if kind == "head" and "head_dim" not in d:
        raise ValueError("Granularity 'head' needs a 'head_dim' field, e.g. {'type': 'head', 'head_dim': 64}")
    return _TYPES[kind](**{k: d[k] for k in fields if k in d})


def is_granularity(obj: Any) -> bool:
    """Whether `obj` is one of the granularity classes."""
    return isinstance(obj, (Weight, Neuron, Head, Layer))
