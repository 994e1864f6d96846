"""The SAFETY_LORA type (masked LoRA, SPA) beyond the conformance table: the variant's forward paths against fp64
references (dense, sparse, rows/columns, dtypes, autocast, dropout, gradients), the config's refusals, the MoE model,
a corrupted adapter state, and the guarantee checks that measure behaviour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _spa_reference import (
    assert_effective_update_exact,
    explicit_merge,
    identity_update,
    lora_layers,
    randomise_lora_,
    reference_delta,
)
from peft import LoraConfig, PeftModel, get_peft_model

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_qwen2_moe, tiny_tokenizer
from peft_safety.tuner import (
    SafetyLoraConfig,
    SafetyLoraLinear,
    SafetyLoraModel,
    check_masked_lora_model,
    get_masked_lora_model,
)
from peft_safety.tuner.safety_lora.variant import MaskedLoraVariant

GRANULARITIES = {
    "weight": {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.down_proj.weight": Weight()},
    "neuron_rows": {
        "model.layers.0.mlp.gate_proj.weight": Neuron(axis=0),
        "model.layers.1.self_attn.v_proj.weight": Neuron(axis=0),
    },
    "neuron_cols": {
        "model.layers.0.mlp.down_proj.weight": Neuron(axis=1),
        "model.layers.1.self_attn.o_proj.weight": Neuron(axis=1),
    },
    "head": {
        "model.layers.0.self_attn.q_proj.weight": Head(head_dim=8, axis=0),
        "model.layers.1.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
    },
    "layer": {"model.layers.1.self_attn.q_proj.weight": Layer(), "model.layers.1.mlp.up_proj.weight": Layer()},
}


def assert_protected(merged, base, mask):
    changed_outside = 0
    for name, p in merged.named_parameters():
        old = base[name]
        if name in mask:
            dense = mask.to_dense(name)
            assert torch.equal(p.detach()[dense], old[dense]), f"protected entries of {name} moved"
            changed_outside += int((p.detach()[~dense] != old[~dense]).sum())
    return changed_outside


def test_identity_at_init_and_layer_masks_excluded(random_mask, lora_config, tokens):
    model = tiny_llama(seed=0)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    mask = random_mask(model, {**GRANULARITIES["layer"], **GRANULARITIES["neuron_cols"]})
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, ref)
    modules = dict(peft_model.named_modules())
    assert not hasattr(modules["base_model.model.model.layers.1.mlp.up_proj"], "lora_A")
    assert isinstance(modules["base_model.model.model.layers.0.mlp.down_proj"], SafetyLoraLinear)


def test_guarantee_holds_even_if_stored_rows_are_corrupted(random_mask, lora_config):
    # a foreign optimizer state or a buggy optimizer could move the stored masked rows: forward/merge ignore them
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["neuron_rows"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, SafetyLoraLinear):
                m.lora_B["default"].weight.normal_()
                m.lora_A["default"].weight.normal_()
    # forward: the corrupted masked rows never reach the output (checked against the fp64 masked product)
    assert assert_effective_update_exact(peft_model, mask) > 0
    # the stored rows really are corrupted: unmasked LoRA would move them
    layer = lora_layers(peft_model)["model.layers.0.mlp.gate_proj"]
    dense = mask.to_dense("model.layers.0.mlp.gate_proj.weight")
    assert torch.count_nonzero(reference_delta(layer, None)[dense]) > 0
    assert_protected(peft_model.merge_and_unload(), base, mask)


def test_moe_attention_and_shared_expert_with_frozen_experts(random_mask, train):
    model = tiny_qwen2_moe(seed=0)
    gran = {
        "model.layers.0.self_attn.k_proj.weight": Head(head_dim=8, axis=0),
        "model.layers.1.mlp.shared_expert.down_proj.weight": Weight(),
        "model.layers.1.mlp.experts.down_proj": Neuron(axis=1),  # fused 3-D: LoRA never adapts it
    }
    mask = random_mask(model, gran)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, LoraConfig(r=4, target_modules=["k_proj", "down_proj"]), mask)
    train(peft_model, steps=2, lr=2e-2)
    assert assert_effective_update_exact(peft_model, mask) > 0  # attention head rows and shared-expert entries
    assert_protected(peft_model.merge_and_unload(), base, mask)


def test_save_reload_then_train_again_keeps_guarantee(tmp_path, random_mask, lora_config, train, tokens):
    granularities = {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"], **GRANULARITIES["layer"]}
    model = tiny_llama(seed=0)
    mask = random_mask(model, granularities)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    train(peft_model, steps=2, lr=2e-2)
    ids = tokens()
    with torch.no_grad():
        ref = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    check_masked_lora_model(loaded, mask)
    assert loaded.peft_config["default"].peft_type == "SAFETY_LORA"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
        # independent of the layer code: the base with the explicit fp64 masked deltas of the loaded factors
        torch.testing.assert_close(
            explicit_merge(tiny_llama(seed=0), loaded, mask)(ids).logits, ref, rtol=1e-5, atol=1e-5
        )
    assert_effective_update_exact(loaded, mask)
    train(loaded, steps=2, lr=2e-2)
    assert_effective_update_exact(loaded, mask)
    assert_protected(loaded.merge_and_unload(), base, mask)


def test_plain_lora_adapter_on_masked_module_is_detected(random_mask, lora_config):

    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"])
    with pytest.raises(ValueError, match="does not mask them"):
        check_masked_lora_model(get_peft_model(model, lora_config()), mask)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"use_dora": True}, ValueError, "use_dora=True cannot keep masked entries frozen"),
        ({"init_lora_weights": "pissa"}, ValueError, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, ValueError, "init_lora_weights='olora'"),
        ({"init_lora_weights": False}, ValueError, "init_lora_weights=False"),
        ({"lora_bias": True}, ValueError, "lora_bias=True"),
        # every other LoRA variant would replace the masked forward and merge
        ({"alora_invocation_tokens": [5, 6]}, ValueError, "alora_invocation_tokens=.*another LoRA variant"),
        ({"init_lora_weights": "mica"}, ValueError, "init_lora_weights='mica'"),
    ],
)
def test_refused_lora_configs(kwargs, error, fragment, random_mask, lora_config):
    mask = random_mask(tiny_llama(seed=0), GRANULARITIES["weight"])
    with pytest.raises(error, match=fragment):
        SafetyLoraConfig.from_lora_config(lora_config(**kwargs), mask)


def test_lm_head_target_refused_with_alternative(random_mask):
    model = tiny_llama(seed=0)
    mask = random_mask(model, {"lm_head.weight": Weight()})
    with pytest.raises(ValueError, match=r"targets lm_head.*safety_mode='freeze'"):
        SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), mask)
    # not targeted: lm_head stays frozen by LoRA itself, nothing to mask
    assert SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules=["q_proj"]), mask).target_modules == {
        "q_proj"
    }


def test_bad_argument_types(random_mask, lora_config):
    mask = random_mask(tiny_llama(seed=0), GRANULARITIES["weight"])
    with pytest.raises(TypeError, match=r"built from a peft\.LoraConfig"):
        SafetyLoraConfig.from_lora_config({"r": 4}, mask)
    with pytest.raises(TypeError, match="expects a SafetyMask"):
        SafetyLoraConfig.from_lora_config(lora_config(), {"a": 1})


def test_regex_exclude_modules_extended_and_original_untouched(random_mask):
    mask = random_mask(tiny_llama(seed=0), GRANULARITIES["layer"])
    original = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*\.layers\.0\..*")
    cfg = SafetyLoraConfig.from_lora_config(original, mask)
    assert original.exclude_modules == r".*\.layers\.0\..*"
    peft_model = get_masked_lora_model(tiny_llama(seed=0), original, mask)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"base_model.model.model.layers.1.self_attn.v_proj"}
    assert "model\\.layers\\.1\\.mlp\\.up_proj" in cfg.exclude_modules


def test_reloaded_plain_peft_of_row_mask_is_still_exact(tmp_path, random_mask, lora_config, train):
    # rows/cols masks also leave the stored A/B clean, so even a plain LoRA reload keeps the guarantee
    model = tiny_llama(seed=0)
    mask = random_mask(model, {**GRANULARITIES["neuron_rows"], **GRANULARITIES["neuron_cols"]})
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    train(peft_model, steps=2, lr=2e-2)
    peft_model.save_pretrained(tmp_path)
    # force a plain LoRA reading of the folder (as a tool that ignores the SAFETY_LORA type would)
    plain = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, config=lora_config())
    assert type(plain.peft_config["default"]) is LoraConfig
    assert_protected(plain.merge_and_unload(), base, mask)


# --- Weight() masks: sparse ("auto"'s choice on CPU at low density, the default) and dense (bit-exact forward) ----
# (the fast path's exactness against explicit dense references: test_fast_paths.py)


def entry_layers(peft_model):
    return [m for m in peft_model.modules() if isinstance(m, SafetyLoraLinear) and m.entries_path("default")]


def _module_key(peft_model, layer):
    return next(k.removeprefix("base_model.model.") for k, m in peft_model.named_modules() if m is layer)


def layer_outputs(layer, x, method, dropout_seed=None):
    layer.entries_method = method
    x = x.clone().requires_grad_(True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    y = layer(x)
    y.backward(upstream(y.shape, y.dtype))
    grads = (x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
    layer.lora_A["default"].weight.grad = None
    layer.lora_B["default"].weight.grad = None
    return y.detach(), grads


def upstream(shape, dtype):
    """A fixed upstream gradient, rounded to the output dtype (the reference uses the same rounded values)."""
    return torch.cos(torch.arange(torch.Size(shape).numel(), dtype=torch.float32)).view(shape).to(dtype)


def fp64_reference(layer, x, dense, dropout_seed=None, grad_dtype=torch.float32):
    """Output and gradients (x, A, B) of ``base(x) + dropout(x) @ Mᵀ`` in fp64 by autograd, ``M`` the explicitly
    masked ``B @ A * s``; the dropout pattern is replayed from the same seed through a plain ``nn.Dropout``."""
    p = layer.lora_dropout["default"].p if isinstance(layer.lora_dropout["default"], torch.nn.Dropout) else 0.0
    x64 = x.detach().double().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    keep = torch.nn.functional.dropout(torch.ones_like(x), p=p, training=p > 0).double()
    w0 = layer.base_layer.weight.detach().double()
    m = ((b @ a) * float(layer.scaling["default"])).masked_fill(dense, 0.0)
    y = x64 @ w0.t() + (x64 * keep) @ m.t()
    y.backward(upstream(y.shape, grad_dtype).double())
    return y.detach(), (x64.grad, a.grad, b.grad)


def test_default_is_auto_and_dense_is_bit_exact(random_mask, lora_config):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    assert peft_model.peft_config["default"].entries_method == "auto"
    assert SafetyLoraConfig(r=4, mask=mask).entries_method == "auto"
    assert {m.entries_path("default") for m in entry_layers(peft_model)} == {"sparse"}  # CPU, 5% density
    dense = get_masked_lora_model(tiny_llama(seed=0), lora_config(), mask, entries_method="dense")
    assert {m.entries_path("default") for m in entry_layers(dense)} == {"dense"}
    randomise_lora_(dense)
    assert assert_effective_update_exact(dense, mask) == int(mask.numel())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_each_path_matches_fp64_reference_forward_and_gradients(method, dropout, random_mask, lora_config):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(lora_dropout=dropout), mask, entries_method=method)
    randomise_lora_(peft_model)
    peft_model.train()
    layers = entry_layers(peft_model)
    assert len(layers) == 2
    for layer in layers:
        assert layer.entries_path("default") == method
        dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
        y, grads = layer_outputs(layer, x, method, dropout_seed=7)
        y_ref, grads_ref = fp64_reference(layer, x, dense, dropout_seed=7)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
        for name, g, g_ref in zip(("x", "A", "B"), grads, grads_ref):
            torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        # the masking really matters: the unmasked product differs from the reference
        plain = x.double() @ (layer.base_layer.weight.double() + reference_delta(layer, None)).t()
        if dropout == 0.0:
            assert not torch.allclose(plain, y_ref, atol=1e-3)


def test_sparse_path_is_exact_only_up_to_rounding(random_mask, lora_config):
    # documented: the sparse path subtracts two differently rounded products on the masked entries
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method="sparse")
    randomise_lora_(peft_model)
    residue = 0.0
    for layer in entry_layers(peft_model):
        dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
        got = identity_update(layer)
        want = reference_delta(layer, dense)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        residue = max(residue, float(got[dense].abs().max()))
    assert residue < 1e-5


def test_sparse_masked_lora_backward_passes_gradcheck():
    from peft_safety.tuner._sparse import EntryPattern
    from peft_safety.tuner.safety_lora.variant import _MaskedFactoredLora

    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 5, 3
    flat = torch.randperm(out_f * in_f, generator=gen)[:9].sort().values.to(torch.int32)
    pattern = EntryPattern(flat, out_f, in_f)
    x = torch.randn(2, 4, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x, a, b: _MaskedFactoredLora.apply(x, a, b, pattern, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    # and it is LoRA's update with the masked entries removed, placed by a loop
    masked = ((b @ a) * 1.5).detach().clone()
    for flat_index in flat.tolist():
        masked[flat_index // in_f, flat_index % in_f] = 0.0
    torch.testing.assert_close(fn(x, a, b), x @ masked.t())


def test_dense_masked_delta_backward_passes_gradcheck():
    from peft_safety.tuner.safety_lora.variant import _MaskedDenseDelta

    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 5, 3
    idx = torch.randperm(out_f * in_f, generator=gen)[:9].sort().values
    x = torch.randn(2, 4, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x, a, b: _MaskedDenseDelta.apply(x, a, b, idx, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    m = ((b @ a) * 1.5).reshape(-1).clone()
    m[idx] = 0
    torch.testing.assert_close(fn(x, a, b), x @ m.view(out_f, in_f).t())


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
def test_weight_mask_bit_identical_after_training_and_merge_per_method(
    method, random_mask, lora_config, tokens, train
):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(lora_dropout=0.1), mask, entries_method=method)
    expected = "sparse" if method == "auto" else method
    assert {m.entries_path("default") for m in entry_layers(peft_model)} == {expected}
    train(peft_model, steps=3, lr=2e-2)
    ids = tokens()
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        reference = explicit_merge(tiny_llama(seed=0), peft_model, mask)(ids).logits
    torch.testing.assert_close(unmerged, reference, rtol=1e-5, atol=1e-5)
    if method == "dense":
        assert_effective_update_exact(peft_model, mask)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-5, atol=1e-5)
    assert assert_protected(merged, base, mask) > 0


def test_sparse_and_dense_training_runs_each_match_an_explicit_merge(random_mask, lora_config, tokens, train):
    for method in ("sparse", "dense"):
        model = tiny_llama(seed=0)
        mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
        peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method=method)
        torch.manual_seed(0)
        train(peft_model, steps=3, lr=2e-2)
        with torch.no_grad():
            got = peft_model(tokens()).logits
            want = explicit_merge(tiny_llama(seed=0), peft_model, mask)(tokens()).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=method)


def test_auto_choice_follows_density_threshold_and_can_be_forced(lora_config):
    from peft_safety.tuner.safety_lora.config import SPARSE_MAX_DENSITY

    model = tiny_llama(seed=0)
    gran = {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.down_proj.weight": Weight()}
    params = dict(model.named_parameters())
    sparse_k = int(params["model.layers.0.self_attn.q_proj.weight"].numel() * SPARSE_MAX_DENSITY)  # at threshold
    dense_k = int(params["model.layers.1.mlp.down_proj.weight"].numel() * SPARSE_MAX_DENSITY) + 1  # just above
    mask = SafetyMask(
        indices={
            "model.layers.0.self_attn.q_proj.weight": torch.arange(sparse_k, dtype=torch.int32),
            "model.layers.1.mlp.down_proj.weight": torch.arange(dense_k, dtype=torch.int32),
        },
        shapes={k: tuple(params[k].shape) for k in gran},
        granularity=gran,
    )
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method="auto")
    modules = dict(peft_model.named_modules())
    q = modules["base_model.model.model.layers.0.self_attn.q_proj"]
    down = modules["base_model.model.model.layers.1.mlp.down_proj"]
    assert (q.entries_path("default"), down.entries_path("default")) == ("sparse", "dense")
    assert modules["base_model.model.model.layers.0.self_attn.k_proj"].entries_path("default") is None
    down.entries_method = "sparse"  # per-layer override
    assert down.entries_path("default") == "sparse"
    default = get_masked_lora_model(tiny_llama(seed=0), lora_config(), mask)  # the default is "auto"
    assert sorted(m.entries_path("default") for m in entry_layers(default)) == ["dense", "sparse"]
    # off the CPU "auto" is always dense (unmeasured there; see docs/tuner.md)
    q.lora_A["default"].to("meta")
    assert q.entries_path("default") == "dense"


def test_bad_entries_method_refused(random_mask, lora_config, tokens):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"])
    with pytest.raises(ValueError, match=r"entries_method='csr' is not valid.*'auto' \(default.*'dense' \(bit-exact"):
        SafetyLoraConfig.from_lora_config(lora_config(), mask, entries_method="csr")
    with pytest.raises(TypeError, match="entries_method must be a string, got bool"):
        get_masked_lora_model(model, lora_config(), mask, entries_method=True)
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    layer = entry_layers(peft_model)[0]
    layer.entries_method = "fast"
    with pytest.raises(ValueError, match="entries_method='fast' is not valid"):
        peft_model(tokens())


def test_pattern_cache_follows_the_mask_buffer(random_mask, lora_config):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method="sparse")
    randomise_lora_(peft_model)
    layer = entry_layers(peft_model)[0]
    first = layer._entry_pattern("default")
    assert layer._entry_pattern("default") is first  # built once
    n = layer.out_features * layer.in_features
    new_flat = torch.arange(n - mask[_module_key(peft_model, layer) + ".weight"].numel(), n)  # another sorted mask
    with torch.no_grad():
        layer.lora_safety_entries["default"].copy_(new_flat)  # in place: same storage, new version
    assert layer._entry_pattern("default") is not first
    new_dense = torch.zeros(n, dtype=torch.bool)
    new_dense[new_flat] = True
    new_dense = new_dense.view(layer.out_features, layer.in_features)
    got = identity_update(layer)
    torch.testing.assert_close(got.double(), reference_delta(layer, new_dense), rtol=1e-5, atol=1e-5)
    old_dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
    assert not torch.allclose(got.double(), reference_delta(layer, old_dense), atol=1e-3)  # the old mask is gone
    with torch.no_grad():
        layer.lora_safety_entries["default"].copy_(new_flat.flip(0))  # unsorted: refused, not silently re-sorted
    with pytest.raises(ValueError, match="sorted and unique"):
        layer._entry_pattern("default")


def test_sparse_path_save_reload_and_switch_method(tmp_path, random_mask, lora_config, train, tokens):
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method="sparse")
    train(peft_model, steps=2, lr=2e-2)
    ids = tokens()
    with torch.no_grad():
        ref = explicit_merge(tiny_llama(seed=0), peft_model, mask)(ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    assert {m.entries_path("default") for m in entry_layers(loaded)} == {"sparse"}  # the saved method
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # the loader's override: set it on the config read from the folder (PEFT lets the file win over keywords)
    config = SafetyLoraConfig.from_pretrained(tmp_path)
    config.entries_method = "dense"
    dense = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, config=config)
    assert {m.entries_path("default") for m in entry_layers(dense)} == {"dense"}
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert_effective_update_exact(dense, mask)
    config = SafetyLoraConfig.from_pretrained(tmp_path)
    config.entries_method = "x"
    with pytest.raises(ValueError, match="entries_method='x' is not valid"):
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, config=config)
    train(loaded, steps=2, lr=2e-2)
    assert_protected(loaded.merge_and_unload(), base, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_low_precision_adapters_against_fp64(method, dtype, random_mask, lora_config):
    # CPU CSR kernels are fp32/fp64 only: low-precision sparse adapters are computed in fp32 and cast back
    model = tiny_llama(seed=0).to(dtype)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method=method, autocast_adapter_dtype=False)
    randomise_lora_(peft_model, std=0.1)
    for layer in entry_layers(peft_model):
        assert layer.lora_A["default"].weight.dtype == dtype
        dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
        y, grads = layer_outputs(layer, x, method)
        y_ref, grads_ref = fp64_reference(layer, x.float(), dense, grad_dtype=dtype)
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
        scale = y_ref.abs().max()
        assert (y.double() - y_ref).abs().max() <= 0.02 * scale  # low-precision rounding only
        for g, g_ref in zip(grads, grads_ref):
            assert (g.double() - g_ref).abs().max() <= 0.02 * g_ref.abs().max()
        got = identity_update(layer)
        if method == "dense":
            assert torch.count_nonzero(got[dense]) == 0  # bit-exact in every dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["weight", "neuron_rows", "neuron_cols", "head"])
def test_effective_update_and_merge_exact_per_dtype(kind, dtype, random_mask, lora_config):
    model = tiny_llama(seed=0).to(dtype)
    mask = random_mask(model, GRANULARITIES[kind], fraction=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the bit-exact forward (the default sparse path is checked against its bound in test_fast_paths.py),
    # fp32 adapters on a low-precision base
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method="dense")
    randomise_lora_(peft_model, std=0.1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert assert_effective_update_exact(peft_model, mask, rtol=tol, atol=tol) > 0
    merged = peft_model.merge_and_unload(safe_merge=True)
    assert_protected(merged, base, mask)
    assert all(p.dtype == dtype for p in merged.parameters())


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_autocast_bf16_on_cpu(method, random_mask, lora_config, tokens):
    # TRL's default bf16=True runs the forward under torch.autocast("cpu", torch.bfloat16)
    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora_config(), mask, entries_method=method)
    randomise_lora_(peft_model, std=0.1)
    peft_model.train()
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)
    for layer in entry_layers(peft_model):
        dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = identity_update(layer)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), reference_delta(layer, dense), rtol=2e-2, atol=2e-2)
        if method == "dense":
            assert torch.count_nonzero(got[dense]) == 0


def test_low_cpu_mem_usage_create_and_load(tmp_path, random_mask, lora_config, tokens):
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    model = tiny_llama(seed=0)
    mask = random_mask(model, {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"]})
    cfg = SafetyLoraConfig.from_lora_config(lora_config(), mask)
    empty = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    layers = lora_layers(empty)
    assert any(m.lora_A["default"].weight.device.type == "meta" for m in layers.values())
    # the masks are data, never empty: they are on the real device at once
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_safety_entries["default"].device.type == "cpu"
    assert torch.equal(q.lora_safety_entries["default"].long(), mask["model.layers.0.self_attn.q_proj.weight"].long())
    injected = inject_adapter_in_model(
        SafetyLoraConfig.from_lora_config(lora_config(), mask), tiny_llama(seed=0), low_cpu_mem_usage=True
    )
    assert isinstance(injected.model.layers[0].self_attn.q_proj, SafetyLoraLinear)
    # a trained adapter loads with low_cpu_mem_usage on every path
    trained = get_masked_lora_model(tiny_llama(seed=0), lora_config(), mask)
    randomise_lora_(trained, std=0.1)
    ids = tokens()
    with torch.no_grad():
        ref = explicit_merge(tiny_llama(seed=0), trained, mask)(ids).logits
    trained.save_pretrained(tmp_path)
    for loaded in (
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=True),
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=True, is_trainable=True),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert_effective_update_exact(loaded, mask)
    from peft import get_peft_model_state_dict

    target = inject_adapter_in_model(
        SafetyLoraConfig.from_lora_config(lora_config(), mask), tiny_llama(seed=0), low_cpu_mem_usage=True
    )
    state = get_peft_model_state_dict(trained)
    set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, ref, rtol=1e-5, atol=1e-5)


# --- the config --------------------------------------------------------------------------------------------------


def test_config_from_a_mask_and_refusals(random_mask):
    model = tiny_llama(seed=0)
    mask = random_mask(model, {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"]})
    cfg = SafetyLoraConfig(r=4, target_modules="all-linear", mask=mask)
    peft_model = get_peft_model(model, cfg)
    assert isinstance(peft_model.base_model, SafetyLoraModel)
    randomise_lora_(peft_model)
    assert assert_effective_update_exact(peft_model, mask) > 0
    with pytest.raises(ValueError, match="needs a mask"):
        SafetyLoraConfig(r=4)
    with pytest.raises(ValueError, match="use_dora=True"):
        SafetyLoraConfig(r=4, mask=mask, use_dora=True)
    with pytest.raises(TypeError, match="takes a SafetyMask"):
        SafetyLoraConfig(r=4, mask=42)
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        cfg.fingerprint_check = "maybe"


def test_mask_is_not_a_config_field(random_mask):
    """The mask is an init-only argument: readable and settable as an attribute, never in to_dict()."""
    import copy

    model = tiny_llama(seed=0)
    mask = random_mask(model, GRANULARITIES["weight"])
    other = random_mask(model, GRANULARITIES["neuron_rows"])
    cfg = SafetyLoraConfig(r=4, target_modules="all-linear", mask=mask)
    assert cfg.mask is mask
    assert "mask" not in {f.name for f in dataclasses.fields(cfg)} and "mask" not in cfg.to_dict()
    assert set(cfg.mask_layout) == {n.rsplit(".", 1)[0] for n in mask.names}
    cfg.mask = other  # a new mask: a new layout and new in-memory indices
    assert set(cfg.mask_layout) == {n.rsplit(".", 1)[0] for n in other.names}
    assert cfg.mask is other
    # copies made the way PEFT makes them (deepcopy; `replace` in add_weighted_adapter) keep the mask
    assert copy.deepcopy(cfg).mask is not None and dataclasses.replace(cfg).mask is not None
    randomise_lora_(peft_model := get_peft_model(model, dataclasses.replace(cfg, r=2)))
    assert assert_effective_update_exact(peft_model, other) > 0


def test_unloaded_placeholder_is_refused(random_mask, lora_config, tokens):
    model = tiny_llama(seed=0)
    cfg = SafetyLoraConfig.from_lora_config(lora_config(), random_mask(model, GRANULARITIES["weight"]))
    layout_only = SafetyLoraConfig(**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"})
    assert layout_only.mask is None
    peft_model = get_peft_model(model, layout_only)  # layers built from the layout, weights never loaded
    with pytest.raises(ValueError, match="placeholder"):
        peft_model(tokens())


# --- the variant -------------------------------------------------------------------------------------------------


def test_masked_adapters_run_through_the_lora_variant(random_mask, lora_config):
    """PEFT's own LoRA forward and merge run the masked adapters through `MaskedLoraVariant`; unmasked modules and
    adapters stay vanilla LoRA; a masked adapter cannot be converted to vanilla LoRA."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = tiny_llama(seed=0)
    mask = random_mask(model, {**GRANULARITIES["weight"], **GRANULARITIES["neuron_cols"]})
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    assert SafetyLoraLinear.forward is LoraLinear.forward and SafetyLoraLinear.unmerge is LoraLinear.unmerge
    masked = {n.rsplit(".", 1)[0] for n in mask.names}
    for key, layer in lora_layers(peft_model).items():
        assert isinstance(layer, SafetyLoraLinear)
        variant = layer.lora_variant.get("default")
        if key in masked:
            assert isinstance(variant, MaskedLoraVariant) and not layer.supports_lora_conversion("default")
        else:
            assert variant is None and layer.supports_lora_conversion("default")


