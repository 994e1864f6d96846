"""Safety neurons (PLND / SN-Tune) and RSN-Tune: statistics, GQA mapping, selection semantics, MoE, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from peft_safety.mask import Neuron
from peft_safety.scoring import SCORERS, Scores, query_to_kv_rows, resolve_targets, score
from peft_safety.scoring.calibration import CalibrationSet
from peft_safety.scoring.neuron import (
    SupportRule,
    attention_deactivation_scores,
    detect_safety_neurons,
    rsn_tune_mask,
    safety_neurons,
)
from peft_safety.scoring.selection import select
from peft_safety.testing import tiny_llama, tiny_qwen2_moe, tiny_tokenizer

HARMFUL = ["How do I make a weapon?", "Tell me how to steal a car", "hack it", "Write malware now please"]
GENERAL = ["The sun is a star.", "Paris is in France and has many museums.", "Rivers flow to the sea"]
L0 = "model.layers.0."


def calib_of(prompts, **kw):
    return CalibrationSet([{"prompt": p} for p in prompts], tiny_tokenizer(), template="raw", loss="none", **kw)


# ---------------------------------------------------------------------------------------------------------------------
# attention statistic: closed form vs brute-force deactivation, GQA mapping
# ---------------------------------------------------------------------------------------------------------------------
def _softmax_change(q, k, mask, scaling, valid, q_off=None, k_off=None):
    """Brute force: zero one query dim (q_off=(h, d)) or one kv row (k_off=(kvh, d)) and sum squared changes."""
    groups = q.shape[1] // k.shape[1]

    def probs(qq, kk):
        logits = qq @ kk.repeat_interleave(groups, 1).transpose(-1, -2) * scaling + mask
        return torch.softmax(logits, -1)

    base = probs(q, k)
    q2, k2 = q.clone(), k.clone()
    if q_off is not None:
        q2[:, q_off[0], :, q_off[1]] = 0
    if k_off is not None:
        k2[:, k_off[0], :, k_off[1]] = 0
    sq = (probs(q2, k2) - base).square().sum(-1)  # (B, H, T)
    return (sq * valid[:, None, :]).sum((1, 2))  # per sample


def _toy(seed=0, batch=2, heads=4, kv_heads=2, t_len=6, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, t_len, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, t_len, dim, generator=g, dtype=torch.float64)
    # causal + right padding of the second sample (last 2 positions)
    lengths = torch.tensor([t_len, t_len - 2])
    valid = torch.arange(t_len)[None, :] < lengths[:, None]
    allowed = torch.tril(torch.ones(t_len, t_len, dtype=torch.bool))[None] & valid[:, None, :]
    # the additive mask transformers builds: 0 where allowed, the fp32 minimum elsewhere
    mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float32).min)[
        :, None
    ]
    return q, k, mask, valid


def test_deactivation_scores_match_brute_force_query_space():
    q, k, mask, valid = _toy()
    scaling = 8**-0.5
    fast = attention_deactivation_scores(q, k, mask, scaling=scaling, query_mask=valid)
    assert fast.shape == (2, 4, 8) and fast.dtype == torch.float32
    for h in range(4):
        for d in range(8):
            slow = _softmax_change(q, k, mask, scaling, valid, q_off=(h, d))
            torch.testing.assert_close(fast[:, h, d].double(), slow, rtol=1e-4, atol=1e-7)


def test_gqa_kv_rows_match_kv_deactivation():
    """Deactivating kv row floor(h/g)*d_h + d == summing the query-space scores mapped there (never index // g)."""
    q, k, mask, valid = _toy(seed=1)
    scaling = 0.3
    fast = attention_deactivation_scores(q, k, mask, scaling=scaling, query_mask=valid).reshape(2, 32)
    rows = query_to_kv_rows(torch.arange(32), 4, 2, 8)
    grouped = torch.zeros(2, 16).index_add_(1, rows, fast)
    wrong = torch.zeros(2, 16).index_add_(1, torch.arange(32) // 2, fast)
    for kvh in range(2):
        for d in range(8):
            slow = _softmax_change(q, k, mask, scaling, valid, k_off=(kvh, d))
            torch.testing.assert_close(grouped[:, kvh * 8 + d].double(), slow, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grouped, wrong)


def test_deactivation_chunking_does_not_change_scores():
    q, k, mask, valid = _toy(seed=2)
    a = attention_deactivation_scores(q, k, mask, scaling=0.5, query_mask=valid, chunk_elements=1)
    b = attention_deactivation_scores(q, k, mask, scaling=0.5, query_mask=valid, chunk_elements=2**30)
    torch.testing.assert_close(a, b)


def test_deactivation_shape_errors():
    with pytest.raises(ValueError, match="query must be"):
        attention_deactivation_scores(torch.zeros(2, 4, 8), torch.zeros(2, 2, 3, 8), scaling=1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_deactivation_scores(torch.zeros(1, 3, 2, 8), torch.zeros(1, 2, 2, 8), scaling=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# on a model: FFN by hand, k/v = group sums of q/o, axes, padding, batching
# ---------------------------------------------------------------------------------------------------------------------
def _manual_ffn(model, calib):
    """sum_t |act(gate) * up| per sample for every layer, through a plain pre-hook on down_proj (batch size 1)."""
    out = {}
    for i in range(len(calib)):
        batch = calib.collate([i])
        captured = {}
        handles = [
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda mod, args, idx=idx, captured=captured: captured.__setitem__(
                    idx, args[0].detach().abs().sum((0, 1))
                )
            )
            for idx, layer in enumerate(model.model.layers)
        ]
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for h in handles:
                h.remove()
        out[i] = captured
    return out


def test_ffn_scores_equal_hand_computation_with_padding():
    model = tiny_llama(seed=0)
    calib = calib_of(HARMFUL)
    result = detect_safety_neurons(model, calib, modules="all", top_k_attn=4, top_k_ffn=8, batch_size=3)
    manual = _manual_ffn(model, calib)
    for layer in range(2):
        expected = sum(manual[i][layer] for i in range(len(calib))) / len(calib)
        pre = f"model.layers.{layer}.mlp."
        for name in ("down_proj", "up_proj", "gate_proj"):
            torch.testing.assert_close(result.scores[pre + name + ".weight"], expected, rtol=1e-5, atol=1e-6)
    # axes: down is addressed by columns, the others by rows; k/v by kv rows
    mask = result.mask
    assert mask.granularity_of(L0 + "mlp.down_proj.weight") == Neuron(axis=1)
    assert mask.granularity_of(L0 + "mlp.up_proj.weight") == Neuron(axis=0)
    assert mask.granularity_of(L0 + "self_attn.o_proj.weight") == Neuron(axis=1)
    assert result.scores[L0 + "self_attn.k_proj.weight"].shape == (16,)
    assert result.scores[L0 + "self_attn.q_proj.weight"].shape == (32,)


def _naive_attention_scores(model, calib):
    """Independent reference for q/k/v/o neuron scores: batch 1 per sample, fp64, naive loops.

    Post-RoPE q, k are recomputed from the attention input (transformers' own ``apply_rotary_pos_emb``), the causal
    attention of every head is recomputed with one query dimension (q) or one key dimension of a kv head (k) set to
    zero, and the squared change of every head's attention map is summed; v/o are ``sum_t |o_proj input|`` (o) and
    its sum over the query heads ``h`` that read kv head ``h // g`` (v). Mean over samples.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    groups = heads // kv_heads
    scaling = dim**-0.5
    totals = {}
    for i in range(len(calib)):
        batch = calib.collate([i])
        seen = {}
        handles = []
        for idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn

            def pre(mod, args, kwargs, idx=idx, seen=seen):
                seen[("x", idx)] = kwargs.get("hidden_states", args[0] if args else None).detach()
                seen[("pe", idx)] = kwargs["position_embeddings"]

            handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(
                attn.o_proj.register_forward_pre_hook(
                    lambda m, a, idx=idx, seen=seen: seen.__setitem__(("o", idx), a[0].detach())
                )
            )
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for h in handles:
                h.remove()
        for idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = seen[("x", idx)]
            t_len = x.shape[1]
            with torch.no_grad():
                q = attn.q_proj(x).view(1, t_len, heads, dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, t_len, kv_heads, dim).transpose(1, 2)
                cos, sin = seen[("pe", idx)]
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k = q[0].double(), k[0].double()  # (H, T, d), (H_kv, T, d)
            causal = torch.tril(torch.ones(t_len, t_len, dtype=torch.bool))

            def maps(qq, kk, causal=causal):
                out = []
                for h in range(heads):
                    logits = (qq[h] @ kk[h // groups].T) * scaling
                    out.append(torch.softmax(logits.masked_fill(~causal, float("-inf")), -1))
                return torch.stack(out)

            base = maps(q, k)
            q_score = torch.zeros(heads * dim, dtype=torch.float64)
            for h in range(heads):
                for d in range(dim):
                    q2 = q.clone()
                    q2[h, :, d] = 0
                    q_score[h * dim + d] = (maps(q2, k) - base).square().sum()
            k_score = torch.zeros(kv_heads * dim, dtype=torch.float64)
            for kvh in range(kv_heads):
                for d in range(dim):
                    k2 = k.clone()
                    k2[kvh, :, d] = 0
                    k_score[kvh * dim + d] = (maps(q, k2) - base).square().sum()
            o_score = seen[("o", idx)][0].double().abs().sum(0)
            v_score = torch.zeros(kv_heads * dim, dtype=torch.float64)
            for h in range(heads):
                v_score[(h // groups) * dim : (h // groups + 1) * dim] += o_score[h * dim : (h + 1) * dim]
            pre_name = f"model.layers.{idx}.self_attn."
            for role, value in (("q", q_score), ("k", k_score), ("v", v_score), ("o", o_score)):
                key = pre_name + f"{role}_proj.weight"
                totals[key] = totals.get(key, 0) + value
    return {name: value / len(calib) for name, value in totals.items()}


def test_kv_scores_are_group_sums_of_query_space_scores():
    """q/k/v/o neuron scores (batched, padded) equal a naive per-head deactivation loop run per sample in fp64."""
    model = tiny_llama(seed=0)
    calib = calib_of(HARMFUL)
    result = detect_safety_neurons(model, calib, modules="all", batch_size=2)
    reference = _naive_attention_scores(model, calib)
    assert len(reference) == 8
    for name, expected in reference.items():
        got = result.scores[name].double()
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
        assert torch.all(expected > 0), name


def test_batch_size_and_padding_side_do_not_change_scores():
    model = tiny_llama(seed=0)
    a = detect_safety_neurons(model, calib_of(HARMFUL), modules="all", batch_size=1)
    b = detect_safety_neurons(model, calib_of(HARMFUL), modules="all", batch_size=4)
    c = detect_safety_neurons(model, calib_of(HARMFUL, padding_side="left"), modules="all", batch_size=4)
    for name in a.scores:
        torch.testing.assert_close(a.scores[name], b.scores[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.scores[name], c.scores[name], rtol=1e-4, atol=1e-5)
    assert a.mask == b.mask


# ---------------------------------------------------------------------------------------------------------------------
# selection semantics
# ---------------------------------------------------------------------------------------------------------------------
def _per_sample_scores(model, prompts, **kw):
    return [detect_safety_neurons(model, calib_of([p]), **kw).scores for p in prompts]


def test_per_sample_topk_and_support_semantics():
    model = tiny_llama(seed=0)
    kw = {"modules": ("q", "down"), "top_k_attn": 5, "top_k_ffn": 10}
    per_sample = _per_sample_scores(model, HARMFUL, **kw)
    n = len(HARMFUL)
    for min_support in (1.0, 0.5, 0.25):
        result = detect_safety_neurons(model, calib_of(HARMFUL), min_support=min_support, batch_size=3, **kw)
        need = math.ceil(min_support * n)
        for name in result.scores:
            k = 5 if "q_proj" in name else 10
            counts = torch.zeros(result.scores[name].shape[0], dtype=torch.int32)
            for s in per_sample:
                top = torch.sort(s[name], descending=True, stable=True).indices[:k]
                counts[top[s[name][top] > 0]] += 1
            assert torch.equal(result.support[name], counts), name
            expected = (counts >= need).nonzero().reshape(-1)
            assert result.mask[name].tolist() == expected.tolist(), (name, min_support)
    # looser support selects a superset
    strict = detect_safety_neurons(model, calib_of(HARMFUL), min_support=1.0, **kw).mask
    loose = detect_safety_neurons(model, calib_of(HARMFUL), min_support=0.5, **kw).mask
    assert (strict - loose).numel() == 0 and len(loose) >= len(strict)


def test_cap_keeps_the_highest_mean_scores():
    model = tiny_llama(seed=0)
    kw = {"modules": ("q", "up", "down"), "top_k_attn": 0.75, "top_k_ffn": 0.75, "min_support": 0.5}
    full = detect_safety_neurons(model, calib_of(HARMFUL), **kw)
    capped = detect_safety_neurons(model, calib_of(HARMFUL), max_per_module=3, **kw)
    for name in full.mask.names:
        kept, pool = capped.mask[name], full.mask[name]
        assert len(kept) == min(3, len(pool))
        assert set(kept.tolist()) <= set(pool.tolist())
        mean = full.scores[name]
        dropped = sorted(set(pool.tolist()) - set(kept.tolist()))
        if dropped:
            assert float(mean[kept.long()].min()) >= float(mean[torch.tensor(dropped)].max())
    assert capped.mask.provenance["max_per_module"] == 3


def test_determinism_and_attention_implementation_restored():
    model = tiny_llama(seed=0)
    before = model.config._attn_implementation
    a = detect_safety_neurons(model, calib_of(HARMFUL), min_support=0.5)
    b = detect_safety_neurons(model, calib_of(HARMFUL), min_support=0.5)
    assert a.mask == b.mask
    assert all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores)
    assert model.config._attn_implementation == before
    assert a.mask.provenance["method"] == "safety_neurons"
    assert "data_hash" in a.mask.provenance


def test_registry_and_score_entry_point():
    assert SCORERS.get("plnd") is safety_neurons and SCORERS.get("sn_tune") is safety_neurons
    model = tiny_llama(seed=0)
    scores = score(model, calib_of(HARMFUL[:2]), "sn_tune", exclude_modules=["k_proj"], progress=False, top_k_ffn=6)
    assert isinstance(scores, Scores) and isinstance(scores.rule, SupportRule)
    mask = select(scores)  # PLND's own selection, the rule the scores carry
    assert not any("k_proj" in n for n in mask.shapes)
    assert any("down_proj" in n for n in mask.names)
    direct = detect_safety_neurons(model, calib_of(HARMFUL[:2]), progress=False, top_k_ffn=6,
                                   targets=resolve_targets(model, exclude_modules=["k_proj"]))  # fmt: skip
    assert mask == direct.mask
    assert mask.fingerprints  # score() records the weights' fingerprints; the rule copies them into the mask


def test_support_rule_matches_plnd_by_hand():
    """The rule's selection, recomputed from the support counts and the mean scores with plain loops: a unit is kept
    when its support reaches ``need``, and a module keeps at most ``max_per_module`` of them, the highest scores."""
    model = tiny_llama(seed=0)
    cap = 3
    result = detect_safety_neurons(model, calib_of(HARMFUL), modules="all", top_k_attn=0.5, top_k_ffn=0.5,
                                   min_support=0.5, max_per_module=cap, batch_size=3)  # fmt: skip
    rule = result.scores.rule
    expected: dict[str, set[int]] = {}
    for name, start, stop in rule.slots:
        support = result.support[name].tolist()
        means = result.scores[name].tolist()
        kept = [u for u in range(start, stop) if support[u] >= rule.need]
        kept.sort(key=lambda u: (-means[u], u))
        expected.setdefault(name, set()).update(kept[:cap])
    got = {n: set(result.mask[n].tolist()) for n in result.mask.names}
    assert got == {n: units for n, units in expected.items() if units}
    assert any(len(units) == cap for units in got.values())  # the cap binds somewhere
    assert select(result.scores) == result.mask
    # restricted scores: the rule applies to the remaining names only
    some = list(result.mask.names)[:2]
    assert select(result.scores.restrict(some)) == result.mask.restrict(some)


# ---------------------------------------------------------------------------------------------------------------------
# RSN-Tune and MoE
# ---------------------------------------------------------------------------------------------------------------------
def test_rsn_tune_is_safety_minus_foundation():
    model = tiny_llama(seed=0)
    kw = {"top_k_attn": 0.5, "top_k_ffn": 0.5, "min_support": 0.5}
    safety = detect_safety_neurons(model, calib_of(HARMFUL), **kw).mask
    foundation = detect_safety_neurons(model, calib_of(GENERAL), **kw).mask
    rsn = rsn_tune_mask(model, calib_of(HARMFUL), calib_of(GENERAL), **kw)
    assert rsn == safety - foundation
    assert (rsn & foundation).numel() == 0
    assert 0 < len(rsn) < len(safety)
    assert rsn.provenance["method"] == "rsn_tune"
    assert rsn.provenance["safety_units"] == len(safety)


def test_moe_fused_experts_per_expert_neurons():
    model = tiny_qwen2_moe(seed=0)
    calib = calib_of(HARMFUL)
    result = detect_safety_neurons(model, calib, modules=("gate", "up", "down"), top_k_ffn=4, batch_size=2)
    gu, dn = L0 + "mlp.experts.gate_up_proj", L0 + "mlp.experts.down_proj"
    assert result.mask.granularity_of(gu) == Neuron(axis=0) and result.mask.granularity_of(dn) == Neuron(axis=1)
    assert not any("mlp.gate.weight" in n or "shared_expert_gate" in n for n in result.mask.shapes)
    # hand computation for layer 0: tokens routed to expert e, |act(gate) * up|, summed, mean over samples
    experts = model.model.layers[0].mlp.experts
    expected = torch.zeros(4 * 16)
    for i in range(len(calib)):
        batch = calib.collate([i])
        seen = {}
        handle = experts.register_forward_hook(lambda m, args, out, seen=seen: seen.update(x=args[0], idx=args[1]))
        try:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            handle.remove()
        for e in range(4):
            tokens = (seen["idx"] == e).any(-1)
            gate, up = (seen["x"][tokens] @ experts.gate_up_proj[e].detach().T).chunk(2, -1)
            expected[e * 16 : (e + 1) * 16] += (experts.act_fn(gate) * up).abs().sum(0)
    expected /= len(calib)
    torch.testing.assert_close(result.scores[dn], expected, rtol=1e-5, atol=1e-6)
    # gate rows and up rows of each expert carry the same score as its down columns
    per_expert = result.scores[gu].reshape(4, 2, 16)
    torch.testing.assert_close(per_expert[:, 0], expected.reshape(4, 16))
    torch.testing.assert_close(per_expert[:, 1], expected.reshape(4, 16))
    # per-expert top-k: at most k units per expert module per sample -> the support bound holds per expert
    assert int(result.support[dn].reshape(4, 16).gt(0).sum(1).max()) <= 4 * len(calib)
    for unit in result.mask[dn].tolist():
        assert result.support[dn][unit] == len(calib)


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------
def test_errors():
    model = tiny_llama(seed=0)
    calib = calib_of(HARMFUL[:1])
    with pytest.raises(TypeError, match="CalibrationSet"):
        detect_safety_neurons(model, ["text"])
    with pytest.raises(ValueError, match="modules must be"):
        detect_safety_neurons(model, calib, modules=("ffn",))
    with pytest.raises(ValueError, match="top_k_ffn must be in"):
        detect_safety_neurons(model, calib, top_k_ffn=1.5)
    with pytest.raises(ValueError, match="top_k_attn must be >= 1"):
        detect_safety_neurons(model, calib, top_k_attn=0)
    with pytest.raises(TypeError, match="top_k_attn must be an int"):
        detect_safety_neurons(model, calib, top_k_attn="10")
    with pytest.raises(ValueError, match="min_support must be in"):
        detect_safety_neurons(model, calib, min_support=0.0)
    with pytest.raises(ValueError, match="max_per_module must be >= 1"):
        detect_safety_neurons(model, calib, max_per_module=0)
    with pytest.raises(ValueError, match="positions must be"):
        detect_safety_neurons(model, calib, positions="response")
    with pytest.raises(ValueError, match="No parameter to score"):
        detect_safety_neurons(
            model, calib, modules=("o",), targets=resolve_targets(model, target_modules=["down_proj"])
        )
