"""Masked LoRA (SPA): masked entries of every base weight stay bit-identical after training and merging."""

from __future__ import annotations

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
from peft import LoraConfig, PeftModel

import peft_safety
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
    base_model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES[kind])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)
    ids = tokens()
    with torch.no_grad():
        assert peft_model(ids).logits.isfinite().all()
    train(peft_model)
    # what the trained layers do in forward: exactly zero on the mask, the fp64 masked product elsewhere
    checked = assert_effective_update_exact(peft_model, mask)
    assert checked > 0 or kind == "layer"
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        # and the whole model equals the base with the explicit fp64 masked deltas added (independent merge)
        torch.testing.assert_close(
            explicit_merge(base_model, peft_model, mask)(ids).logits, unmerged, rtol=1e-5, atol=1e-5
        )
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
                m.lora_A["default"].weight.normal_()
    # forward: the corrupted masked rows never reach the output (checked against the fp64 masked product)
    assert assert_effective_update_exact(peft_model, mask) > 0
    # the stored rows really are corrupted: unmasked LoRA would move them
    layer = lora_layers(peft_model)["model.layers.0.mlp.gate_proj"]
    dense = mask.to_dense("model.layers.0.mlp.gate_proj.weight")
    assert torch.count_nonzero(reference_delta(layer, None)[dense]) > 0
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
    assert assert_effective_update_exact(peft_model, mask) > 0  # attention head rows and shared-expert entries
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
    assert loaded.peft_config["default"].peft_type == "SAFETY_LORA"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
        # independent of the layer code: the base with the explicit fp64 masked deltas of the loaded factors
        torch.testing.assert_close(
            explicit_merge(tiny_llama(seed=0), loaded, mask)(ids).logits, ref, rtol=1e-5, atol=1e-5
        )
    assert_effective_update_exact(loaded, mask)
    train(loaded, steps=2)
    assert_effective_update_exact(loaded, mask)
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
    get_peft_model(
        tiny_llama(seed=0), peft_safety.SafetyConfig(mask=make_mask(tiny_llama(seed=0), GRANULARITIES["weight"]))
    ).save_pretrained(tmp_path / "set")
    with pytest.raises(ValueError, match="is a SAFETY adapter, not a masked LoRA adapter"):
        load_masked_lora(tiny_llama(seed=0), str(tmp_path / "set"))


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
    # force a plain LoRA reading of the folder (as a tool that ignores the SAFETY_LORA type would)
    plain = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, config=lora())
    assert type(plain.peft_config["default"]) is LoraConfig
    assert_protected(plain.merge_and_unload(), base, mask)


# --- Weight() masks: dense (default, bit-exact) and sparse (opt-in) paths, against fp64 references ----------------


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


def test_default_path_is_dense_and_bit_exact():
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask)
    assert peft_model.peft_config["default"].entries_method == "dense"
    assert {m.entries_path("default") for m in entry_layers(peft_model)} == {"dense"}
    randomise_lora_(peft_model)
    assert assert_effective_update_exact(peft_model, mask) == int(mask.numel())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_each_path_matches_fp64_reference_forward_and_gradients(method, dropout):
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(lora_dropout=dropout), mask, entries_method=method)
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


def test_sparse_path_is_exact_only_up_to_rounding():
    # documented: the opt-in sparse path subtracts two differently rounded products on the masked entries
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method="sparse")
    randomise_lora_(peft_model)
    residue = 0.0
    for layer in entry_layers(peft_model):
        dense = mask.to_dense(_module_key(peft_model, layer) + ".weight")
        got = identity_update(layer)
        want = reference_delta(layer, dense)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        residue = max(residue, float(got[dense].abs().max()))
    assert residue < 1e-5


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


def test_dense_masked_delta_backward_passes_gradcheck():
    from peft_safety.tuner.lora import _MaskedDenseDelta

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
        reference = explicit_merge(tiny_llama(seed=0), peft_model, mask)(ids).logits
    torch.testing.assert_close(unmerged, reference, rtol=1e-5, atol=1e-5)
    if method == "dense":
        assert_effective_update_exact(peft_model, mask)
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-5, atol=1e-5)
    assert assert_protected(merged, base, mask) > 0


def test_sparse_and_dense_training_runs_each_match_an_explicit_merge():
    for method in ("sparse", "dense"):
        model = tiny_llama(seed=0)
        mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
        peft_model = get_masked_lora_model(model, lora(), mask, entries_method=method)
        torch.manual_seed(0)
        train(peft_model, steps=3)
        with torch.no_grad():
            got = peft_model(tokens()).logits
            want = explicit_merge(tiny_llama(seed=0), peft_model, mask)(tokens()).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=method)


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
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method="auto")
    modules = dict(peft_model.named_modules())
    q = modules["base_model.model.model.layers.0.self_attn.q_proj"]
    down = modules["base_model.model.model.layers.1.mlp.down_proj"]
    assert (q.entries_path("default"), down.entries_path("default")) == ("sparse", "dense")
    assert modules["base_model.model.model.layers.0.self_attn.k_proj"].entries_path("default") is None
    down.entries_method = "sparse"  # per-layer override
    assert down.entries_path("default") == "sparse"
    default = get_masked_lora_model(tiny_llama(seed=0), lora(), mask)
    assert {m.entries_path("default") for m in entry_layers(default)} == {"dense"}
    # off the CPU "auto" is always dense (CSR kernels measured 14-80x slower than the dense path on an H200)
    q.lora_A["default"].to("meta")
    assert q.entries_path("default") == "dense"


