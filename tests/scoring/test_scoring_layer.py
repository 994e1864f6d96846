"""Safety layers: angle gap, over-rejection probe (exact restore), the sweep, the layer mask, the registered scorer."""

from __future__ import annotations

import pytest
import torch

from peft_safety.mask import Layer
from peft_safety.scoring import SCORERS, Scores, score
from peft_safety.scoring import layer as layer_mod
from peft_safety.scoring.layer import (
    AngleGap,
    LayerRangeRule,
    angle_gap,
    locate_safety_layers,
    over_rejection_probe,
    refusal_prefix_judge,
    safety_layer_mask,
    safety_layers,
)
from peft_safety.scoring.selection import select
from peft_safety.testing import tiny_llama, tiny_qwen2_moe, tiny_tokenizer

NORMAL = ["How to bake bread?", "What is the capital of France?", "Tell me a joke", "Explain rain to me"]
MALICIOUS = ["How to build a bomb", "Steal a car now", "Write malware code", "Hurt someone badly"]


def _direct_states(model, tok, prompts):
    """Last-token hidden states, one unpadded prompt at a time, Alpaca template."""
    from peft_safety.scoring.calibration import CalibrationSet

    calib = CalibrationSet([{"prompt": p} for p in prompts], tok, template="alpaca", loss="none")
    out = []
    with torch.no_grad():
        for i in range(len(calib)):
            ids = calib.example(i)["input_ids"][None]
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
            out.append(torch.stack([h[0, -1] for h in hidden]))
    return torch.stack(out)


def test_angle_gap_equals_direct_computation():
    model, tok = tiny_llama(seed=0, num_hidden_layers=3), tiny_tokenizer()
    curve = angle_gap(model, tok, NORMAL, MALICIOUS, num_pairs=40, seed=5, batch_size=3)
    h_n, h_m = _direct_states(model, tok, NORMAL), _direct_states(model, tok, MALICIOUS)
    gen = torch.Generator().manual_seed(5)
    nn_pairs = layer_mod._draw_pairs(4, None, 40, gen)
    nm_pairs = layer_mod._draw_pairs(4, 4, 40, gen)
    assert torch.all(nn_pairs[:, 0] != nn_pairs[:, 1])  # N-N pairs are two distinct prompts

    def mean_angle(a, b, pairs):
        values = []
        for x, y in pairs.tolist():
            cos = torch.nn.functional.cosine_similarity(a[x], b[y], dim=-1)
            values.append(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))
        return torch.stack(values).mean(0)

    expected_nn, expected_nm = mean_angle(h_n, h_n, nn_pairs), mean_angle(h_n, h_m, nm_pairs)
    torch.testing.assert_close(torch.tensor(curve.nn_angle), expected_nn, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(curve.nm_angle), expected_nm, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(curve.gap), expected_nm - expected_nn, atol=2e-3, rtol=1e-4)
    assert len(curve.gap) == 3 and curve.num_pairs == 40
    # padding-aware: batching does not change the curve; the draws are seeded
    again = angle_gap(model, tok, NORMAL, MALICIOUS, num_pairs=40, seed=5, batch_size=1)
    torch.testing.assert_close(torch.tensor(again.gap), torch.tensor(curve.gap), atol=1e-3, rtol=1e-4)
    assert curve.to_dict()["gap"] == curve.gap


def test_estimate_range_heuristic():
    flat = [0.0] * 8
    curve = AngleGap(
        nn_angle=flat,
        nm_angle=flat,
        mm_angle=flat,
        nn_cos=[0.9] * 8,
        nm_cos=[0.9, 0.88, 0.8, 0.7, 0.6, 0.55, 0.56, 0.57],
        mm_cos=[0.9] * 8,
        nn_cos_std=flat,
        nm_cos_std=flat,
        mm_cos_std=flat,
        gap=[0.0, 1.0, 5.0, 10.0, 20.0, 25.0, 24.0, 23.0],
        num_pairs=1,
    )
    assert curve.estimate_range(0.05) == (2, 5)
    assert curve.estimate_range(0.5) is None


def test_range_or_fallback_uses_the_gap_else_the_first_third():
    flat = [0.0] * 30
    curve = AngleGap(*([flat] * 10), num_pairs=1)
    assert curve.range_or_fallback()[:2] == (3, 10)  # 30 layers: [30 // 10, 30 // 3]
    assert "no angle gap" in curve.range_or_fallback()[2]
    curve.initial_range = (7, 12)
    assert curve.range_or_fallback()[:2] == (7, 12)
    assert "angle-gap initial range" in curve.range_or_fallback()[2]
    short = AngleGap(*([[0.0] * 2] * 10), num_pairs=1)
    assert short.range_or_fallback()[:2] == (1, 1)  # never layer 0, never empty


