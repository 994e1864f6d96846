"""apply_mask_: the in-place verb for plain Trainer / custom-loop users."""

from __future__ import annotations

import pytest
import torch

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama
from peft_safety.training.apply import apply_mask_
from peft_safety.training.freeze import FreezeViolationError

Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
O1 = "model.layers.1.self_attn.o_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def _mask(model, with_fingerprints: bool = True) -> SafetyMask:
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in (Q, GATE, DOWN, O1, UP1)}
    return SafetyMask(
        indices={Q: [0, 5, 77, 200], GATE: [1, 9], DOWN: [3, 30], O1: [0]},  # UP1 covered, no entry
        shapes=shapes,
        granularity={Q: Weight(), GATE: Neuron(axis=0), DOWN: Neuron(axis=1), O1: Layer(), UP1: Weight()},
        fingerprints={n: fingerprint_tensor(params[n]) for n in shapes} if with_fingerprints else None,
        provenance={"method": "test"},
    )


def _loop(model, optimizer, steps: int = 3) -> None:
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(6, 128, (2, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("mode", ["freeze", "train_only"])
def test_custom_loop_exact(mode):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = apply_mask_(model, mask, mode=mode)
    params = dict(model.named_parameters())
    if mode == "freeze":
        assert not params[O1].requires_grad  # a Layer() entry: switched off, costs nothing
        assert params[UP1].requires_grad
    else:
        assert params[UP1].requires_grad is False  # covered without entries: frozen whole
        assert params[O1].requires_grad
    assert params["model.embed_tokens.weight"].requires_grad  # not covered: untouched
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    handle.attach_optimizer(optimizer)
    _loop(model, optimizer)
    assert handle.verify().ok
    assert handle.verify(reference=before).ok
    for name in (Q, GATE, DOWN, O1, UP1):
        dense = mask.to_dense(name)
        frozen = dense if mode == "freeze" else ~dense
        now = params[name].detach()
        assert torch.equal(now[frozen], before[name][frozen]), name
        if not bool(frozen.all()):
            assert not torch.equal(now[~frozen], before[name][~frozen]), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not torch.equal(params[name].detach(), before[name]), name
    handle.remove()
    assert all(p.requires_grad for p in model.parameters())
    assert not optimizer._optimizer_step_post_hooks


def test_optimizer_given_up_front_and_context_manager():
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05)
    with apply_mask_(model, mask, "freeze", optimizer) as handle:
        _loop(model, optimizer)
        report = handle.verify(reference=before)
        assert report.ok and report.checked_entries == mask.numel()
    assert all(p.requires_grad for p in model.parameters())


def test_without_optimizer_verify_catches_decay():
    model = tiny_llama(seed=0)
    handle = apply_mask_(model, _mask(model), "freeze")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _loop(model, optimizer, steps=2)
    with pytest.raises(FreezeViolationError, match="changed"):
        handle.verify()
    handle.remove()


def test_works_through_a_peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    mask = SafetyMask(indices={Q: [1, 2]}, shapes={Q: (32, 32)}, provenance={"method": "test"})
    with apply_mask_(model, mask, "freeze") as handle:
        # the base weight is already frozen by PEFT and only partly covered: guarded by a copy, nothing moves
        assert handle.num_frozen == 2
        assert handle.verify().ok


def test_bad_inputs():
    model = tiny_llama(seed=0)
    mask = _mask(model)
    with pytest.raises(ValueError, match="mode='spa' is not valid"):
        apply_mask_(model, mask, mode="spa")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        apply_mask_("model", mask)
    other = tiny_llama(seed=0, num_hidden_layers=1)
    with pytest.raises(ValueError, match="does not fit this model"):
        apply_mask_(other, mask)
    with torch.no_grad():
        dict(model.named_parameters())[Q].mul_(2.0)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        apply_mask_(model, mask)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        apply_mask_(model, mask, fingerprint_check="warn").remove()
    assert all(p.requires_grad for p in model.parameters())
