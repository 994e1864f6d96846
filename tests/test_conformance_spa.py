"""Conformance of masked LoRA (SAFETY_LORA) with the generic behaviour every PEFT tuner must have.

Our own matrix (no code copied from PEFT's test suite): each check runs for every mask granularity on a tiny Llama
and compares with independent references (the base model, an explicit fp64 merge of the factors with the mask applied
by hand, the effective update measured on an identity input). The checks follow the list PEFT applies to its tuners:
save/load (safetensors and pickle-free .bin, ``low_cpu_mem_usage``), merge/unmerge/safe merge (non-finite weights are
an error), disable/enable, add/set/delete adapters, inference mode, dtype autocast on fp16/bf16 bases, an FSDP-style
state-dict round trip through ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``, and identical outputs
after a reload in a fresh process through ``PeftModel.from_pretrained``. Mixed adapters (``PeftMixedModel``) are not
supported by PEFT for types outside its own list: that refusal is checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _spa_reference import assert_effective_update_exact, explicit_merge, lora_layers, randomise_lora_
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyLoraConfig
from peft_safety.tuner.lora import mask_lora_config

KINDS = {
    "weight": {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.down_proj.weight": Weight()},
    "neuron_rows": {"model.layers.0.mlp.gate_proj.weight": Neuron(axis=0)},
    "neuron_cols": {"model.layers.1.self_attn.o_proj.weight": Neuron(axis=1)},
    "head": {"model.layers.0.self_attn.q_proj.weight": Head(head_dim=8, axis=0)},
    "layer": {"model.layers.1.self_attn.q_proj.weight": Layer()},
    "mixed": {
        "model.layers.0.self_attn.v_proj.weight": Weight(),
        "model.layers.1.mlp.up_proj.weight": Neuron(axis=0),
        "model.layers.0.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
        "model.layers.1.mlp.gate_proj.weight": Layer(),
    },
}
IDS = torch.arange(3, 27).view(2, 12)


def make_mask(model, kind: str, seed: int = 0) -> SafetyMask:
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, gran in KINDS[kind].items():
        shape = tuple(params[name].shape)
        units = gran.num_units(shape)
        k = 1 if isinstance(gran, Layer) else max(1, units // 4)
        indices[name] = torch.randperm(units, generator=gen)[:k].sort().values.to(torch.int32)
        shapes[name] = shape
    return SafetyMask(indices=indices, shapes=shapes, granularity=KINDS[kind])


def lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


def build(kind: str, seed: int = 1, dtype: torch.dtype = torch.float32, **kwargs):
    model = tiny_llama(seed=0).to(dtype)
    mask = make_mask(model, kind)
    peft_model = get_peft_model(model, mask_lora_config(lora(), mask), **kwargs)
    randomise_lora_(peft_model, seed=seed, std=0.2)
    return peft_model, mask


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def reference(peft_model, mask) -> torch.Tensor:
    return logits(explicit_merge(tiny_llama(seed=0), peft_model, mask))


def assert_like_reference(peft_model, mask):
    torch.testing.assert_close(logits(peft_model), reference(peft_model, mask), rtol=1e-5, atol=1e-5)
    assert_effective_update_exact(peft_model, mask)


pytestmark = pytest.mark.parametrize("kind", list(KINDS))


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load(kind, tmp_path, safe_serialization, low_cpu_mem_usage):
    peft_model, mask = build(kind)
    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    name = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert (tmp_path / name).is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert isinstance(loaded.peft_config["default"], SafetyLoraConfig)
    assert torch.equal(logits(loaded), logits(peft_model))
    assert_like_reference(loaded, mask)
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_merge_unmerge_and_safe_merge(kind):
    peft_model, mask = build(kind)
    base = {n: p.detach().clone() for n, p in tiny_llama(seed=0).named_parameters()}
    want = reference(peft_model, mask)
    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model), want, rtol=1e-5, atol=1e-5)
    weights = {
        n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in peft_model.named_parameters()
    }
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(weights[name].detach()[dense], base[name][dense]), f"{name}: merged masked entries moved"
    peft_model.unmerge_adapter()
    torch.testing.assert_close(logits(peft_model), want, rtol=1e-5, atol=1e-5)
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(weights[name].detach()[dense], base[name][dense])
        torch.testing.assert_close(weights[name].detach(), base[name], rtol=0, atol=1e-6)
    merged = peft_model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_non_finite_weights(kind):
    peft_model, _ = build(kind)
    layer = next(iter(lora_layers(peft_model).values()))
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        peft_model.merge_adapter(safe_merge=True)


def test_disable_and_enable(kind):
    peft_model, mask = build(kind)
    base_logits = logits(tiny_llama(seed=0))
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits)
    assert_like_reference(peft_model, mask)
    peft_model.base_model.disable_adapter_layers()
    assert torch.equal(logits(peft_model), base_logits)
    peft_model.base_model.enable_adapter_layers()
    assert_like_reference(peft_model, mask)


def test_add_set_delete_adapters(kind):
    peft_model, mask = build(kind)
    first = logits(peft_model)
    other_mask = make_mask(tiny_llama(seed=0), kind, seed=5)
    peft_model.add_adapter("other", mask_lora_config(lora(), other_mask))
    assert peft_model.active_adapter == "default"
    assert torch.equal(logits(peft_model), first)  # an added adapter is not active
    peft_model.set_adapter("other")
    randomise_lora_(peft_model, seed=9, std=0.2)  # both adapters random; only "other" is active
    assert_effective_update_exact(peft_model, other_mask)
    for layer in lora_layers(peft_model).values():
        assert all(not p.requires_grad for p in layer.lora_A["default"].parameters())
    peft_model.set_adapter("default")
    assert_effective_update_exact(peft_model, mask)
    peft_model.delete_adapter("other")
    assert list(peft_model.peft_config) == ["default"]
    assert not any(".other" in k or k.endswith("other") for k in peft_model.state_dict())
    assert_like_reference(peft_model, mask)


def test_inference_mode_and_trainable_parameters(kind, tmp_path):
    peft_model, _ = build(kind)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lora_safety" in n for n, _ in peft_model.named_parameters())  # masks are buffers, never trained
    peft_model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert frozen.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable_again = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    assert {n for n, p in trainable_again.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_dtype_autocast(kind, dtype, autocast_adapter_dtype):
    peft_model, mask = build(kind, dtype=dtype, autocast_adapter_dtype=autocast_adapter_dtype)
    adapter_dtypes = {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}
    if kind != "layer" or adapter_dtypes:
        assert adapter_dtypes == {torch.float32 if autocast_adapter_dtype else dtype}
    out = logits(peft_model)
    assert out.dtype == dtype and out.isfinite().all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert_effective_update_exact(peft_model, mask, rtol=tol, atol=tol)


def test_fsdp_style_state_dict_round_trip(kind):
    peft_model, mask = build(kind)
    # FSDP hands PEFT the full model state dict (gathered), not the module: select the adapter entries from it
    state = get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict())
    assert any("lora_safety" in k for k in state) or kind == "layer"
    assert all(".default." not in k for k in state)
    layout_only = SafetyLoraConfig(
        **{k: v for k, v in peft_model.peft_config["default"].to_dict().items() if k != "peft_type"}
    )
    target = inject_adapter_in_model(layout_only, tiny_llama(seed=0), low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    torch.testing.assert_close(logits(target), logits(peft_model), rtol=0, atol=0)
    assert_effective_update_exact(target, mask)


def test_mixed_model_is_refused_clearly(kind):
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="'SAFETY_LORA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(model, mask_lora_config(lora(), make_mask(model, kind)), mixed=True)


_FRESH = """
import json, sys
import torch
import peft_safety  # registers SAFETY_LORA
from peft import PeftModel
from safetensors.torch import save_file
from peft_safety.testing import tiny_llama
jobs = json.loads(sys.argv[1])
ids = torch.arange(3, 27).view(2, 12)
out = {}
for kind, folder in jobs.items():
    model = PeftModel.from_pretrained(tiny_llama(seed=0), folder)
    with torch.no_grad():
        out[kind] = model(ids).logits.contiguous()
    out[kind + ".type"] = torch.tensor([type(model.peft_config["default"]).__name__ == "SafetyLoraConfig"])
