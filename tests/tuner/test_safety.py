"""The SAFETY type (SET) beyond the conformance table: its layer's arithmetic (sparse-delta autograd, sampled
matmul, half-precision bases, merge rounding), the MoE model, the file format, and the config's refusals."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_qwen2_moe
from peft_safety.tuner import SafetyConfig, SafetyLinear
from peft_safety.tuner._sparse import EntryPattern
from peft_safety.tuner.safety.layer import _FoldedDeltaLinear, _SparseDelta, sampled_matmul

LLAMA_GRANULARITY = {
    "model.layers.0.self_attn.q_proj.weight": Weight(),
    "model.layers.0.self_attn.v_proj.weight": Weight(),
    "model.layers.0.mlp.down_proj.weight": Neuron(axis=1),
    "model.layers.1.self_attn.k_proj.weight": Head(head_dim=8, axis=0),
    "model.layers.1.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
    "model.layers.1.mlp.gate_proj.weight": Neuron(axis=0),
    "model.layers.1.mlp.up_proj.weight": Layer(),
    "lm_head.weight": Weight(),
}

MOE_GRANULARITY = {
    "model.layers.0.self_attn.q_proj.weight": Weight(),
    "model.layers.0.mlp.shared_expert.down_proj.weight": Neuron(axis=1),
    "model.layers.1.self_attn.v_proj.weight": Neuron(axis=0),
    "model.layers.1.mlp.shared_expert.up_proj.weight": Weight(),
}


@pytest.fixture(params=["llama", "moe"])
def model_and_mask(request, random_mask):
    if request.param == "llama":
        model = tiny_llama(seed=0)
        return model, random_mask(model, LLAMA_GRANULARITY, fraction=0.2)
    model = tiny_qwen2_moe(seed=0)
    return model, random_mask(model, MOE_GRANULARITY, fraction=0.2)


@pytest.fixture
def moe_and_mask(random_mask):
    """The tiny Qwen2-MoE (the conformance table covers the Llama): attention and shared-expert masks."""
    model = tiny_qwen2_moe(seed=0)
    return model, random_mask(model, MOE_GRANULARITY, fraction=0.2)


# ---- identity, structure ----------------------------------------------------------------------------------------------


def test_identity_at_init_and_only_masked_modules_wrapped(model_and_mask, tokens):
    model, mask = model_and_mask
    ids = tokens()
    with torch.no_grad():
        ref = model(ids).logits
    peft_model = get_peft_model(model, SafetyConfig(mask=mask))
    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, SafetyLinear)
    }
    assert wrapped == {name.rsplit(".", 1)[0] for name in mask.names}
    with torch.no_grad():
        out = peft_model(ids).logits
    assert torch.equal(out, ref)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".safety_values.default" in n for n in trainable)


def test_values_count_matches_mask_numel(model_and_mask):
    model, mask = model_and_mask
    peft_model = get_peft_model(model, SafetyConfig(mask=mask))
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n_trainable == mask.numel()


def _reference_delta(gran, unit_indices, values, shape):
    """The dense fp64 delta of one module, placed by a naive loop over the mask's own units (no library code)."""
    delta = torch.zeros(shape, dtype=torch.float64)
    v = values.detach().double()
    units = [int(i) for i in unit_indices]
    if isinstance(gran, Weight):
        for k, flat in enumerate(units):
            delta[flat // shape[1], flat % shape[1]] += v[k]
    elif isinstance(gran, Layer):
        delta += v
    else:
        width = 1 if isinstance(gran, Neuron) else gran.head_dim
        positions = [u * width + o for u in units for o in range(width)]
        for k, pos in enumerate(positions):
            if gran.axis == 0:
                delta[pos, :] += v[k, :]
            else:
                delta[:, pos] += v[:, k]
    return delta


def test_forward_matches_dense_reference(model_and_mask, tokens):
    model, mask = model_and_mask
    ref_model = copy.deepcopy(model)
    ref_model.set_experts_implementation("eager")  # the grouped-mm expert kernel has no fp64 path
    ref_model.double()
    peft_model = get_peft_model(model, SafetyConfig(mask=mask, init_weights=False))
    params = dict(ref_model.named_parameters())
    with torch.no_grad():
        for name in mask.names:
            layer = peft_model.base_model.model.get_submodule(name.rsplit(".", 1)[0])
            values = layer.safety_values["default"]
            assert values.abs().min() > 0 or values.numel() == 0
            params[name] += _reference_delta(mask.granularity_of(name), mask[name], values, params[name].shape)
    ids = tokens()
    with torch.no_grad():
        out = peft_model(ids).logits
        ref = ref_model(ids).logits
    assert (ref - out.double()).abs().max() < 1e-4
    with torch.no_grad(), peft_model.disable_adapter():
        assert (ref - peft_model(ids).logits.double()).abs().max() > 1e-2  # the deltas matter at this tolerance


@pytest.mark.parametrize(("dtype", "delta"), [(torch.bfloat16, 3e-3), (torch.float16, 4e-4)])
def test_half_precision_base_keeps_small_deltas(dtype, delta):
    # Weights in [1, 2): a delta below half their rounding step vanishes if it is added into the half-precision weight.
    # Each row holds pairs (+a, -a) and each input pairs (x, x), so the base output cancels exactly and what remains
    # is the deltas' contribution, which an fp64 reference of (W + delta) x gives exactly.
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = 16, 128
    a = 1 + torch.rand(d_out, d_in // 2, generator=gen)
    w = torch.stack([a, -a], dim=-1).reshape(d_out, d_in)
    linear = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    idx = torch.randperm(d_out * d_in, generator=gen)[: d_out * d_in // 2].sort().values.to(torch.int32)
    layer = SafetyLinear(linear, "default", kind="entries", indices=idx)
    with torch.no_grad():
        layer.safety_values["default"].fill_(delta)
    half_x = 0.5 + 0.5 * torch.rand(4, d_in // 2, generator=gen)
    x = torch.stack([half_x, half_x], dim=-1).reshape(4, d_in).to(dtype)
    w64 = linear.weight.detach().double()
    d64 = torch.zeros(d_out * d_in, dtype=torch.float64)
    d64[idx.long()] = delta
    d64 = d64.view(d_out, d_in)
    ref = x.double() @ (w64 + d64).t()
    eps = torch.finfo(dtype).eps
    base_err = (linear(x).double() - x.double() @ w64.t()).abs().max()  # the dtype's own matmul error (0 here)
    tol = base_err + 2 * eps * (x.double().abs() @ d64.abs().t())
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype
    assert ((out.double() - ref).abs() <= tol).all()
    assert ref.abs().min() > 10 * tol.max()  # the deltas are what the output measures
    # value gradients are computed in fp32 and match the fp64 reference
    out = layer(x)
    grad_out = torch.ones_like(out)
    (gv,) = torch.autograd.grad(out, layer.safety_values["default"], grad_out)
    rows, cols = idx.long() // d_in, idx.long() % d_in
    expected = (grad_out.double().t() @ x.double())[rows, cols]
    torch.testing.assert_close(gv.double(), expected, rtol=1e-2, atol=1e-2)


def test_half_precision_merge_reports_rounded_away_deltas():
    linear = torch.nn.Linear(64, 8, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.fill_(1.5)
    idx = torch.arange(0, 512, 2, dtype=torch.int32)
    layer = SafetyLinear(linear, "default", kind="entries", indices=idx)
    with torch.no_grad():
        layer.safety_values["default"].fill_(1e-3)  # below half of bf16's step at 1.5 (2**-7 / 2 = 3.9e-3)
    with pytest.warns(UserWarning, match="bfloat16.*keep the adapter unmerged"):
        layer.merge()
    assert layer.merge_rounding_loss["default"] == (256, 256)


# ---- gradients --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("method", ["sampled", "dense"])
def test_sparse_delta_gradients_match_autograd(method, fold):
    torch.manual_seed(0)
    weight = torch.randn(12, 9)
    before = weight.clone()
    idx = torch.tensor([0, 5, 17, 40, 41, 99, 107], dtype=torch.int32)
    pattern = EntryPattern(idx, 12, 9)
    values = torch.randn(idx.numel(), requires_grad=True)
    x = torch.randn(3, 4, 9, requires_grad=True)
    if fold:
        y = _FoldedDeltaLinear.apply(x, values, weight, pattern, method)
    else:
        y = x @ weight.t() + _SparseDelta.apply(x, values, pattern, method)
    grad_out = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), grad_out)
    assert torch.equal(weight, before)  # a fold is written back bit-exactly

    # reference: a naive loop places the deltas, plain autograd differentiates
    values_ref = values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    delta = torch.zeros(12, 9)
    for k, flat in enumerate(idx.tolist()):
        delta = delta + torch.nn.functional.one_hot(torch.tensor(flat), 12 * 9).view(12, 9) * values_ref[k]
    y_ref = x_ref @ (weight + delta).t()
    gx_ref, gv_ref = torch.autograd.grad(y_ref, (x_ref, values_ref), grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gv, gv_ref)


def test_sparse_delta_passes_gradcheck():
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([1, 4, 6, 13, 19], dtype=torch.int32)
    pattern = EntryPattern(idx, 4, 5)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x, v: _SparseDelta.apply(x, v, pattern, "sampled"), (x, values))
    assert torch.autograd.gradcheck(
        lambda x, v: _FoldedDeltaLinear.apply(x, v, weight, pattern, "sampled"), (x, values)
    )


def test_sampled_matmul_chunks_agree_with_dense(monkeypatch):
    import peft_safety.tuner._sparse as sparse

    torch.manual_seed(1)
    g, x = torch.randn(7, 10), torch.randn(7, 6)
    idx = torch.tensor([1, 2, 13, 30, 59], dtype=torch.int32)
    monkeypatch.setattr(sparse, "_GATHER_CHUNK_ELEMENTS", 14)  # two entries per chunk
    expected = (g.t() @ x).reshape(-1)[idx.long()]
    torch.testing.assert_close(sampled_matmul(g, x, idx, 6), expected)  # sampled_addmm path (fp32)
    pattern = EntryPattern(idx, 10, 6)
    torch.testing.assert_close(pattern._gather_sample(g.t(), x.t()), expected)  # chunked gather fallback
    got_bf16 = sampled_matmul(g.bfloat16(), x.bfloat16(), idx, 6)  # no sparse kernel: gather, fp32 accumulation
    assert got_bf16.dtype == torch.float32
    torch.testing.assert_close(got_bf16, expected, rtol=2e-2, atol=5e-2)


def test_merged_weight_not_saved_for_backward():
    weight = torch.randn(64, 64)
    idx = torch.arange(0, 4096, 97, dtype=torch.int32)
    pattern = EntryPattern(idx, 64, 64)
    values = torch.zeros(idx.numel(), requires_grad=True)
    x = torch.randn(5, 64)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _FoldedDeltaLinear.apply(x, values, weight, pattern, "sampled").sum()
        _SparseDelta.apply(x, values, pattern, "sampled").sum()
    # only x and the values are kept (the frozen base weight is referenced, never copied)
    assert saved and all(t.numel() < weight.numel() for t in saved)


# ---- training invariants ---------------------------------------------------------------------------------------------


def test_training_changes_only_masked_entries(moe_and_mask, train):
    # the conformance table checks the Llama; here the MoE model (shared experts, router) keeps the guarantee
    model, mask = moe_and_mask
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, SafetyConfig(mask=mask))
    train(peft_model, steps=3)
    merged = peft_model.merge_and_unload()
    after = dict(merged.named_parameters())
    assert set(after) == set(before)
    for name, old in before.items():
        new = after[name].detach()
        if name in mask:
            dense = mask.to_dense(name)
            assert torch.equal(new[~dense], old[~dense]), name  # outside the mask: bit-identical
            assert not torch.equal(new[dense], old[dense]), name  # inside: trained
        else:
            assert torch.equal(new, old), name


def test_merge_unmerge_and_disable_on_moe(moe_and_mask, tokens):
    model, mask = moe_and_mask
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, SafetyConfig(mask=mask, init_weights=False))
    ids = tokens()
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
        peft_model.merge_adapter()
        merged = peft_model(ids).logits
        peft_model.unmerge_adapter()
        again = peft_model(ids).logits
        base_out = peft_model.unload()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(disabled, unmerged)
    torch.testing.assert_close(disabled, base_out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, base[name], rtol=0, atol=1e-6)


