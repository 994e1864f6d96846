"""Reversible in-place interventions: effects inside the block, bit-exact restoration after it (also on errors)."""

from __future__ import annotations

import pytest
import torch

from peft_safety.analysis.probes import mask_drift, noised, restored_from, rewind_, scaled, zeroed
from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_qwen2_moe

DOWN = "model.layers.0.mlp.down_proj.weight"  # (32, 64)
UP = "model.layers.0.mlp.up_proj.weight"  # (64, 32)
Q = "model.layers.1.self_attn.q_proj.weight"  # (32, 32), head_dim 8
OPROJ = "model.layers.1.self_attn.o_proj.weight"  # (32, 32)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mixed_mask(model):
    """One parameter per granularity: weight entries, down columns, up rows, q heads, a whole o_proj."""
    params = dict(model.named_parameters())
    names = [DOWN, UP, Q, OPROJ, "model.layers.0.self_attn.v_proj.weight"]
    shapes = {n: tuple(params[n].shape) for n in names}
    gran = {DOWN: Neuron(axis=1), UP: Neuron(axis=0), Q: Head(head_dim=8, axis=0), OPROJ: Layer()}
    gran["model.layers.0.self_attn.v_proj.weight"] = Weight()
    indices = {
        DOWN: torch.tensor([1, 5, 63]),
        UP: torch.tensor([0, 7]),
        Q: torch.tensor([2]),
        OPROJ: torch.tensor([0]),
        "model.layers.0.self_attn.v_proj.weight": torch.tensor([0, 33, 511]),
    }
    return SafetyMask(indices, shapes, gran)


def test_zeroed_effect_inside_and_exact_restore():
    model = tiny_llama(seed=0)
    mask = mixed_mask(model)
    snap = snapshot(model)
    params = dict(model.named_parameters())
    with zeroed(model, mask) as m:
        assert m is model
        for name in mask.names:
            dense = mask.to_dense(name)
            assert torch.all(params[name][dense] == 0), name
            # entries outside the mask are untouched
            assert torch.equal(params[name][~dense], snap[name][~dense]), name
        # axes: down columns, up rows, q head 2 = rows 16..23
        assert torch.all(params[DOWN][:, 5] == 0) and params[DOWN][5, 0] != 0
        assert torch.all(params[UP][7] == 0)
        assert torch.all(params[Q][16:24] == 0) and torch.all(params[Q][24:] != 0)
    for name, param in model.named_parameters():
        assert torch.equal(param, snap[name]), name


def test_restore_after_exception():
    model = tiny_llama(seed=0)
    mask = mixed_mask(model)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), scaled(model, mask, 3.0):
        raise RuntimeError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, snap[name]), name
    with pytest.raises(KeyError), noised(model, mask, 0.5, seed=1):
        raise KeyError("inside")
    for name, param in model.named_parameters():
        assert torch.equal(param, snap[name]), name


def test_scaled_bf16_restores_bit_exactly():
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    names = [n for n in params if ".layers.0." in n and n.endswith("proj.weight")]
    mask = SafetyMask({n: [0] for n in names}, {n: tuple(params[n].shape) for n in names}, Layer())
    snap = snapshot(model)
    # dividing back would not be exact in bf16: check that this test would catch it
    w = snap[DOWN]
    assert not torch.equal((w * 1.1) / 1.1, w)
    with scaled(model, mask, 1.1):
        expected = (snap[DOWN].float() * 1.1).to(torch.bfloat16)
        assert torch.equal(params[DOWN], expected)
    for name, param in model.named_parameters():
        assert torch.equal(param.view(torch.int16), snap[name].view(torch.int16)), name


def test_noised_scale_determinism_and_restore():
    model = tiny_llama(seed=0)
    params = dict(model.named_parameters())
    mask = SafetyMask({DOWN: torch.arange(0, 2048, 2)}, {DOWN: (32, 64)}, Weight())
    snap = snapshot(model)
    with noised(model, mask, 0.38, seed=3):
        first = params[DOWN].detach().clone()
    with noised(model, mask, 0.38, seed=3):
        again = params[DOWN].detach().clone()
    with noised(model, mask, 0.38, seed=4):
        other = params[DOWN].detach().clone()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    delta = (first - snap[DOWN]).reshape(-1)
    assert torch.all(delta[1::2] == 0)  # unmasked entries untouched
    expected_std = 0.38 * snap[DOWN].float().std()
    assert abs(float(delta[0::2].std()) / float(expected_std) - 1) < 0.1
    assert torch.equal(params[DOWN], snap[DOWN])
    with noised(model, mask, 0.0):
        assert torch.equal(params[DOWN], snap[DOWN])


