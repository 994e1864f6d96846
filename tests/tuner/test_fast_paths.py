"""The fast forward paths against explicit dense references written here, in fp32, bf16 and fp16.

* Masked LoRA, ``Weight()`` masks, ``entries_method="sparse"`` (what the default ``"auto"`` picks on CPU at low
  density): the training forward equals the dense masked forward within fp32 rounding, the merged weights are
  bit-identical to the base on the mask, and the guarantee checks (``mask_drift`` / ``verify_safety``) hold the forward
  to its documented rounding bound and the merge to bit-exactness. Every check fails when the mask is dropped.
* SET: the fp32 fold (the delta written into ``W`` for one matmul, then the original entries written back) leaves
  ``W`` bit-identical whatever happens; on bf16/fp16 bases the delta takes a sparse pass (no second weight-sized
  matmul) and a delta below the weight's rounding step still moves the output and the input gradient as the fp64
  reference says.

The references never call the library's own arithmetic: the masked delta is ``B @ A * s`` in fp64 with the masked
entries zeroed by a loop over the flat indices.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch
from _spa_reference import identity_update, lora_layers, randomise_lora_
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from peft_safety.analysis.probes import mask_drift
from peft_safety.mask import Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig, SafetyLinear, SafetyLoraLinear, get_masked_lora_model

WEIGHT_MASK = {
    "model.layers.0.self_attn.q_proj.weight": Weight(),
    "model.layers.0.mlp.down_proj.weight": Weight(),
    "model.layers.1.mlp.gate_proj.weight": Weight(),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


def masked_delta64(layer, flat_indices, adapter="default"):
    """fp64 ``B @ A * s`` with the masked entries set to zero by a loop over the flat indices."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    delta = (b @ a) * float(layer.scaling[adapter])
    d_in = delta.shape[1]
    for flat in flat_indices.tolist():
        delta[flat // d_in, flat % d_in] = 0.0
    return delta


def magnitude64(layer, adapter="default"):
    """fp64 ``s·|B| @ |A|``: the scale of the update each entry's rounding is relative to."""
    a = layer.lora_A[adapter].weight.detach().double().abs()
    b = layer.lora_B[adapter].weight.detach().double().abs()
    return (b @ a) * abs(float(layer.scaling[adapter]))


def sparse_model(random_mask, lora_config, dtype=torch.float32, fraction=0.05, **kwargs):
    """The tiny Llama in ``dtype`` with a masked LoRA (default options) over `WEIGHT_MASK` at ``fraction``."""
    model = tiny_llama(seed=0).to(dtype)
    mask = random_mask(model, WEIGHT_MASK, fraction=fraction)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_masked_lora_model(model, lora_config(**kwargs.pop("lora", {})), mask, **kwargs)
    return peft_model, mask, base


def masked_layers(peft_model, mask):
    layers = lora_layers(peft_model)
    return {key: layers[key] for key in (n.rsplit(".", 1)[0] for n in mask.names)}


def bits(t):
    """The raw bits of a tensor (so -0.0 and +0.0 differ, as bit-identity requires)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --- masked LoRA: the sparse training forward ------------------------------------------------------------------------


def check_update_against_reference(layer, mask_flat, x):
    """The fast path's update (fp32) equals the explicit fp64 masked update within fp32 rounding; raises otherwise.

    Bound: every output is a dot product of length ``d_in`` (through rank ``r``) with the rounding of two sums of
    ``d_in + r`` terms each, so ``|err| <= 4 (d_in + r + 2) eps32 (|x| @ (s |B| |A|)ᵀ)`` (the masked-entry terms only
    need their own ``(r + 1)`` part; the coarser bound covers them).
    """
    from peft_safety.tuner.safety_lora.variant import _sparse_masked_forward

    weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    update = _sparse_masked_forward(x, weight_a, weight_b, layer._entry_pattern("default"), layer.scaling["default"])
    assert update.dtype == torch.float32
    x64 = x.detach().double()
    reference = x64 @ masked_delta64(layer, mask_flat).t()
    r = weight_a.shape[0]
    bound = 4 * (layer.in_features + r + 2) * EPS32 * (x64.abs() @ magnitude64(layer).t())
    err = (update.double() - reference).abs()
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"
    return reference, bound, update


@pytest.mark.parametrize("adapter_dtype", ["float32", "base"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_forward_matches_explicit_dense_reference(dtype, adapter_dtype, random_mask, lora_config):
    half_adapters = adapter_dtype == "base" and dtype != torch.float32
    peft_model, mask, _ = sparse_model(random_mask, lora_config, dtype, autocast_adapter_dtype=not half_adapters)
    randomise_lora_(peft_model, std=0.3)
    for key, layer in masked_layers(peft_model, mask).items():
        assert layer.entries_path("default") == "sparse"  # the default ("auto") on CPU at 5% density
        assert layer.lora_A["default"].weight.dtype == (dtype if half_adapters else torch.float32)
        x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
        flat = mask[f"{key}.weight"]
        reference, bound, _ = check_update_against_reference(layer, flat, x)
        # the check discriminates: LoRA's unmasked update is far outside the bound
        unmasked = x.detach().double() @ (masked_delta64(layer, flat[:0])).t()
        assert ((unmasked - reference).abs() > bound).any()
        # the layer's output, in its dtype: base + update, rounded once more to the output dtype
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype
        w64 = layer.get_base_layer().weight.detach().double()
        y_ref = x.double() @ w64.t() + reference
        scale = x.double().abs() @ (w64.abs() + magnitude64(layer)).t()
        eps = torch.finfo(dtype).eps
        assert ((y.double() - y_ref).abs() <= 4 * eps * scale + 4 * (layer.in_features + 6) * EPS32 * scale).all()


def test_sparse_gradients_match_explicit_dense_reference(random_mask, lora_config):
    peft_model, mask, _ = sparse_model(random_mask, lora_config, lora={"lora_dropout": 0.0})
    randomise_lora_(peft_model, std=0.3)
    peft_model.train()
    for key, layer in masked_layers(peft_model, mask).items():
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = layer(x)
        upstream = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view(y.shape)
        y.backward(upstream)
        a64 = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
        b64 = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        keep = torch.ones(layer.out_features, layer.in_features, dtype=torch.float64)
        d_in = layer.in_features
        for flat in mask[f"{key}.weight"].tolist():
            keep[flat // d_in, flat % d_in] = 0.0
        m = (b64 @ a64) * float(layer.scaling["default"]) * keep
        y64 = x64 @ layer.get_base_layer().weight.detach().double().t() + x64 @ m.t()
        y64.backward(upstream.double())
        for got, want in ((x.grad, x64.grad), (layer.lora_A["default"].weight.grad, a64.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
        # the mask matters for the gradients too: B's gradient without it differs
        no_mask = (x64.detach().reshape(-1, d_in).t() @ upstream.double().reshape(-1, layer.out_features)).t()
        plain_grad_b = (no_mask @ a64.detach().t()) * float(layer.scaling["default"])
        assert not torch.allclose(plain_grad_b, b64.grad, atol=1e-3)


def _drop_the_mask(monkeypatch):
    """The breakage the checks must catch: the sparse path forgets to subtract the masked entries."""
    import peft_safety.tuner.safety_lora.variant as variant

    def unmasked(x, weight_a, weight_b, pattern, scaling):
        return (x.float() @ weight_a.float().t()) @ weight_b.float().t() * scaling

    monkeypatch.setattr(variant, "_sparse_masked_forward", unmasked)


def test_reference_check_fails_when_the_mask_is_dropped(monkeypatch, random_mask, lora_config):
    peft_model, mask, _ = sparse_model(random_mask, lora_config)
    randomise_lora_(peft_model, std=0.3)
    key, layer = next(iter(masked_layers(peft_model, mask).items()))
    x = torch.randn(2, 7, layer.in_features, generator=torch.Generator().manual_seed(1))
    check_update_against_reference(layer, mask[f"{key}.weight"], x)
    _drop_the_mask(monkeypatch)
    with pytest.raises(AssertionError, match="max excess"):
        check_update_against_reference(layer, mask[f"{key}.weight"], x)


# --- masked LoRA: merged weights are bit-exact -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_after_sparse_training_is_bit_exact_on_the_mask(dtype, random_mask, lora_config, train):
    peft_model, mask, base = sparse_model(random_mask, lora_config, dtype)
    assert {m.entries_path("default") for m in masked_layers(peft_model, mask).values()} == {"sparse"}
    train(peft_model, steps=3, lr=2e-2)
    layers = masked_layers(peft_model, mask)
    deltas = {key: masked_delta64(layer, mask[f"{key}.weight"]) for key, layer in layers.items()}
    magnitudes = {key: magnitude64(layer) for key, layer in layers.items()}
    merged = dict(peft_model.merge_and_unload(safe_merge=True).named_parameters())
    moved = 0
    for key, delta in deltas.items():
        name = f"{key}.weight"
        dense = mask.to_dense(name)
        got, before = merged[name].detach(), base[name]
        assert got.dtype == dtype
        assert torch.equal(bits(got)[dense], bits(before)[dense]), f"{name}: a masked entry moved"
        # elsewhere the merge adds the explicit masked delta (up to the dtype's rounding of W + delta)
        want = before.double() + delta
        eps = torch.finfo(dtype).eps
        bound = eps * want.abs() + 2 * eps * delta.abs() + 8 * EPS32 * magnitudes[key]
        assert ((got.double() - want).abs() <= bound).all()
        moved += int((got[~dense] != before[~dense]).sum())
    assert moved > 0  # training did move the unmasked entries


@pytest.mark.slow  # a fresh interpreter (torch, transformers, peft): ~10-30 s
def test_merge_is_bit_exact_after_reload_in_a_fresh_process(tmp_path, random_mask, lora_config, train):
    peft_model, mask, base = sparse_model(random_mask, lora_config)
    train(peft_model, steps=3, lr=2e-2)
    peft_model.save_pretrained(tmp_path / "adapter")
    script = (
        "import sys, torch, peft_safety\n"
        "from peft import PeftModel\n"
        "from safetensors.torch import save_file\n"
        "from peft_safety.testing import tiny_llama\n"
        "model = PeftModel.from_pretrained(tiny_llama(seed=0), sys.argv[1])\n"
        "paths = {m.entries_path('default') for m in model.modules() if hasattr(m, 'entries_path')} - {None}\n"
        "merged = model.merge_and_unload(safe_merge=True)\n"
        "save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, sys.argv[2])\n"
        "print(sorted(paths))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "adapter"), str(tmp_path / "merged.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == ["sparse"]
    merged = load_file(tmp_path / "merged.safetensors")
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(bits(merged[name])[dense], bits(base[name])[dense])
        assert not torch.equal(merged[name], base[name])  # the adapter was merged


# --- masked LoRA: what verify checks -----------------------------------------------------------------------------


def test_identity_residues_stay_within_the_documented_bound(random_mask, lora_config):
    from peft_safety.tuner.safety_lora.variant import sparse_forward_bound

    for dtype in DTYPES:
        for seed, std in ((1, 1.0), (2, 1e-3), (3, 3.0)):
            rank16 = lambda **_: LoraConfig(r=16, lora_alpha=8, target_modules="all-linear")  # noqa: E731
            peft_model, mask, _ = sparse_model(random_mask, rank16, dtype)
            randomise_lora_(peft_model, seed=seed, std=std)
            residues = 0
            for key, layer in masked_layers(peft_model, mask).items():
                dense = mask.to_dense(f"{key}.weight")
                got = identity_update(layer).double()
                bound = layer.forward_tolerance().double()
                # the bound written out here from its documented formula, fp64
                r = layer.lora_A["default"].weight.shape[0]
                out = torch.finfo(dtype)
                written = 4 * ((r + 1) * EPS32 * magnitude64(layer) + out.smallest_normal * out.eps)
                torch.testing.assert_close(bound, written, rtol=1e-5, atol=0)
                assert torch.equal(
                    bound, sparse_forward_bound(*layer_factors(layer), layer.scaling["default"], dtype).double()
                )
                assert (got[dense].abs() <= bound[dense]).all(), f"{dtype} {key}: residue above the bound"
                residues += int(torch.count_nonzero(got[dense]))
                if dtype == torch.float32:
                    # the bound is tight: an unmasked update is orders of magnitude above it
                    typical = got[~dense].abs().median()
                    assert float(bound[dense].max()) < 1e-3 * float(typical)
            if dtype == torch.float32 and std == 1.0:
                assert residues > 0  # the sparse forward is not bit-exact, so the bound is what accepts it


def layer_factors(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def test_mask_drift_holds_the_forward_to_its_bound_and_the_merge_to_bit_exactness(
    monkeypatch, random_mask, lora_config
):
    peft_model, mask, _ = sparse_model(random_mask, lora_config)
    randomise_lora_(peft_model)
    n_masked = int(mask.numel())
    assert mask_drift(peft_model, None, mask, mode="freeze")["violations"] == 0
    # the residues exist and the bound is what accepts them: with a zero bound they are violations
    with monkeypatch.context() as patch:
        patch.setattr(
            SafetyLoraLinear, "forward_tolerance", lambda self: torch.zeros(self.out_features, self.in_features)
        )
        residues = mask_drift(peft_model, None, mask, mode="freeze")["violations"]
    assert 0 < residues < n_masked
    # a merge that would move masked entries is a violation even though the forward is within its bound
    with monkeypatch.context() as patch:
        from peft.tuners.lora.layer import Linear as LoraLinear

        patch.setattr(SafetyLoraLinear, "get_delta_weight", LoraLinear.get_delta_weight)
        assert mask_drift(peft_model, None, mask, mode="freeze")["violations"] == n_masked
    # a forward that drops the mask: every masked entry is far above the bound
    _drop_the_mask(monkeypatch)
    assert mask_drift(peft_model, None, mask, mode="freeze")["violations"] == n_masked


def test_dense_path_is_still_held_to_bit_exactness(random_mask, lora_config):
    peft_model, mask, _ = sparse_model(random_mask, lora_config, entries_method="dense")
    randomise_lora_(peft_model)
    for key, layer in masked_layers(peft_model, mask).items():
        assert layer.entries_path("default") == "dense" and layer.forward_tolerance() is None
        got = identity_update(layer)
        assert torch.count_nonzero(got[mask.to_dense(f"{key}.weight")]) == 0
    assert mask_drift(peft_model, None, mask, mode="freeze")["violations"] == 0


# --- SET: the fp32 fold ------------------------------------------------------------------------------------------


def set_layer(dtype=torch.float32, d_out=24, d_in=20, n=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(d_in, d_out, bias=True).to(dtype).requires_grad_(False)  # a frozen base
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=gen).to(dtype))
        linear.bias.copy_(torch.randn(d_out, generator=gen).to(dtype))
    idx = torch.randperm(d_out * d_in, generator=gen)[:n].sort().values.to(torch.int32)
    layer = SafetyLinear(linear, "default", kind="entries", indices=idx, init_weights=False)
    return layer, idx


def explicit_set_output(layer, idx, x):
    w = layer.get_base_layer().weight.detach().double().clone()
    values = layer.safety_values["default"].detach().double()
    d_in = w.shape[1]
    for k, flat in enumerate(idx.tolist()):
        w[flat // d_in, flat % d_in] += values[k]
    return x.double() @ w.t() + layer.get_base_layer().bias.detach().double()


def test_fold_leaves_the_base_weight_bit_identical():
    layer, idx = set_layer()
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    x = torch.randn(4, 20, requires_grad=True)
    y = layer(x)
    assert torch.equal(weight, before)
    torch.testing.assert_close(y.double(), explicit_set_output(layer, idx, x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.equal(weight, before) and x.grad is not None
    with torch.inference_mode():
        layer(torch.randn(2, 20))
    assert torch.equal(weight, before)


def test_fold_is_undone_when_the_matmul_fails(monkeypatch):
    import peft_safety.tuner.safety.layer as set_module

    layer, _ = set_layer()
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    seen = {}

    def failing_linear(x, w, *args):
        seen["folded"] = not torch.equal(w, before)  # the matmul does see W + delta
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(set_module.F, "linear", failing_linear)
    with pytest.raises(RuntimeError, match="simulated"):
        layer(torch.randn(3, 20))
    assert seen["folded"] and torch.equal(weight, before)


def test_fold_is_safe_across_threads():
    layer, idx = set_layer(d_out=64, d_in=48, n=300)
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    inputs = [torch.randn(8, 48, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expected = [explicit_set_output(layer, idx, x) for x in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(25):
                x = inputs[i].clone().requires_grad_(True)
                y = layer(x)
                y.sum().backward()
                if not torch.allclose(y.double(), expected[i], rtol=1e-5, atol=1e-5):
                    errors.append(f"thread {i}: wrong output")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(weight, before)


# --- SET: half-precision bases, no doubled matmul, no delta lost -------------------------------------------------


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("dtype", DTYPES)
def test_set_entries_cost_one_matmul_of_the_layer_size(dtype):
    """FLOP count of forward + input gradient: exactly the frozen layer's (the delta's own work is O(nnz·tokens),
    gathers that are not matmuls), where the half-precision path used to run a second matmul of the layer's size."""
    layer, _ = set_layer(dtype, d_out=64, d_in=48, n=100)
    base = layer.get_base_layer()
    x = torch.randn(2, 16, 48).to(dtype)

    def run(module):
        def step():
            inp = x.clone().requires_grad_(True)
            module(inp).float().sum().backward()

        return step

    frozen = _flops(run(base))
    assert frozen == 2 * (2 * 2 * 16 * 48 * 64)  # forward and input gradient, one matmul each
    assert _flops(run(layer)) == frozen


