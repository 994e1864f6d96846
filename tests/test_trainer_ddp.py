"""2-process DDP (gloo, CPU): frozen entries stay bit-identical on every rank, the rest trains and stays in sync."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_ddp_two_processes_freeze_exact(tmp_path):
    from peft_safety.testing import tiny_llama

    port, world = _free_port(), 2
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out.decode(errors="replace"))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]

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
