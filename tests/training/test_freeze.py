"""The defining invariant of SPA full fine-tuning: frozen entries stay bit-identical under any optimizer."""

from __future__ import annotations

import pytest
import torch

from peft_safety.testing import tiny_llama
from peft_safety.training.freeze import (
    Freezer,
    FreezeViolationError,
    dense_frozen_masks,
)

STEPS = 3


def _masks(model) -> dict[str, torch.Tensor]:
    """One parameter per storage kind: random entries, rows, columns, a whole tensor."""
    g = torch.Generator().manual_seed(0)
    p = dict(model.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    gate = "model.layers.0.mlp.gate_proj.weight"
    down = "model.layers.1.mlp.down_proj.weight"
    o = "model.layers.1.self_attn.o_proj.weight"
    masks = {q: torch.rand(p[q].shape, generator=g) < 0.3}
    rows = torch.zeros(p[gate].shape, dtype=torch.bool)
    rows[[1, 5, 9]] = True
    cols = torch.zeros(p[down].shape, dtype=torch.bool)
    cols[:, [0, 7, 30]] = True
    masks.update({gate: rows, down: cols, o: torch.ones(p[o].shape, dtype=torch.bool)})
    return masks


def _optimizer(kind: str, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.01)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.01)


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, 128, (2, 12), generator=g) for _ in range(n)]


def _train(model, optimizer, steps: int, accumulation: int, clip: bool, seed: int = 0) -> None:
    model.train()
    batches = _batches(steps * accumulation, seed)
    for start in range(0, len(batches), accumulation):
        for ids in batches[start : start + accumulation]:
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_invariant(model, before, frozen: dict[str, torch.Tensor]) -> None:
    """Every frozen entry bit-identical, every trainable parameter changed somewhere, checked by name."""
    for name, p in model.named_parameters():
        now, old = p.detach(), before[name]
        if name in frozen:
            f = frozen[name]
            assert torch.equal(now[f], old[f]), f"{name}: frozen entries moved"
            if not bool(f.all()):
                assert not torch.equal(now[~f], old[~f]), f"{name}: trainable entries did not move"
        elif p.requires_grad:
            assert not torch.equal(now, old), f"{name}: trainable parameter did not move"


@pytest.mark.parametrize("mode", ["freeze", "train_only"])
@pytest.mark.parametrize("opt", ["adamw", "sgd", "adafactor"])
@pytest.mark.parametrize(("accumulation", "clip"), [(1, False), (2, True)])
def test_frozen_entries_bit_identical(mode, opt, accumulation, clip):
    model = tiny_llama(seed=0)
    masks = _masks(model)
    frozen = dict(dense_frozen_masks(masks, mode))
    before = _snapshot(model)
    optimizer = _optimizer(opt, model.parameters())
    with Freezer(masks, mode).install(model, optimizer) as freezer:
        _train(model, optimizer, STEPS, accumulation, clip)
        report = freezer.verify()
        assert report.ok and report.checked_entries == sum(int(f.sum()) for f in frozen.values())
        assert freezer.verify(reference=before).ok
    _assert_invariant(model, before, frozen)


def test_without_restore_adamw_decay_moves_frozen_entries():
    """The failure the Freezer exists for: zero gradients alone do not stop AdamW's decoupled decay."""
    model = tiny_llama(seed=0)
    masks = _masks(model)
    before = _snapshot(model)
    optimizer = _optimizer("adamw", model.parameters())
    freezer = Freezer(masks).install(model)  # gradient hooks only, no optimizer attached
    try:
        _train(model, optimizer, 2, 1, False)
        report = freezer.verify(reference=before, strict=False)
        assert not report.ok and report.changed
        with pytest.raises(FreezeViolationError, match="frozen entries changed"):
            freezer.verify(reference=before)
    finally:
        freezer.remove()


def test_gradients_masked_before_clipping():
    model = tiny_llama(seed=0)
    model.train()
    masks = _masks(model)
    ids = _batches(1)[0]
    with Freezer(masks).install(model):
        model(input_ids=ids, labels=ids).loss.backward()
        params = dict(model.named_parameters())
        for name, m in masks.items():
            assert torch.count_nonzero(params[name].grad[m]) == 0, name
            assert torch.count_nonzero(params[name].grad[~m]) > 0 or bool(m.all())


def test_storage_is_compact_and_hooks_removed():
    model = tiny_llama(seed=0)
    masks = _masks(model)
    optimizer = torch.optim.AdamW(model.parameters())
    freezer = Freezer(masks).install(model, optimizer)
    # hooks fire on plain parameters: the trainer skips the redundant pre-clip mask_grads_() pass
    assert freezer.resolved_backend == "single" and freezer.needs_grad_mask_call is False
    assert Freezer(masks, backend="fsdp1").needs_grad_mask_call is False  # not installed: no backend yet
    kinds = {e.name: e.kind for e in freezer._entries}
    assert kinds == {
        "model.layers.0.self_attn.q_proj.weight": "entries",
        "model.layers.0.mlp.gate_proj.weight": "rows",
        "model.layers.1.mlp.down_proj.weight": "cols",
        "model.layers.1.self_attn.o_proj.weight": "whole",
    }
    n_frozen = sum(int(m.sum()) for m in masks.values())
    assert freezer.num_frozen == n_frozen
    q_flat = int(masks["model.layers.0.self_attn.q_proj.weight"].sum())
    # values (4 B) for everything, int64 ids: one per flat entry, one per row / column
    assert freezer.memory_bytes == 4 * n_frozen + 8 * (q_flat + 3 + 3)
    freezer.remove()
    assert not freezer.installed and freezer.memory_bytes == 0
    assert not optimizer._optimizer_step_post_hooks
    for p in model.parameters():
        assert not p._post_accumulate_grad_hooks