def test_bad_entries_method_refused():
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"])
    with pytest.raises(ValueError, match=r"entries_method='csr' is not one of.*'dense' \(default, bit-exact"):
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


def test_sparse_path_save_reload_and_switch_method(tmp_path):
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method="sparse")
    train(peft_model, steps=2)
    ids = tokens()
    with torch.no_grad():
        ref = explicit_merge(tiny_llama(seed=0), peft_model, mask)(ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = load_masked_lora(tiny_llama(seed=0), str(tmp_path), is_trainable=True)
    assert {m.entries_path("default") for m in entry_layers(loaded)} == {"sparse"}  # the saved method
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)
    dense = load_masked_lora(tiny_llama(seed=0), str(tmp_path), entries_method="dense")
    assert {m.entries_path("default") for m in entry_layers(dense)} == {"dense"}
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert_effective_update_exact(dense, mask)
    with pytest.raises(ValueError, match="entries_method='x' is not one of"):
        load_masked_lora(tiny_llama(seed=0), str(tmp_path), entries_method="x")
    train(loaded, steps=2)
    assert_protected(loaded.merge_and_unload(), base, mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_low_precision_adapters_against_fp64(method, dtype):
    # CPU CSR kernels are fp32/fp64 only: low-precision sparse adapters are computed in fp32 and cast back
    model = tiny_llama(seed=0).to(dtype)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method=method, autocast_adapter_dtype=False)
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
def test_effective_update_and_merge_exact_per_dtype(kind, dtype):
    model = tiny_llama(seed=0).to(dtype)
    mask = make_mask(model, GRANULARITIES[kind], fraction=0.1)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora(), mask)  # default path, fp32 adapters on a low-precision base
    randomise_lora_(peft_model, std=0.1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert assert_effective_update_exact(peft_model, mask, rtol=tol, atol=tol) > 0
    merged = peft_model.merge_and_unload(safe_merge=True)
    assert_protected(merged, base, mask)
    assert all(p.dtype == dtype for p in merged.parameters())


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_autocast_bf16_on_cpu(method):
    # TRL's default bf16=True runs the forward under torch.autocast("cpu", torch.bfloat16)
    model = tiny_llama(seed=0)
    mask = make_mask(model, GRANULARITIES["weight"], fraction=0.05)
    peft_model = get_masked_lora_model(model, lora(), mask, entries_method=method)
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


def test_low_cpu_mem_usage_create_and_load(tmp_path):
    from peft import get_peft_model, inject_adapter_in_model, set_peft_model_state_dict

    model = tiny_llama(seed=0)
    mask = make_mask(model, {**GRANULARITIES["weight"], **GRANULARITIES["neuron_rows"]})
    cfg = mask_lora_config(lora(), mask)
    empty = get_peft_model(model, cfg, low_cpu_mem_usage=True)
    layers = lora_layers(empty)
    assert any(m.lora_A["default"].weight.device.type == "meta" for m in layers.values())
    # the masks are data, never empty: they are on the real device at once
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_safety_entries["default"].device.type == "cpu"
    assert torch.equal(q.lora_safety_entries["default"].long(), mask["model.layers.0.self_attn.q_proj.weight"].long())
    injected = inject_adapter_in_model(mask_lora_config(lora(), mask), tiny_llama(seed=0), low_cpu_mem_usage=True)
    assert isinstance(injected.model.layers[0].self_attn.q_proj, SafetyLoraLinear)
    # a trained adapter loads with low_cpu_mem_usage on every path
    trained = get_masked_lora_model(tiny_llama(seed=0), lora(), mask)
    randomise_lora_(trained, std=0.1)
    ids = tokens()
    with torch.no_grad():
        ref = explicit_merge(tiny_llama(seed=0), trained, mask)(ids).logits
    trained.save_pretrained(tmp_path)
    for loaded in (
        load_masked_lora(tiny_llama(seed=0), str(tmp_path), low_cpu_mem_usage=True),
        PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=True),
    ):
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert_effective_update_exact(loaded, mask)
    from peft import get_peft_model_state_dict

    target = inject_adapter_in_model(mask_lora_config(lora(), mask), tiny_llama(seed=0), low_cpu_mem_usage=True)
    state = get_peft_model_state_dict(trained)
    set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, ref, rtol=1e-5, atol=1e-5)