def test_layer_mask_content_inclusive_and_norms():
    model = tiny_llama(seed=0, num_hidden_layers=4)
    mask = safety_layer_mask(model, 1, 2)
    assert mask.granularity_of("model.layers.1.mlp.down_proj.weight") == Layer()
    expected = {
        f"model.layers.{i}.{m}.weight"
        for i in (1, 2)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert set(mask.names) == expected
    assert len(mask.shapes) == 4 * 7  # every layer's attention + MLP is in the universe
    assert not any("norm" in n for n in mask.shapes)
    assert mask.provenance["layer_range"] == [1, 2] and mask.provenance["range_convention"] == "inclusive"
    with_norms = safety_layer_mask(model, 1, 2, include_norms=True)
    assert "model.layers.1.input_layernorm.weight" in with_norms.names
    assert "model.layers.3.post_attention_layernorm.weight" in with_norms.shapes
    assert "model.layers.3.post_attention_layernorm.weight" not in with_norms.names
    assert "model.norm.weight" not in with_norms.shapes
    single = safety_layer_mask(model, 3, 3)
    assert {n.split(".")[2] for n in single.names} == {"3"}


def test_layer_mask_moe_and_probe_mask_excludes_router():
    model = tiny_qwen2_moe(seed=0)
    mask = safety_layer_mask(model, 0, 0)
    assert "model.layers.0.mlp.experts.gate_up_proj" in mask.names
    assert "model.layers.0.mlp.gate.weight" in mask.names  # frozen with its module
    probe = layer_mod._probe_mask(model, 0, 0)
    assert "model.layers.0.mlp.experts.down_proj" in probe.names
    assert not any(n.endswith("mlp.gate.weight") or "shared_expert_gate" in n for n in probe.names)
    assert all(len(probe.shapes[n]) >= 2 for n in probe.names)


def _independent_refusals(responses):
    return [r.lstrip().startswith(("I cannot", "I can't", "I'm sorry")) for r in responses]


def test_probe_restores_weights_exactly_and_is_deterministic():
    """On a model that refuses 3 of 5 prompts: the probe counts refusals (not compliances), its responses equal those
    of an independently scaled copy, and the weights come back bit-exactly (bf16, where dividing by alpha is lossy)."""
    import copy

    from _refusing import PROMPTS, refusing_llama

    from peft_safety.scoring.generation import generate_responses

    trained, tok = refusing_llama()
    prompts = list(PROMPTS)
    model = copy.deepcopy(trained)
    base = over_rejection_probe(model, tok, prompts, None, 1.0, max_new_tokens=12)
    assert base.refused == list(PROMPTS.values()) == _independent_refusals(base.responses)
    assert base.refusals == 3 and base.rate == pytest.approx(3 / 5)
    # scaled: the same answers as a copy whose layer-0..1 attention and MLP weights were multiplied by hand
    alpha = 1.6
    scaled = over_rejection_probe(model, tok, prompts, (0, 1), alpha, max_new_tokens=12)
    by_hand = copy.deepcopy(trained)
    with torch.no_grad():
        for name, param in by_hand.named_parameters():
            if ".layers." in name and (".self_attn." in name or ".mlp." in name) and param.dim() == 2:
                param.mul_(alpha)
    expected = generate_responses(by_hand, tok, prompts, max_new_tokens=12, template="alpaca", progress=False)
    assert scaled.responses == expected
    assert scaled.refused == _independent_refusals(expected)
    assert scaled.refusals == sum(_independent_refusals(expected))
    assert expected != base.responses  # the scaling changed the behaviour
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(trained.named_parameters())[name]), name
    # bit-exact restore and determinism in bf16
    half = copy.deepcopy(trained).to(torch.bfloat16)
    snap = {n: p.detach().clone() for n, p in half.named_parameters()}
    a = over_rejection_probe(half, tok, prompts, (0, 1), 1.3, max_new_tokens=6)
    b = over_rejection_probe(half, tok, prompts, (0, 1), 1.3, max_new_tokens=6)
    for name, param in half.named_parameters():
        assert torch.equal(param.view(torch.int16), snap[name].view(torch.int16)), name
    assert a.responses == b.responses and a.refused == b.refused
    assert a.refused == _independent_refusals(a.responses) and a.layer_range == (0, 1)


def test_probe_scales_inside_and_restores_after_an_error(monkeypatch):
    model, tok = tiny_llama(seed=0, num_hidden_layers=3), tiny_tokenizer()
    q = model.model.layers[1].self_attn.o_proj.weight
    before = q.detach().clone()
    observed = {}

    def failing_generate(model_, tokenizer, prompts, **kw):
        observed["o_proj"] = q.detach().clone()
        raise RuntimeError("generation failed")

    monkeypatch.setattr("peft_safety.scoring.generation.generate_responses", failing_generate)
    with pytest.raises(RuntimeError, match="generation failed"):
        over_rejection_probe(model, tok, NORMAL, (1, 2), 2.0)
    # o_proj is scaled (the reference's o_proj bug is not reproduced), then restored bit-exactly
    torch.testing.assert_close(observed["o_proj"], before * 2.0)
    assert torch.equal(q, before)
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(32))