@pytest.mark.parametrize(
    ("dtype", "delta", "autocast"),
    [(torch.bfloat16, 3e-3, False), (torch.float16, 4e-4, False), (torch.bfloat16, 3e-3, True)],
    ids=["bf16", "fp16", "fp32-base-under-bf16-autocast"],
)
def test_half_precision_deltas_below_the_ulp_move_output_and_gradient(dtype, delta, autocast):
    # W[2p+s, 2q+u] = (-1)^(s+u) a[p, q] with a in [1.1, 1.9]: inputs paired (x, x) and output gradients paired (g, g)
    # cancel the base exactly in both directions, so what remains is the deltas' contribution, each below half the
    # weight's rounding step (folded into W in this dtype they would vanish).
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = 16, 32
    a = 1.1 + 0.8 * torch.rand(d_out // 2, d_in // 2, generator=gen)  # one binade, away from its edges
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    w = (a[:, None, :, None] * sign[None, :, None, :]).reshape(d_out, d_in).to(dtype).float()  # representable
    # under autocast the base stays fp32 (values representable in bf16) and autocast runs its matmul in bf16
    linear = torch.nn.Linear(d_in, d_out, bias=False).to(torch.float32 if autocast else dtype).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(w)
    ulp_half = (2 ** torch.floor(torch.log2(w.abs())) * torch.finfo(dtype).eps / 2).min()
    assert delta < ulp_half
    idx = torch.randperm(d_out * d_in, generator=gen)[: d_out * d_in // 2].sort().values.to(torch.int32)
    layer = SafetyLinear(linear, "default", kind="entries", indices=idx)
    with torch.no_grad():
        layer.safety_values["default"].fill_(delta)
    masked = linear.weight.reshape(-1)[idx.long()].to(dtype)
    assert torch.equal((masked + delta).to(dtype), masked)  # folded into W in this dtype, every delta would vanish
    half_x = 0.5 + 0.5 * torch.rand(3, d_in // 2, generator=gen)
    x = torch.stack([half_x, half_x], dim=-1).reshape(3, d_in).to(dtype)
    x = (x.float() if autocast else x).requires_grad_(True)
    half_g = 0.5 + 0.5 * torch.rand(3, d_out // 2, generator=gen)
    g = torch.stack([half_g, half_g], dim=-1).reshape(3, d_out).to(dtype)
    d64 = torch.zeros(d_out * d_in, dtype=torch.float64)
    d64[idx.long()] = delta
    d64 = d64.view(d_out, d_in)
    w64 = linear.weight.detach().double()
    assert (x.detach().double() @ w64.t()).abs().max() == 0 and (g.double() @ w64).abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(g)
    y_ref = x.detach().double() @ (w64 + d64).t()
    gx_ref = g.double() @ (w64 + d64)
    eps = torch.finfo(dtype).eps
    for got, want, scale in (
        (y.detach(), y_ref, x.detach().double().abs() @ d64.t()),
        (x.grad, gx_ref, g.double().abs() @ d64),
    ):
        assert got.dtype == (x.dtype if got is x.grad else dtype)
        assert ((got.double() - want).abs() <= 2 * eps * scale).all()
        assert (want.abs() > 20 * (2 * eps * scale)).all()  # each entry measures its deltas, far above rounding


def test_set_model_with_half_precision_base_trains_without_doubled_matmul(random_mask, tokens):
    model = tiny_llama(seed=0).to(torch.bfloat16)
    mask = random_mask(model, WEIGHT_MASK, fraction=0.05)
    peft_model = get_peft_model(model, SafetyConfig(mask=mask))
    ids = tokens()
    frozen = _flops(lambda: tiny_llama(seed=0).to(torch.bfloat16)(input_ids=ids, labels=ids))
    adapted = _flops(lambda: peft_model(input_ids=ids, labels=ids))
    assert adapted == frozen  # forward: one matmul per layer, as the frozen model
