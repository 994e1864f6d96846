"""FSDP2 (``fully_shard``, 2 processes, gloo, CPU): the Freezer keeps frozen entries bit-identical on sharded
``DTensor`` parameters through AdamW with weight decay, clipping and gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from _ddp_worker import fsdp2_dense_masks, launch

from peft_safety.testing import tiny_llama

pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.multiprocess
def test_fsdp2_freezer_exact_on_cpu(tmp_path):
    world = 2
    launch("fsdp2", tmp_path, world=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    before = dict(tiny_llama(seed=0).named_parameters())
    masks = fsdp2_dense_masks(tiny_llama(seed=0))
    for r in results:
        assert r["world_size"] == world and r["backend"] == "fsdp2"
        assert r["ok"] and r["ok_reference"]  # the freezer's own check, against its copy and the original model
        assert r["checked"] > 0
    # each rank checked its shard only; together they cover every frozen entry
    assert sum(r["checked"] for r in results) == sum(int(m.sum()) for m in masks.values())
    for name, now in results[0]["params"].items():
        assert torch.equal(now, results[1]["params"][name]), f"{name}: ranks disagree"
        old = before[name].detach()
        if name in masks:
            m = masks[name]
            assert torch.equal(now[m], old[m]), f"{name}: frozen entries moved"
            assert not torch.equal(now[~m], old[~m]), f"{name}: free entries did not train"
        else:
            assert not torch.equal(now, old), f"{name} did not train"