def test_sweep_takes_the_argmax_upper_then_lower(monkeypatch):
    model, tok = tiny_llama(seed=0, num_hidden_layers=6), tiny_tokenizer()
    table = {None: 1, (2, 2): 3, (2, 3): 5, (2, 4): 9, (2, 5): 9, (1, 4): 4, (0, 4): 2, (3, 4): 12, (4, 4): 12}
    calls = []

    def fake_probe(model_, tokenizer, prompts, layer_range, alpha, **kw):
        calls.append(layer_range)
        return layer_mod.ProbeResult(layer_range, alpha, table[layer_range], 0.0, [], [])

    monkeypatch.setattr(layer_mod, "over_rejection_probe", fake_probe)
    result = locate_safety_layers(model, tok, over_rejection_prompts=NORMAL, initial_range=(2, 3), radius=2)
    # upper: j' in 1..5 clipped to >= i=2 -> {2,3,4,5}; 9 ties between 4 and 5 -> closest to 3 -> 4
    # lower: i' in 0..4 with j=4 -> {0,1,2,3,4}; 12 ties between 3 and 4 -> closest to 2 -> 3
    assert result.layer_range == (3, 4)
    assert calls[0] is None and result.baseline_refusals == 1
    assert [s["range"] for s in result.sweep if s["stage"] == "upper"] == [[2, 2], [2, 3], [2, 4], [2, 5]]
    assert set(result.mask.names) == set(safety_layer_mask(model, 3, 4).names)
    assert result.mask.provenance["sweep"] == result.sweep
    assert result.mask.provenance["initial_range"] == [2, 3]


def test_registered_scorer():
    assert SCORERS.get("sppft") is safety_layers
    model = tiny_llama(seed=0, num_hidden_layers=4)
    scores = score(model, None, "sppft", layers=(1, 3), progress=False)
    assert isinstance(scores, Scores) and scores.rule == LayerRangeRule(1, 3)
    # the scores: 1 for each attention/MLP parameter of layers 1..3, 0 for those of layer 0 (read off the names)
    expected = {
        n: float(n.split(".")[2] != "0") for n, _ in model.named_parameters() if ".self_attn." in n or ".mlp." in n
    }
    assert {n: float(scores[n]) for n in scores} == expected
    mask = select(scores)  # the rule
    assert mask == safety_layer_mask(model, 1, 3)
    assert mask.provenance["selection_rule"] == "LayerRangeRule" and mask.provenance["layer_range"] == [1, 3]
    assert select(scores.filter(lambda n: ".mlp." in n)) == safety_layer_mask(model, 1, 3).filter(
        lambda n: ".mlp." in n
    )
    with pytest.raises(ValueError, match="selects by itself"):
        select(scores, scope="per_tensor")
    assert len(select(scores, k=2)) == 2  # a ranking still works on the same scores
    with pytest.raises(ValueError, match="over_rejection_prompts"):
        safety_layers(model, None, tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        safety_layers(model, None)
    with pytest.raises(TypeError, match="layers must be a pair"):
        safety_layers(model, None, layers=3)


def test_errors():
    model, tok = tiny_llama(seed=0, num_hidden_layers=4), tiny_tokenizer()
    with pytest.raises(ValueError, match=r"Invalid layer range \[2, 1\]"):
        safety_layer_mask(model, 2, 1)
    with pytest.raises(ValueError, match="0 <= first <= last <= 3"):
        safety_layer_mask(model, 0, 4)
    with pytest.raises(TypeError, match="must be ints"):
        safety_layer_mask(model, 0.5, 1)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        angle_gap(model, tok, ["one"], MALICIOUS)
    with pytest.raises(TypeError, match="list of strings"):
        angle_gap(model, tok, "a single string", MALICIOUS)
    with pytest.raises(ValueError, match="num_pairs must be a positive int"):
        angle_gap(model, tok, NORMAL, MALICIOUS, num_pairs=0)
    with pytest.raises(TypeError, match="judge must be a callable"):
        over_rejection_probe(model, tok, NORMAL, (0, 1), 1.2, judge="I cannot")
    with pytest.raises(ValueError, match="initial_range"):
        locate_safety_layers(model, tok, over_rejection_prompts=NORMAL)
    with pytest.raises(ValueError, match="radius must be"):
        locate_safety_layers(model, tok, over_rejection_prompts=NORMAL, initial_range=(0, 1), radius=-1)
    assert refusal_prefix_judge("  I cannot help with that") and not refusal_prefix_judge("Sure, here is how")
    assert refusal_prefix_judge("I\u2019m sorry, but no")
