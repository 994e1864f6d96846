"""2-process DDP (gloo, CPU): frozen entries stay bit-identical on every rank, the rest trains and stays in sync."""

from __future__ import annotations

import pytest
import torch
from _ddp_worker import launch

pytest.importorskip("trl")


@pytest.mark.multiprocess
def test_ddp_two_processes_freeze_exact(tmp_path):
    from peft_safety.testing import tiny_llama

    world = 2
    launch("train", tmp_path, world=world)

    before = {n: t.detach() for n, t in tiny_llama(seed=0).named_parameters()}
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert all(r["world_size"] == world for r in results)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    frozen_q = torch.zeros(32 * 32, dtype=torch.bool)
    frozen_q[[0, 7, 99, 512]] = True
    frozen = {q: frozen_q.view(32, 32), v: torch.zeros(16, 32, dtype=torch.bool)}
    frozen[v][[2, 5]] = True
    for r in results:
        params = r["params"]
        for name, now in params.items():
            assert torch.equal(now, results[0]["params"][name]), f"{name}: ranks out of sync"
            if name in frozen:
                f = frozen[name]
                assert torch.equal(now[f], before[name][f]), f"{name}: frozen entries moved"
                assert not torch.equal(now[~f], before[name][~f]), f"{name}: free entries did not move"
            else:
                assert not torch.equal(now, before[name]), f"{name} did not train"
