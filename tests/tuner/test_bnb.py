"""SET and masked LoRA on bitsandbytes 4-bit / 8-bit base layers, on CPU.

Trap: an eval-mode forward without grad permanently repacks 4-bit weights on some CPUs and
silently kills gradients, so every model here is put in train mode before its first forward.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import peft_safety  # noqa: E402, F401
from peft_safety.mask import Neuron, Weight  # noqa: E402
from peft_safety.testing import tiny_llama  # noqa: E402
from peft_safety.tuner import SafetyConfig, SafetyLinear, get_masked_lora_model  # noqa: E402

GRAN = {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.gate_proj.weight": Neuron(axis=0)}


def load_quantized(path, bits):
    if bits == 4:
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        qcfg = BitsAndBytesConfig(load_in_8bit=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu")
    except Exception as exc:  # bnb's CPU backend is optional: skip with the reason rather than fail
        pytest.skip(f"bitsandbytes {bits}-bit CPU backend unavailable: {type(exc).__name__}: {exc}")
    model.train()  # before any forward: see the module docstring
    return model


@pytest.fixture
def make_mask(random_mask):
    return lambda: random_mask(tiny_llama(seed=0), GRAN, fraction=0.2)


def ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [4, 8])
def test_set_on_quantized_base_trains_and_reloads(base_dir, bits, tmp_path, make_mask):
    model = load_quantized(base_dir, bits)
    mask = make_mask()
    peft_model = get_peft_model(model, SafetyConfig(mask=mask, init_weights=False))
    layers = [m for m in peft_model.modules() if isinstance(m, SafetyLinear)]
    assert layers and all(m.quantization_backend is not None for m in layers)
    x = ids()
    out = peft_model(input_ids=x, labels=x)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # the delta is added on top of the quantised output: disabling the adapter changes the logits
    with torch.no_grad():
        with_delta = peft_model(x).logits
        with peft_model.disable_adapter():
            without = peft_model(x).logits
    assert not torch.allclose(with_delta, without)

    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_quantized(base_dir, bits), tmp_path)
    reloaded.train()  # from_pretrained switches to eval mode: avoid the 4-bit repacking trap
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, with_delta, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_set_merge_into_quantized_base_is_close(base_dir, bits, make_mask):
    # merging re-quantises the whole weight: lossy (documented), so only approximately equal
    model = load_quantized(base_dir, bits)
    peft_model = get_peft_model(model, SafetyConfig(mask=make_mask(), init_weights=False))
    x = ids()
    with torch.no_grad():
        before = peft_model(x).logits
        peft_model.merge_adapter()
        after = peft_model(x).logits
    assert (after - before).abs().max() < 0.5


@pytest.mark.parametrize("bits", [4, 8])
def test_masked_qlora_trains_and_refuses_merge(base_dir, bits, make_mask):
    from peft import LoraConfig

    model = load_quantized(base_dir, bits)
    peft_model = get_masked_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "gate_proj"]), make_mask())
    x = ids()
    peft_model(input_ids=x, labels=x).loss.backward()
    grad_b = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grad_b and all(g is not None for g in grad_b)
    with pytest.raises(ValueError, match="re-quantises the whole weight"):
        peft_model.merge_adapter()


@pytest.mark.parametrize("bits", [4, 8])
def test_base_fingerprints_skip_quantised_weights(base_dir, bits, tmp_path, make_mask):
    import json

    # trained on the float base: fingerprints recorded; loading on a quantised copy cannot compare them (the stored
    # integers are not the float values), so the check skips those tensors instead of refusing a legitimate base
    float_base = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(float_base, SafetyConfig(mask=make_mask(), init_weights=False)).save_pretrained(tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert set(cfg["base_fingerprints"]) == set(GRAN)
    assert cfg["base_model_source"] == "local" and cfg["base_model_name_or_path"] == str(base_dir)
    reloaded = PeftModel.from_pretrained(load_quantized(base_dir, bits), tmp_path / "f")
    assert any(isinstance(m, SafetyLinear) for m in reloaded.modules())
    # trained on the quantised base: nothing to fingerprint; loads on the float base
    quantised = get_peft_model(load_quantized(base_dir, bits), SafetyConfig(mask=make_mask(), init_weights=False))
    quantised.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["base_fingerprints"] is None
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "q")
