"""``Scores``: per-unit fp32 importance of a model's parameters, the input of :func:`peft_safety.select`.

A :class:`Scores` is an ordered, read-only mapping ``{parameter name: fp32 tensor}`` with, for every name, the unit
each score entry stands for (its granularity), the full shape of the parameter, and a provenance dict (method,
aggregation, sign convention, data hash, seed, base model). The order of the names matters: it is the first key of
:func:`~peft_safety.select`'s tie-break.

The library never writes scores to disk on its own: they are as large as the model (fp32). Users who want to keep
them call :meth:`Scores.to_safetensors` explicitly; :meth:`Scores.histogram` gives a compact diagnostic instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ..mask.granularity import Granularity, Weight, granularity_from_dict
from .units import GranularitySpec, expected_score_shape
from .units import granularity_map as _granularity_map

__all__ = ["Scores", "SelectionRule", "expected_score_shape"]

_FORMAT = "peft_safety.scoring.scores"
_FORMAT_VERSION = "1"
_CHECK_CHUNK = 1 << 22


def _to_fp32(name: str, value: Any) -> torch.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"score names must be str (parameter names), got {type(name).__name__} {name!r}.")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"scores[{name!r}] must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"scores[{name!r}] has dtype {value.dtype}; scores must be floating point (they become fp32).")
    if value.is_meta:
        from ..errors import SafetyError

        raise SafetyError(
            f"scores[{name!r}] is on the meta device and holds no values: score a model whose weights are loaded "
            "(not one built under init_empty_weights() or with device_map='meta')."
        )
    t = value.detach()
    if t.dtype != torch.float32:
        t = t.float()
    t = t.contiguous()
    # checked chunk by chunk so that the boolean temporaries stay small next to a large tensor
    flat = t.reshape(-1)
    finite = all(bool(torch.isfinite(flat[s : s + _CHECK_CHUNK]).all()) for s in range(0, flat.numel(), _CHECK_CHUNK))
    if not finite:
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(
            f"scores[{name!r}] has {n_nan} NaN and {n_inf} inf value(s) (after conversion to fp32); scores must be "
            "finite. Check the scorer's accumulators (fp32, no overflow) or replace them, e.g. torch.nan_to_num."
        )
    return t


def _check_fingerprints(fingerprints: Mapping[str, str] | None, names: Iterable[str]) -> dict[str, str]:
    if fingerprints is None:
        return {}
    if not isinstance(fingerprints, Mapping):
        raise TypeError(f"fingerprints must be a dict name -> str, got {type(fingerprints).__name__}.")
    known = set(names)
    out = {}
    for n, fp in fingerprints.items():
        if n not in known:
            raise ValueError(f"fingerprints has {n!r}, which is not scored; give fingerprints of scored names only.")
        if not isinstance(fp, str):
            raise TypeError(f"fingerprints[{n!r}] must be a str from fingerprint_tensor(), got {fp!r}.")
        out[n] = fp
    return out


def _check_shards(shards: Mapping[str, Any] | None, names: Iterable[str]) -> dict[str, Any]:
    if not shards:
        return {}
    from .distributed import Shard

    if not isinstance(shards, Mapping):
        raise TypeError(f"shards must be a dict name -> Shard, got {type(shards).__name__}.")
    known = set(names)
    out = {}
    for n, sh in shards.items():
        if n not in known:
            raise ValueError(f"shards has {n!r}, which is not scored.")
        if not isinstance(sh, Shard):
            raise TypeError(f"shards[{n!r}] must be a peft_safety.scoring.distributed.Shard, got {type(sh).__name__}.")
        out[n] = sh
    return out


class Scores(Mapping[str, torch.Tensor]):
    """Ordered fp32 scores per parameter, with granularity, parameter shapes and provenance.

    Args:
        scores: mapping ``name -> tensor``. Floating tensors are converted to contiguous fp32 (detached); the
            order of the mapping is kept.
        granularity: one :class:`Granularity` for every name or a mapping ``name -> Granularity``; default
            ``Weight()``. ``Weight()`` scores have the parameter's shape, ``Neuron(axis)`` and ``Head`` scores are
            1-D over the units, ``Layer()`` scores are 0-D.
        shapes: full shape of each parameter. Optional for ``Weight()`` scores (the score shape), required for
            the others.
        provenance: method, aggregation, sign convention, data hash, seed, base model, ... (copied).
        fingerprints: ``{name: peft_safety.mask.fingerprint_tensor(weight)}`` of the weights the scores were computed
            on (copied). `peft_safety.score` records them for every scored parameter; `select` copies them into the
            mask, so that ``mask.validate(model)`` rejects a model with other weights.
        rule: the scorer's own selection (`SelectionRule`), for scorers that select internally (safety neurons,
            safety layers): ``select(scores)`` without ``fraction`` or ``k`` applies it. It follows the scores through
            `to`, `restrict` and `filter` (applied to the remaining names) and is dropped by `map`, arithmetic and
            `with_granularity` (other values or units); `to_safetensors` does not save it.
        shards: for scores of a sharded model (FSDP2, DeepSpeed ZeRO-3), ``{name: Shard}``: the tensor of a name is
            then only this rank's part of the full score tensor, the box the `Shard` describes (``Weight()`` scores
            only). `select` on such scores is collective and exact over the ranks (`peft_safety.scoring.distributed`);
            `shapes` stay the full parameter shapes.

    Raises:
        TypeError: non-tensor or non-floating scores, bad granularity types.
        ValueError: NaN/inf scores (named, with counts), a score shape that does not fit the parameter shape and
            granularity, missing shapes.

    Example:
        >>> import torch
        >>> from peft_safety.mask import Neuron
        >>> s = Scores({"w": torch.rand(4, 3)}, provenance={"method": "magnitude"})
        >>> s.numel(), s.shapes["w"]
        (12, (4, 3))
        >>> n = Scores({"w": torch.rand(4)}, granularity=Neuron(0), shapes={"w": (4, 3)})
        >>> n.numel()
        4
    """

    def __init__(
        self,
        scores: Mapping[str, torch.Tensor],
        *,
        granularity: GranularitySpec = None,
        shapes: Mapping[str, Iterable[int]] | None = None,
        provenance: Mapping[str, Any] | None = None,
        fingerprints: Mapping[str, str] | None = None,
        rule: SelectionRule | None = None,
        shards: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(scores, Mapping):
            raise TypeError(f"scores must be a mapping name -> tensor, got {type(scores).__name__}.")
        self._shards = _check_shards(shards, scores)
        if provenance is not None and not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}.")
        self._tensors: dict[str, torch.Tensor] = {n: _to_fp32(n, v) for n, v in scores.items()}
        self._granularity = _granularity_map(self._tensors, granularity)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for n, t in self._tensors.items():
            g = self._granularity[n]
            shard = self._shards.get(n)
            if shard is not None:
                if not isinstance(g, Weight):
                    raise ValueError(f"sharded scores[{n!r}] must have Weight() granularity, got {g}.")
                if tuple(t.shape) != tuple(shard.shape):
                    raise ValueError(
                        f"scores[{n!r}] has shape {tuple(t.shape)} but its shard holds a box of shape {shard.shape}."
                    )
                shape = tuple(int(s) for s in shapes[n]) if shapes is not None and n in shapes else None
                if shape is None or math.prod(shape) != shard.full_numel:
                    raise ValueError(
                        f"shapes[{n!r}] must give the full parameter shape of sharded scores ({shard.full_numel} "
                        f"entries), got {shape}."
                    )
                self._shapes[n] = shape
                continue
            if shapes is not None and n in shapes:
                shape = tuple(int(s) for s in shapes[n])
            elif isinstance(g, Weight):
                shape = tuple(t.shape)
            else:
                raise ValueError(
                    f"shapes[{n!r}] is needed for {g} scores (the parameter's full shape), e.g. shapes={{{n!r}: "
                    "tuple(param.shape)}."
                )
            want = expected_score_shape(shape, g, n)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"scores[{n!r}] has shape {tuple(t.shape)} but a parameter of shape {shape} with {g} "
                    f"granularity needs scores of shape {want}."
                )
            self._shapes[n] = shape
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.fingerprints: dict[str, str] = _check_fingerprints(fingerprints, self._tensors)
        if rule is not None and not isinstance(rule, SelectionRule):
            raise TypeError(f"rule must be a SelectionRule, got {type(rule).__name__}.")
        self.rule: SelectionRule | None = rule

    # --- mapping -------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no scores for {name!r}; {len(self._tensors)} names are scored (see .names).") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    @property
    def names(self) -> tuple[str, ...]:
        """Scored parameter names, in order."""
        return tuple(self._tensors)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full parameter shape per name (a copy)."""
        return dict(self._shapes)

    @property
    def granularity(self) -> dict[str, Granularity]:
        """Granularity per name (a copy)."""
        return dict(self._granularity)

    def granularity_of(self, name: str) -> Granularity:
        """The granularity of one parameter's scores."""
        if name not in self._granularity:
            self[name]  # raises the helpful KeyError
        return self._granularity[name]

    def numel(self) -> int:
        """Total number of units (score entries) over every tensor (of the full tensors, for sharded scores)."""
        return sum(self._shards[n].full_numel if n in self._shards else t.numel() for n, t in self._tensors.items())

    # --- sharded scores ------------------------------------------------------------------------------------------
    @property
    def is_sharded(self) -> bool:
        """Whether the tensors are this rank's parts of scores spread over several ranks (see ``shards``)."""
        return bool(self._shards)

    @property
    def shards(self) -> dict[str, Any]:
        """``{name: Shard}`` of sharded scores (a copy; empty for ordinary scores)."""
        return dict(self._shards)

    def local_numel(self) -> int:
        """Score entries held in this process."""
        return sum(t.numel() for t in self._tensors.values())

    #: entries read at once by the selection engine
    selection_chunk = 1 << 20

    def selection_comm(self) -> Any:
        """The ranks the selection runs over: the process group for sharded scores, this process otherwise."""
        from .distributed import Comm

        return Comm() if self.is_sharded else Comm.local()

    def selection_pieces(self) -> dict[str, list[Any]]:
        """``{name: [Piece]}``: this rank's part of each tensor for the selection engine."""
        from .distributed import Piece

        return {n: [Piece.of_tensor(tid, t, self._shards.get(n))] for tid, (n, t) in enumerate(self._tensors.items())}

    def __eq__(self, other: object) -> bool:
        """Same names in the same order, same shapes, granularities, shards, provenance and bit-identical tensors."""
        if not isinstance(other, Scores):
            return NotImplemented
        return (
            self.names == other.names
            and self._shapes == other._shapes
            and self._shards == other._shards
            and self._granularity == other._granularity
            and self.provenance == other.provenance
            and all(torch.equal(self._tensors[n], other._tensors[n].to(self._tensors[n].device)) for n in self.names)
        )

    __hash__ = None  # mutable provenance; like dict

    def __repr__(self) -> str:
        grans = sorted({str(g) for g in self._granularity.values()})
        gran = grans[0] if len(grans) == 1 else "{" + ", ".join(grans) + "}"
        method = self.provenance.get("method")
        extra = f", method={method!r}" if method is not None else ""
        device = {str(t.device) for t in self._tensors.values()}
        dev = f", device={device.pop()}" if len(device) == 1 else ""
        return f"Scores({len(self)} tensors, {self.numel():,} units, granularity={gran}{extra}{dev})"

    # --- derived scores ------------------------------------------------------------------------------------------
    def _replace(
        self,
        tensors: Mapping[str, torch.Tensor],
        provenance: Mapping[str, Any] | None = None,
        fingerprints: Mapping[str, str] | None = None,
        keep_rule: bool = True,
    ) -> Scores:
        fps = self.fingerprints if fingerprints is None else fingerprints
        return Scores(
            tensors,
            granularity={n: self._granularity[n] for n in tensors},
            shapes={n: self._shapes[n] for n in tensors},
            provenance=self.provenance if provenance is None else provenance,
            fingerprints={n: fp for n, fp in fps.items() if n in tensors},
            rule=self.rule if keep_rule else None,
            shards={n: sh for n, sh in self._shards.items() if n in tensors},
        )

    def to(self, device: torch.device | str) -> Scores:
        """A copy on ``device`` (tensors already there are shared, not copied)."""
        return self._replace({n: t.to(device) for n, t in self._tensors.items()})

    def restrict(self, names: Iterable[str]) -> Scores:
        """Scores of the given names only, in the order of ``self``.

        Raises:
            KeyError: for a name that is not scored.
        """
        wanted = set(names)
        unknown = sorted(wanted - set(self._tensors))
        if unknown:
            raise KeyError(f"cannot restrict to unscored names {unknown[:5]}; scored names are in .names.")
        return self._replace({n: t for n, t in self._tensors.items() if n in wanted})

    def filter(self, fn: Callable[[str], bool]) -> Scores:
        """Scores of the names for which ``fn(name)`` is true (e.g. ``lambda n: "mlp" in n``)."""
        return self._replace({n: t for n, t in self._tensors.items() if fn(n)})

    def with_granularity(
        self, granularity: GranularitySpec, shapes: Mapping[str, Iterable[int]] | None = None
    ) -> Scores:
        """The same score tensors read with another granularity (validated against ``shapes`` or the current ones)."""
        return Scores(
            self._tensors,
            granularity=granularity,
            shapes=shapes or self._shapes,
            provenance=self.provenance,
            fingerprints=self.fingerprints,
            shards=self._shards,
        )

    def map(
        self, fn: Callable[..., torch.Tensor], *others: Scores, provenance: Mapping[str, Any] | None = None
    ) -> Scores:
        """Apply ``fn`` tensor by tensor: ``fn(self[name], other1[name], ...)`` for every name.

        Use it to transform or combine scores, e.g. ``safety.map(lambda s, u: s - 0.5 * u, utility)``. Every other
        :class:`Scores` must have the same names, shapes and granularity; ``fn`` must return a tensor of the same
        shape.

        Args:
            fn: the function applied to the tensors of one name.
            others: further :class:`Scores` to combine with.
            provenance: provenance of the result; default: ``self``'s plus ``"derived": True``.

        Raises:
            ValueError: mismatching names/shapes/granularity, or ``fn`` changing the shape.
        """
        for o in others:
            if not isinstance(o, Scores):
                raise TypeError(f"Scores.map combines Scores only, got {type(o).__name__}.")
            if o.names != self.names:
                diff = sorted(set(o.names) ^ set(self.names))[:5]
                raise ValueError(f"cannot combine scores over different names (differing: {diff}); use .restrict().")
            for n in self.names:
                if o._shards.get(n) != self._shards.get(n):
                    raise ValueError(
                        f"cannot combine scores for {n!r}: they hold different shards ({self._shards.get(n)} vs "
                        f"{o._shards.get(n)}); score both on the same sharded model."
                    )
                if o._shapes[n] != self._shapes[n] or o._granularity[n] != self._granularity[n]:
                    raise ValueError(
                        f"cannot combine scores for {n!r}: {self._shapes[n]} {self._granularity[n]} vs "
                        f"{o._shapes[n]} {o._granularity[n]}."
                    )
        out = {}
        for n, t in self._tensors.items():
            r = fn(t, *(o._tensors[n] for o in others))
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != tuple(t.shape):
                got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(
                    f"Scores.map: fn returned {got} for {n!r}, expected a tensor of shape {tuple(t.shape)}."
                )
            out[n] = r
        prov = {**self.provenance, "derived": True} if provenance is None else provenance
        # a fingerprint survives only where every operand was computed on the same weights
        fps = {n: fp for n, fp in self.fingerprints.items() if all(o.fingerprints.get(n) == fp for o in others)}
        return self._replace(out, prov, fps, keep_rule=False)

    def abs(self) -> Scores:
        """Element-wise absolute value."""
        return self.map(torch.abs)

    def __neg__(self) -> Scores:
        return self.map(torch.neg)

    def _binary(self, other: Any, op: Callable[[torch.Tensor, Any], torch.Tensor]) -> Scores:
        if isinstance(other, Scores):
            return self.map(op, other)
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return self.map(lambda t: op(t, other))
        return NotImplemented

    def __add__(self, other: Any) -> Scores:
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other: Any) -> Scores:
        return self._binary(other, torch.sub)

    def __mul__(self, other: Any) -> Scores:
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Scores:
        return self._binary(other, torch.div)

    # --- diagnostics ---------------------------------------------------------------------------------------------
    def histogram(
        self, bins: int = 64, *, range: tuple[float, float] | None = None, chunk: int = 1 << 20
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of every score, computed tensor by tensor (never concatenated).

        Args:
            bins: number of equal-width bins.
            range: ``(low, high)``; default: the global min and max. Scores outside are not counted.
            chunk: entries counted at once (counts stay exact in fp32 below 2**24 per chunk).

        Returns:
            ``(counts, edges)``: int64 counts of shape ``(bins,)`` and fp64 edges of shape ``(bins + 1,)``.

        For sharded scores the call is collective and the counts cover every rank's entries (replicas once).

        Raises:
            ValueError: ``bins < 1``, an empty ``Scores``, or ``low > high``.
        """
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins={bins!r} must be an int >= 1.")
        if self.numel() == 0:
            raise ValueError("cannot build a histogram of empty scores.")
        comm = self.selection_comm()
        counted = [
            t for n, t in self._tensors.items() if t.numel() and (n not in self._shards or self._shards[n].counted)
        ]
        if range is None:
            lo = comm.min_float(min((float(t.min()) for t in counted), default=math.inf))
            hi = comm.max_float(max((float(t.max()) for t in counted), default=-math.inf))
        else:
            lo, hi = float(range[0]), float(range[1])
            if lo > hi:
                raise ValueError(f"range={range!r} has low > high.")
        if lo == hi:  # every score equal: one bin of width one around the value, like numpy
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.zeros(bins, dtype=torch.int64)
        chunk = min(chunk, 1 << 24)
        for t in counted:
            flat = t.reshape(-1)
            for s in builtins_range(0, flat.numel(), chunk):
                counts += torch.histc(flat[s : s + chunk], bins=bins, min=lo, max=hi).round().long().cpu()
        comm.sum_(counts)
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        return counts, edges

    # --- explicit files ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *, max_file_bytes: int = 2**31) -> str:
        """Write the scores to a folder: fp32 safetensors files of whole tensors (at most ``max_file_bytes`` each,
        a larger tensor alone in its file) and ``scores_index.json`` (names, shapes, granularity, provenance,
        fingerprints), each file atomically, the index last.

        `ScoreFiles(save_directory)` selects from the folder without loading it (scores larger than RAM);
        `Scores.from_pretrained` loads it. For sharded scores the call is collective: every rank calls it, rank 0
        writes, receiving one tensor's parts at a time.

        Returns:
            The folder.
        """
        from .score_files import save_scores

        return save_scores(self, save_directory, max_file_bytes=max_file_bytes)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Scores:
        """Load scores written by :meth:`save_pretrained` (a folder) or :meth:`to_safetensors` (a file) into memory.

        Raises:
            FileNotFoundError: no such folder or file.
            ValueError: a malformed index or file (see `ScoreFiles`).
        """
        from .score_files import ScoreFiles

        with ScoreFiles(path) as files:
            return cls(
                {n: files.read(n) for n in files.names},
                granularity=files.granularity,
                shapes=files.shapes,
                provenance=files.provenance,
                fingerprints=files.fingerprints,
            )

    def to_safetensors(self, path: str | os.PathLike) -> None:
        """Write the scores **densely** to one safetensors file (as large as the parameters, fp32), atomically.

        The library never calls this; it is for users who want to re-select from the same scores later (``peft-safety
        select SCORES.safetensors``). Granularity, shapes and provenance go into the header metadata.
        """
        from safetensors.torch import save_file

        if self.is_sharded:
            raise ValueError(
                "to_safetensors writes whole tensors from one process, but these scores are sharded over ranks; use "
                "scores.save_pretrained(directory) (collective: every rank calls it), which writes one file per "
                "tensor group without gathering the scores."
            )
        path = os.fspath(path)
        meta = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "names": json.dumps(list(self.names)),
            "granularity": json.dumps({n: g.to_dict() for n, g in self._granularity.items()}),
            "shapes": json.dumps({n: list(s) for n, s in self._shapes.items()}),
            "provenance": json.dumps(self.provenance, default=str),
            "fingerprints": json.dumps(self.fingerprints),
        }
        from .._io import atomic_path

        with atomic_path(path) as tmp:
            save_file({n: t.cpu() for n, t in self._tensors.items()}, tmp, metadata=meta)

    @classmethod
    def from_safetensors(
        cls,
        path: str | os.PathLike,
        *,
        granularity: GranularitySpec = None,
        shapes: Mapping[str, Iterable[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> Scores:
        """Read scores written by :meth:`to_safetensors`, or any safetensors file of floating tensors.

        A file without our metadata is read as ``Weight()`` scores in the file's tensor order, unless
        ``granularity``/``shapes`` are given. Arguments given here override the file's metadata.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            ValueError: a newer ``format_version`` or invalid scores.
        """
        from safetensors import safe_open

        from .._files import check_safetensors_file

        path = os.fspath(path)
        if not os.path.lexists(path):
            from ..errors import SafetyFileNotFoundError

            raise SafetyFileNotFoundError(f"no scores file at {path!r}.")
        # empty, truncated, device or non-safetensors files are named here, not inside safetensors
        check_safetensors_file(path, "scores file", "write it again with Scores.to_safetensors(path)")
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            names = json.loads(meta["names"]) if "names" in meta else keys
            tensors = {n: f.get_tensor(n) for n in names}
        provenance: dict[str, Any] = {}
        fingerprints: dict[str, str] = {}
        if meta.get("format") == _FORMAT:
            version = meta.get("format_version", "1")
            if not re.fullmatch(r"[0-9]{1,9}", version):  # int() would read "1_0" as 10
                from ..errors import SafetyFileError

                raise SafetyFileError(f"{path!r}: scores format_version {version!r} is not a version number.")
            if int(version) > int(_FORMAT_VERSION):
                raise ValueError(
                    f"{path!r} has scores format_version {version}, newer than this library reads "
                    f"({_FORMAT_VERSION}); upgrade peft-safety."
                )
            if granularity is None and "granularity" in meta:
                granularity = {n: granularity_from_dict(d) for n, d in json.loads(meta["granularity"]).items()}
            if shapes is None and "shapes" in meta:
                shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
            provenance = json.loads(meta.get("provenance", "{}"))
            fingerprints = json.loads(meta.get("fingerprints", "{}"))
            if not isinstance(fingerprints, dict):
                raise ValueError(f"{path!r}: metadata 'fingerprints' must be a JSON object; the file is corrupted.")
            fingerprints = {n: fp for n, fp in fingerprints.items() if n in tensors}
        return cls(tensors, granularity=granularity, shapes=shapes, provenance=provenance, fingerprints=fingerprints)


builtins_range = range  # ``histogram`` takes a ``range=`` argument that shadows the builtin inside it


class SelectionRule:
    """How a scorer that selects internally turns its own `Scores` into a mask.

    Safety neurons keep the units in enough samples' top-k (`peft_safety.scoring.neuron.SupportRule`); safety layers
    keep the parameters of a located layer range (`peft_safety.scoring.layer.LayerRangeRule`). Their scorers return
    `Scores` carrying the rule, and ``select(scores)`` without ``fraction`` or ``k`` applies it, so ``score()`` always
    returns `Scores` and ``select()`` always makes the mask; ``select(scores, fraction=...)`` ranks the same scores
    like any others instead.

    Subclasses implement `indices` (and `describe` for provenance entries).
    """

    def indices(self, scores: Scores) -> dict[str, torch.Tensor]:
        """``{name: unit indices}`` selected from ``scores`` (names without a selected unit may be left out)."""
        raise NotImplementedError(f"{type(self).__name__} must implement indices(scores).")

    def describe(self) -> dict[str, Any]:
        """Provenance entries of the rule (JSON-serialisable)."""
        return {}

    def select(
        self,
        scores: Scores,
        *,
        scope: str = "global",
        exclude: Any = None,
        largest: bool = True,
        granularity: Any = None,
        provenance: Mapping[str, Any] | None = None,
    ):
        """The `SafetyMask` of the rule's units over every scored parameter, with the scores' fingerprints and
        provenance (plus ``selection_rule`` and `describe`). The arguments of `select` that only a ranking uses
        (``scope``, ``exclude``, ``largest``, ``granularity``) must keep their defaults.

        Raises:
            ValueError: one of those arguments was given.
        """
        from ..mask import SafetyMask

        given = [name for name, off in (("scope", scope == "global"), ("exclude", exclude is None),
                                        ("largest", largest is True), ("granularity", granularity is None)) if not off]  # fmt: skip
        if given:
            raise ValueError(
                f"These scores carry the {type(self).__name__} of their scorer, which selects by itself: "
                f"{given} apply only to a ranking. Pass fraction= or k= to rank the scores instead, or apply "
                "the rule and edit the mask (e.g. select(scores) - exclude)."
            )
        picked = self.indices(scores)
        unknown = sorted(set(picked) - set(scores.names))
        if unknown:
            raise ValueError(f"{type(self).__name__} selected unscored parameters {unknown[:3]}.")
        prov = {**scores.provenance, **self.describe(), "selection_rule": type(self).__name__}
        prov.update(provenance or {})
        return SafetyMask(
            {n: idx.cpu() for n, idx in picked.items() if idx.numel()},
            scores.shapes,
            scores.granularity,
            fingerprints=scores.fingerprints or None,
            provenance=prov,
        )