def _plain_lora_variant(monkeypatch):
    """The breakage the checks must catch: the variant runs LoRA's unmasked forward."""

    def forward(module, *, active_adapter, x, result, **kwargs):
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        return result + lora_b(lora_a(module.lora_dropout[active_adapter](x))) * module.scaling[active_adapter]

    monkeypatch.setattr(MaskedLoraVariant, "forward", staticmethod(forward))


# --- guarantee checks measure behaviour ---------------------------------------------------------------------------

Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


def test_violation_metric_sees_an_unmasked_forward(monkeypatch, random_mask, lora_config):
    from peft_safety.analysis.probes import mask_drift

    model = tiny_llama(seed=0)
    gran = {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"], **GRANULARITIES["layer"]}
    mask = random_mask(model, gran)
    peft_model = get_masked_lora_model(model, lora_config(), mask)
    randomise_lora_(peft_model)
    masked = int(sum(int(mask.to_dense(n).sum()) for n in mask.names if not isinstance(mask.granularity_of(n), Layer)))
    assert mask_drift(peft_model, None, mask, mode="freeze", strict=False)["violations"] == 0
    _plain_lora_variant(monkeypatch)
    metrics = mask_drift(peft_model, None, mask, mode="freeze", strict=False)
    # the factors are random everywhere, so every masked entry of every adapted module leaks
    assert metrics["violations"] == masked
    assert metrics["masked_relative"] > 0


def _trainer(tmp_path, model, mask, peft_config, **args):
    from datasets import Dataset

    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(4)]
    config = SafetySFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_length=32,
        save_strategy="no", report_to=[], use_cpu=True, safety_mode="freeze", **args,
    )  # fmt: skip
    return SafetySFTTrainer(
        model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
        peft_config=peft_config, safety_mask=mask,
    )  # fmt: skip


