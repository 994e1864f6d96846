"""Masked LoRA (SPA): masked entries of every base weight stay bit-identical after training and merging."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

import peft_safety  # noqa: F401
from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_qwen2_moe
from peft_safety.tuner.lora import (
    SafetyLoraLinear,
    check_masked_lora_model,
    get_masked_lora_model,
    load_masked_lora,
    mask_lora_config,
)

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


def make_mask(model, granularity, fraction=0.25, seed=0):
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, gran in granularity.items():
        shape = tuple(params[name].shape)
        units = gran.num_units(shape)
        k = 1 if isinstance(gran, Layer) else max(1, int(units * fraction))
        indices[name] = torch.randperm(units, generator=gen)[:k].sort().values.to(torch.int32)
        shapes[name] = shape
    return SafetyMask(indices=indices, shapes=shapes, granularity=granularity)


def tokens(seed=0):
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


def train(model, steps=4, weight_decay=0.1):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=weight_decay)
    for step in range(steps):
        ids = tokens(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


def assert_protected(merged, base, mask):
    changed_outside = 0
    for name, p in merged.named_parameters():
        old = base[name]
        if name in mask:
            dense = mask.to_dense(name)
            assert torch.equal(p.detach()[dense], old[dense]), f"protected entries of {name} moved"
            changed_outside += int((p.detach()[~dense] != old[~dense]).sum())
    return changed_outside


@pytest.mark.parametrize("kind", list(GRANULARITIES))
def test_masked_entries_bit_identical_after_training_and_merge(kind):
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES[kind])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)
    ids = tokens()
    with torch.no_grad():
        assert peft_model(ids).logits.isfinite().all()
    train(peft_model)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    changed = assert_protected(merged, base, mask)
    if kind != "layer":
        assert changed > 0  # the unprotected entries of the masked tensors did train


def test_identity_at_init_and_layer_masks_excluded():
    model = tiny_llama(seed=0)
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    mask = make_mask(model, {**GRANULARITIES["layer"], **GRANULARITIES["neuron_cols"]})
    peft_model = get_masked_lora_model(model, lora(), mask)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, ref)
    modules = dict(peft_model.named_modules())
    assert not hasattr(modules["base_model.model.model.layers.1.mlp.up_proj"], "lora_A")
    assert isinstance(modules["base_model.model.model.layers.0.mlp.down_proj"], SafetyLoraLinear)


def test_guarantee_holds_even_if_stored_rows_are_corrupted():
    # a foreign optimizer state or a buggy optimizer could move the stored masked rows: forward/merge ignore them
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["neuron_rows"])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, SafetyLoraLinear):
                m.lora_B["default"].weight.normal_()
    assert_protected(peft_model.merge_and_unload(), base, mask)


def test_moe_attention_and_shared_expert_with_frozen_experts():
    model = tiny_qwen2_moe(seed=0)
    gran = {
        "model.layers.0.self_attn.k_proj.weight": Head(head_dim=8, axis=0),
        "model.layers.1.mlp.shared_expert.down_proj.weight": Weight(),
        "model.layers.1.mlp.experts.down_proj": Neuron(axis=1),  # fused 3-D: LoRA never adapts it
    }
    mask = make_mask(model, gran)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, LoraConfig(r=4, target_modules=["k_proj", "down_proj"]), mask)
    train(peft_model, steps=2)
    assert_protected(peft_model.merge_and_unload(), base, mask)


def _train_save_reload(tmp_path, granularities, **mask_kwargs):
    """Train a masked LoRA for 2 steps, save it, reload it trainable: (loaded, mask, base weights, ids, logits)."""
    model = tiny_llama(seed=0)
    mask = make_mask(model, granularities, **mask_kwargs)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)
    train(peft_model, steps=2)
    ids = tokens()
    with torch.no_grad():
        ref = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_masked_lora(tiny_llama(seed=0), str(tmp_path), is_trainable=True)
    return loaded, mask, base, ids, ref


def test_save_reload_then_train_again_keeps_guarantee(tmp_path):
    granularities = {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"], **GRANULARITIES["layer"]}
    loaded, mask, base, ids, ref = _train_save_reload(tmp_path, granularities)
    check_masked_lora_model(loaded, mask)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    train(loaded, steps=2)
    assert_protected(loaded.merge_and_unload(), base, mask)


def test_plain_lora_adapter_on_masked_module_is_detected():
    from peft import get_peft_model

    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"])
    with pytest.raises(ValueError, match="does not mask them"):
        check_masked_lora_model(get_peft_model(model, lora()), mask)


def test_load_masked_lora_refuses_plain_adapter(tmp_path):
    from peft import get_peft_model

    get_peft_model(tiny_llama(seed=0), lora()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a masked LoRA adapter"):
        load_masked_lora(tiny_llama(seed=0), str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"use_dora": True}, ValueError, "use_dora=True cannot keep masked entries frozen"),
        ({"init_lora_weights": "pissa"}, ValueError, "init_lora_weights='pissa'"),
        ({"init_lora_weights": "olora"}, ValueError, "init_lora_weights='olora'"),
        ({"init_lora_weights": False}, ValueError, "init_lora_weights=False"),
        ({"lora_bias": True}, ValueError, "lora_bias=True"),
    ],
)
def test_refused_lora_configs(kwargs, error, fragment):
    mask = make_mask(tiny_llama(seed=0), GRANULARITIES["weight"])
    with pytest.raises(error, match=fragment):
        mask_lora_config(lora(**kwargs), mask)


def test_lm_head_target_refused_with_alternative():
    model = tiny_llama(seed=0)
    mask = make_mask(model, {"lm_head.weight": Weight()})
    with pytest.raises(ValueError, match=r"targets lm_head.*safety_mode='freeze'"):
        mask_lora_config(LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), mask)
    # not targeted: lm_head stays frozen by LoRA itself, nothing to mask
    assert mask_lora_config(LoraConfig(r=4, target_modules=["q_proj"]), mask).target_modules == {"q_proj"}


def test_bad_argument_types():
    mask = make_mask(tiny_llama(seed=0), GRANULARITIES["weight"])
    with pytest.raises(TypeError, match=r"expects a peft\.LoraConfig"):
        mask_lora_config({"r": 4}, mask)
    with pytest.raises(TypeError, match="expects a SafetyMask"):
        mask_lora_config(lora(), {"a": 1})


def test_regex_exclude_modules_extended_and_original_untouched():
    mask = make_mask(tiny_llama(seed=0), GRANULARITIES["layer"])
    original = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], exclude_modules=r".*\.layers\.0\..*")
    cfg = mask_lora_config(original, mask)
    assert original.exclude_modules == r".*\.layers\.0\..*"
    peft_model = get_masked_lora_model(tiny_llama(seed=0), original, mask)
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"base_model.model.model.layers.1.self_attn.v_proj"}
    assert "model\\.layers\\.1\\.mlp\\.up_proj" in cfg.exclude_modules


def test_reloaded_plain_peft_of_row_mask_is_still_exact(tmp_path):
    # rows/cols masks also leave the stored A/B clean, so even a plain LoRA reload keeps the guarantee
    model = tiny_llama(seed=0)
    mask = make_mask(model, {**GRANULARITIES["neuron_rows"], **GRANULARITIES["neuron_cols"]})
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)
    train(peft_model, steps=2)
    peft_model.save_pretrained(tmp_path)
    plain = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert_protected(plain.merge_and_unload(), base, mask)


# --- Weight() masks: sparse correction vs dense masked delta ------------------------------------------------------


def entry_layers(peft_model):
    return [m for m in peft_model.modules() if isinstance(m, SafetyLoraLinear) and m.entries_path("default")]


def randomise_lora_(peft_model, seed=1):
    # B starts at zero, which would make every comparison trivial
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in entry_layers(peft_model):
            m.lora_A["default"].weight.copy_(torch.randn(m.lora_A["default"].weight.shape, generator=gen))
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=gen))


def layer_outputs(layer, x, method, dropout_seed=None):
    layer.entries_method = method
    x = x.clone().requires_grad_(True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    y = layer(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    grads = (x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())
    layer.lora_A["default"].weight.grad = None
    layer.lora_B["default"].weight.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sparse_path_matches_dense_path_forward_and_gradients(dropout):
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(lora_dropout=dropout), mask)
    randomise_lora_(peft_model)
    peft_model.train()
    layers = entry_layers(peft_model)
    assert len(layers) == 2
    for layer in layers:
        assert layer.entries_path("default") == "sparse"  # 5% <= SPARSE_MAX_DENSITY
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
        y_sparse, g_sparse = layer_outputs(layer, x, "sparse", dropout_seed=7)
        y_dense, g_dense = layer_outputs(layer, x, "dense", dropout_seed=7)
        torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-4)
        for name, gs, gd in zip(("x", "A", "B"), g_sparse, g_dense):
            torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        # the correction really matters: plain LoRA (no masking) differs from both
        plain = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        if dropout == 0.0:
            assert not torch.allclose(plain, y_dense, atol=1e-3)


def test_sparse_correction_backward_passes_gradcheck():
    from peft_safety.tuner.lora import _EntryPattern, _MaskedEntryCorrection

    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 5, 3
    flat = torch.randperm(out_f * in_f, generator=gen)[:9].sort().values.to(torch.int32)
    pattern = _EntryPattern(flat, out_f, in_f)
    x = torch.randn(2, 4, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.randn(r, in_f, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(out_f, r, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda x, a, b: _MaskedEntryCorrection.apply(x, a, b, pattern, 1.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b))
    # and it is exactly what LoRA adds at the masked entries
    dense = torch.zeros(out_f * in_f, dtype=torch.float64)
    dense[flat.long()] = ((b @ a) * 1.5).reshape(-1)[flat.long()]
    torch.testing.assert_close(fn(x, a, b), x @ dense.view(out_f, in_f).t())


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
def test_weight_mask_bit_identical_after_training_and_merge_per_method(method):
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(lora_dropout=0.1), mask, entries_method=method)
    expected = "sparse" if method == "auto" else method
    assert {m.entries_path("default") for m in entry_layers(peft_model)} == {expected}
    train(peft_model, steps=3)
    ids = tokens()
    with torch.no_grad():
        unmerged = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert assert_protected(merged, base, mask) > 0


def test_sparse_and_dense_training_runs_agree():
    logits = {}
    for method in ("sparse", "dense"):
        model = tiny_llama(seed=0)
        mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
        peft_model = get_masked_lora_model(model, lora(), mask, entries_method=method)
        torch.manual_seed(0)
        train(peft_model, steps=3)
        with torch.no_grad():
            logits[method] = peft_model(tokens()).logits
    torch.testing.assert_close(logits["sparse"], logits["dense"], rtol=1e-4, atol=1e-4)


def test_auto_choice_follows_density_threshold_and_can_be_forced():
    from peft_safety.tuner.lora import SPARSE_MAX_DENSITY

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
    peft_model = get_masked_lora_model(model, lora(), mask)
    modules = dict(peft_model.named_modules())
    q = modules["base_model.model.model.layers.0.self_attn.q_proj"]
    down = modules["base_model.model.model.layers.1.mlp.down_proj"]
    assert (q.entries_path("default"), down.entries_path("default")) == ("sparse", "dense")
    assert modules["base_model.model.model.layers.0.self_attn.k_proj"].entries_path("default") is None
    down.entries_method = "sparse"  # per-layer override
    assert down.entries_path("default") == "sparse"
    forced = get_masked_lora_model(tiny_llama(seed=0), lora(), mask, entries_method="dense")
    assert {m.entries_path("default") for m in entry_layers(forced)} == {"dense"}


def test_bad_entries_method_refused():
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"])
    with pytest.raises(ValueError, match=r"entries_method='csr' is not one of.*force 'sparse' or 'dense'"):
        mask_lora_config(lora(), mask, entries_method="csr")
    with pytest.raises(TypeError, match="entries_method must be a string, got bool"):
        get_masked_lora_model(model, lora(), mask, entries_method=True)
    peft_model = get_masked_lora_model(model, lora(), mask)
    layer = entry_layers(peft_model)[0]
    layer.entries_method = "fast"
    with pytest.raises(ValueError, match="entries_method='fast' is not one of"):
        peft_model(tokens())


def test_pattern_cache_follows_the_mask_buffer():
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method="sparse")
    randomise_lora_(peft_model)
    layer = entry_layers(peft_model)[0]
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    first = layer._entry_pattern("default")
    assert layer._entry_pattern("default") is first  # built once
    with torch.no_grad():
        # another mask, in place (wrapped around, so no longer sorted: the pattern sorts it)
        idx = layer.lora_safety_entries["default"]
        idx.copy_((idx + 1) % (layer.out_features * layer.in_features))
    assert layer._entry_pattern("default") is not first
    y_sparse, _ = layer_outputs(layer, x, "sparse")
    y_dense, _ = layer_outputs(layer, x, "dense")
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-4)


def test_sparse_path_save_reload_and_switch_method(tmp_path):
    loaded, mask, base, ids, ref = _train_save_reload(tmp_path, GRANULARITIES["weight"], fraction=0.05)
    assert {m.entries_path("default") for m in entry_layers(loaded)} == {"sparse"}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    dense = load_masked_lora(tiny_llama(seed=0), str(tmp_path), entries_method="dense")
    assert {m.entries_path("default") for m in entry_layers(dense)} == {"dense"}
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="entries_method='x' is not one of"):
        load_masked_lora(tiny_llama(seed=0), str(tmp_path), entries_method="x")
    train(loaded, steps=2)
    assert_protected(loaded.merge_and_unload(), base, mask)


def test_sparse_path_in_bf16_accumulates_in_fp32():
    # CPU CSR kernels are fp32/fp64 only: bf16 adapters are computed in fp32 and cast back
    model = tiny_llama(seed=0).to(torch.bfloat16)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask, autocast_adapter_dtype=False)
    randomise_lora_(peft_model)
    layer = entry_layers(peft_model)[0]
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y_sparse, g_sparse = layer_outputs(layer, x, "sparse")
    y_dense, g_dense = layer_outputs(layer, x, "dense")
    assert y_sparse.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in g_sparse)
    scale = y_dense.float().abs().max()
    assert (y_sparse.float() - y_dense.float()).abs().max() <= 0.02 * scale  # bf16 rounding only
    for gs, gd in zip(g_sparse, g_dense):
        assert (gs.float() - gd.float()).abs().max() <= 0.02 * gd.float().abs().max()
