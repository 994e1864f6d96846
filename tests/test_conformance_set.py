"""PEFT's generic tuner checks, run over the SAFETY (SET) adapter type as a matrix of mask granularities.

Our own checks (no code from PEFT's test battery): save/load (safetensors, pickle, ``low_cpu_mem_usage``),
merge/unmerge/safe merge, disable/enable, add/set/delete adapters, mixed adapters (refused, with the documented
alternative), inference mode, dtype autocast on fp16/bf16 bases, the FSDP-style state-dict round trip, and outputs
equal after reload in a fresh Python process through ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM``.
Every expected output is computed independently: the base model's own output, or the explicit fp64 reference
``x @ (W + scatter(delta))ᵀ`` built from the mask's indices by a plain loop.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftMixedModel, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

import peft_safety  # noqa: F401  (registers the SAFETY type)
from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig, SafetyLinear

ROOT = Path(__file__).resolve().parents[1]

# one granularity per matrix row, on two modules each (q/k/v/o: 32x32 or 16x32; gate/up: 64x32; down: 32x64)
MASKS = {
    "weight": {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.down_proj.weight": Weight()},
    "neuron": {
        "model.layers.0.mlp.gate_proj.weight": Neuron(axis=0),
        "model.layers.1.mlp.down_proj.weight": Neuron(axis=1),
    },
    "head": {
        "model.layers.0.self_attn.k_proj.weight": Head(head_dim=8, axis=0),
        "model.layers.1.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
    },
    "layer": {"model.layers.0.mlp.up_proj.weight": Layer(), "model.layers.1.self_attn.v_proj.weight": Layer()},
}


def make_mask(kind: str, seed: int = 0, fraction: float = 0.3) -> SafetyMask:
    params = dict(tiny_llama(seed=0).named_parameters())
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, gran in MASKS[kind].items():
        shape = tuple(params[name].shape)
        units = gran.num_units(shape)
        k = 1 if isinstance(gran, Layer) else max(1, int(units * fraction))
        indices[name] = torch.randperm(units, generator=gen)[:k].sort().values
        shapes[name] = shape
    return SafetyMask(indices=indices, shapes=shapes, granularity=MASKS[kind])


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def adapted(kind: str, seed: int = 0, **kwargs):
    return get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=make_mask(kind, seed), init_weights=False, **kwargs))


def reference_logits(peft_model, mask: SafetyMask, tokens: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """fp64 logits of the base model with W + delta written in by a loop over the mask's units (no library code)."""
    ref = copy.deepcopy(tiny_llama(seed=0)).double()
    params = dict(ref.named_parameters())
    model = peft_model.get_base_model()
    with torch.no_grad():
        for name in mask.names:
            values = model.get_submodule(name.rsplit(".", 1)[0]).safety_values[adapter].detach().double()
            gran, p = mask.granularity_of(name), params[name]
            units = [int(u) for u in mask[name]]
            if isinstance(gran, Weight):
                for k, flat in enumerate(units):
                    p[flat // p.shape[1], flat % p.shape[1]] += values[k]
            elif isinstance(gran, Layer):
                p += values
            else:
                width = 1 if isinstance(gran, Neuron) else gran.head_dim
                for k, pos in enumerate(u * width + o for u in units for o in range(width)):
                    if gran.axis == 0:
                        p[pos, :] += values[k]
                    else:
                        p[:, pos] += values[:, k]
        return ref(tokens).logits


def base_logits(tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tiny_llama(seed=0)(tokens).logits


KINDS = list(MASKS)


# ---- forward and save/load -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_fp64_reference(kind):
    model = adapted(kind)
    with torch.no_grad():
        out = model(ids()).logits
    ref = reference_logits(model, make_mask(kind), ids())
    assert (out.double() - ref).abs().max() < 1e-4
    assert (base_logits(ids()).double() - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("safe_serialization", "low_cpu_mem_usage"),
    [(True, False), (True, True), (False, False)],
    ids=["st", "lcmu", "bin"],
)
def test_save_load_roundtrip(kind, safe_serialization, low_cpu_mem_usage, tmp_path):
    model = adapted(kind)
    with torch.no_grad():
        ref = model(ids()).logits
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / weights).is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, ref)


# ---- merge / unmerge / safe merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_safe_merge(kind):
    model = adapted(kind)
    base = {n: p.detach().clone() for n, p in tiny_llama(seed=0).named_parameters()}
    ref = reference_logits(model, make_mask(kind), ids())
    with torch.no_grad():
        model.merge_adapter()
        assert (model(ids()).logits.double() - ref).abs().max() < 1e-4
        model.unmerge_adapter()
        for name, p in model.get_base_model().named_parameters():
            if "safety_" not in name:
                torch.testing.assert_close(p, base[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
        merged = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, SafetyLinear) for m in merged.modules())
        assert (merged(ids()).logits.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_non_finite_like_peft(kind):
    model = adapted(kind)
    layer = next(m for m in model.modules() if isinstance(m, SafetyLinear))
    with torch.no_grad():
        layer.safety_values["default"].view(-1)[0] = float("inf")
    before = layer.get_base_layer().weight.detach().clone()
    # PEFT's tuners word it so (peft/tuners/lora/layer.py); callers match on it
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)  # nothing written


# ---- disable / enable, inference mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_disable_enable(kind):
    model = adapted(kind)
    with torch.no_grad():
        on = model(ids()).logits
        with model.disable_adapter():
            assert torch.equal(model(ids()).logits, base_logits(ids()))
        assert torch.equal(model(ids()).logits, on)
        model.base_model.disable_adapter_layers()
        assert torch.equal(model(ids()).logits, base_logits(ids()))
        model.base_model.enable_adapter_layers()
        assert torch.equal(model(ids()).logits, on)


