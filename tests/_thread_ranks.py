"""Ranks as threads: a `Comm` whose collectives exchange tensors between threads of this process.

Used to test the sharded bookkeeping (shard layouts, exact statistics, the distributed selection engine, mask
assembly) on many random layouts in milliseconds, with every rank a thread holding its own shards; the real process
groups (FSDP2, ZeRO-3) are tested in tests/test_sharded_scoring.py. Every collective is a rendezvous: each thread
posts its value, all wait, all read every value, all wait again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from peft_safety.scoring.distributed import Comm


class _Hub:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world
        self.calls = [0] * world


class ThreadComm(Comm):
    """The collectives of `Comm` between ``world`` threads."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub, self.rank, self.world, self.device = hub, rank, hub.world, torch.device("cpu")

    def _exchange(self, value: Any) -> list[Any]:
        self.hub.calls[self.rank] += 1
        self.hub.slots[self.rank] = value
        self.hub.barrier.wait()
        out = list(self.hub.slots)
        self.hub.barrier.wait()
        return out

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(t.detach().clone())
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        t.copy_(total)
        return t

    def max_int(self, value: int) -> int:
        return max(self._exchange(int(value)))

    def max_float(self, value: float) -> float:
        return max(self._exchange(float(value)))

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._exchange(obj)

    def gather_to_root(self, t: torch.Tensor, counts: list[int]) -> list[torch.Tensor] | None:
        parts = self._exchange(t.detach().clone())
        assert [p.numel() for p in parts] == [int(c) for c in counts], "gather_to_root: counts disagree with sizes"
        return [p for r, p in enumerate(parts) if r == 0 or counts[r]] if self.rank == 0 else None

    def barrier(self) -> None:
        self._exchange(None)


def run_ranks(world: int, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    """``fn(comm)`` in ``world`` threads, one per rank; returns the results in rank order (re-raises the first
    error)."""
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException | None] = [None] * world

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(hub, rank))
        except BaseException as err:
            errors[rank] = err
            hub.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    assert len(set(hub.calls)) == 1, f"ranks ran different numbers of collectives: {hub.calls}"
    return results
