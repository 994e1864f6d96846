"""`SafetyMask`: the safety-critical entries of a model, as sorted unique unit indices per parameter.

The API contract is `docs/concepts.md`. Everything here works on index vectors (``O(mask)`` memory); the only
parameter-sized tensors are built by `SafetyMask.to_dense` for one parameter at a time, and by `SafetyMask.from_dense`
for the dense tensors the caller already holds.

This module imports only torch and the standard library (``peft_safety.mask`` never pulls transformers or the Hub
client; Hub downloads import ``peft_safety.mask.hub`` lazily).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._version import __version__
from ..errors import SafetyError, SafetyFileError, SafetyFileNotFoundError
from ..vocab import check_fingerprint_policy, did_you_mean, layer_index, split_layer
from .granularity import Granularity, Weight, is_granularity
from .serialization import (
    MASK_FILENAME,
    MAX_PARAMETER_NUMEL,
    decode_mask,
    mask_to_bytes,
    read_mask_file,
    resolve_mask_file,
    save_mask,
)

__all__ = [
    "MaskSummary",
    "SafetyMask",
    "fingerprint_tensor",
    "fingerprints_of",
    "layer_index_of",
    "module_type_of",
]

#: number of sampled positions in `fingerprint_tensor`
FINGERPRINT_SAMPLES = 4096
#: prefix of fingerprint strings; bump it if the sampling or hashing scheme ever changes
FINGERPRINT_SCHEME = "bf16s4096b2b"
_INT32_LIMIT = 2**31

_DIGIT_COMPONENT_RE = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def fingerprint_tensor(tensor: torch.Tensor) -> str:
    """A cheap, dtype-robust fingerprint of a weight tensor.

    The values at a fixed set of at most 4096 evenly spaced flat positions are rounded to bfloat16 and hashed
    (BLAKE2b) together with the shape. A float32 checkpoint and its bfloat16 cast therefore give the same fingerprint,
    while another model (or a fine-tuned copy) almost surely does not. float16 copies can differ (double rounding
    float32 -> float16 -> bfloat16 is not always equal to float32 -> bfloat16), and quantised weights differ: validate
    those with ``fingerprint_check="warn"`` or ``"ignore"``.

    Cost: reads at most 4096 values, whatever the tensor size.

    Args:
        tensor: the weight (any floating or integer dtype, any device except ``meta``).

    Returns:
        A string ``"bf16s4096b2b:<32 hex digits>"``.

    Raises:
        TypeError: if `tensor` is not a `torch.Tensor`.
        ValueError: if `tensor` is on the meta device (it has no values).

    Example:

    ```python
    >>> w = torch.randn(64, 32)
    >>> fingerprint_tensor(w) == fingerprint_tensor(w.to(torch.bfloat16))
    True
    ```
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"fingerprint_tensor expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type == "meta":
        raise ValueError(
            "fingerprint_tensor: the tensor is on the meta device and has no values; load the weights first"
        )
    t = tensor.detach()
    n = t.numel()
    flat = t.reshape(-1)
    if n <= FINGERPRINT_SAMPLES:
        values = flat
    else:
        positions = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * n // FINGERPRINT_SAMPLES
        values = flat[positions.to(flat.device)]
    bits = values.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).tolist()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(t.shape)).encode())
    h.update(struct.pack(f"<{len(bits)}h", *bits))
    return f"{FINGERPRINT_SCHEME}:{h.hexdigest()}"


def _fingerprintable(tensor: Any) -> bool:
    """Plain tensors with values: not meta, not a sharded ``DTensor`` (a shard is not the weight), not packed
    quantised storage (bitsandbytes ``Params4bit``/``Int8Params``, whose values never match a float fingerprint)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
        return False
    if hasattr(tensor, "quant_state") or type(tensor).__name__ in ("Params4bit", "Int8Params", "DTensor"):
        return False
    return type(getattr(tensor, "data", tensor)).__name__ != "DTensor"


def fingerprints_of(model_or_state_dict: Any, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{name: fingerprint_tensor(weight)}`` of a model's (or state dict's) parameters.

    Parameters without plain values are left out (meta tensors, sharded ``DTensor`` shards, bitsandbytes-packed
    weights): a mask made from them records no fingerprint for them and `SafetyMask.validate` cannot check them.

    Cost: `fingerprint_tensor` reads at most 4096 values per tensor, so the cost grows with the number of weight
    matrices, not with their sizes: fingerprinting never copies or hashes a whole model.

    Args:
        model_or_state_dict: a ``torch.nn.Module`` or a mapping ``{name: tensor}``.
        names: the parameters to fingerprint (default: all). Names missing from the model are left out.

    Returns:
        The fingerprints, in the order of `names` (or of the model).

    Raises:
        TypeError: if `model_or_state_dict` is neither a module nor a mapping.
    """
    if hasattr(model_or_state_dict, "named_parameters"):
        params = dict(model_or_state_dict.named_parameters())
    elif isinstance(model_or_state_dict, Mapping):
        params = dict(model_or_state_dict)
    else:
        raise TypeError(f"fingerprints_of expects a model or a state dict, got {type(model_or_state_dict).__name__}")
    wanted = list(params) if names is None else list(names)
    return {n: fingerprint_tensor(params[n]) for n in wanted if n in params and _fingerprintable(params[n])}