# ---- file format ------------------------------------------------------------------------------------------------------


def test_file_format(tmp_path, random_mask, tokens):
    """What a SAFETY folder holds (the round trip itself is in the conformance table)."""
    model = tiny_llama(seed=0)
    mask = random_mask(model, LLAMA_GRANULARITY, fraction=0.2)
    peft_model = get_peft_model(model, SafetyConfig(mask=mask, init_weights=False))
    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SAFETY" and cfg["mode"] == "train_only"
    assert "mask" not in cfg and "fingerprint_check" not in cfg
    assert cfg["mask_layout"]["model.layers.1.mlp.up_proj"] == {"kind": "whole", "n": 1, "shape": [64, 32]}
    assert cfg["mask_layout"]["model.layers.1.self_attn.k_proj"]["kind"] == "rows"
    assert cfg["mask_layout"]["model.layers.1.self_attn.o_proj"]["kind"] == "cols"
    assert set(cfg["mask_layout"]) == {n.rsplit(".", 1)[0] for n in mask.names}
    state = load_file(tmp_path / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    saved = state["base_model.model." + q + ".safety_indices"]
    assert saved.dtype == torch.int32
    assert torch.equal(saved, mask[q + ".weight"])
    k = state["base_model.model.model.layers.1.self_attn.k_proj.safety_indices"]  # heads stored as their rows
    heads = mask["model.layers.1.self_attn.k_proj.weight"].tolist()
    assert k.tolist() == [h * 8 + o for h in heads for o in range(8)]
    assert state["base_model.model.model.layers.1.mlp.up_proj.safety_indices"].tolist() == [0]
    assert state["base_model.model.model.layers.1.mlp.up_proj.safety_values"].shape == (64, 32)


def test_push_to_hub_uploads_adapter_files(random_mask):
    model = tiny_llama(seed=0)
    peft_model = get_peft_model(model, SafetyConfig(mask=random_mask(model, LLAMA_GRANULARITY)))
    with (
        mock.patch("transformers.utils.hub.hf_api") as api,
        mock.patch("transformers.utils.hub.create_and_tag_model_card"),
    ):
        peft_model.push_to_hub("me/toy-safety-adapter")
    ops = api.return_value.create_commit.call_args.kwargs["operations"]
    assert sorted(op.path_in_repo for op in ops) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_mixed_set_and_lora_alternative(random_mask, tokens):
    """A SET adapter cannot share modules with LoRA; merging it first and adding LoRA to the merged model works."""
    from peft import LoraConfig, inject_adapter_in_model

    mask = random_mask(tiny_llama(seed=0), {"model.layers.0.self_attn.q_proj.weight": Weight()})
    lora = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), tiny_llama(seed=0))
    with pytest.raises(ValueError, match=r"already carries adapter 'default' of PEFT type LORA.*merge_and_unload\(\)"):
        inject_adapter_in_model(SafetyConfig(mask=mask), lora)
    set_model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    with torch.no_grad():
        ref = set_model(tokens()).logits
    with_lora = get_peft_model(set_model.merge_and_unload(), LoraConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(with_lora(tokens()).logits, ref, rtol=1e-6, atol=1e-6)  # LoRA starts at zero


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("values_dtype", "autocast", "expected"),
    [
        ("float32", True, torch.float32),
        ("float32", False, torch.float32),  # documented: fp32 deltas stay fp32 (PEFT's tuners would follow the base)
        ("base", True, torch.float32),  # PEFT upcasts half-precision adapter weights
        ("base", False, "base"),
    ],
)
def test_values_dtype_with_autocast(base_dtype, values_dtype, autocast, expected, tmp_path, random_mask, tokens):
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[base_dtype]
    values = name if values_dtype == "base" else values_dtype
    want = base_dtype if expected == "base" else expected
    mask = random_mask(tiny_llama(seed=0), {"model.layers.0.self_attn.q_proj.weight": Weight()})
    config = SafetyConfig(mask=mask, init_weights=False, values_dtype=values)
    model = get_peft_model(tiny_llama(seed=0, dtype=base_dtype), config, autocast_adapter_dtype=autocast)
    layers = [m for m in model.modules() if isinstance(m, SafetyLinear)]
    assert {m.safety_values["default"].dtype for m in layers} == {want}
    with torch.no_grad():
        out = model(tokens()).logits
    assert out.dtype == base_dtype and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_llama(seed=0, dtype=base_dtype), tmp_path, autocast_adapter_dtype=autocast)
    assert {m.safety_values["default"].dtype for m in loaded.modules() if isinstance(m, SafetyLinear)} == {want}
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, out)


