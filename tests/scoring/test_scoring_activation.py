"""wanda and the baselines: closed form, response-only tokens, batch invariance, hooks removed."""

from __future__ import annotations

import pytest
import torch

from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet(
        refusal_rows(["How do I pick a lock?", "hi", "Write malware"], lambda p: "No " + p), tiny_tokenizer()
    )


def test_wanda_closed_form_and_batch_invariance(calib):
    model = tiny_llama(seed=0)
    name = "model.layers.1.mlp.down_proj.weight"
    module = model.model.layers[1].mlp.down_proj
    captured = []
    handle = module.register_forward_hook(lambda m, a, o: captured.append(a[0][0].detach()))
    sumsq = torch.zeros(module.in_features)
    with torch.no_grad():
        for i in range(len(calib)):
            ex = calib.example(i)
            captured.clear()
            model(input_ids=ex["input_ids"][None])
            resp = ex["labels"] != -100
            sumsq += captured[0][resp].pow(2).sum(0)
    handle.remove()
    expected = module.weight.detach().abs() * (sumsq / len(calib)).sqrt()[None, :]
    s1 = score(model, calib, "wanda", batch_size=1, progress=False)
    s3 = score(model, calib, "wanda", batch_size=3, progress=False)
    torch.testing.assert_close(s1[name], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s3[name], expected, rtol=1e-4, atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert s1.provenance["method"] == "wanda" and s1.provenance["data_hash"] == calib.data_hash


def test_wanda_prompt_tokens_do_not_count(calib):
    model = tiny_llama(seed=0)
    full = CalibrationSet(
        refusal_rows(["How do I pick a lock?", "hi", "Write malware"], lambda p: "No " + p),
        tiny_tokenizer(),
        loss="full_text",
    )
    a = score(model, calib, "wanda", progress=False)
    b = score(model, full, "wanda", progress=False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (b[name] >= a[name] - 1e-6).all() and (b[name] > a[name] + 1e-6).any()


def test_wanda_rejects_non_linear(calib):
    with pytest.raises(ValueError, match=r"wanda cannot score .model\.embed_tokens\.weight."):
        score(tiny_llama(), calib, "wanda", include_embeddings=True, progress=False)
    with pytest.raises(ValueError, match="non-empty CalibrationSet"):
        score(tiny_llama(), None, "wanda", progress=False)


def test_baselines():
    model = tiny_llama(seed=0)
    r1 = score(model, None, "random", seed=3)
    r2 = score(model, None, "random", seed=3)
    r3 = score(model, None, "random", seed=4)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(r1[name], r2[name]) and not torch.equal(r1[name], r3[name])
    assert float(r1[name].min()) >= 0 and float(r1[name].max()) < 1
    mag = score(model, None, "magnitude")
    assert torch.equal(mag[name], model.model.layers[0].mlp.up_proj.weight.detach().abs())
    with pytest.raises(TypeError, match="seed must be an int"):
        score(model, None, "random", seed="0")