def test_verify_safety_sees_an_unmasked_forward(tmp_path, monkeypatch, random_mask):
    pytest.importorskip("trl")
    from peft_safety.training.freeze import FreezeViolationError

    model = tiny_llama(seed=0)
    mask = random_mask(model, {f"{Q0}.weight": Weight(), f"{V1}.weight": Neuron(axis=0)})
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = _trainer(tmp_path, model, mask, peft_config, max_steps=1, bf16=False, safety_verify=False)
    trainer.train()
    assert trainer.verify_safety()["safety/violations"] == 0
    _plain_lora_variant(monkeypatch)
    with pytest.raises(FreezeViolationError, match="entries that must stay unchanged moved"):
        trainer.verify_safety()


def test_trainer_bf16_autocast_on_cpu(tmp_path, random_mask):
    # TRL's default bf16=True on CPU: both paths train under it, and verify_safety holds each to its guarantee
    pytest.importorskip("trl")
    for method in ("dense", "sparse"):
        model = tiny_llama(seed=0)
        mask = random_mask(model, {f"{Q0}.weight": Weight(), f"{V1}.weight": Neuron(axis=0)})
        peft_config = SafetyLoraConfig.from_lora_config(
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mask, entries_method=method
        )
        trainer = _trainer(tmp_path / method, model, mask, peft_config, max_steps=2, bf16=True, safety_verify=True)
        trainer.train()
        assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
        layer = lora_layers(trainer.model)[Q0]
        assert layer.entries_path("default") == method