# ---- bad inputs -------------------------------------------------------------------------------------------------------


def test_freeze_mode_points_to_trainer():
    with pytest.raises(ValueError, match="SafetySFTTrainer"):
        SafetyConfig(mask="some/mask", mode="freeze")


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"mode='sparse' is not valid.*'train_only'"):
        SafetyConfig(mask="some/mask", mode="sparse")


def test_missing_mask_and_wrong_type():
    with pytest.raises(ValueError, match="needs a mask"):
        SafetyConfig()
    with pytest.raises(TypeError, match="takes a SafetyMask"):
        SafetyConfig(mask={"a": 1})
    with pytest.raises(ValueError, match="values_dtype='int8'"):
        SafetyConfig(mask="m", values_dtype="int8")
    with pytest.raises(ValueError, match="gradient_method='sparse'"):
        SafetyConfig(mask="m", gradient_method="sparse")


def test_mask_is_not_a_config_field(random_mask):
    """The mask is an init-only argument: readable and settable as an attribute, never in to_dict()."""
    import dataclasses

    model = tiny_llama(seed=0)
    mask = random_mask(model, {"model.layers.0.self_attn.q_proj.weight": Weight()})
    other = random_mask(model, {"model.layers.0.self_attn.v_proj.weight": Weight()})
    cfg = SafetyConfig(mask=mask)
    assert cfg.mask is mask
    assert "mask" not in {f.name for f in dataclasses.fields(cfg)} and "mask" not in cfg.to_dict()
    cfg.mask = other
    assert cfg.mask is other
    with pytest.raises(TypeError, match="takes a SafetyMask"):
        cfg.mask = 3
    wrapped = {n for n, m in get_peft_model(model, cfg).named_modules() if isinstance(m, SafetyLinear)}
    assert wrapped == {"base_model.model.model.layers.0.self_attn.v_proj"}
    # copies made the way PEFT makes them keep the mask
    assert copy.deepcopy(cfg).mask is not None and dataclasses.replace(cfg).mask is not None


