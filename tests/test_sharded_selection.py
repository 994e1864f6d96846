"""The sharded bookkeeping against explicit references, with ranks as threads (tests/_thread_ranks.py).

* `Shard` index maps against slicing the full tensor;
* exact cross-shard std against ``torch.std`` in float64, and sharded fingerprints against `fingerprint_tensor`;
* the distributed selection (global / per_tensor / per_row, largest and smallest, exclude) on random tie-heavy tensors
  in random layouts (FSDP2 row and column boxes, uneven; ZeRO-3 flat partitions that split rows; HSDP replicas) against
  a stable sort of the concatenated full tensors;
* the streamed mask file against the in-memory mask's file.
"""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
import torch
from _thread_ranks import run_ranks

from peft_safety.mask import SafetyMask, fingerprint_tensor
from peft_safety.scoring import distributed as D
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import select, select_and_save


# ---------------------------------------------------------------------------------------------------------- layouts
def rows(shape, world):
    """FSDP2 Shard(0): ``torch.chunk`` of dim 0 (ceil-sized, trailing ranks may get fewer or none)."""
    size = -(-shape[0] // world)
    out = []
    for r in range(world):
        lo, hi = min(r * size, shape[0]), min((r + 1) * size, shape[0])
        out.append(D.Shard(tuple(shape), (lo,) + (0,) * (len(shape) - 1), (hi - lo, *shape[1:])))
    return out


def cols(shape, world):
    """FSDP2 Shard(1) (even: FSDP2 requires it for dim > 0)."""
    size = shape[1] // world
    return [
        D.Shard(tuple(shape), (0, r * size) + (0,) * (len(shape) - 2), (shape[0], size, *shape[2:]))
        for r in range(world)
    ]


def flat(shape, world):
    """DeepSpeed ZeRO-3: partitions of ceil(numel / world) entries of the flattened tensor."""
    n = math.prod(shape)
    size = -(-n // world)
    return [D.Shard.flat(n, min(r * size, n), max(0, min(size, n - r * size))) for r in range(world)]


def replicated(shape, world):
    """HSDP: ``world / 2`` row shards, replicated twice; the second replica's boxes are not counted."""
    half = rows(shape, world // 2)
    return half + [D.Shard(b.grid, b.offsets, b.shape, counted=False) for b in half]


LAYOUTS = {"rows": rows, "cols": cols, "flat": flat, "replicated": replicated}


def box_of(full: torch.Tensor, shard: D.Shard) -> torch.Tensor:
    """The shard's values by slicing (independent of `Shard.to_global`)."""
    if len(shard.grid) == 1 and full.dim() != 1:
        start = shard.offsets[0]
        return full.reshape(-1)[start : start + shard.shape[0]].clone()
    return full[tuple(slice(o, o + s) for o, s in zip(shard.offsets, shard.shape))].clone()


def test_shard_to_global_matches_slicing():
    gen = random.Random(0)
    for _ in range(200):
        shape = tuple(gen.randint(1, 6) for _ in range(gen.randint(1, 3)))
        offsets = tuple(gen.randint(0, d - 1) for d in shape)
        extent = tuple(gen.randint(1, d - o) for d, o in zip(shape, offsets))
        box = D.Shard(shape, offsets, extent)
        ids = torch.arange(math.prod(shape)).reshape(shape)
        want = ids[tuple(slice(o, o + s) for o, s in zip(offsets, extent))].reshape(-1)
        got = box.to_global(torch.arange(box.numel))
        assert torch.equal(got, want), (shape, offsets, extent)
        contiguous = bool((want[1:] - want[:-1] == 1).all()) if want.numel() > 1 else True
        assert (box.flat_start() is not None) == contiguous
    part = D.Shard.flat(10, 4, 3)
    assert part.to_global(torch.tensor([0, 2])).tolist() == [4, 6] and part.flat_start() == 4
    with pytest.raises(ValueError, match="leaves the grid"):
        D.Shard((4, 4), (3, 0), (2, 4))


def test_order_keys_are_order_preserving():
    v = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    for largest in (True, False):
        keys = D.order_keys(v, largest).tolist()
        ordered = keys if largest else keys[::-1]
        assert ordered == sorted(ordered)
        assert keys[3] == keys[4]  # -0.0 ties with +0.0


@pytest.mark.parametrize("layout", ["rows", "cols", "flat", "replicated"])
@pytest.mark.parametrize("experts", [False, True])
def test_exact_group_std_matches_full_tensor(layout, experts):
    g = torch.Generator().manual_seed(1)
    shape = (4, 6, 10) if experts else (14, 10)
    full = torch.randn(shape, generator=g) * 3 + 1
    world = 4 if layout == "replicated" else 3 if layout != "cols" else 2
    boxes = LAYOUTS[layout](shape, world)
    group = math.prod(shape[1:]) if experts else math.prod(shape)

    def rank(comm):
        box = boxes[comm.rank]
        return D.exact_group_std(box_of(full, box), box, group, comm)

    got = run_ranks(world, rank)
    grouped = full.double().reshape(-1, group)
    want = grouped.std(dim=1).float()  # float64 reference, rounded once
    for r in got:
        assert torch.equal(r, want), (layout, r, want)
    # the one-process path (the whole tensor, no process group) gives the same number
    assert torch.equal(D.exact_group_std(full, D.Shard.whole(shape), group, D.Comm.local()), want)


@pytest.mark.parametrize("layout", ["rows", "cols", "flat", "replicated"])
def test_sharded_fingerprints_equal_full_fingerprints(layout):
    g = torch.Generator().manual_seed(2)
    tensors = {"big": torch.randn(96, 64, generator=g), "small": torch.randn(6, 4, generator=g)}
    tensors["big"][0, 0] = -0.0  # the sign of a zero is part of the fingerprint
    world = 4 if layout == "replicated" else 2
    layouts = {n: LAYOUTS[layout](tuple(t.shape), world) for n, t in tensors.items()}

    def rank(comm):
        local = {n: box_of(t, layouts[n][comm.rank]) for n, t in tensors.items()}
        shards = {n: layouts[n][comm.rank] for n in tensors}
        return D.sharded_fingerprints(local, shards, {n: t.shape for n, t in tensors.items()}, comm)

    for got in run_ranks(world, rank):
        assert got == {n: fingerprint_tensor(t) for n, t in tensors.items()}


# -------------------------------------------------------------------------------------------------------- selection
def reference_global(tensors, k, largest):
    """First k of a stable sort of the concatenation, split back per tensor (the documented tie-break)."""
    cat = torch.cat([t.reshape(-1) for t in tensors])
    order = torch.sort(cat, descending=largest, stable=True).indices[:k]
    out, offset = [], 0
    for t in tensors:
        inside = order[(order >= offset) & (order < offset + t.numel())] - offset
        out.append(sorted(inside.tolist()))
        offset += t.numel()
    return out


def random_case(seed):
    gen = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = [(gen.randint(1, 9), gen.choice([4, 6, 7])) for _ in range(gen.randint(1, 5))]
    tensors = [torch.randint(-3, 4, s, generator=g).float() * gen.choice([1.0, 0.5]) for s in shapes]
    if gen.random() < 0.3:
        tensors[0] = tensors[0] * 0.0  # -0.0 and +0.0 tie
    return gen, tensors


def run_engine(tensors, layouts, world, k, largest, budget, chunk):
    numel = {tid: t.numel() for tid, t in enumerate(tensors)}

    def rank(comm):
        pieces = [D.Piece.of_tensor(tid, box_of(t, layouts[tid][comm.rank]), layouts[tid][comm.rank])
                  for tid, t in enumerate(tensors)]  # fmt: skip
        found = D.select_pieces(
            pieces, k, largest=largest, comm=comm, tensor_numel=numel, n_tensors=len(tensors), chunk=chunk,
            budget=budget,
        )  # fmt: skip
        return {tid: [p.tolist() for p in parts] for tid, parts in found.items()}

    results = run_ranks(world, rank)
    out = []
    for tid in range(len(tensors)):
        got = []
        for r, res in enumerate(results):
            if layouts[tid][r].counted:
                got += [i for part in res.get(tid, []) for i in part]
            else:
                assert all(not part for part in res.get(tid, [])), "a replica selected entries"
        assert len(got) == len(set(got))
        out.append(sorted(got))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_distributed_engine_equals_stable_sort(seed):
    gen, tensors = random_case(seed)
    layout = gen.choice(["rows", "flat", "replicated", "cols"])
    world = 4 if layout == "replicated" else gen.choice([2, 3])
    if layout == "cols":
        world = 2
        tensors = [t if t.shape[1] % 2 == 0 else torch.cat([t, t[:, :1]], dim=1) for t in tensors]
    layouts = [LAYOUTS[layout](tuple(t.shape), world) for t in tensors]
    total = sum(t.numel() for t in tensors)
    k = gen.randint(1, total)
    largest = gen.random() < 0.5
    budget = gen.choice([0, 2, 1 << 20])  # 0 and 2 force the read-pass levels down to the flat-index digits
    got = run_engine(tensors, layouts, world, k, largest, budget, chunk=gen.choice([1, 3, 1 << 20]))
    assert got == reference_global(tensors, k, largest), (layout, world, k, largest, budget)


def test_engine_index_levels_on_large_tie_blocks():
    """All entries equal: the k-th entry is decided by tensor position and flat index alone (16-bit digits of an index
    above 2**16, so two index levels)."""
    tensors = [torch.zeros(3), torch.zeros(300, 300)]
    layouts = [flat((3,), 2), flat((300, 300), 2)]
    for k in (1, 3, 4, 70_000, 90_003):
        got = run_engine(tensors, layouts, 2, k, True, budget=0, chunk=4096)
        assert got == reference_global(tensors, k, True), k


def sharded_scores_of(full: Scores, layouts: dict, comm) -> Scores:
    """This rank's sharded view of ``full`` (with the given layouts), selecting over the thread ranks."""
    local = {n: box_of(full[n], layouts[n][comm.rank]) for n in full.names}
    shards = {n: layouts[n][comm.rank] for n in full.names}
    view = Scores(local, shapes=full.shapes, provenance=full.provenance, fingerprints=full.fingerprints, shards=shards)
    view.selection_comm = lambda: comm  # the thread ranks instead of a process group
    return view


def _file_parts(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


SELECTIONS = [
    {"fraction": 0.2},
    {"k": 7, "largest": False},
    {"fraction": 0.3, "scope": "per_tensor"},
    {"k": 2, "scope": "per_tensor", "largest": False},
    {"k": 3, "scope": "per_row"},
    {"fraction": 0.5, "scope": "per_row", "largest": False},
]


@pytest.mark.parametrize("layout", ["rows", "flat", "replicated"])
@pytest.mark.parametrize("kwargs", SELECTIONS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_sharded_select_equals_single_process_select(layout, kwargs, tmp_path):
    g = torch.Generator().manual_seed(3)
    # an odd width: flat partitions split rows; ties everywhere
    full = Scores(
        {f"layer.{i}.weight": torch.randint(0, 5, (r, 7), generator=g).float() for i, r in enumerate([5, 9, 3, 12])},
        provenance={"method": "test", "seed": 3},
        fingerprints={"layer.0.weight": "x:1"},
    )
    world = 4 if layout == "replicated" else 3
    layouts = {n: LAYOUTS[layout](full.shapes[n], world) for n in full.names}
    exclude = SafetyMask(indices={"layer.1.weight": list(range(0, 63, 2))}, shapes={"layer.1.weight": (9, 7)})
    want = select(full, **kwargs)
    want_excl = select(full, exclude=exclude, **kwargs)

    def rank(comm):
        view = sharded_scores_of(full, layouts, comm)
        mask = select(view, **kwargs)
        mask_excl = select(view, exclude=exclude, **kwargs)
        path = select_and_save(view, tmp_path / f"r{comm.rank}", **kwargs)
        return mask, mask_excl, path

    results = run_ranks(world, rank)
    mask, mask_excl, path = results[0]
    assert mask == want and mask.provenance == want.provenance and mask.fingerprints == want.fingerprints
    assert mask_excl == want_excl and mask_excl.provenance == want_excl.provenance
    assert all(r[0] is None and r[1] is None for r in results[1:])
    with open(path, "rb") as fh:
        assert _file_parts(fh.read()) == _file_parts(want.to_bytes())
    assert SafetyMask.from_pretrained(path) == want


def test_sharded_select_refuses_rows_split_by_columns():
    full = Scores({"w": torch.rand(4, 6)})
    layouts = {"w": cols((4, 6), 2)}

    def rank(comm):
        with pytest.raises(ValueError, match="needs whole rows on each rank"):
            select(sharded_scores_of(full, layouts, comm), k=1, scope="per_row")
        return select(sharded_scores_of(full, layouts, comm), k=5)

    assert run_ranks(2, rank)[0] == select(full, k=5)


def test_sharded_scores_checks_and_histogram():
    full = Scores({"w": torch.arange(24.0).reshape(4, 6) / 24})
    boxes = rows((4, 6), 2)
    with pytest.raises(ValueError, match="holds a box of shape"):
        Scores({"w": torch.rand(3, 6)}, shapes={"w": (4, 6)}, shards={"w": boxes[0]})
    with pytest.raises(ValueError, match="full parameter shape"):
        Scores({"w": torch.rand(2, 6)}, shards={"w": boxes[0]})
    with pytest.raises(TypeError, match=r"must be a peft_safety\.scoring\.distributed\.Shard"):
        Scores({"w": torch.rand(2, 6)}, shapes={"w": (4, 6)}, shards={"w": (0, 2)})

    def rank(comm):
        view = sharded_scores_of(full, {"w": boxes}, comm)
        assert view.is_sharded and view.numel() == 24 and view.local_numel() == 12
        with pytest.raises(ValueError, match=r"sharded over ranks; use scores\.save_pretrained"):
            view.to_safetensors("x.safetensors")
        return view.histogram(bins=4)

    want = full.histogram(bins=4)
    for counts, edges in run_ranks(2, rank):
        assert torch.equal(counts, want[0]) and torch.equal(edges, want[1])


def test_write_safetensors_reads_back_with_the_library(tmp_path):
    from safetensors import safe_open

    from peft_safety.scoring.distributed import write_safetensors

    tensors = {
        "b": torch.arange(5, dtype=torch.int32),
        "a": torch.randn(2, 3),
        "c": torch.arange(3, dtype=torch.int64),
    }
    entries = [("c", "I64", (3,)), ("a", "F32", (2, 3)), ("b", "I32", (5,))]
    path = write_safetensors(tmp_path / "x.safetensors", entries, {"k": "v"}, ((n, tensors[n]) for n, _, _ in entries))
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n), t)
    with pytest.raises(RuntimeError, match="out of order"):
        write_safetensors(tmp_path / "y.safetensors", entries, {}, iter([("a", tensors["a"])]))
    assert not (tmp_path / "y.safetensors").exists()
