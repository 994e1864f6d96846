"""Scores of models that do not fit one device: shards, exact cross-shard statistics, and exact distributed top-k.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, directly or through accelerate) a parameter is a ``DTensor``
whose rank-local part is a box of the full tensor (``Shard(0)``: a range of rows, the default). Under DeepSpeed
ZeRO-3 a parameter is an empty placeholder whose rank-local part, ``param.ds_tensor``, is a range of the flattened
tensor (``ds_numel`` entries split into ``ceil(ds_numel / world)``-sized partitions, the last one padded). A `Shard`
describes either layout: a box ``[offsets, offsets + shape)`` in a *grid* (the full shape for DTensor boxes,
``(numel,)`` for flat partitions), so that a local flat index maps to the tensor's global flat index in one rule.

Scoring keeps one fp32 accumulator per local shard; nothing full-size is all-reduced. `Scores` built from shards are
*sharded* (`Scores.shards`), and `select` on them runs the exact distributed selection of this module:

* ``global`` / ``per_tensor``: a radix search over the composite order key ``(score, tensor position, flat index)``:
  16-bit digits of the fp32 bit pattern (mapped to order-preserving int32 keys), then the tensor position, then the
  flat index, each level one histogram whose counts are all-reduced. A level that leaves few enough undecided
  entries moves them into memory, so a selection usually reads the scores twice: one histogram pass and one pass that
  keeps the sure winners and the undecided entries; the remaining levels run on those in memory. The k-th entry of
  the composite order is exact, so the result is the first ``k`` entries of a stable sort of the concatenated scores,
  the tie-break of single-process `select`, whatever the layout.
* ``per_row``: each row's top-k where a rank holds whole rows; rows a flat partition splits are completed from the
  fragments of the neighbouring ranks (at most two per rank and tensor).

The same engine selects from score files on disk (`peft_safety.scoring.score_files`), where a "rank" holds every
tensor and a pass is a read of the files.

Mask assembly: every rank sends its selected global flat indices of one tensor at a time to rank 0, which either
builds the `SafetyMask` or streams the indices straight into ``safety_mask.safetensors`` (`select_and_save`), so rank
0 never holds more than one tensor's indices.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Comm",
    "Shard",
    "exact_group_std",
    "is_sharded_model",
    "is_sharded_parameter",
    "local_values",
    "shard_of",
    "sharded_fingerprints",
    "write_mask_stream",
    "write_safetensors",
]

_BINS = 1 << 16
#: bytes written to a file at once (one tensor is streamed in pieces of this size)
_WRITE_CHUNK = 1 << 26
#: the one-process per-row kernel: ``(rows, k, largest=...) -> sorted flat indices``
RowTopK = Callable[..., torch.Tensor]


# =====================================================================================================================
# shards
# =====================================================================================================================
@dataclass(frozen=True)
class Shard:
    """The part of a full tensor that one rank holds.

    Attributes:
        grid: the index space the box lives in: the full shape for DTensor boxes, ``(numel,)`` for flat partitions
            (DeepSpeed ZeRO-3). Row-major flat indices are the same in both, so ``grid`` only says how to read
            ``offsets``.
        offsets: the box's first coordinate in ``grid``.
        shape: the box's extent (the local tensor holds ``prod(shape)`` entries, row-major).
        counted: ``False`` on a replica (HSDP's replicate groups hold the same box on several ranks): its entries are
            counted and selected on another rank only.
    """

    grid: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    counted: bool = True

    def __post_init__(self) -> None:
        if not (len(self.grid) == len(self.offsets) == len(self.shape)):
            raise ValueError(f"Shard grid {self.grid}, offsets {self.offsets} and shape {self.shape} differ in rank.")
        for g, o, s in zip(self.grid, self.offsets, self.shape):
            if o < 0 or s < 0 or (o + s > g and s > 0):
                raise ValueError(f"Shard box offsets {self.offsets} + shape {self.shape} leaves the grid {self.grid}.")

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Shard:
        """The shard of a tensor held entirely by this rank."""
        shape = tuple(int(s) for s in shape)
        return cls(grid=shape, offsets=(0,) * len(shape), shape=shape)

    @classmethod
    def flat(cls, numel: int, start: int, length: int) -> Shard:
        """A range ``[start, start + length)`` of the flattened tensor."""
        return cls(grid=(int(numel),), offsets=(int(start),), shape=(int(length),))

    @property
    def numel(self) -> int:
        """Entries this rank holds."""
        return math.prod(self.shape)

    @property
    def full_numel(self) -> int:
        """Entries of the full tensor."""
        return math.prod(self.grid)

    def flat_start(self) -> int | None:
        """The global flat index of the first local entry when the box is one contiguous range, else `None`."""
        if self.numel == 0:
            return 0
        nd = len(self.grid)
        i = 0
        while i < nd and self.shape[i] == 1:
            i += 1
        if all(self.shape[j] == self.grid[j] for j in range(i + 1, nd)):
            return self._ravel(self.offsets)
        return None

    def _ravel(self, coords: Sequence[int]) -> int:
        flat = 0
        for c, g in zip(coords, self.grid):
            flat = flat * g + c
        return flat

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        """Global flat indices (int64) of local flat indices (row-major in ``shape``). Increasing local indices map to
        increasing global indices (a box keeps the row-major order)."""
        local = local.to(torch.int64)
        start = self.flat_start()
        if start is not None:
            return local + start
        out = torch.zeros_like(local)
        rest = local.clone()
        stride = 1
        for g, o, s in reversed(list(zip(self.grid, self.offsets, self.shape))):
            coord = rest % s
            rest = rest.div_(s, rounding_mode="floor")
            out += (coord + o) * stride
            stride *= g
        return out

    def rows_whole(self) -> bool:
        """Whether every row (all dimensions but the last of the full tensor) the box touches lies in it whole."""
        if len(self.grid) == 1:  # a flat partition: rows of the full tensor need the full shape
            return False
        return self.shape[-1] == self.grid[-1]

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": list(self.grid),
            "offsets": list(self.offsets),
            "shape": list(self.shape),
            "counted": self.counted,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Shard:
        return cls(tuple(d["grid"]), tuple(d["offsets"]), tuple(d["shape"]), bool(d.get("counted", True)))


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _is_zero3(t: Any) -> bool:
    return hasattr(t, "ds_tensor") and hasattr(t, "ds_numel")


def is_sharded_parameter(param: Any) -> bool:
    """Whether ``param`` is a sharded FSDP2 ``DTensor`` or a DeepSpeed ZeRO-3 partitioned parameter."""
    return _is_dtensor(param) or _is_zero3(param)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (FSDP2 ``DTensor`` or DeepSpeed ZeRO-3)."""
    return any(is_sharded_parameter(p) for p in model.parameters())


def full_shape(param: Any) -> tuple[int, ...]:
    """The logical shape of a parameter (ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is global)."""
    ds = getattr(param, "ds_shape", None)
    return tuple(int(s) for s in (ds if ds is not None else param.shape))


def _zero3_layout(param: Any) -> tuple[int, int]:
    """(rank in the partition group, partition size) of a ZeRO-3 parameter, checked against the default group."""
    group = getattr(param, "ds_process_group", None)
    dist = torch.distributed
    world = dist.get_world_size(group=group) if group is not None else dist.get_world_size()
    if world != dist.get_world_size():
        raise ValueError(
            "DeepSpeed partitions this parameter over a subgroup of the processes (ZeRO++ hpZ / MiCS): each "
            "partition then exists on several ranks, which peft-safety's sharded scoring does not count. Score with "
            "plain ZeRO-3 (no zero_hpz_partition_size / mics_shard_size)."
        )
    rank = dist.get_rank(group=group) if group is not None else dist.get_rank()
    size = int(param.ds_tensor.numel())
    if size != -(-int(param.ds_numel) // world):
        raise ValueError(
            f"A DeepSpeed ZeRO-3 partition holds {size} entries of {int(param.ds_numel)} over {world} ranks, not the "
            "ceil(numel / world) this code assumes; the partition layout of this DeepSpeed version is not supported."
        )
    return rank, size


def shard_of(param: Any) -> Shard | None:
    """Where this rank's part of ``param`` sits in the full tensor, or `None` for an unsharded parameter.

    Raises:
        ValueError: DTensor placements other than ``Shard``/``Replicate`` (``Partial``, strided shards of FSDP2 + TP),
            whose local part is not one box; ZeRO-3 partitions over a subgroup (hpZ, MiCS).
    """
    if _is_zero3(param):
        numel = int(param.ds_numel)
        rank, size = _zero3_layout(param)
        start = min(rank * size, numel)
        return Shard.flat(numel, start, max(0, min(size, numel - start)))
    if not _is_dtensor(param):
        return None
    t = param.data if isinstance(param, nn.Parameter) else param
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    for p in placements:
        if type(p) not in (DShard, Replicate):
            raise ValueError(
                f"A DTensor parameter has placement {p!r}; sharded scoring reads Shard(d) and Replicate placements "
                "(FSDP2's default). Score before applying tensor parallelism, or with Shard placements only."
            )
    shape = tuple(int(s) for s in t.shape)
    local_shape, offsets = compute_local_shape_and_global_offset(shape, t.device_mesh, placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(
            f"The local part of a DTensor has shape {tuple(local.shape)}, but its placements {placements} give "
            f"{tuple(local_shape)}; its layout is not a box of the full tensor."
        )
    coordinate = t.device_mesh.get_coordinate() or []
    counted = all(c == 0 for p, c in zip(placements, coordinate) if isinstance(p, Replicate))
    return Shard(grid=shape, offsets=tuple(int(o) for o in offsets), shape=tuple(local_shape), counted=counted)


def local_values(param: Any, shard: Shard | None = None) -> torch.Tensor:
    """This rank's values of ``param`` (detached), shaped like its `Shard` (the whole tensor when unsharded)."""
    if _is_zero3(param):
        shard = shard or shard_of(param)
        return param.ds_tensor.detach().reshape(-1)[: shard.numel]
    t = param.data if isinstance(param, nn.Parameter) else param
    if _is_dtensor(t):
        return t.to_local().detach()
    return t.detach()


def reduce_scatter_flat(grad: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Sum a full-size gradient over the ranks and keep this rank's flat partition (DeepSpeed ZeRO-3's layout:
    partitions of ``ceil(numel / world)`` entries, the last one padded). Returns ``shard.numel`` fp32 entries."""
    dist = torch.distributed
    world = dist.get_world_size()
    numel = shard.full_numel
    size = -(-numel // world)
    comm = Comm()
    flat = torch.zeros(size * world, dtype=torch.float32, device=comm.device)
    flat[:numel].copy_(grad.detach().reshape(-1))
    out = torch.empty(size, dtype=torch.float32, device=comm.device)
    dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM)
    return out[: shard.numel].to(grad.device)


# =====================================================================================================================
# communication
# =====================================================================================================================
class Comm:
    """The collectives the sharded code needs, as no-ops in one process (``world == 1``).

    Tensors travel on the backend's device (CUDA for NCCL, CPU for gloo) and come back on the caller's device.
    """

    def __init__(self, world: int | None = None) -> None:
        dist = torch.distributed
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if active else 0
        self.world = dist.get_world_size() if active else 1
        if world is not None and world != self.world:
            raise ValueError(f"expected a process group of {world} ranks, found {self.world}.")
        self.device = torch.device("cpu")
        if active and "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())

    @classmethod
    def local(cls) -> Comm:
        """A one-process communicator even inside a process group (selection from files on one rank)."""
        c = cls.__new__(cls)
        c.rank, c.world, c.device = 0, 1, torch.device("cpu")
        return c

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns ``t``."""
        if self.world > 1:
            buf = t.to(self.device)
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf.to(t.device))
        return t

    def max_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        if self.world > 1:
            buf = t.to(self.device)
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
            t = buf.cpu()
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return self.max_int(int(bool(flag))) > 0

    def min_float(self, value: float) -> float:
        return -self.max_float(-value)

    def max_float(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        if self.world > 1:
            buf = t.to(self.device)
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
            t = buf.cpu()
        return float(t.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_to_root(self, t: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor] | None:
        """Rank 0 receives every rank's 1-D ``t`` (rank ``r`` sends ``counts[r]`` entries); other ranks get `None`.

        Point-to-point, one rank after the other, so rank 0 holds the pieces of one tensor only.
        """
        if self.world == 1:
            return [t]
        if self.rank == 0:
            parts = [t]
            for r in range(1, self.world):
                if counts[r]:
                    buf = torch.empty(counts[r], dtype=t.dtype, device=self.device)
                    torch.distributed.recv(buf, src=r)
                    parts.append(buf.to(t.device))
            return parts
        if counts[self.rank]:
            torch.distributed.send(t.to(self.device).contiguous(), dst=0)
        return None

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


# =====================================================================================================================
# exact statistics over shards
# =====================================================================================================================
def _group_slices(shard: Shard, group_numel: int) -> Iterator[tuple[int, slice]]:
    """``(group id, slice of the local flat values)`` for groups of ``group_numel`` consecutive global entries
    (a whole tensor, or one expert of a fused expert tensor), for boxes that are contiguous or split only inside
    a group-aligned leading dimension."""
    start = shard.flat_start()
    n = shard.numel
    if start is not None:
        pos = 0
        while pos < n:
            gid = (start + pos) // group_numel
            end = min(n, (gid + 1) * group_numel - start)
            yield gid, slice(pos, end)
            pos = end
        return
    # a non-contiguous box: the groups must be whole leading-dimension slices of it (experts of a (E, d, d) tensor
    # sharded along dim >= 1), so each leading index of the box is one group
    inner = math.prod(shard.grid[1:])
    if group_numel % inner and inner % group_numel:
        raise ValueError(f"groups of {group_numel} entries do not align with the box {shard}.")
    per_lead = math.prod(shard.shape[1:])
    for i in range(shard.shape[0]):
        lead = shard.offsets[0] + i
        if group_numel >= inner:
            yield (lead * inner) // group_numel, slice(i * per_lead, (i + 1) * per_lead)
        else:
            raise ValueError(f"groups of {group_numel} entries split the rows of the box {shard}; not supported.")


def exact_group_std(values: torch.Tensor, shard: Shard, group_numel: int, comm: Comm | None = None) -> torch.Tensor:
    """Unbiased standard deviation of every group of ``group_numel`` consecutive entries of the full tensor,
    from this rank's shard, exactly as if computed on the whole tensor: two passes in float64 (the mean from the
    all-reduced sums, then the all-reduced squared deviations from it), rounded to float32 once at the end.

    A group is the whole tensor (``group_numel = numel``) or one expert of a fused expert tensor.

    Returns:
        ``(num_groups,)`` float32; 0 for groups of fewer than 2 entries.
    """
    comm = comm or Comm()
    groups = max(1, shard.full_numel // max(group_numel, 1))
    flat = values.reshape(-1)

    def pieces() -> Iterator[tuple[int, torch.Tensor]]:  # float64 copies of at most 2**22 entries at a time
        if shard.counted:
            for gid, sl in _group_slices(shard, group_numel):
                for s in range(sl.start, sl.stop, 1 << 22):
                    yield gid, flat[s : min(s + (1 << 22), sl.stop)].double()

    sums = torch.zeros(groups, dtype=torch.float64)
    counts = torch.zeros(groups, dtype=torch.float64)
    for gid, part in pieces():
        sums[gid] += part.sum().item()
        counts[gid] += part.numel()
    comm.sum_(sums)
    comm.sum_(counts)
    mean = sums / counts.clamp_min(1)
    m2 = torch.zeros(groups, dtype=torch.float64)
    for gid, part in pieces():
        m2[gid] += (part - mean[gid]).pow(2).sum().item()
    comm.sum_(m2)
    std = torch.where(counts > 1, (m2 / (counts - 1).clamp_min(1)).sqrt(), torch.zeros_like(m2))
    return std.float()


def broadcast_groups(values: torch.Tensor, shard: Shard, group_numel: int, per_group: torch.Tensor) -> torch.Tensor:
    """``values * per_group[group of each entry]`` in place, for the groups of `exact_group_std`."""
    flat = values.reshape(-1)
    for gid, sl in _group_slices(shard, group_numel):
        flat[sl].mul_(per_group[gid].to(flat.device))
    return values


def sharded_fingerprints(
    params: Mapping[str, Any],
    shards: Mapping[str, Shard],
    shapes: Mapping[str, Sequence[int]],
    comm: Comm | None = None,
) -> dict:
    """`peft_safety.mask.fingerprint_tensor` of sharded weights, equal to the fingerprint of the full tensor: each rank
    reads the sampled positions (at most 4096 per tensor) it holds, one all-gather brings them together, and they are
    hashed as `fingerprint_tensor` hashes them (``tests/test_sharded_selection.py`` checks that the two agree)."""
    from ..mask.safety_mask import FINGERPRINT_SAMPLES

    comm = comm or Comm()
    positions: dict[str, torch.Tensor] = {}
    mine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, param in params.items():
        shard = shards[name]
        n = shard.full_numel
        if n > FINGERPRINT_SAMPLES:
            positions[name] = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64) * n // FINGERPRINT_SAMPLES
        else:
            positions[name] = torch.arange(n, dtype=torch.int64)
        if shard.counted and shard.numel:
            local = local_values(param, shard).reshape(-1)
            owned, where = _positions_in_shard(shard, positions[name])
            mine[name] = (owned, local[where.to(local.device)].cpu())
    gathered = comm.all_gather_object(mine)
    out = {}
    for name in params:
        sample: torch.Tensor | None = None
        for part in gathered:
            if name in part:
                owned, values = part[name]
                if sample is None:
                    sample = torch.zeros(positions[name].numel(), dtype=values.dtype)
                sample[owned] = values
        if sample is not None:
            out[name] = fingerprint_of_sample(sample, shapes[name])
    return out


def fingerprint_of_sample(sample: torch.Tensor, shape: Sequence[int]) -> str:
    """The fingerprint `peft_safety.mask.fingerprint_tensor` gives a tensor of ``shape`` whose values at its sampled
    positions are ``sample`` (in the weight's own dtype)."""
    import hashlib

    from ..mask.safety_mask import FINGERPRINT_SCHEME

    bits = sample.to(torch.bfloat16).view(torch.int16).tolist()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(int(s) for s in shape)).encode())
    h.update(struct.pack(f"<{len(bits)}h", *bits))
    return f"{FINGERPRINT_SCHEME}:{h.hexdigest()}"


def _positions_in_shard(shard: Shard, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(which of the global flat ``positions`` this shard holds, their local flat indices)."""
    nd = len(shard.grid)
    rest = positions.clone()
    coords = []
    for g in reversed(shard.grid):
        coords.append(rest % g)
        rest = rest // g
    coords.reverse()
    inside = torch.ones_like(positions, dtype=torch.bool)
    local = torch.zeros_like(positions)
    for d in range(nd):
        c = coords[d] - shard.offsets[d]
        inside &= (c >= 0) & (c < shard.shape[d])
        local = local * shard.shape[d] + c.clamp(0, max(shard.shape[d] - 1, 0))
    return inside.nonzero().reshape(-1), local[inside]


# =====================================================================================================================
# the selection engine: exact k-th entry of the composite order (score, tensor position, flat index)
# =====================================================================================================================
class Piece:
    """This rank's part of one score tensor, as the selection engine reads it.

    Args:
        tid: the tensor's position in the scores order (the second key of the tie-break).
        shard: where the part sits in the full tensor.
        read: ``read(start, count)`` -> fp32 1-D values of local flat entries ``[start, start + count)``.
        device: where the engine keeps this piece's index buffers.
    """

    def __init__(
        self,
        tid: int,
        shard: Shard,
        read: Callable[[int, int], torch.Tensor],
        device: Any = "cpu",
        chunks: Callable[[int], Iterator[tuple[int, torch.Tensor]]] | None = None,
    ):
        self.tid = tid
        self.shard = shard
        self.read = read
        self.device = torch.device(device)
        self._chunks = chunks
        self.sure: list[torch.Tensor] = []
        self.cand_idx: torch.Tensor | None = None
        self.cand_val: torch.Tensor | None = None

    @classmethod
    def of_tensor(cls, tid: int, tensor: torch.Tensor, shard: Shard | None = None) -> Piece:
        flat = tensor.reshape(-1)
        shard = shard or Shard.whole(tuple(tensor.shape))
        return cls(tid, shard, lambda s, n: flat[s : s + n], flat.device)

    @property
    def numel(self) -> int:
        return self.shard.numel if self.shard.counted else 0

    def chunks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(local start, values)`` of consecutive chunks (a file piece reads the next chunk ahead)."""
        if not self.numel:
            return iter(())
        if self._chunks is not None:
            return self._chunks(chunk)
        return ((s, self.read(s, min(chunk, self.numel - s))) for s in range(0, self.numel, chunk))

    def reset(self) -> None:
        self.sure, self.cand_idx, self.cand_val = [], None, None


def _oriented(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """fp32 values where larger is better, ``-0.0`` folded into ``+0.0`` (exact)."""
    return values + 0.0 if largest else 0.0 - values


def order_keys(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """Order-preserving int32 keys of fp32 scores: larger key = better score (``largest=False``: smaller score).

    Non-negative floats keep their bit pattern, negative ones flip every bit but the sign, so the signed int32 order
    is the float order; ``-0.0`` ties with ``+0.0``.
    """
    return _keys_of_oriented(_oriented(values, largest))


def _keys_of_oriented(v: torch.Tensor) -> torch.Tensor:
    bits = v.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_to_float(key: int) -> float:
    """The oriented fp32 value of a key (keys past +-inf, NaN bit patterns, clamp to +-inf)."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    value = float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())
    if math.isnan(value):
        return math.inf if key > 0 else -math.inf
    return value


def _raw_high_to_key() -> torch.Tensor:
    """Raw high 16 bits of an fp32 (offset by 32768) -> position of its key bucket: a permutation of 65536 bins."""
    high = torch.arange(-32768, 32768, dtype=torch.int64)
    return torch.where(high >= 0, high, high ^ 0x7FFF) + 32768


@dataclass
class _Cut:
    """The part of the composite order fixed so far: each level fixes one digit of the k-th entry's key."""

    high: int | None = None  # key >> 16 of the k-th entry
    key: int | None = None  # its full key
    tid: int | None = None  # its tensor position
    digits: list[tuple[int, int]] = field(default_factory=list)  # (shift, digit) of its global flat index
    finished: bool = False  # the last fixed level's bucket is taken whole

    def split(
        self, values: torch.Tensor, piece: Piece, where: Callable[[torch.Tensor], torch.Tensor], largest: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(selected for sure, undecided, undecided oriented values)`` among ``values``: the first two as local
        flat indices (``where(positions in values)``), the last as oriented fp32.

        ``values`` are raw scores (``largest`` says which end is better) or already oriented (``largest=True``).
        Float comparisons against the fixed bucket's bounds: one comparison pass over ``values`` plus work on the
        entries at or above the bucket only.
        """
        none = torch.empty(0, dtype=torch.int64, device=values.device)
        if self.high is None:
            pos = torch.arange(values.numel(), device=values.device)
            return none, where(pos), _oriented(values, largest)
        if self.key is None:
            low = _key_to_float(self.high << 16)
            high = _key_to_float((self.high << 16) | 0xFFFF)
        else:
            low = high = _key_to_float(self.key)
        pos = _nonzero(values >= low if largest else values <= -low)
        sub = _oriented(values[pos], largest)
        above = sub > high
        better, und, und_v = pos[above], pos[~above], sub[~above]
        if self.tid is not None and und.numel():
            if piece.tid < self.tid:
                better, und = torch.cat([better, und]), und[:0]
            elif piece.tid > self.tid:
                und = und[:0]
            elif self.digits:
                g = piece.shard.to_global(where(und))
                keep = torch.ones_like(und, dtype=torch.bool)
                for shift, digit in self.digits:
                    d = (g >> shift) & 0xFFFF
                    wins = keep & (d < digit)
                    better = torch.cat([better, und[wins]])
                    keep &= d == digit
                und = und[keep]
            und_v = _oriented(values[und], largest)
        if self.finished:
            better, und = torch.cat([better, und]), und[:0]
            und_v = und_v[:0]
        return where(better), where(und), und_v


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the true entries (int64); numpy's ``flatnonzero`` on CPU, several times faster than torch's."""
    if mask.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().reshape(-1)


def _count(hist: torch.Tensor, buckets: torch.Tensor) -> None:
    if buckets.numel() >= hist.numel() // 4:
        hist += torch.bincount(buckets, minlength=hist.numel()).to(hist.device)
    elif buckets.numel():
        hist.index_add_(
            0, buckets.to(hist.device, torch.int64), torch.ones(buckets.shape, dtype=hist.dtype, device=hist.device)
        )


def _pick(hist: torch.Tensor, need: int, larger_first: bool) -> tuple[int, int, int]:
    """(bucket holding the ``need``-th best entry, entries in better buckets, entries in the bucket)."""
    h = hist.cpu()
    if larger_first:
        at_or_above = h.flip(0).cumsum(0).flip(0)
        bucket = int((at_or_above >= need).sum()) - 1
        above = int(at_or_above[bucket] - h[bucket])
    else:
        at_or_below = h.cumsum(0)
        bucket = int((at_or_below < need).sum())
        above = int(at_or_below[bucket] - h[bucket])
    return bucket, above, int(h[bucket])


def _index_shifts(numel: int) -> list[int]:
    bits = max(1, (max(numel, 1) - 1).bit_length())
    return list(range(((bits - 1) // 16) * 16, -1, -16))


def select_pieces(
    pieces: Sequence[Piece],
    k: int,
    *,
    largest: bool,
    comm: Comm,
    tensor_numel: Mapping[int, int],
    n_tensors: int,
    chunk: int = 1 << 20,
    budget: int | None = None,
) -> dict[int, list[torch.Tensor]]:
    """The exact top-``k`` entries of every rank's ``pieces`` together, in the composite order (score, tensor
    position, global flat index): equal to the first ``k`` entries of a stable sort of the concatenated scores.

    Collective: every rank calls it with its own pieces (possibly none) and the same ``k``. In one process with the
    pieces in tensor order and ``budget`` unset, a one-read buffer is used when ``2k`` entries fit next to the largest
    piece (`_stream_select`); otherwise the radix levels of the module docstring.

    Args:
        pieces: this rank's pieces of the tensors in the group.
        k: entries to select over all ranks, ``1 <= k <=`` the group's total.
        largest: highest scores (``False``: lowest).
        comm: the ranks.
        tensor_numel: ``{tensor position: full numel}`` of the tensors in the group.
        n_tensors: number of tensor positions (bins of the tensor level).
        chunk: entries read at once.
        budget: the most undecided entries a rank keeps in memory (12 bytes each) to spare a read; default a third
            of the largest piece, at least 2**20.

    Returns:
        ``{tensor position: [sorted global flat indices (int64) of each of this rank's pieces]}``.
    """
    pieces = list(pieces)
    for p in pieces:
        p.reset()
    largest_piece = max((p.numel for p in pieces), default=0)
    # the one-read buffer when its peak (about 52 bytes per selected entry and 24 per chunk entry: buffer, prune
    # temporaries, read-ahead) stays within twice the largest piece's fp32 bytes
    if (
        budget is None
        and comm.world == 1
        and _streamable(pieces)
        and 13 * k + 6 * chunk <= 2 * max(largest_piece, 1 << 20)
    ):
        return _stream_select(pieces, k, largest, chunk)
    if budget is None:
        budget = max(1 << 20, largest_piece // 3)
    cut = _Cut()
    need = k
    in_memory = False
    level = 0  # 0: key high 16 bits, 1: key low 16 bits, 2: tensor position, 3+: global flat index digits
    shifts: list[int] = []

    def sources(p: Piece) -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], bool]]:
        """(values, positions -> local flat indices, raw orientation) of what is still undecided in ``p``: raw
        chunks read from the piece, or the kept undecided entries (already oriented)."""
        if in_memory:
            if p.cand_val is not None and p.cand_val.numel():
                yield p.cand_val, lambda sel, p=p: p.cand_idx[sel], True
            return
        for s, c in p.chunks(chunk):
            yield c, lambda sel, s=s: sel + s, largest

    def histogram(level: int) -> torch.Tensor:
        if level == 0:  # raw high 16 bits of the oriented values, permuted into key order once
            raw = torch.zeros(_BINS, dtype=torch.int64)
            for p in pieces:
                for c, _, orientation in sources(p):
                    bits = _oriented(c, orientation).view(torch.int32)
                    raw += torch.bincount((bits >> 16) + 32768, minlength=_BINS).cpu()
            hist = torch.zeros_like(raw)
            hist[_raw_high_to_key()] = raw
            return hist
        hist = torch.zeros(_BINS if level != 2 else max(n_tensors, 1), dtype=torch.int64)
        for p in pieces:
            if level >= 3 and p.tid != cut.tid:
                continue
            for c, where, orientation in sources(p):
                _, und, und_v = cut.split(c, p, where, orientation)
                if level == 1:
                    _count(hist, _keys_of_oriented(und_v) & 0xFFFF)
                elif level == 2:
                    hist[p.tid] += und.numel()
                else:
                    _count(hist, (p.shard.to_global(und) >> shifts[level - 3]) & 0xFFFF)
        return hist

    def collect() -> None:
        """Read every piece once: keep the sure winners and, unless finished, the undecided entries (local flat
        indices and oriented values)."""
        for p in pieces:
            idx_parts, val_parts = [], []
            for c, where, orientation in sources(p):
                better, und, und_v = cut.split(c, p, where, orientation)
                if better.numel():
                    p.sure.append(better)
                if und.numel():
                    idx_parts.append(und)
                    val_parts.append(und_v)
            p.cand_idx = torch.cat(idx_parts) if idx_parts else None
            p.cand_val = torch.cat(val_parts) if val_parts else None

    while True:
        hist_local = histogram(level)
        hist = comm.sum_(hist_local.clone())
        bucket, above, inside = _pick(hist, need, larger_first=level < 2)
        if level == 0:
            cut.high = bucket - 32768
        elif level == 1:
            cut.key = (cut.high << 16) | bucket
        elif level == 2:
            cut.tid = bucket
            shifts = _index_shifts(tensor_numel[bucket])
        else:
            cut.digits.append((shifts[level - 3], bucket))
        need -= above
        if need == inside:
            cut.finished = True
            break
        if level >= 3 and level - 3 == len(shifts) - 1:  # pragma: no cover - the composite key is unique
            raise RuntimeError("selection did not converge: two entries share tensor position and flat index")
        if not in_memory and comm.max_int(int(hist_local[bucket])) <= budget:
            collect()
            in_memory = True
        level += 1

    if not in_memory:
        collect()  # finished: every entry is decided in this read
    result: dict[int, list[torch.Tensor]] = {}
    for p in pieces:
        parts = list(p.sure)
        if p.cand_val is not None and p.cand_val.numel():
            better, _, _ = cut.split(p.cand_val, p, lambda sel, p=p: p.cand_idx[sel])
            parts.append(better)
        local = torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.int64, device=p.device)
        result.setdefault(p.tid, []).append(p.shard.to_global(local))
        p.reset()
    return result


def _streamable(pieces: Sequence[Piece]) -> bool:
    """One process, one piece per tensor, in tensor order: reading order is the tie-break order."""
    tids = [p.tid for p in pieces]
    return tids == sorted(set(tids))


def _stream_select(pieces: Sequence[Piece], k: int, largest: bool, chunk: int) -> dict[int, list[torch.Tensor]]:
    """The top-``k`` in one read, for one process: a buffer of ``2k + chunk`` entries keeps the best entries seen so
    far; when it is full, it keeps the best ``k`` (the k-th value by ``kthvalue``, every entry above it, and the
    earliest entries equal to it: entries arrive in the tie-break order), and the k-th value becomes the bar a later
    entry must beat strictly (an equal later entry loses the tie to every kept one). Linear time per prune; memory
    12 bytes per buffer entry (fp32 value, int64 position over all pieces) plus a prune's temporaries."""
    capacity = 2 * k + chunk
    device = pieces[0].device if pieces else torch.device("cpu")
    buf_v = torch.empty(capacity, dtype=torch.float32, device=device)
    buf_i = torch.empty(capacity, dtype=torch.int64, device=device)
    starts = [0]
    for p in pieces:
        starts.append(starts[-1] + p.numel)
    size = 0
    bar: float | None = None

    def prune(keep: int) -> None:
        nonlocal size, bar
        v = buf_v[:size]
        if size > keep:
            kth = float(torch.kthvalue(v, size - keep + 1).values)  # the keep-th largest
            above = _nonzero(v > kth)
            ties = _nonzero(v == kth)[: keep - above.numel()]  # the earliest of the equal entries
            best = torch.cat([above, ties]).sort().values
            kept_v, kept_i = v[best], buf_i[:size][best]
            size = best.numel()
            buf_v[:size], buf_i[:size] = kept_v, kept_i
        if size == keep:
            bar = float(buf_v[:size].min())

    for j, p in enumerate(pieces):
        for s, c in p.chunks(chunk):
            if bar is not None:  # compared raw (-0.0 == +0.0 as floats), oriented only when kept
                pos = _nonzero(c > bar if largest else c < -bar)
                v = _oriented(c[pos], largest)
            else:
                v = _oriented(c, largest)
                pos = torch.arange(v.numel(), device=v.device)
            n = pos.numel()
            if not n:
                continue
            if size + n > capacity:
                prune(k)
            buf_v[size : size + n] = v
            buf_i[size : size + n] = pos.to(device) + (starts[j] + s)
            size += n
    if size:
        prune(k)
    kept = buf_i[:size].sort().values
    result: dict[int, list[torch.Tensor]] = {}
    bounds = torch.searchsorted(kept, torch.tensor(starts, dtype=torch.int64, device=kept.device)).tolist()
    for j, p in enumerate(pieces):
        local = kept[bounds[j] : bounds[j + 1]] - starts[j]
        result.setdefault(p.tid, []).append(p.shard.to_global(local))
    return result


# ---------------------------------------------------------------------------------------------------------- per row
def _rows_of_flat_piece(
    p: Piece, width: int, k: int, largest: bool, chunk: int, comm: Comm, tensor: str, topk_indices_per_row: RowTopK
):
    """Per-row top-k of a flat partition: whole rows here, split rows completed from the other ranks' fragments."""
    start = p.shard.offsets[0] if p.numel else 0
    n = p.numel
    parts: list[torch.Tensor] = []
    fragments: list[tuple[int, int, torch.Tensor]] = []
    if n:
        end = start + n
        head_row, tail_row = start // width, (end - 1) // width
        if head_row == tail_row and (start % width or end % width):  # a part of one row only
            fragments.append((head_row, start % width, p.read(0, n).cpu()))
        else:
            first_full = -(-start // width) * width
            last_full = (end // width) * width
            if start % width:
                fragments.append((head_row, start % width, p.read(0, first_full - start).cpu()))
            rows_total = (last_full - first_full) // width
            block = max(1, chunk // width)
            for r0 in range(0, rows_total, block):
                nr = min(block, rows_total - r0)
                vals = p.read(first_full - start + r0 * width, nr * width).reshape(nr, width)
                local = topk_indices_per_row(vals, k, largest=largest).to(torch.int64)
                parts.append(local + first_full + r0 * width)
            if end % width:
                fragments.append((tail_row, 0, p.read(last_full - start, end - last_full).cpu()))
    gathered = comm.all_gather_object(fragments)
    rows: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for rank, frs in enumerate(gathered):
        for row, col, vals in frs:
            rows.setdefault(row, []).append((col, rank, vals))
    for row, frs in sorted(rows.items()):
        frs.sort(key=lambda f: f[0])
        if min(f[1] for f in frs) != comm.rank:
            continue  # the lowest rank holding a fragment of the row selects it
        cols = [f[0] for f in frs]
        full = torch.cat([f[2] for f in frs])
        if full.numel() != width or cols[0] != 0:
            raise RuntimeError(f"{tensor!r}: the fragments of row {row} cover {full.numel()} of {width} columns.")
        local = topk_indices_per_row(full.reshape(1, width).float(), k, largest=largest).to(torch.int64)
        parts.append(local + row * width)
    return torch.cat(parts).sort().values if parts else torch.empty(0, dtype=torch.int64)


def select_rows(
    pieces: Sequence[Piece],
    shape: Sequence[int],
    k: int,
    *,
    largest: bool,
    comm: Comm,
    tensor: str,
    chunk: int,
    topk_indices_per_row: RowTopK,
) -> list[torch.Tensor]:
    """Per-row top-``k`` (rows = all dimensions but the last) of one tensor, from this rank's pieces: sorted global
    flat indices (int64) per piece. Collective for flat partitions (their split rows travel between ranks).

    ``topk_indices_per_row(block, k, largest=...)`` is the one-process kernel (`selection.topk_indices_per_row`),
    applied to blocks of whole rows."""
    width = int(shape[-1])
    out = []
    flat_layout = any(len(p.shard.grid) == 1 for p in pieces)
    if comm.any(flat_layout):
        if len(pieces) > 1:
            raise ValueError(f"{tensor!r}: per-row selection reads one flat partition per rank, got {len(pieces)}.")
        p = pieces[0] if pieces else Piece(0, Shard.flat(math.prod(shape), 0, 0), lambda s, n: torch.empty(0))
        return [_rows_of_flat_piece(p, width, k, largest, chunk, comm, tensor, topk_indices_per_row)]
    for p in pieces:
        if not p.numel:
            out.append(torch.empty(0, dtype=torch.int64))
            continue
        if not p.shard.rows_whole():
            raise ValueError(
                f"scope='per_row' needs whole rows on each rank, but {tensor!r} is split along its last dimension "
                f"(this rank holds {p.shard.shape} of {p.shard.grid}). Shard it along dim 0 (FSDP2's default "
                "Shard(0)), or use scope='per_tensor' / 'global'."
            )
        w_local = p.shard.shape[-1]
        rows = p.numel // w_local
        block = max(1, chunk // w_local)
        parts = []
        for r0 in range(0, rows, block):
            nr = min(block, rows - r0)
            vals = p.read(r0 * w_local, nr * w_local).reshape(nr, w_local)
            parts.append(topk_indices_per_row(vals, k, largest=largest).to(torch.int64) + r0 * w_local)
        local = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        out.append(p.shard.to_global(local))
    return out


# =====================================================================================================================
# mask assembly on rank 0
# =====================================================================================================================
def mask_index_dtype(shape: Sequence[int]) -> torch.dtype:
    """The index dtype a `SafetyMask` stores for a parameter of ``shape`` (int64 from 2**31 entries on)."""
    return torch.int64 if math.prod(shape) >= 2**31 else torch.int32


def file_order(counts: Mapping[str, tuple[torch.dtype, int]]) -> list[str]:
    """The order safetensors lays tensors out in: larger dtypes first, then by name (empty tensors left out: a
    `SafetyMask` stores none)."""
    return sorted((n for n, (_, c) in counts.items() if c), key=lambda n: (-counts[n][0].itemsize, n))


def assemble(
    names: Sequence[str],
    local: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    comm: Comm,
) -> tuple[dict[str, tuple[torch.dtype, int]], Callable[[Sequence[str]], Iterator[tuple[str, torch.Tensor | None]]]]:
    """The global count of selected units per name, and an iterator that brings one name's indices to rank 0.

    Args:
        names: every scored name (the same list on every rank).
        local: this rank's selected global flat indices per name (sorted, int64; missing = none).
        shapes: full shapes.
        comm: the ranks.

    Returns:
        ``(counts, stream)``: ``counts[name] = (mask index dtype, total count)`` on every rank; ``stream(order)``
        yields ``(name, sorted index tensor on rank 0, None elsewhere)`` for the names of ``order`` (collective: every
        rank iterates the same order).
    """
    mine = torch.zeros(comm.world, len(names), dtype=torch.int64)
    for j, n in enumerate(names):
        if n in local:
            mine[comm.rank, j] = int(local[n].numel())
    per_rank = comm.sum_(mine)
    position = {n: j for j, n in enumerate(names)}
    counts = {n: (mask_index_dtype(shapes[n]), int(per_rank[:, j].sum())) for j, n in enumerate(names)}

    def stream(order: Sequence[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
        for n in order:
            j = position[n]
            mine_n = local.get(n, torch.empty(0, dtype=torch.int64)).to(torch.int64)
            parts = comm.gather_to_root(mine_n, per_rank[:, j].tolist())
            if parts is None:
                yield n, None
                continue
            idx = torch.cat([p.cpu() for p in parts]) if len(parts) > 1 else parts[0].cpu()
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                idx = idx.sort().values  # boxes that interleave in flat order (Shard(d > 0))
            yield n, idx.to(counts[n][0])

    return counts, stream


def _mask_metadata(shapes, granularity, fingerprints, provenance) -> dict[str, str]:
    """The ``__metadata__`` of the mask file `SafetyMask.save_pretrained` writes for these fields (taken from the
    library's own writer, on a mask without indices: the metadata does not depend on them)."""
    from ..mask import SafetyMask
    from ..mask.serialization import mask_to_bytes

    empty = SafetyMask(
        indices={}, shapes=shapes, granularity=granularity, fingerprints=fingerprints, provenance=provenance
    )
    blob = mask_to_bytes(empty)
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n])["__metadata__"]


def write_safetensors(
    path: str | os.PathLike,
    entries: Sequence[tuple[str, str, Sequence[int]]],
    metadata: Mapping[str, str],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    fsync: bool = True,
) -> str:
    """Write a safetensors file whose tensors arrive one at a time, atomically.

    Args:
        path: the file.
        entries: ``(name, dtype code, shape)`` in the order the data is laid out (``"F32"``, ``"I32"``, ``"I64"``).
        metadata: the ``__metadata__`` strings (written with sorted keys, as the safetensors library writes them).
        tensors: ``(name, tensor)`` in the order of ``entries``; each is checked against its entry.

    The header is ``{"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}`` in compact JSON padded
    with spaces to a multiple of 8 bytes, the layout of the safetensors library.
    """
    from .._io import atomic_path

    itemsize = {"F32": 4, "I32": 4, "I64": 8}
    dtypes = {"F32": torch.float32, "I32": torch.int32, "I64": torch.int64}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, code, shape in entries:
        size = math.prod(shape) * itemsize[code]
        header[name] = {"dtype": code, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        expected = iter(entries)
        for name, t in tensors:
            entry = next(expected, None)
            if entry is None or entry[0] != name:
                raise RuntimeError(f"{path}: tensor {name!r} arrived out of order (expected {entry and entry[0]!r}).")
            _, code, shape = entry
            if t.dtype != dtypes[code] or t.numel() != math.prod(shape):
                raise RuntimeError(f"{path}: tensor {name!r} is {t.dtype} x {t.numel()}, declared {code} {shape}.")
            flat = t.detach().reshape(-1).contiguous().cpu()
            step = max(1, _WRITE_CHUNK // flat.element_size())
            for s in range(0, flat.numel(), step):
                fh.write(memoryview(flat[s : s + step].numpy()).cast("B"))
        if next(expected, None) is not None:
            raise RuntimeError(f"{path}: fewer tensors arrived than the header declares.")
    return os.fspath(path)


def write_mask_stream(
    save_directory: str | os.PathLike,
    *,
    shapes: Mapping[str, Sequence[int]],
    granularity: Any,
    fingerprints: Mapping[str, str],
    provenance: Mapping[str, Any],
    counts: Mapping[str, tuple[torch.dtype, int]],
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> str:
    """Write ``save_directory/safety_mask.safetensors`` from index tensors that arrive one at a time, in
    `file_order`, with the header entries and data bytes `SafetyMask.save_pretrained` writes for the same mask (the
    metadata keys sorted: the safetensors library writes them in hash order); atomically.

    Memory: one tensor's indices at a time. The header (shapes, granularity, fingerprints, provenance and every
    tensor's byte range) is written first from ``counts``; each arriving tensor is checked against its declared count
    and dtype, and against the mask rules (1-D, sorted, unique, in range).
    """
    from ..mask.serialization import MASK_FILENAME

    directory = os.fspath(save_directory)
    if os.path.isfile(directory) or directory.endswith(".safetensors"):
        raise ValueError(f"save_directory must be a folder, got {directory!r}; the file is always {MASK_FILENAME}.")
    meta = _mask_metadata(shapes, granularity, fingerprints, provenance)
    order = file_order(counts)
    entries = [(n, "I64" if counts[n][0] == torch.int64 else "I32", (counts[n][1],)) for n in order]

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for n, idx in tensors:
            numel = math.prod(shapes[n])
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
                raise RuntimeError(f"{n!r}: assembled indices leave [0, {numel}).")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise RuntimeError(f"{n!r}: assembled indices are not sorted and unique.")
            yield n, idx

    os.makedirs(directory, exist_ok=True)
    return write_safetensors(os.path.join(directory, MASK_FILENAME), entries, meta, checked())


def check_sharded_support(model: nn.Module, method: str, fn: Any) -> None:
    """Refuse a scorer on a sharded model unless it declares ``fn.supports_sharding = True``.

    Built-ins that do: ``snip`` (both aggregations), ``esi`` and ``wanda`` (see their modules for how each stays
    exact). The others (baselines, safety neurons, safety layers) read or edit whole weights and would silently see
    one shard; a scorer of your own declares support by setting the attribute once it handles `Shard` layouts.
    """
    if getattr(fn, "supports_sharding", False) or not is_sharded_model(model):
        return
    raise ValueError(
        f"score(..., {method!r}) cannot score a sharded model (FSDP2 DTensor or DeepSpeed ZeRO-3 parameters): it "
        "reads whole weights, and each rank holds a shard. Sharded scoring supports 'snip', 'esi' and 'wanda'; for "
        f"{method!r}, score an unsharded copy (e.g. on CPU, or with device_map='auto' across GPUs)."
    )