def test_mask_for_another_model_shape(random_mask):
    other = tiny_llama(seed=0, hidden_size=48, head_dim=12)
    mask = random_mask(other, {"model.layers.0.self_attn.q_proj.weight": Weight()})
    with pytest.raises(ValueError, match="mask was built for another model"):
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask))


def test_mask_for_another_model_fingerprint(random_mask):
    mask = random_mask(tiny_llama(seed=1), LLAMA_GRANULARITY, fingerprints=True)
    with pytest.raises(ValueError, match="fingerprint of"):
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask))
    # the same model passes
    get_peft_model(tiny_llama(seed=1), SafetyConfig(mask=mask))


def test_unknown_parameter():
    mask = SafetyMask(
        indices={"model.layers.7.mlp.up_proj.weight": [1]}, shapes={"model.layers.7.mlp.up_proj.weight": (64, 32)}
    )
    with pytest.raises(ValueError, match="which this model does not have"):
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"exclude_modules": ["v_proj"]}, "filters exclude module 'model.layers.0.self_attn.v_proj'"),
        ({"target_modules": ["q_proj"]}, "filters exclude module"),
        ({"layers_to_transform": [0], "layers_pattern": "layers"}, "filters exclude module 'model.layers.1"),
    ],
)
def test_mask_entries_on_excluded_modules(kwargs, fragment, random_mask):
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match=fragment):
        get_peft_model(model, SafetyConfig(mask=random_mask(model, LLAMA_GRANULARITY), **kwargs))