#: the decoder-layer index in a parameter name (`peft_safety.vocab.layer_index`, under the name of this module)
layer_index_of = layer_index


def module_type_of(name: str) -> str:
    """The module type of a parameter name: the part after the layer index, without a trailing ``.weight``, with
    other numeric components (per-expert indices) replaced by ``*``.

    Example:

    ```python
    >>> module_type_of("model.layers.3.self_attn.q_proj.weight")
    'self_attn.q_proj'
    >>> module_type_of("model.layers.0.block_sparse_moe.experts.5.w1.weight")
    'block_sparse_moe.experts.*.w1'
    >>> module_type_of("lm_head.weight")
    'lm_head'
    ```
    """
    rest = split_layer(name)[1] or name
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return _DIGIT_COMPONENT_RE.sub("*", rest) or name


def _index_dtype(shape: Sequence[int]) -> torch.dtype:
    return torch.int64 if math.prod(shape) >= _INT32_LIMIT else torch.int32


def _closest(name: str, candidates: Iterable[str]) -> str:
    return did_you_mean(name, candidates, n=3, available=False)


def _check_json(provenance: Mapping[str, Any]) -> None:
    for key, value in provenance.items():
        if not isinstance(key, str):
            raise TypeError(f"provenance keys must be strings, got {key!r} ({type(key).__name__})")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"provenance[{key!r}] = {value!r} is not JSON-serialisable ({err}); use str, int, float (finite), "
                "bool, None, lists and dicts of those"
            ) from None


def _normalize_shape(name: str, shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"shapes[{name!r}] must be a tuple of ints, got {type(shape).__name__}")
    out = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"shapes[{name!r}] = {tuple(shape)!r} must contain ints only")
        if d < 0:
            raise ValueError(f"shapes[{name!r}] = {tuple(shape)!r} has a negative dimension")
        out.append(int(d))
    return tuple(out)


def _normalize_indices(name: str, value: Any, shape: tuple[int, ...], gran: Granularity) -> torch.Tensor:
    """Validate one index vector and return a private CPU copy with the canonical dtype."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"indices[{name!r}]: a list of indices must contain ints only")
        t = torch.tensor(list(value), dtype=torch.int64)
    else:
        raise TypeError(f"indices[{name!r}] must be a 1-D integer torch.Tensor, got {type(value).__name__}")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(
            f"indices[{name!r}] has dtype {t.dtype}; indices must be an integer tensor (int32), e.g. "
            "t.to(torch.int32). For a boolean mask use SafetyMask.from_dense"
        )
    if t.dim() != 1:
        raise ValueError(f"indices[{name!r}] must be 1-D, got shape {tuple(t.shape)}; flatten it (t.reshape(-1))")
    t = t.to(device="cpu", dtype=torch.int64)
    n = t.numel()
    if n:
        units = gran.num_units(shape)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= units:
            raise ValueError(
                f"indices[{name!r}] out of range: found {lo if lo < 0 else hi}, but {gran!r} on shape {shape} has "
                f"{units} units (valid 0..{units - 1})"
            )
        if n > 1:
            diffs = t[1:] - t[:-1]
            if bool((diffs <= 0).any()):
                dup = bool((diffs == 0).any())
                problem = "contain duplicates" if dup else "are not sorted"
                raise ValueError(f"indices[{name!r}] {problem}; pass torch.unique(t) (sorted, unique)")
    return t.to(_index_dtype(shape)).clone()


def _union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.unique(torch.cat([a, b]), sorted=True).to(a.dtype)


def _intersect(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[torch.isin(a, b, assume_unique=True)]


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[~torch.isin(a, b, assume_unique=True)]


# ---------------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------------


def _count(units: int = 0, numel: int = 0, total: int = 0, parameters: int = 0) -> dict[str, Any]:
    return {"parameters": parameters, "units": units, "numel": numel, "total": total, "density": 0.0}


def _finish(c: dict[str, Any]) -> dict[str, Any]:
    c["density"] = c["numel"] / c["total"] if c["total"] else 0.0
    return c


@dataclass
class MaskSummary:
    """Counts and densities of a mask, per decoder layer and per module type.

    Every count is a dict with keys ``parameters`` (eligible parameters), ``units`` (selected units), ``numel``
    (selected weight entries), ``total`` (eligible weight entries) and ``density`` (``numel / total``).

    Attributes:
        total: the count over every parameter of the mask.
        per_layer: ``{layer index: count}`` for parameters whose name carries a layer index.
        per_module: ``{module type: count}`` (see `module_type_of`), e.g. ``self_attn.q_proj``,
            ``mlp.experts.down_proj``, ``lm_head``.
        outside_layers: the count over parameters without a layer index (embeddings, final norm, lm_head).
        granularity: ``{granularity repr: number of parameters}``.
        provenance: the mask's provenance.
    """

    total: dict[str, Any]
    per_layer: dict[int, dict[str, Any]]
    per_module: dict[str, dict[str, Any]]
    outside_layers: dict[str, Any]
    granularity: dict[str, int] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (layer indices become string keys)."""
        return {
            "total": dict(self.total),
            "per_layer": {str(k): dict(v) for k, v in self.per_layer.items()},
            "per_module": {k: dict(v) for k, v in self.per_module.items()},
            "outside_layers": dict(self.outside_layers),
            "granularity": dict(self.granularity),
            "provenance": dict(self.provenance),
        }

    @staticmethod
    def _table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        header = (title, "params", "units", "entries", "of", "density")
        body = [
            (key, str(c["parameters"]), str(c["units"]), str(c["numel"]), str(c["total"]), f"{c['density']:.4%}")
            for key, c in rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def fmt(r: Sequence[str]) -> str:
            return "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r)))

        return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]

    def __str__(self) -> str:
        lines = self._table("layer", [(str(k), v) for k, v in sorted(self.per_layer.items())])
        if self.outside_layers["parameters"]:
            lines.append(self._table("layer", [("(none)", self.outside_layers)])[2])
        lines.append("")
        lines += self._table("module", sorted(self.per_module.items()))
        lines.append("")
        lines += self._table("total", [("all", self.total)])
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# SafetyMask
# ---------------------------------------------------------------------------------------------------------------------


