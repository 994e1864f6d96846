"""The Freezer against a naive reference: dense boolean masks applied by hand, step by step.

The reference zeroes the frozen gradient entries with ``grad[mask] = 0`` after backward (before clipping), steps the
optimizer, and writes the saved values back with ``param[mask] = saved``. A Freezer-trained model must match it
exactly, frozen *and* trainable entries: a mask applied after clipping, to the wrong axis, to the wrong entries or not
at all, or a missing restore, changes some entry.
"""

from __future__ import annotations

import pytest
import torch

from peft_safety.testing import tiny_llama
from peft_safety.training.freeze import Freezer

Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _masks(model):
    g = torch.Generator().manual_seed(1)
    p = dict(model.named_parameters())
    rows = torch.zeros(p[GATE].shape, dtype=torch.bool)
    rows[[0, 3, 17]] = True
    cols = torch.zeros(p[DOWN].shape, dtype=torch.bool)
    cols[:, [2, 11, 40]] = True  # a column mask of a non-square matrix: an axis swap cannot go unnoticed
    return {
        Q: torch.rand(p[Q].shape, generator=g) < 0.25,
        GATE: rows,
        DOWN: cols,
        O_PROJ: torch.ones(p[O_PROJ].shape, dtype=torch.bool),
    }


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(6, 128, (2, 10), generator=g) for _ in range(n)]


def _run(model, optimizer, batches, accumulation, before_clip=None, after_step=None):
    model.train()
    for start in range(0, len(batches), accumulation):
        for ids in batches[start : start + accumulation]:
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if before_clip is not None:
            before_clip()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()


@pytest.mark.parametrize("mode", ["freeze", "train_only"])
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_freezer_equals_naive_masked_training(mode, opt):
    def make_opt(params):
        if opt == "adamw":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        return torch.optim.SGD(params, lr=5e-2, momentum=0.9, weight_decay=0.05)

    batches = _batches(6)
    ours = tiny_llama(seed=0)
    masks = _masks(ours)
    # frozen entries: the mask itself (freeze), or everything outside it within the masked tensors (train_only; the
    # Freezer leaves tensors without a mask entry alone, as documented)
    frozen = {n: (m if mode == "freeze" else ~m).clone() for n, m in masks.items()}
    opt_ours = make_opt(ours.parameters())
    with Freezer(masks, mode).install(ours, opt_ours):
        _run(ours, opt_ours, batches, accumulation=2)

    naive = tiny_llama(seed=0)
    p_naive = dict(naive.named_parameters())
    saved = {n: p_naive[n].detach()[f].clone() for n, f in frozen.items()}
    opt_naive = make_opt(naive.parameters())

    def zero_frozen_grads():
        for n, f in frozen.items():
            if p_naive[n].grad is not None:
                p_naive[n].grad[f] = 0

    @torch.no_grad()
    def restore():
        for n, f in frozen.items():
            p_naive[n][f] = saved[n]

    _run(naive, opt_naive, batches, accumulation=2, before_clip=zero_frozen_grads, after_step=restore)

    start = dict(tiny_llama(seed=0).named_parameters())
    moved = 0
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.detach(), p_naive[name].detach(), rtol=0, atol=0, msg=name)
        if name in frozen:
            assert torch.equal(p.detach()[frozen[name]], start[name].detach()[frozen[name]]), name
        moved += int((p.detach() != start[name].detach()).sum())
    assert moved > 0  # something trained