def test_filters_that_keep_every_mask_module_are_fine(random_mask):
    model = tiny_llama(seed=0)
    mask = random_mask(model, {"model.layers.1.mlp.gate_proj.weight": Neuron(axis=0)})
    cfg = SafetyConfig(mask=mask, layers_to_transform=[1], layers_pattern="layers", exclude_modules=["q_proj"])
    assert get_peft_model(model, cfg).peft_config["default"].mask_layout


def test_fused_moe_experts_are_refused_with_advice(random_mask):
    model = tiny_qwen2_moe(seed=0)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    mask = random_mask(model, {name: Weight()})
    with pytest.raises(ValueError, match=r"fused MoE expert parameter.*'\.experts\.' not in name"):
        get_peft_model(model, SafetyConfig(mask=mask))


def test_non_linear_parameter_refused(random_mask):
    model = tiny_llama(seed=0)
    mask = random_mask(model, {"model.embed_tokens.weight": Neuron(axis=0)})
    with pytest.raises(ValueError, match="belongs to a Embedding"):
        get_peft_model(model, SafetyConfig(mask=mask))


def test_bias_raises_type_error_like_peft_tuners_without_bias():
    with pytest.raises(TypeError, match="bias='all'"):
        SafetyConfig(mask="m", bias="all")


