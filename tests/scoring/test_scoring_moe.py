"""MoE: fused 3-D expert tensors scored per expert; router explicit; per-expert Wanda norms exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.testing import tiny_mixtral, tiny_qwen2_moe, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet(
        refusal_rows(["How do I pick a lock?", "hello there"], lambda p: "No " + p), tiny_tokenizer()
    )


FUSED = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")


def naive_gradient_sum(model, calib, names):
    """Reference: the explicit sum over samples of each sample's response-only mean-NLL gradient, one sample at a
    time (no batching, no padding, no hooks)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for i in range(len(calib)):
        ex = calib.example(i)
        logits = model(input_ids=ex["input_ids"][None]).logits[0, :-1]
        labels = ex["labels"][1:]
        keep = labels != -100
        loss = F.cross_entropy(logits[keep].float(), labels[keep])
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
            total[n] += g.double()
    return {n: params[n].detach().double() for n in names}, total


@pytest.mark.parametrize("build", [tiny_qwen2_moe, tiny_mixtral])
def test_moe_gradient_scores_per_expert(build, calib):
    model = build(seed=0)
    s = score(model, calib, "snip", aggregation="abs_of_sum", progress=False)
    weights, grads = naive_gradient_sum(model, calib, FUSED)
    for name in FUSED:
        assert s[name].shape == weights[name].shape
        for e in range(weights[name].shape[0]):
            expected = weights[name][e].abs() * grads[name][e].abs()
            atol = 1e-5 * float(expected.abs().max())
            torch.testing.assert_close(s[name][e].double(), expected, rtol=1e-4, atol=atol, msg=f"{name} expert {e}")
            # an expert no response token was routed to has exactly zero scores
            assert bool((s[name][e] == 0).all()) == bool((expected == 0).all())
    assert not any(".mlp.gate.weight" in n for n in s)
    with_router = score(model, calib, "snip", aggregation="abs_of_sum", include_router=True, progress=False)
    assert "model.layers.0.mlp.gate.weight" in with_router


@pytest.mark.parametrize("build", [tiny_qwen2_moe, tiny_mixtral])
def test_esi_fused_experts_use_one_std_per_expert(build, calib):
    model = build(seed=0)
    with torch.no_grad():  # experts with very different scales: one std for the whole tensor would be wrong
        for name in FUSED:
            w = dict(model.named_parameters())[name]
            w.mul_(torch.tensor([0.1, 1.0, 10.0, 3.0]).view(-1, *([1] * (w.dim() - 1))))
    s = score(model, calib, "esi", batch_size=2, progress=False)
    weights, grads = naive_gradient_sum(model, calib, FUSED)
    for name in FUSED:
        for e in range(weights[name].shape[0]):
            expected = grads[name][e].abs() * weights[name][e].std()  # ESI with the expert's own (unbiased) std
            # fp32 sums in another order: compare entries near zero against the expert's largest score
            atol = 1e-5 * float(expected.abs().max())
            torch.testing.assert_close(s[name][e].double(), expected, rtol=1e-4, atol=atol, msg=f"{name} expert {e}")
    assert s.provenance["std"] == "unbiased, per expert for fused expert tensors"
    # a non-expert tensor keeps the whole-tensor std
    attn = "model.layers.0.self_attn.v_proj.weight"
    w_attn, g_attn = naive_gradient_sum(model, calib, [attn])
    expected = g_attn[attn].abs() * w_attn[attn].std()
    torch.testing.assert_close(s[attn].double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_moe_wanda_per_expert_exact(calib):
    model = tiny_qwen2_moe(seed=0)
    experts = model.model.layers[0].mlp.experts
    seen = []
    handle = experts.register_forward_hook(lambda m, a, o: seen.append((a[0].detach(), a[1].detach())))
    sumsq_in = torch.zeros(experts.num_experts, experts.hidden_dim)
    sumsq_mid = torch.zeros(experts.num_experts, experts.intermediate_dim)
    with torch.no_grad():
        for i in range(len(calib)):
            ex = calib.example(i)
            seen.clear()
            model(input_ids=ex["input_ids"][None])
            hidden, idx = seen[0]
            resp = ex["labels"] != -100
            for e in range(experts.num_experts):
                rows = (idx == e).any(-1) & resp
                x = hidden[rows]
                sumsq_in[e] += x.pow(2).sum(0)
                gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                sumsq_mid[e] += (experts.act_fn(gate) * up).pow(2).sum(0)
    handle.remove()
    s = score(model, calib, "wanda", batch_size=2, progress=False)
    n = len(calib)
    exp_gu = experts.gate_up_proj.detach().abs() * (sumsq_in / n).sqrt()[:, None, :]
    exp_dn = experts.down_proj.detach().abs() * (sumsq_mid / n).sqrt()[:, None, :]
    torch.testing.assert_close(s["model.layers.0.mlp.experts.gate_up_proj"], exp_gu, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["model.layers.0.mlp.experts.down_proj"], exp_dn, rtol=1e-4, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