@pytest.mark.parametrize("kind", KINDS)
def test_inference_mode(kind, tmp_path):
    model = adapted(kind, inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())
    trainable = adapted(kind)
    n_train = sum(p.numel() for p in trainable.parameters() if p.requires_grad)
    assert n_train == make_mask(kind).numel()
    trainable.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    again = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) == n_train


# ---- several adapters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_add_set_delete_adapters(kind):
    model = adapted(kind)
    other_mask = make_mask("weight", seed=7)
    model.add_adapter("other", SafetyConfig(mask=other_mask, init_weights=False))
    with torch.no_grad():
        first = model(ids()).logits
        model.set_adapter("other")
        second = model(ids()).logits
    assert (second.double() - reference_logits(model, other_mask, ids(), adapter="other")).abs().max() < 1e-4
    assert (first.double() - reference_logits(model, make_mask(kind), ids())).abs().max() < 1e-4
    model.set_adapter("default")
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any("other" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, first)
    model.add_adapter("third", SafetyConfig(mask=make_mask(kind, seed=3)))
    model.set_adapter("third")
    model.delete_adapter("default")
    with torch.no_grad():  # "third" starts at zero: the base model again
        assert torch.equal(model(ids()).logits, base_logits(ids()))


def test_mixed_adapters_are_refused_with_the_alternative():
    mask = make_mask("weight")
    with pytest.raises(ValueError, match="SAFETY"):
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask), mixed=True)
    mixed = PeftMixedModel(tiny_llama(seed=0), LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="SAFETY"):
        mixed.add_adapter("set", SafetyConfig(mask=mask))
    with pytest.raises(ValueError, match="different peft types"):
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask)).add_adapter("l", LoraConfig(target_modules=["v"]))
    # a module already wrapped by LoRA: our own error names the alternative
    from peft import inject_adapter_in_model

    lora = inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), tiny_llama(seed=0))
    with pytest.raises(TypeError, match=r"merge_and_unload\(\)"):
        inject_adapter_in_model(SafetyConfig(mask=mask), lora)
    # the documented alternative works: merge the SET adapter, then LoRA on the merged model
    set_model = adapted("weight")
    ref = reference_logits(set_model, mask, ids())
    merged = set_model.merge_and_unload()
    with_lora = get_peft_model(merged, LoraConfig(target_modules=["v_proj"]))
    with torch.no_grad():
        assert (with_lora(ids()).logits.double() - ref).abs().max() < 1e-4


def test_bias_all_raises_type_error_like_peft_tuners_without_bias():
    with pytest.raises(TypeError, match="bias='all'"):
        SafetyConfig(mask=make_mask("weight"), bias="all")


# ---- dtype autocast --------------------------------------------------------------------------------------------------


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
def test_dtype_autocast(base_dtype, values_dtype, autocast, expected, tmp_path):
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[base_dtype]
    values = name if values_dtype == "base" else values_dtype
    want = base_dtype if expected == "base" else expected
    mask = make_mask("weight")
    config = SafetyConfig(mask=mask, init_weights=False, values_dtype=values)
    model = get_peft_model(tiny_llama(seed=0, dtype=base_dtype), config, autocast_adapter_dtype=autocast)
    layers = [m for m in model.modules() if isinstance(m, SafetyLinear)]
    assert {m.safety_values["default"].dtype for m in layers} == {want}
    with torch.no_grad():
        out = model(ids()).logits
    assert out.dtype == base_dtype and torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0, dtype=base_dtype), tmp_path, autocast_adapter_dtype=autocast)
    layers = [m for m in loaded.modules() if isinstance(m, SafetyLinear)]
    assert {m.safety_values["default"].dtype for m in layers} == {want}
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, out)


# ---- FSDP-style state-dict round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    model = adapted(kind)
    with torch.no_grad():
        ref = model(ids()).logits
    state = get_peft_model_state_dict(model)
    assert all(k.startswith("base_model.model.") and "safety_" in k for k in state)
    fresh = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=make_mask(kind)))  # zero deltas
    result = set_peft_model_state_dict(fresh, state)
    assert not [k for k in result.unexpected_keys if "safety_" in k]
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, ref)
    # onto a model whose placeholders come from another mask (the sizes in the state dict win)
    other = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=make_mask(kind, seed=9, fraction=0.1)))
    set_peft_model_state_dict(other, state)
    with torch.no_grad():
        assert torch.equal(other(ids()).logits, ref)


# ---- outputs equal after reload in a fresh process -------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import peft_safety  # registers SAFETY
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # as in the parent (tests/conftest.py): same kernels, bit-identical sums
    base_dir, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    tokens = torch.load(cases["tokens"])
    results = {}
    for kind, adapter in cases["adapters"].items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter)
        with torch.no_grad():
            results[kind] = (model(tokens).logits, auto(tokens).logits)
    torch.save(results, out)
    """
)


def test_fresh_process_reload(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    tokens = ids(3)
    torch.save(tokens, tmp_path / "tokens.pt")
    expected, adapters = {}, {}
    for kind in KINDS:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = get_peft_model(base, SafetyConfig(mask=make_mask(kind), init_weights=False))
        with torch.no_grad():
            expected[kind] = model(tokens).logits
        model.save_pretrained(tmp_path / kind)
        adapters[kind] = str(tmp_path / kind)
        cfg = json.loads((tmp_path / kind / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["base_model_source"] == "local"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cases = json.dumps({"tokens": str(tmp_path / "tokens.pt"), "adapters": adapters})
    out = tmp_path / "out.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(base_dir), cases, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out)
    for kind in KINDS:
        from_pretrained, auto = results[kind]
        assert torch.equal(from_pretrained, expected[kind]), kind
        assert torch.equal(auto, expected[kind]), kind