def test_switched_off_tensor_is_checksummed():
    model = tiny_llama(seed=0)
    name = "model.layers.1.self_attn.o_proj.weight"
    p = dict(model.named_parameters())[name]
    p.requires_grad_(False)
    freezer = Freezer({name: torch.ones(p.shape, dtype=torch.bool)}).install(model)
    assert freezer.memory_bytes == 0 and freezer.num_frozen == p.numel()
    assert freezer.verify().ok
    with torch.no_grad():
        p[0, 0] += 1.0
    with pytest.raises(FreezeViolationError, match=name):
        freezer.verify()
    freezer.remove()


@pytest.mark.parametrize("foreign_state", [False, True])
def test_resume_from_checkpoint_keeps_frozen_entries(tmp_path, foreign_state):
    """Resumed optimizer state (even from a run that froze nothing) must not move frozen entries."""
    model = tiny_llama(seed=0)
    original = _snapshot(model)
    masks = _masks(model)
    optimizer = _optimizer("adamw", model.parameters())
    if foreign_state:
        # a plain run first: Adam moments are non-zero at the positions we will freeze; then reset the weights
        _train(model, optimizer, 2, 1, False, seed=1)
        model.load_state_dict(original)
    else:
        with Freezer(masks).install(model, optimizer):
            _train(model, optimizer, 2, 1, False)
    torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, tmp_path / "ckpt.pt")

    resumed = tiny_llama(seed=1)  # different init: everything must come from the checkpoint
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    optimizer = _optimizer("adamw", resumed.parameters())
    optimizer.load_state_dict(ckpt["optim"])
    before = _snapshot(resumed)
    with Freezer(masks).install(resumed, optimizer) as freezer:
        exp_avg = optimizer.state[resumed.model.layers[0].self_attn.q_proj.weight]["exp_avg"]
        assert torch.count_nonzero(exp_avg[masks["model.layers.0.self_attn.q_proj.weight"]]) == 0  # scrubbed
        _train(resumed, optimizer, 2, 1, True, seed=2)
        assert freezer.verify(reference=original).ok
    _assert_invariant(resumed, before, masks)


def test_gradient_checkpointing_and_bf16_autocast():
    model = tiny_llama(seed=0)
    model.activation_checkpointing_enable()
    masks = _masks(model)
    before = _snapshot(model)
    optimizer = _optimizer("adamw", model.parameters())
    with Freezer(masks).install(model, optimizer) as freezer:
        model.train()
        for ids in _batches(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert freezer.verify().ok
    _assert_invariant(model, before, masks)


def test_bf16_parameters_exact():
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    masks = _masks(model)
    before = _snapshot(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with Freezer(masks).install(model, optimizer):
        _train(model, optimizer, 2, 1, True)
    _assert_invariant(model, before, masks)


def test_bad_inputs():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="mode='frez' is not valid"):
        Freezer({}, mode="frez")
    with pytest.raises(ValueError, match="backend='mpi' is not valid"):
        Freezer({}, backend="mpi")
    with pytest.raises(TypeError, match=r"torch\.bool tensors"):
        Freezer({"model.embed_tokens.weight": torch.zeros(3)})
    with pytest.raises(TypeError, match="Expected a SafetyMask"):
        Freezer([1, 2, 3])
    with pytest.raises(ValueError, match="computed for another model"):
        Freezer({"model.layers.7.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)}).install(model)
    with pytest.raises(ValueError, match="does not match parameter"):
        Freezer({"model.layers.0.mlp.up_proj.weight": torch.ones(2, 2, dtype=torch.bool)}).install(model)
    freezer = Freezer({"model.layers.0.mlp.up_proj.weight": torch.ones(64, 32, dtype=torch.bool)}).install(model)
    with pytest.raises(RuntimeError, match="already installed"):
        freezer.install(model)
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        freezer.attach_optimizer(object())
    freezer.remove()
    with pytest.raises(RuntimeError, match="install"):
        freezer.verify()


@pytest.mark.parametrize("mode", ["freeze", "train_only"])
def test_install_compares_shapes_before_allocating(monkeypatch, mode):
    """A mask declaring a huge shape for a small parameter is refused before its dense shape is built."""
    from peft_safety.mask import Layer, SafetyMask
    from peft_safety.training import freeze

    model = tiny_llama(seed=0)
    name = "model.layers.0.mlp.up_proj.weight"
    # 10**12 entries: a dense bool mask of this shape would take a terabyte
    mask = SafetyMask({name: [0]}, {name: (10**6, 10**6)}, Layer())
    allocated = []

    def spy(*args, **kwargs):
        allocated.append(args)
        raise AssertionError("a dense mask was built before the shapes were compared")

    monkeypatch.setattr(freeze, "dense_frozen_masks", spy)
    monkeypatch.setattr(SafetyMask, "to_dense", spy)
    with pytest.raises(ValueError, match=r"shape \(1000000, 1000000\).*shape \(64, 32\)"):
        Freezer(mask, mode=mode).install(model)
    assert not allocated
    # the mapping form is checked the same way
    with pytest.raises(ValueError, match="does not match parameter"):
        Freezer({name: torch.ones(2, 2, dtype=torch.bool)}, mode=mode).install(model)
    assert not allocated