def test_target_parameters_refused():
    with pytest.raises(ValueError, match="target_parameters"):
        SafetyConfig(mask="m", target_parameters=["mlp.experts.gate_up_proj"])


def test_mask_from_path(tmp_path, random_mask):
    model = tiny_llama(seed=0)
    mask = random_mask(model, LLAMA_GRANULARITY)
    mask.save_pretrained(tmp_path)
    cfg = SafetyConfig(mask=str(tmp_path))
    assert cfg.mask_source == str(tmp_path)
    peft_model = get_peft_model(model, cfg)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == mask.numel()


@pytest.mark.parametrize("bad", [[5, 3, 9], [3, 3, 9]], ids=["unsorted", "duplicate"])
def test_layer_refuses_unsorted_or_duplicate_indices(bad):
    with pytest.raises(ValueError, match="strictly increasing"):
        SafetyLinear(torch.nn.Linear(8, 4), "default", kind="entries", indices=torch.tensor(bad))


@pytest.mark.parametrize(
    ("kind", "indices", "fragment"),
    [
        ("rows", [4], "out of range"),
        ("cols", [-1, 2], "out of range"),
        ("whole", [1], "out of range"),
        ("whole", [0, 1], "more than"),
        ("entries", [], "non-empty"),
        ("dense", [0], "Unknown storage kind 'dense'"),
    ],
)
def test_layer_refuses_indices_outside_its_weight(kind, indices, fragment):
    with pytest.raises(ValueError, match=fragment):
        SafetyLinear(torch.nn.Linear(8, 4), "default", kind=kind, indices=torch.tensor(indices, dtype=torch.int64))