def test_restored_from_and_rewind_and_drift():
    model, reference = tiny_llama(seed=0), tiny_llama(seed=1)
    mask = mixed_mask(model)
    params = dict(model.named_parameters())
    ref = {n: p.detach() for n, p in reference.named_parameters()}
    snap = snapshot(model)
    with restored_from(model, reference, mask):
        for name in mask.names:
            dense = mask.to_dense(name)
            assert torch.equal(params[name][dense], ref[name][dense])
            assert torch.equal(params[name][~dense], snap[name][~dense])
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    # a state dict works as a reference too
    with restored_from(model, reference.state_dict(), mask):
        assert torch.equal(params[OPROJ], ref[OPROJ])

    drift = mask_drift(model, reference, mask)
    assert drift["masked_numel"] == mask.numel()
    assert drift["masked_norm"] > 0
    n = rewind_(model, reference, mask)
    assert n == mask.numel()
    drift = mask_drift(model, reference, mask)
    assert drift["masked_norm"] == 0.0 and drift["masked_max_abs"] == 0.0
    assert drift["unmasked_norm"] > 0
    # per parameter: the down_proj's masked part is 3 columns of 32 entries
    row = drift["per_parameter"][DOWN]
    assert row["masked_numel"] == 3 * 32 and row["unmasked_numel"] == 32 * 64 - 3 * 32
    full = float((snap[DOWN] - ref[DOWN]).norm())
    unmasked = (snap[DOWN] - ref[DOWN]).clone()
    unmasked[:, [1, 5, 63]] = 0
    assert row["unmasked_norm"] == pytest.approx(float(unmasked.norm()), rel=1e-6)
    assert row["unmasked_norm"] < full


def test_mask_drift_on_identical_models_is_zero():
    model, reference = tiny_llama(seed=0), tiny_llama(seed=0)
    drift = mask_drift(model, reference, mixed_mask(model))
    assert drift["masked_norm"] == 0.0 and drift["unmasked_norm"] == 0.0


def test_moe_fused_experts_rows_and_columns():
    model = tiny_qwen2_moe(seed=0)
    params = dict(model.named_parameters())
    gu = "model.layers.0.mlp.experts.gate_up_proj"  # (4, 32, 32): E, 2*ff, h
    dn = "model.layers.0.mlp.experts.down_proj"  # (4, 32, 16): E, h, ff
    mask = SafetyMask(
        {gu: [1 * 32 + 3], dn: [2 * 16 + 5]},
        {gu: tuple(params[gu].shape), dn: tuple(params[dn].shape)},
        {gu: Neuron(axis=0), dn: Neuron(axis=1)},
    )
    snap = snapshot(model)
    with zeroed(model, mask):
        assert torch.all(params[gu][1, 3] == 0)
        assert torch.all(params[dn][2, :, 5] == 0)
        assert int((params[gu] == 0).sum()) == 32 and int((params[dn] == 0).sum()) == 32
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_nested_contexts_restore_in_order():
    model = tiny_llama(seed=0)
    mask = mixed_mask(model)
    snap = snapshot(model)
    with scaled(model, mask, 2.0), zeroed(model, mask.restrict([DOWN])):
        pass
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


def test_peft_wrapped_names_resolve():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=0)
    mask = mixed_mask(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"]))
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    before = down.detach().clone()
    with zeroed(peft_model, mask):
        assert torch.all(down[:, [1, 5, 63]] == 0)
    assert torch.equal(down, before)


def test_errors():
    model = tiny_llama(seed=0)
    mask = mixed_mask(model)
    with pytest.raises(TypeError, match="SafetyMask"), zeroed(model, {"a": 1}):
        pass
    with pytest.raises(TypeError, match="alpha must be a real number"), scaled(model, mask, "2"):
        pass
    with pytest.raises(ValueError, match="alpha must be finite"), scaled(model, mask, float("nan")):
        pass
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"), noised(model, mask, -1.0):
        pass
    with pytest.raises(TypeError, match="seed must be an int"), noised(model, mask, 0.1, seed=1.5):
        pass
    other = SafetyMask({"model.layers.9.mlp.down_proj.weight": [0]}, {"model.layers.9.mlp.down_proj.weight": (32, 64)})
    with pytest.raises(ValueError, match="does not have"), zeroed(model, other):
        pass
    wrong = SafetyMask({DOWN: [0]}, {DOWN: (64, 32)})
    with pytest.raises(ValueError, match="shape"), zeroed(model, wrong):
        pass
    with pytest.raises(TypeError, match="reference must be"), restored_from(model, 3, mask):
        pass
    partial = {n: t for n, t in tiny_llama(seed=1).state_dict().items() if n != OPROJ}
    snap = snapshot(model)
    with pytest.raises(ValueError, match="reference has no parameter"):
        rewind_(model, partial, mask)
    # nothing was written before the error
    assert all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
