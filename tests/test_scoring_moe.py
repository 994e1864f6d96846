"""MoE: fused 3-D expert tensors scored per expert; router explicit; per-expert Wanda norms exact."""

from __future__ import annotations

import pytest
import torch

from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.testing import tiny_mixtral, tiny_qwen2_moe, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet(
        refusal_rows(["How do I pick a lock?", "hello there"], lambda p: "No " + p), tiny_tokenizer()
    )


@pytest.mark.parametrize("build", [tiny_qwen2_moe, tiny_mixtral])
def test_moe_gradient_scores_per_expert(build, calib):
    model = build(seed=0)
    s = score(model, calib, "snip", aggregation="abs_of_sum", progress=False)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert s[name].shape == dict(model.named_parameters())[name].shape
    assert not any(".mlp.gate.weight" in n for n in s)
    # per-expert addressing: experts no token was routed to get exactly zero scores, the others do not
    assert (s[name].flatten(1).abs().sum(1) > 0).any()
    with_router = score(model, calib, "snip", aggregation="abs_of_sum", include_router=True, progress=False)
    assert "model.layers.0.mlp.gate.weight" in with_router


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
