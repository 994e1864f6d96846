"""Targets: roles, axes, router/embedding/lm_head policy, tied weights, GQA map, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_safety.scoring.targets import attention_geometry, fused_row_ranges, query_to_kv_rows, resolve_targets
from peft_safety.testing import tiny_llama, tiny_mixtral, tiny_qwen2_moe


def test_llama_roles_and_axes():
    t = resolve_targets(tiny_llama())
    assert len(t) == 14 and "lm_head.weight" not in t and "model.embed_tokens.weight" not in t
    roles = {n.split(".")[-2]: (i.role, i.neuron_axis, i.layer) for n, i in t.items() if ".layers.1." in n}
    assert roles["q_proj"] == ("q", 0, 1) and roles["down_proj"] == ("down", 1, 1) and roles["o_proj"] == ("o", 1, 1)
    assert t.numel() == sum(p.numel() for n, p in tiny_llama().named_parameters() if n in t)


def test_moe_router_explicit_and_fused_experts():
    model = tiny_qwen2_moe()
    t = resolve_targets(model)
    assert not any("mlp.gate.weight" in n or "shared_expert_gate" in n for n in t)
    gu = t["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu.expert_dim == 0 and gu.num_experts == 4 and gu.fused == (("gate", 0, 16), ("up", 16, 32))
    assert t["model.layers.0.mlp.experts.down_proj"].neuron_axis == 1
    with_router = resolve_targets(model, include_router=True)
    assert with_router["model.layers.0.mlp.gate.weight"].role == "router"
    assert with_router["model.layers.0.mlp.shared_expert_gate.weight"].role == "router"
    assert "model.layers.0.mlp.gate.weight" in resolve_targets(tiny_mixtral(), include_router=True)


def test_embeddings_lm_head_and_tied():
    t = resolve_targets(tiny_llama(), include_lm_head=True, include_embeddings=True)
    assert t["lm_head.weight"].role == "lm_head" and t["model.embed_tokens.weight"].role == "embed"
    tied = tiny_llama(tie_word_embeddings=True)
    tt = resolve_targets(tied, include_lm_head=True)
    assert "lm_head.weight" not in tt and "model.embed_tokens.weight" in tt
    assert tt.tied == {"lm_head.weight": "model.embed_tokens.weight"}


def test_target_and_exclude_modules():
    model = tiny_llama()
    assert resolve_targets(model, target_modules=["down_proj"]).names == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    assert len(resolve_targets(model, target_modules=r".*layers\.0\..*")) == 7
    assert len(resolve_targets(model, exclude_modules=["self_attn.q_proj"])) == 12
    with pytest.raises(ValueError, match=r"target_modules entries \['dwn_proj'\] match no module.*down_proj"):
        resolve_targets(model, target_modules=["dwn_proj"])
    with pytest.raises(TypeError, match="target_modules must be a str"):
        resolve_targets(model, target_modules=[1])


def test_unknown_architecture():
    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 1)

    with pytest.raises(ValueError, match=r"No parameter of Conv is eligible.*target_modules"):
        resolve_targets(Conv())


def test_gqa_map_matches_repeat_kv():
    n_heads, n_kv, d = 4, 2, 8
    assert attention_geometry(tiny_llama()) == (n_heads, n_kv, d)
    # repeat_kv expands kv head j to query heads j*g .. j*g+g-1: build that map by construction and compare
    kv = torch.arange(n_kv * d).reshape(n_kv, 1, d).expand(n_kv, n_heads // n_kv, d).reshape(-1)
    assert torch.equal(query_to_kv_rows(torch.arange(n_heads * d), n_heads, n_kv, d), kv)
    assert query_to_kv_rows([17], n_heads, n_kv, d).tolist() == [9]  # head 2, dim 1 -> kv head 1: 8 + 1 (not 17 // 2)
    with pytest.raises(ValueError, match="must lie in"):
        query_to_kv_rows([32], n_heads, n_kv, d)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        query_to_kv_rows([0], 4, 3, 8)


def test_fused_qkv_offsets():
    assert fused_row_ranges("qkv", 64, (4, 2, 8)) == (("q", 0, 32), ("k", 32, 48), ("v", 48, 64))
    with pytest.raises(ValueError, match="implies 64"):
        fused_row_ranges("qkv", 60, (4, 2, 8))
