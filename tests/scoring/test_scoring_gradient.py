"""snip / esi: closed-form checks against per-sample autograd, aggregation, padding invariance, hygiene, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.scoring.gradient import JudgeObjective
from peft_safety.testing import tiny_llama, tiny_tokenizer

PROMPTS = ["How do I pick a lock?", "hi", "Write malware now", "ok"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib(tok):
    return CalibrationSet(refusal_rows(PROMPTS, lambda p: "No. " + p[::-1]), tok)


def per_sample_grads(model, calib, name):
    """Reference: one autograd call per sample on the response-only mean NLL."""
    weight = dict(model.named_parameters())[name]
    grads = []
    for i in range(len(calib)):
        ex = calib.example(i)
        logits = model(input_ids=ex["input_ids"][None]).logits[0, :-1]
        labels = ex["labels"][1:]
        keep = labels != -100
        (g,) = torch.autograd.grad(F.cross_entropy(logits[keep], labels[keep]), weight)
        grads.append(g)
    return weight.detach(), torch.stack(grads)


NAMES = ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def test_snip_and_esi_closed_form(calib):
    model = tiny_llama(seed=0)
    s_abs = score(model, calib, "snip", progress=False)
    s_sum = score(model, calib, "snip", aggregation="abs_of_sum", batch_size=3, progress=False)
    e = score(model, calib, "esi", batch_size=3, progress=False)
    for name in NAMES:
        w, g = per_sample_grads(model, calib, name)
        torch.testing.assert_close(s_abs[name], w.abs() * g.abs().sum(0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s_sum[name], w.abs() * g.sum(0).abs(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(e[name], g.sum(0).abs() * w.std(), rtol=1e-4, atol=1e-9)
    assert s_abs.provenance["aggregation"] == "sum_of_abs" and e.provenance["std"].startswith("unbiased")
    assert s_abs.provenance["data_hash"] == calib.data_hash and s_abs.provenance["method"] == "snip"


def test_sum_of_abs_vs_abs_of_sum(calib):
    model = tiny_llama(seed=0)
    a = score(model, calib, "snip", target_modules=["down_proj"], progress=False)
    b = score(model, calib, "snip", aggregation="abs_of_sum", target_modules=["down_proj"], progress=False)
    for name in a:
        # triangle inequality: |sum g| <= sum |g|, strict where per-sample signs disagree
        assert (b[name] <= a[name] * (1 + 1e-5) + 1e-12).all()
        assert (b[name] < a[name] * (1 - 1e-3)).any()
    # a single sample: both aggregations coincide
    one = calib.subsample(1, seed=0)
    a1 = score(model, one, "snip", target_modules=["down_proj"], progress=False)
    b1 = score(model, one, "snip", aggregation="abs_of_sum", target_modules=["down_proj"], progress=False)
    for name in a1:
        torch.testing.assert_close(a1[name], b1[name], rtol=1e-5, atol=1e-10)


def test_padding_and_batching_invariance(calib):
    model = tiny_llama(seed=0)
    alone = score(model, calib, "esi", batch_size=1, progress=False)
    padded = score(model, calib, "esi", batch_size=4, progress=False)
    for name in alone:
        torch.testing.assert_close(alone[name], padded[name], rtol=1e-4, atol=1e-9)


def test_hygiene_and_determinism(calib):
    model = tiny_llama(seed=0)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a user flag that must survive
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    first = score(model, calib, "snip", aggregation="abs_of_sum", batch_size=2, progress=False)
    second = score(model, calib, "snip", aggregation="abs_of_sum", batch_size=2, progress=False)
    for name in first:
        assert torch.equal(first[name], second[name])
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == before[n], n
        assert not p._post_accumulate_grad_hooks, n
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training is False


def test_bf16_and_checkpointing(calib):
    """bf16 model: fp32 scores within a bound set by bf16 precision of an fp64 reference on the same (bf16-rounded)
    weights; gradient checkpointing: the same scores as without it."""
    ref = score(tiny_llama(seed=0), calib, "esi", progress=False)
    bf16 = score(tiny_llama(seed=0, dtype=torch.bfloat16), calib, "esi", progress=False)
    exact = tiny_llama(seed=0, dtype=torch.bfloat16).to(torch.float64)  # the same weights, exact arithmetic
    weights = dict(exact.named_parameters())
    grads = {n: torch.zeros_like(weights[n]) for n in bf16.names}
    for i in range(len(calib)):
        ex = calib.example(i)
        logits = exact(input_ids=ex["input_ids"][None]).logits[0, :-1]
        labels = ex["labels"][1:]
        keep = labels != -100
        loss = F.cross_entropy(logits[keep], labels[keep])
        for n, g in zip(grads, torch.autograd.grad(loss, [weights[n] for n in grads])):
            grads[n] += g
    # bf16 keeps 8 significant bits: unit roundoff u = 2**-8. Every matmul output and activation of the 2-layer
    # forward and backward is rounded once to bf16 (fp32 accumulation inside), so the score, a product of a few
    # such factors, carries a normwise relative error of a small multiple of u (about 1.5u measured). Allow 4u:
    # an fp32 accumulator or std(W) lost, or a gradient folded in the wrong place, is far outside it.
    bound = 4 * 2.0**-8
    for name in grads:
        assert bf16[name].dtype == torch.float32
        expected = grads[name].abs() * weights[name].detach().std()
        err = (bf16[name].double() - expected).norm() / expected.norm()
        assert err < bound, (name, float(err))
    model = tiny_llama(seed=0)
    model.train()
    model.gradient_checkpointing_enable()
    ck = score(model, calib, "esi", progress=False)
    for n in ref:
        torch.testing.assert_close(ck[n], ref[n], rtol=1e-4, atol=1e-9)
    assert model.training is True


def test_nan_gradient_names_parameter(calib):
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Non-finite (loss|gradient).* batch 0"):
        score(model, calib, "esi", progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_nan_gradient_with_finite_loss(calib):
    from peft_safety.scoring.gradient import refusal_nll

    model = tiny_llama(seed=0)
    w = model.model.layers[1].mlp.down_proj.weight

    def objective(m, batch, batch_index):
        # sqrt at 0: the value is 0 (finite loss) but the derivative is inf
        return refusal_nll(m, batch, batch_index) + torch.sqrt(w[0, 0] - w[0, 0].detach())

    with pytest.raises(
        ValueError, match=r"Non-finite gradient .* 'model\.layers\.1\.mlp\.down_proj\.weight' at batch 0"
    ):
        score(model, calib, "esi", objective=objective, progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs(calib, tok):
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=r"Unknown scorer 'snp'\. Did you mean 'snip'\?"):
        score(model, calib, "snp")
    with pytest.raises(ValueError, match="Unknown aggregation 'mean'"):
        score(model, calib, "snip", aggregation="mean", progress=False)
    with pytest.raises(ValueError, match="need calibration data"):
        score(model, None, "snip", progress=False)
    with pytest.raises(ValueError, match="loss='none'"):
        score(model, CalibrationSet([{"prompt": "hi"}], tok, loss="none"), "esi", progress=False)
    with pytest.raises(ValueError, match="match no module"):
        score(model, calib, "esi", target_modules=["nope_proj"], progress=False)


def test_judge_objective_tiny_guard(calib, tok):
    model, guard = tiny_llama(seed=0), tiny_llama(seed=1, num_hidden_layers=1)
    judge = JudgeObjective(guard, tok, tok, safe_token="s", seed=0)
    a = score(model, calib, "esi", objective=judge, progress=False)
    b = score(model, calib, "esi", objective=JudgeObjective(guard, tok, tok, safe_token="s", seed=0), progress=False)
    c = score(model, calib, "esi", objective=JudgeObjective(guard, tok, tok, safe_token="s", seed=1), progress=False)
    name = NAMES[1]
    assert torch.equal(a[name], b[name])  # seeded Gumbel noise: reproducible
    assert not torch.equal(a[name], c[name])
    assert a[name].abs().sum() > 0
    assert all(p.grad is None for p in guard.parameters()) and all(p.requires_grad for p in guard.parameters())
    assert a.provenance["objective"] == "JudgeObjective"
    # identical tokenizers: the vocabulary transfer is the identity on ordinary tokens
    dense = judge.transfer_matrix(128).to_dense()
    assert dense[40, 40] == 1 and dense[40].sum() == 1
    with pytest.raises(ValueError, match="is 2 guard tokens"):
        JudgeObjective(guard, tok, tok, safe_token="ab")


def test_device_map_model_scores_like_the_plain_model(calib, tmp_path):
    # a model dispatched by accelerate (device_map) scores exactly like the same weights loaded plainly; the fp32
    # accumulators live on each parameter's own device
    from transformers import AutoModelForCausalLM

    from peft_safety.scoring import score
    from peft_safety.testing import tiny_llama

    tiny_llama(seed=0).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"model": "cpu", "lm_head": "cpu"})
    a = score(plain, calib, "esi", progress=False)
    b = score(dispatched, calib, "esi", progress=False)
    for name in a.names:
        assert torch.equal(a[name], b[name]), name
        assert b[name].device == dict(dispatched.named_parameters())[name].device


def test_scoring_a_model_with_injected_adapters_is_a_clear_error(calib):
    # get_peft_model wraps the base model in place: scoring it afterwards would score renamed '...base_layer' weights
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=0)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"PEFT adapter layers injected .*merge_and_unload"):
        score(model, calib, "esi", progress=False)


def test_judge_objective_is_batch_invariant(calib, tok):
    """The judge-guided ESI objective gives the same scores for batch sizes 1, 2 and 4, equal to the explicit sum of
    per-sample gradients (each sample's Gumbel noise depends on the sample, not on its batch)."""
    model = tiny_llama(seed=0)
    guard = tiny_llama(seed=3)
    names = NAMES

    def judge():
        return JudgeObjective(guard, tok, tok, safe_token="s", seed=5)

    by_size = {
        bs: score(
            model,
            calib,
            "esi",
            objective=judge(),
            batch_size=bs,
            target_modules=["v_proj", "down_proj"],
            progress=False,
        )
        for bs in (1, 2, 4)
    }
    # reference: one objective evaluation per sample (global sample index i), gradients summed explicitly
    params = dict(model.named_parameters())
    ref = {n: torch.zeros_like(params[n]) for n in names}
    objective = judge()
    for i in range(len(calib)):
        batch = calib.collate([i])
        loss = objective(model, batch, batch_index=i, sample_indices=[i])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            ref[n] += g
    for n in names:
        expected = ref[n].abs() * params[n].detach().std()
        scale = expected.abs().max()
        assert scale > 0
        for bs, s in by_size.items():
            # the tiny guard's gradients are ~1e-12: compare relative to the largest score
            torch.testing.assert_close(s[n] / scale, expected / scale, rtol=1e-4, atol=1e-5, msg=f"batch size {bs}")