class SafetyMask:
    """Safety-critical entries of a model: sorted unique unit indices per parameter, plus shapes, granularity,
    fingerprints and provenance.

    Args:
        indices: ``{parameter name: 1-D sorted unique integer tensor}`` in the unit of that parameter's granularity
            (a list of ints is accepted too). Empty vectors are allowed and mean "no entry".
        shapes: ``{parameter name: full shape}`` for every parameter the mask was computed over, selected or not, so
            that `density` is relative to the eligible parameters.
        granularity: one granularity for every parameter, or ``{name: granularity}`` covering every name in
            `shapes`.
        fingerprints: optional ``{name: fingerprint_tensor(weight)}`` to notice a mask loaded into another model.
        provenance: a JSON-serialisable dict (method, aggregation, sparsity, seed, data_hash, base_model,
            base_model_revision, score_sign, ...). ``library_version`` is filled in when missing.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: for invalid indices (not 1-D, not integer, unsorted, duplicated, out of range), indices or
            fingerprints of a parameter missing from `shapes`, a granularity that cannot address a shape, or a
            provenance that is not JSON-serialisable. The message names the parameter and the fix.

    Example:

    ```python
    >>> mask = SafetyMask(
    ...     indices={"model.layers.0.mlp.down_proj.weight": torch.tensor([3, 17, 40], dtype=torch.int32)},
    ...     shapes={"model.layers.0.mlp.down_proj.weight": (32, 64)},
    ...     provenance={"method": "snip", "sparsity": 0.01, "seed": 0},
    ... )
    >>> len(mask), mask.numel(), mask.total_numel()
    (3, 3, 2048)
    ```
    """

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor | Sequence[int]],
        shapes: Mapping[str, Sequence[int]],
        granularity: Granularity | Mapping[str, Granularity] = Weight(),  # noqa: B008 - frozen, immutable default
        fingerprints: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(indices, Mapping):
            raise TypeError(f"indices must be a dict {{name: tensor}}, got {type(indices).__name__}")
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes must be a dict {{name: shape}}, got {type(shapes).__name__}")
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if not isinstance(name, str):
                raise TypeError(f"parameter names must be strings, got {name!r}")
            self._shapes[name] = _normalize_shape(name, shape)

        self._gran: dict[str, Granularity] = {}
        if is_granularity(granularity):
            self._default: Granularity = granularity  # type: ignore[assignment]
            self._gran = dict.fromkeys(self._shapes, granularity)  # type: ignore[arg-type]
        elif isinstance(granularity, Mapping):
            missing = [n for n in self._shapes if n not in granularity]
            if missing:
                raise ValueError(
                    f"granularity has no entry for {missing[:3]}{' ...' if len(missing) > 3 else ''}; a granularity "
                    "dict must cover every name in shapes (or pass one granularity for all)"
                )
            for name, g in granularity.items():
                if name not in self._shapes:
                    raise ValueError(
                        f"granularity names {name!r}, which is not in shapes.{_closest(name, self._shapes)}"
                    )
                if not is_granularity(g):
                    raise TypeError(f"granularity[{name!r}] must be Weight(), Neuron(), Head() or Layer(), got {g!r}")
                self._gran[name] = g
            values = list(self._gran.values())
            self._default = values[0] if values else Weight()
        else:
            raise TypeError(
                f"granularity must be Weight(), Neuron(axis), Head(head_dim, axis), Layer() or a dict of those, "
                f"got {granularity!r}"
            )
        for name, shape in self._shapes.items():
            self._gran[name].check_shape(shape, name)

        self._indices: dict[str, torch.Tensor] = {}
        for name in indices:
            if name not in self._shapes:
                raise ValueError(
                    f"indices has parameter {name!r}, which is not in shapes; add shapes[{name!r}] = the parameter's "
                    f"shape.{_closest(name, self._shapes)}"
                )
        for name in self._shapes:  # keep the order of shapes (model order, usually)
            if name in indices:
                t = _normalize_indices(name, indices[name], self._shapes[name], self._gran[name])
                if t.numel():
                    self._indices[name] = t

        self._fingerprints: dict[str, str] = {}
        if fingerprints is not None:
            if not isinstance(fingerprints, Mapping):
                raise TypeError(f"fingerprints must be a dict {{name: str}}, got {type(fingerprints).__name__}")
            for name, fp in fingerprints.items():
                if name not in self._shapes:
                    raise ValueError(f"fingerprints has parameter {name!r}, which is not in shapes")
                if not isinstance(fp, str):
                    raise TypeError(f"fingerprints[{name!r}] must be a str from fingerprint_tensor(), got {fp!r}")
                self._fingerprints[name] = fp

        if provenance is not None and not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
        prov = dict(provenance or {})
        prov.setdefault("library_version", __version__)
        _check_json(prov)
        # a deep copy through JSON: later edits of the caller's dict (or nested lists) never reach the mask
        self._provenance: dict[str, Any] = json.loads(json.dumps(prov))

    @classmethod
    def _trusted(
        cls,
        indices: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
        gran: dict[str, Granularity],
        fingerprints: dict[str, str],
        provenance: dict[str, Any],
    ) -> SafetyMask:
        """Build from parts that are already valid (results of algebra), skipping the O(mask) checks."""
        self = cls.__new__(cls)
        self._shapes = dict(shapes)
        self._gran = {n: gran[n] for n in self._shapes}
        values = list(self._gran.values())
        self._default = values[0] if values else Weight()
        self._indices = {n: indices[n] for n in self._shapes if n in indices and indices[n].numel()}
        self._fingerprints = {n: fp for n, fp in fingerprints.items() if n in self._shapes}
        prov = dict(provenance)
        prov.setdefault("library_version", __version__)
        _check_json(prov)
        self._provenance = json.loads(json.dumps(prov))
        return self

    # ---- read access -------------------------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Parameters with at least one selected unit, in the order of `shapes`."""
        return tuple(self._indices)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every eligible parameter (a copy)."""
        return dict(self._shapes)

    @property
    def indices(self) -> dict[str, torch.Tensor]:
        """``{name: indices}`` of the parameters with entries (a shallow copy; do not modify the tensors)."""
        return dict(self._indices)

    @property
    def granularity(self) -> Granularity | dict[str, Granularity]:
        """The granularity if it is the same for every parameter, else ``{name: granularity}``."""
        values = set(self._gran.values())
        if len(values) <= 1:
            return next(iter(values)) if values else self._default
        return dict(self._gran)

    def granularity_of(self, name: str) -> Granularity:
        """The granularity of parameter `name` (any name in `shapes`)."""
        self._check_known(name)
        return self._gran[name]

    @property
    def fingerprints(self) -> dict[str, str]:
        """``{name: fingerprint}`` recorded at creation (a copy; may be empty)."""
        return dict(self._fingerprints)

    @property
    def provenance(self) -> dict[str, Any]:
        """How the mask was made (a copy)."""
        return json.loads(json.dumps(self._provenance))

    def _check_known(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(f"{name!r} is not a parameter of this mask.{_closest(name, self._shapes)}")

    def __len__(self) -> int:
        """Number of selected units (entries, neurons, heads or parameters, by granularity)."""
        return sum(t.numel() for t in self._indices.values())

    def numel(self) -> int:
        """Number of weight entries covered by the mask."""
        return sum(t.numel() * self._gran[n].unit_numel(self._shapes[n]) for n, t in self._indices.items())

    def total_numel(self) -> int:
        """Number of weight entries of every eligible parameter (every name in `shapes`)."""
        return sum(math.prod(s) for s in self._shapes.values())

    @property
    def density(self) -> float:
        """``numel() / total_numel()`` (0.0 for a mask without parameters)."""
        total = self.total_numel()
        return self.numel() / total if total else 0.0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Iterate over ``(name, indices)`` of the parameters with entries."""
        return iter(list(self._indices.items()))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, indices)`` pairs of the parameters with entries."""
        return iter(self)

    def __contains__(self, name: object) -> bool:
        """Whether parameter `name` has at least one selected unit."""
        return name in self._indices

    def __getitem__(self, name: str) -> torch.Tensor:
        """The indices of parameter `name` (an empty tensor for an eligible parameter without entries).

        Raises:
            KeyError: if `name` is not in `shapes` (with close-name suggestions).
        """
        self._check_known(name)
        t = self._indices.get(name)
        return t if t is not None else torch.zeros(0, dtype=_index_dtype(self._shapes[name]))

    def __eq__(self, other: object) -> bool:
        """Same shapes, granularities and indices. Provenance and fingerprints (metadata) are not compared."""
        if not isinstance(other, SafetyMask):
            return NotImplemented
        return (
            self._shapes == other._shapes
            and self._gran == other._gran
            and self._indices.keys() == other._indices.keys()
            and all(torch.equal(t, other._indices[n]) for n, t in self._indices.items())
        )

    __hash__ = None  # type: ignore[assignment] - mutable-looking container semantics, like dict

    def __repr__(self) -> str:
        g = self.granularity
        g_repr = repr(g) if is_granularity(g) else f"mixed({len(set(self._gran.values()))})"
        method = self._provenance.get("method")
        extra = f", method={method!r}" if method is not None else ""
        return (
            f"SafetyMask(parameters={len(self._indices)}/{len(self._shapes)}, units={len(self)}, "
            f"numel={self.numel()}, density={self.density:.4g}, granularity={g_repr}{extra})"
        )

    # ---- dense conversions -----------------------------------------------------------------------------------------

    def to_dense(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The boolean mask of one parameter (``True`` at selected entries), of the parameter's shape.

        Memory: one bool tensor of the parameter's size.

        Raises:
            KeyError: if `name` is not in `shapes`.
        """
        self._check_known(name)
        shape, gran = self._shapes[name], self._gran[name]
        numel = math.prod(shape)
        if numel > MAX_PARAMETER_NUMEL:  # also keeps torch from overflowing an int64 size
            raise SafetyError(
                f"to_dense({name!r}): the parameter's shape {tuple(shape)} has {numel} entries, more than a dense mask "
                f"can hold ({MAX_PARAMETER_NUMEL}); the shape is wrong (check mask.shapes against the model)"
            )
        view = torch.zeros(gran.num_units(shape), gran.unit_numel(shape), dtype=torch.bool, device=device)
        idx = self._indices.get(name)
        if idx is not None:
            view[idx.to(device=view.device, dtype=torch.int64)] = True
        return gran.from_unit_view(view, shape)

    @classmethod
    def from_dense(
        cls,
        dense: Mapping[str, torch.Tensor],
        granularity: Granularity | Mapping[str, Granularity] = Weight(),  # noqa: B008 - frozen default
        fingerprints: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> SafetyMask:
        """Build a mask from boolean tensors ``{name: bool tensor of the parameter's shape}``.

        Every tensor becomes an eligible parameter (its shape goes into `shapes`). With a coarser granularity than
        `Weight()`, a unit is selected when all of its entries are ``True``; a partially selected unit is an error.

        Raises:
            TypeError: if a value is not a tensor.
            ValueError: if a tensor is not boolean, or a unit is only partially selected.

        Example:

        ```python
        >>> d = torch.zeros(4, 3, dtype=torch.bool); d[1] = True
        >>> SafetyMask.from_dense({"w": d}, granularity=Neuron(axis=0))["w"].tolist()
        [1]
        ```
        """
        if not isinstance(dense, Mapping):
            raise TypeError(f"from_dense expects a dict {{name: bool tensor}}, got {type(dense).__name__}")
        shapes = {}
        for name, t in dense.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"from_dense: dense[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.bool:
                raise ValueError(f"from_dense: dense[{name!r}] has dtype {t.dtype}; pass a bool tensor (t != 0)")
            shapes[name] = tuple(t.shape)
        # building the instance validates granularities against shapes first
        empty = cls({}, shapes, granularity, fingerprints, provenance)
        indices = {}
        for name, t in dense.items():
            gran = empty._gran[name]
            view = gran.unit_view(t.detach())
            full, some = view.all(dim=1), view.any(dim=1)
            partial = some & ~full
            if bool(partial.any()):
                unit = int(partial.nonzero()[0, 0])
                raise ValueError(
                    f"from_dense: unit {unit} of {name!r} is only partly selected, which {gran!r} cannot represent; "
                    "use granularity=Weight() or select whole units"
                )
            indices[name] = full.nonzero().reshape(-1).cpu().to(_index_dtype(shapes[name]))
        empty._indices = {n: t for n, t in indices.items() if t.numel()}
        return empty

    def to_weight(self) -> SafetyMask:
        """The same entries with `Weight()` granularity (flat indices) for every parameter.

        Memory: ``O(numel())`` int64 temporaries per parameter, never a dense tensor.
        """
        indices = {}
        for name, t in self._indices.items():
            shape = self._shapes[name]
            flat = self._gran[name].to_flat_indices(t, shape)
            indices[name] = flat.to(_index_dtype(shape))
        return SafetyMask._trusted(
            indices, self._shapes, dict.fromkeys(self._shapes, Weight()), self._fingerprints, self._provenance
        )

    def _flat(self, name: str) -> torch.Tensor:
        t = self._indices.get(name)
        if t is None:
            return torch.zeros(0, dtype=torch.int64)
        return self._gran[name].to_flat_indices(t, self._shapes[name])

    # ---- subsets ----------------------------------------------------------------------------------------------------

    def restrict(self, names: Iterable[str]) -> SafetyMask:
        """The mask over the given parameters only (their shapes, entries and fingerprints).

        Raises:
            ValueError: if a name is not in `shapes` (with close-name suggestions).
        """
        if isinstance(names, str):
            names = [names]
        keep = set()
        for name in names:
            if name not in self._shapes:
                raise ValueError(f"restrict: {name!r} is not a parameter of this mask.{_closest(name, self._shapes)}")
            keep.add(name)
        return self.filter(lambda n: n in keep)

    def filter(self, fn: Callable[[str], bool]) -> SafetyMask:
        """The mask over the parameters whose name satisfies ``fn(name)``.

        Example:

        ```python
        >>> mlp_only = mask.filter(lambda name: ".mlp." in name)
        ```
        """
        if not callable(fn):
            raise TypeError(f"filter expects a callable fn(name) -> bool, got {type(fn).__name__}")
        shapes = {n: s for n, s in self._shapes.items() if fn(n)}
        return SafetyMask._trusted(self._indices, shapes, self._gran, self._fingerprints, self._provenance)

    def with_fingerprints(
        self, fingerprints: Mapping[str, str], *, replace: bool = False, provenance: Mapping[str, Any] | None = None
    ) -> SafetyMask:
        """A copy of this mask whose fingerprints are updated from `fingerprints` (or replaced, with ``replace=True``).

        `score` uses it to record the weights a mask-returning scorer worked on; the trainer uses it to record the
        base weights a mask without fingerprints is applied to.

        Args:
            fingerprints: ``{name: fingerprint_tensor(weight)}`` for names in `shapes` (see `fingerprints_of`).
            replace: drop the existing fingerprints first.
            provenance: entries added to (or replacing those of) the provenance, e.g. which weights the new
                fingerprints describe.

        Raises:
            TypeError: if `fingerprints` is not a mapping of strings.
            ValueError: if a name is not in `shapes`.
        """
        if not isinstance(fingerprints, Mapping):
            raise TypeError(f"fingerprints must be a dict {{name: str}}, got {type(fingerprints).__name__}")
        fps = {} if replace else dict(self._fingerprints)
        for name, fp in fingerprints.items():
            if name not in self._shapes:
                raise ValueError(
                    f"fingerprints has parameter {name!r}, which is not in shapes.{_closest(name, self._shapes)}"
                )
            if not isinstance(fp, str):
                raise TypeError(f"fingerprints[{name!r}] must be a str from fingerprint_tensor(), got {fp!r}")
            fps[name] = fp
        prov = dict(self._provenance)
        if provenance is not None:
            if not isinstance(provenance, Mapping):
                raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
            prov.update(provenance)
        return SafetyMask._trusted(self._indices, self._shapes, self._gran, fps, prov)

    # ---- algebra ----------------------------------------------------------------------------------------------------

    def _merge_meta(self, other: SafetyMask, op: str):
        if not isinstance(other, SafetyMask):
            raise TypeError(f"SafetyMask {op} expects another SafetyMask, got {type(other).__name__}")
        shapes = dict(self._shapes)
        gran = dict(self._gran)
        for name, shape in other._shapes.items():
            if name in shapes:
                if shapes[name] != shape:
                    raise ValueError(
                        f"{name!r} has shape {shapes[name]} in one mask and {shape} in the other; masks of different "
                        "models cannot be combined"
                    )
                g_self, g_other = self._gran[name], other._gran[name]
                if g_self != g_other:
                    if name in self._indices and name in other._indices:
                        raise ValueError(
                            f"{name!r} has granularity {g_self!r} in one mask and {g_other!r} in the other; convert "
                            "both with .to_weight() first (a | b -> a.to_weight() | b.to_weight())"
                        )
                    # only one side has entries: its granularity describes the result
                    if name in other._indices:
                        gran[name] = g_other
            else:
                shapes[name] = shape
                gran[name] = other._gran[name]
        fps = dict(self._fingerprints)
        for name, fp in other._fingerprints.items():
            if name in fps and fps[name] != fp:
                raise ValueError(
                    f"{name!r} has different fingerprints in the two masks: they were computed on different weights. "
                    "Combine masks of the same model (or rebuild one with fingerprints=None if this is intended)"
                )
            fps[name] = fp
        prov: dict[str, Any] = {
            k: v for k, v in self._provenance.items() if k != "library_version" and other._provenance.get(k) == v
        }
        prov.update({"operation": op, "operands": [self._provenance, other._provenance]})
        return shapes, gran, fps, prov

    def _combine(self, other: SafetyMask, op: str) -> SafetyMask:
        shapes, gran, fps, prov = self._merge_meta(other, op)
        indices: dict[str, torch.Tensor] = {}
        for name in shapes:
            a, b = self._indices.get(name), other._indices.get(name)
            if op == "|":
                r = a if b is None else b if a is None else _union(a, b)
            elif op == "&":
                r = None if a is None or b is None else _intersect(a, b)
            else:
                r = a if a is None or b is None else _difference(a, b)
            if r is not None and r.numel():
                indices[name] = r.to(_index_dtype(shapes[name]))
        return SafetyMask._trusted(indices, shapes, gran, fps, prov)

    def __or__(self, other: SafetyMask) -> SafetyMask:
        """Union, per parameter. Shapes must agree; granularities must agree where both masks have entries."""
        return self._combine(other, "|")

    def __and__(self, other: SafetyMask) -> SafetyMask:
        """Intersection, per parameter."""
        return self._combine(other, "&")

    def __sub__(self, other: SafetyMask) -> SafetyMask:
        """Set difference (e.g. Wei et al.'s ``safety - utility``), per parameter."""
        return self._combine(other, "-")

    def overlap_counts(self, other: SafetyMask) -> dict[str, tuple[int, int]]:
        """``{name: (|A & B|, |A | B|)}`` in weight entries, for every parameter with entries in either mask.

        Parameters with the same granularity in both masks are compared on their unit indices; otherwise both are
        expanded to flat weight indices (``O(entries)`` of that parameter).

        Raises:
            TypeError: if `other` is not a `SafetyMask`.
            ValueError: if a parameter has different shapes in the two masks.
        """
        if not isinstance(other, SafetyMask):
            raise TypeError(f"expected a SafetyMask, got {type(other).__name__}")
        out: dict[str, tuple[int, int]] = {}
        names = list(self._indices) + [n for n in other._indices if n not in self._indices]
        for name in names:
            if name in self._shapes and name in other._shapes and self._shapes[name] != other._shapes[name]:
                raise SafetyError(
                    f"{name!r} has shape {self._shapes[name]} in one mask and {other._shapes[name]} in the other: the "
                    "masks belong to different models"
                )
            a, b = self._indices.get(name), other._indices.get(name)
            if a is None or b is None:
                side, t = (other, b) if a is None else (self, a)
                out[name] = (0, t.numel() * side._gran[name].unit_numel(side._shapes[name]))
                continue
            g, shape = self._gran[name], self._shapes[name]
            if g == other._gran[name]:
                inter = int(torch.isin(a, b, assume_unique=True).sum()) * g.unit_numel(shape)
                union = (a.numel() + b.numel()) * g.unit_numel(shape) - inter
            else:
                fa, fb = self._flat(name), other._flat(name)
                inter = int(torch.isin(fa, fb, assume_unique=True).sum())
                union = fa.numel() + fb.numel() - inter
            out[name] = (inter, union)
        return out

    def iou(self, other: SafetyMask, per_parameter: bool = False) -> float | dict[str, float]:
        """Intersection over union in weight entries.

        Args:
            other: the other mask.
            per_parameter: if `True`, return ``{name: IoU}`` for every parameter with entries in either mask;
                otherwise the global IoU, ``sum |A & B| / sum |A | B|`` over tensors.

        Returns:
            A float in ``[0, 1]`` (1.0 when both masks are empty), or a dict of them.
        """
        counts = self.overlap_counts(other)
        if per_parameter:
            return {n: (i / u if u else 1.0) for n, (i, u) in counts.items()}
        inter = sum(i for i, _ in counts.values())
        union = sum(u for _, u in counts.values())
        return inter / union if union else 1.0

    # ---- summary ----------------------------------------------------------------------------------------------------

    def summary(self) -> MaskSummary:
        """Counts and densities per decoder layer and per module type (a `MaskSummary`)."""
        total = _count()
        per_layer: dict[int, dict[str, Any]] = {}
        per_module: dict[str, dict[str, Any]] = {}
        outside = _count()
        grans: dict[str, int] = {}
        for name, shape in self._shapes.items():
            g = self._gran[name]
            t = self._indices.get(name)
            units = 0 if t is None else t.numel()
            numel = units * g.unit_numel(shape)
            size = math.prod(shape)
            layer = layer_index_of(name)
            buckets = [total, per_module.setdefault(module_type_of(name), _count())]
            buckets.append(outside if layer is None else per_layer.setdefault(layer, _count()))
            for c in buckets:
                c["parameters"] += 1
                c["units"] += units
                c["numel"] += numel
                c["total"] += size
            grans[repr(g)] = grans.get(repr(g), 0) + 1
        for c in [total, outside, *per_layer.values(), *per_module.values()]:
            _finish(c)
        return MaskSummary(
            total=total,
            per_layer=dict(sorted(per_layer.items())),
            per_module=per_module,
            outside_layers=outside,
            granularity=grans,
            provenance=self.provenance,
        )

    # ---- model checks -----------------------------------------------------------------------------------------------

    def validate(
        self, model_or_state_dict: Any, fingerprint_check: str = "error", *, fingerprint: str | None = None
    ) -> None:
        """Check that this mask fits a model: every parameter exists, shapes agree, fingerprints agree.

        Args:
            model_or_state_dict: anything with ``named_parameters()`` (a ``torch.nn.Module``) or a mapping
                ``{name: tensor}`` (a state dict).
            fingerprint_check: what to do when a recorded fingerprint differs from the model's weight: ``"error"``
                (raise), ``"warn"`` (one `UserWarning` listing the parameters) or ``"ignore"``.
            fingerprint: the former spelling of ``fingerprint_check``, accepted until every caller uses the new one.

        Raises:
            TypeError: if `model_or_state_dict` is neither a model nor a mapping.
            ValueError: for an unknown parameter name (with close-name suggestions), a shape mismatch, an index out
                of range for the model's shape, or (with ``fingerprint_check="error"``) a fingerprint mismatch.
        """
        if fingerprint is not None:
            fingerprint_check = fingerprint
        fingerprint = check_fingerprint_policy(fingerprint_check)
        if hasattr(model_or_state_dict, "named_parameters"):
            params = dict(model_or_state_dict.named_parameters())
        elif isinstance(model_or_state_dict, Mapping):
            params = dict(model_or_state_dict)
        else:
            raise TypeError(
                f"validate expects a model (with named_parameters()) or a state dict, got "
                f"{type(model_or_state_dict).__name__}"
            )
        problems: list[str] = []
        mismatched: list[str] = []
        for name, shape in self._shapes.items():
            if name not in params:
                problems.append(
                    f"parameter {name!r} is not in the model.{_closest(name, params)} (Was the mask computed on "
                    "another model, or on a wrapped one, e.g. a PeftModel with a 'base_model.model.' prefix?)"
                )
                continue
            p = params[name]
            actual = tuple(p.shape)
            if actual != shape:
                problems.append(
                    f"parameter {name!r} has shape {actual} in the model but {shape} in the mask; the mask belongs "
                    "to another model or configuration"
                )
                continue
            idx = self._indices.get(name)
            units = self._gran[name].num_units(actual)
            if idx is not None and int(idx[-1]) >= units:
                problems.append(f"parameter {name!r}: index {int(idx[-1])} out of range for {units} units")
            fp = self._fingerprints.get(name)
            checkable = fp is not None and fingerprint != "ignore" and p.device.type != "meta"
            if checkable and fingerprint_tensor(p) != fp:
                mismatched.append(name)
        if problems:
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise SafetyError(
                f"SafetyMask does not fit this model ({len(problems)} problem(s)):\n  "
                + "\n  ".join(problems[:10])
                + more
            )
        if mismatched:
            msg = (
                f"fingerprint mismatch for {len(mismatched)} parameter(s), e.g. {mismatched[:3]}: the model's weights "
                "differ from those the mask was computed on (another checkpoint, a fine-tuned copy, float16 or "
                "quantised weights). Use the base model the mask was made for, or pass fingerprint_check='warn'/'ignore' "
                "if this is intended"
            )
            if fingerprint == "error":
                raise SafetyError(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)

    # ---- files ------------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Any) -> str:
        """Write ``save_directory/safety_mask.safetensors`` atomically (format v1, see ``docs/mask_format.md``).

        Returns:
            The path of the written file.
        """
        return save_mask(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Any,
        revision: str | None = None,
        cache_dir: str | Any | None = None,
        token: str | bool | None = None,
        subfolder: str | None = None,
    ) -> SafetyMask:
        """Load a mask from a folder, a ``.safetensors`` file, or a Hub repository id.

        Args:
            path_or_repo_id: a local folder holding ``safety_mask.safetensors``, the file itself, or a Hub repo id
                (downloaded with ``huggingface_hub.hf_hub_download``).
            revision: Hub revision (branch, tag or commit).
            cache_dir: Hub cache folder.
            token: Hub token.
            subfolder: folder inside the folder / repository.

        Raises:
            FileNotFoundError: if a local folder has no mask file.
            ValueError: if the file is not a valid peft-safety mask (see ``docs/mask_format.md``).
        """
        path = resolve_mask_file(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token, subfolder=subfolder
        )
        return cls._from_file_parts(read_mask_file(path), path)

    @classmethod
    def _from_file_parts(cls, parts: dict[str, Any], where: str) -> SafetyMask:
        # the constructor's checks (sorted, unique, in range ...) name the file the bad values came from
        try:
            return cls(**parts)
        except (TypeError, ValueError) as err:
            raise SafetyFileError(f"{where}: invalid mask file: {err}") from None

    def to_bytes(self) -> bytes:
        """The bytes of this mask's ``safety_mask.safetensors`` file (format v1)."""
        return mask_to_bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> SafetyMask:
        """Parse the bytes of a ``safety_mask.safetensors`` file (every check of `from_pretrained` applies)."""
        return cls._from_file_parts(decode_mask(data, where=where), where)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload this mask and a model card to the Hub; see `peft_safety.mask.hub.push_mask_to_hub` for the arguments."""
        from .hub import push_mask_to_hub

        return push_mask_to_hub(self, repo_id, **kwargs)


def mask_from_bytes(data: bytes, where: str = "<bytes>") -> SafetyMask:
    """Parse the bytes of a ``safety_mask.safetensors`` file; see `SafetyMask.from_bytes`."""
    return SafetyMask.from_bytes(data, where=where)


def load_mask(path: str | Any) -> SafetyMask:
    """Read a local ``safety_mask.safetensors`` file, or the one inside a local folder (never the Hub); see
    `SafetyMask.from_pretrained`.

    Raises:
        TypeError: if `path` is not a string or path.
        FileNotFoundError: if there is no such file (or the folder has no mask file).
        ValueError: if the file is not a valid mask (see ``docs/mask_format.md``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_mask expects a file or folder path, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MASK_FILENAME)
        if not os.path.isfile(path):
            raise SafetyFileNotFoundError(
                f"No {MASK_FILENAME} in {os.path.dirname(path)!r}; save one with save_pretrained"
            )
    return SafetyMask._from_file_parts(read_mask_file(path), path)
