"""One PEFT type per model: a SET or masked-LoRA adapter next to an adapter of another type is refused, on every path a
user takes, with what to do instead (merge first; for masked LoRA, build the LoRA with ``from_lora_config``), and the
model is left as it was."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_safety.mask import Neuron, SafetyMask, Weight
from peft_safety.tuner import SafetyConfig, SafetyLoraConfig

Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"
IDS = torch.arange(3, 19).view(2, 8)
SET_HINT = r"SAFETY \(peft-safety's SET adapter.*merge the adapter already in the model into the base first"
MERGE_HINT = r"merge_and_unload\(\)"


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    return SafetyMask(
        {Q: torch.arange(0, 1024, 7), V: torch.tensor([2, 5])},
        {Q: tuple(p[Q].shape), V: tuple(p[V].shape)},
        granularity={Q: Weight(), V: Neuron(axis=0)},
    )


def _set_model(base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return get_peft_model(model, SafetyConfig(mask=_mask(model), init_weights=False)), model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, base_dir):
    folder = tmp_path_factory.mktemp("lora")
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(target_modules=["q_proj"])
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def set_dir(tmp_path_factory, base_dir):
    folder = tmp_path_factory.mktemp("set")
    _set_model(base_dir)[0].save_pretrained(folder)
    return folder


def test_lora_next_to_a_set_adapter_is_refused_with_the_merge_hint(base_dir, lora_dir):
    set_model, inner = _set_model(base_dir)
    before = _logits(set_model)
    lora = LoraConfig(target_modules=["q_proj", "v_proj"])
    paths = {
        # PEFT compares the types first; its message names ours with the hint
        "PeftModel.add_adapter": lambda: set_model.add_adapter("lora", lora),
        "PeftModel.load_adapter": lambda: set_model.load_adapter(lora_dir, adapter_name="lora"),
        # a second tuner on a model that carries the SET adapter (get_peft_model changed `inner` in place)
        "get_peft_model(base carrying SET)": lambda: get_peft_model(inner, lora),
        "get_peft_model(PeftModel)": lambda: get_peft_model(set_model, lora),
        "transformers load_adapter": lambda: inner.load_adapter(str(lora_dir), adapter_name="lora"),
    }
    for name, add in paths.items():
        with pytest.raises(ValueError, match=MERGE_HINT) as err:
            add()
        assert "SAFETY" in str(err.value) and "LORA" in str(err.value), name
        assert list(set_model.peft_config) == ["default"], name  # nothing added
        assert torch.equal(_logits(set_model), before), name
    # the way out the message gives works
    merged = set_model.merge_and_unload()
    get_peft_model(merged, lora)


def test_set_next_to_a_lora_adapter_is_refused_with_the_merge_hint(base_dir, set_dir):
    inner = AutoModelForCausalLM.from_pretrained(base_dir)
    lora_model = get_peft_model(inner, LoraConfig(target_modules=["k_proj"]))
    before = _logits(lora_model)
    set_config = SafetyConfig(mask=_mask(inner), init_weights=False)
    paths = {
        "PeftModel.add_adapter": lambda: lora_model.add_adapter("set", set_config),
        "PeftModel.load_adapter": lambda: lora_model.load_adapter(set_dir, adapter_name="set"),
        "get_peft_model(base carrying LoRA)": lambda: get_peft_model(inner, set_config),
        "transformers load_adapter": lambda: inner.load_adapter(str(set_dir), adapter_name="set"),
    }
    for name, add in paths.items():
        with pytest.raises(ValueError, match=MERGE_HINT) as err:
            add()
        assert "LORA" in str(err.value) and "SAFETY" in str(err.value), name
        assert list(lora_model.peft_config) == ["default"], name
        assert type(lora_model.peft_config["default"]) is LoraConfig, name  # not overwritten by ours
        assert torch.equal(_logits(lora_model), before), name


def test_plain_lora_next_to_a_masked_lora_is_refused_with_the_hint(base_dir, lora_dir):
    inner = AutoModelForCausalLM.from_pretrained(base_dir)
    masked = get_peft_model(inner, SafetyLoraConfig(r=4, target_modules="all-linear", mask=_mask(inner)))
    lora = LoraConfig(target_modules=["q_proj"])
    paths = {
        "PeftModel.add_adapter": lambda: masked.add_adapter("lora", lora),
        "PeftModel.load_adapter": lambda: masked.load_adapter(lora_dir, adapter_name="lora"),
        # before: the plain LoRA joined the masked layers unmasked (SafetyLoraLinear is a LoraLayer)
        "get_peft_model(base carrying SAFETY_LORA)": lambda: get_peft_model(inner, lora, adapter_name="lora"),
        "transformers load_adapter": lambda: inner.load_adapter(str(lora_dir), adapter_name="lora"),
    }
    for name, add in paths.items():
        with pytest.raises(ValueError, match=r"SafetyLoraConfig\.from_lora_config\(lora_config, mask\)"):
            add()
        assert list(masked.peft_config) == ["default"], name


def test_the_type_formats_with_its_hint_and_stays_a_plain_string():
    from peft_safety.tuner import SafetyPeftType

    assert f"{SafetyPeftType.SAFETY}".startswith("SAFETY (peft-safety's SET adapter")
    assert f"{SafetyPeftType.SAFETY_LORA:>12}" == " SAFETY_LORA"
    assert SafetyPeftType.SAFETY == "SAFETY" and SafetyPeftType.SAFETY.value == "SAFETY"
    assert hash(SafetyPeftType.SAFETY_LORA) == hash("SAFETY_LORA")


def test_two_set_adapters_still_share_a_model(base_dir, set_dir):
    set_model, _ = _set_model(base_dir)
    set_model.load_adapter(set_dir, adapter_name="second")
    assert set(set_model.peft_config) == {"default", "second"}
    plain = AutoModelForCausalLM.from_pretrained(base_dir)
    plain.load_adapter(str(set_dir))
    plain.load_adapter(str(set_dir), adapter_name="second")
    assert set(plain.peft_config) == {"default", "second"}
    assert isinstance(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), set_dir), PeftModel)