save_file(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def fresh_process_logits(tmp_path_factory):
    """Every kind saved here, reloaded through PeftModel.from_pretrained in one fresh interpreter."""
    root = tmp_path_factory.mktemp("fresh")
    jobs, expected = {}, {}
    for kind in KINDS:
        peft_model, mask = build(kind)
        folder = root / kind
        peft_model.save_pretrained(folder)
        jobs[kind] = str(folder)
        expected[kind] = (logits(peft_model), reference(peft_model, mask))
    out_file = root / "logits.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(jobs), str(out_file)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_file(out_file), expected


def test_outputs_equal_after_reload_in_a_fresh_process(kind, fresh_process_logits):
    got, expected = fresh_process_logits
    assert bool(got[kind + ".type"].all())
    in_process, ref = expected[kind]
    assert torch.equal(got[kind], in_process)
    torch.testing.assert_close(got[kind], ref, rtol=1e-5, atol=1e-5)


_FRESH_GUARANTEE = """
import json, sys
import torch
import peft_safety  # registers SAFETY_LORA
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM
from peft_safety import SafetyMask
base_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
out = {}
for kind, folder in jobs.items():
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    merged = dict(AutoPeftModelForCausalLM.from_pretrained(folder).merge_and_unload().named_parameters())
    mask = SafetyMask.from_pretrained(folder)
    mask.validate(AutoModelForCausalLM.from_pretrained(base_dir), fingerprint="error")
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        other.get_parameter(next(iter(mask.shapes))).mul_(-3)
    try:
        mask.validate(other, fingerprint="error")
        refused = False
    except ValueError:
        refused = True
    moved_masked = moved_unmasked = 0
    for name in mask.shapes:
        dense = mask.to_dense(name)
        changed = merged[name] != base[name]
        moved_masked += int((changed & dense).sum())
        moved_unmasked += int((changed & ~dense).sum())
    out[kind] = {"moved_masked": moved_masked, "moved_unmasked": moved_unmasked, "refused_other_base": refused}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def fresh_process_guarantee(tmp_path_factory):
    """Adapter + mask saved in one folder per kind, reloaded in a fresh interpreter by AutoPeftModelForCausalLM and
    SafetyMask.from_pretrained; the merged weights compared with the base entry by entry there."""
    from peft_safety.mask import fingerprints_of

    root = tmp_path_factory.mktemp("fresh_guarantee")
    base_dir = root / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    jobs = {}
    for kind in KINDS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir)
        mask = make_mask(model, kind)
        mask = mask.with_fingerprints(fingerprints_of(model, mask.shapes))
        peft_model = get_peft_model(model, mask_lora_config(lora(), mask))
        randomise_lora_(peft_model, seed=1, std=0.2)
        folder = root / kind
        peft_model.save_pretrained(folder)
        mask.save_pretrained(folder)
        jobs[kind] = str(folder)
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_GUARANTEE, str(base_dir), json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_guarantee_survives_save_and_fresh_process_auto_loader(kind, fresh_process_guarantee):
    got = fresh_process_guarantee[kind]
    assert got["moved_masked"] == 0  # merged weights equal the base bit for bit on every masked entry
    assert got["refused_other_base"]  # the mask's fingerprints reject other weights
    if kind != "layer":  # a Layer() mask covers the whole tensor: nothing of it may move
        assert got["moved_unmasked"] > 0  # the adapter did change the rest (the check is not vacuous)
