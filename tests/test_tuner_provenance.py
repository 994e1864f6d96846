"""peft_safety.tuner.provenance: base-model references and base-weight fingerprints (recorded, then checked)."""

from __future__ import annotations

import json

import pytest
import torch

from peft_safety.testing import tiny_llama
from peft_safety.tuner.provenance import (
    SOURCE_MARKER,
    base_model_reference,
    check_base_fingerprints,
    check_policy,
    fingerprint_base,
)

NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def test_same_weights_pass_and_dtype_copies_pass():
    model = tiny_llama(seed=0)
    recorded = fingerprint_base(model, NAMES)
    assert set(recorded) == set(NAMES)
    assert check_base_fingerprints(model, recorded) == []
    # the same checkpoint in bf16 and in fp16 is the same base
    assert check_base_fingerprints(tiny_llama(seed=0).to(torch.bfloat16), recorded) == []
    assert check_base_fingerprints(tiny_llama(seed=0).to(torch.float16), recorded) == []
    # recorded on an fp16 copy, checked on the fp32 original
    assert check_base_fingerprints(model, fingerprint_base(tiny_llama(seed=0).to(torch.float16), NAMES)) == []


def test_changed_weight_is_named_and_policies_apply():
    model = tiny_llama(seed=0)
    recorded = fingerprint_base(model, NAMES)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*base_fingerprint_check='warn'"):
        check_base_fingerprints(model, recorded, recorded_base="org/base")
    with pytest.warns(UserWarning, match="down_proj"):
        assert check_base_fingerprints(model, recorded, policy="warn") == [NAMES[1]]
    assert check_base_fingerprints(model, recorded, policy="ignore") == []
    other = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="and 1 more"):
        check_base_fingerprints(other, recorded)


def test_missing_tensor_and_bad_policy():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="is missing from the model"):
        check_base_fingerprints(model, {"model.layers.9.mlp.up_proj.weight": "bf16s4096b2b:00"})
    with pytest.raises(ValueError, match="no such tensor"):
        fingerprint_base(model, ["nope.weight"])
    with pytest.raises(ValueError, match="'raise' is invalid"):
        check_policy("raise")
    with pytest.raises(TypeError):
        check_policy(True)


def test_meta_weights_are_skipped():
    with torch.device("meta"):
        meta = tiny_llama(seed=0)
    assert fingerprint_base(meta, NAMES) == {}
    assert check_base_fingerprints(meta, fingerprint_base(tiny_llama(seed=0), NAMES)) == []


def test_reference_hub_id_cache_snapshot_marker_and_local(tmp_path):
    model = tiny_llama(seed=0)
    assert base_model_reference(model) == {"base_model": None, "revision": None, "source": None}
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_reference(model) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": None,
        "source": "hub",
    }
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--tiny-model" / "snapshots" / commit
    snap.mkdir(parents=True)
    model.config._name_or_path = str(snap)
    assert base_model_reference(model) == {"base_model": "org/tiny-model", "revision": commit, "source": "hub"}
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / SOURCE_MARKER).write_text(json.dumps({"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    model.config._name_or_path = str(converted)
    assert base_model_reference(model)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = tmp_path / "mine"
    plain.mkdir()
    model.config._name_or_path = str(plain)
    assert base_model_reference(model) == {"base_model": str(plain), "revision": None, "source": "local"}


def test_sharded_placeholders_are_skipped():
    model = tiny_llama(seed=0)
    recorded = fingerprint_base(model, NAMES)
    # DeepSpeed ZeRO-3 leaves empty placeholders (with `ds_shape`) in the model
    zero3 = tiny_llama(seed=0)
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = (32, 32)
    zero3.model.layers[0].self_attn.q_proj.weight = placeholder
    assert check_base_fingerprints(zero3, recorded) == []
    assert set(fingerprint_base(zero3, NAMES)) == {NAMES[1]}


@pytest.mark.parametrize("kind", ["SAFETY", "SAFETY_LORA"])
def test_both_adapter_configs_validate_the_provenance_fields(kind):
    from peft_safety.mask import SafetyMask, Weight
    from peft_safety.tuner import SafetyConfig, SafetyLoraConfig

    model = tiny_llama(seed=0)
    name = "model.layers.0.self_attn.q_proj.weight"
    mask = SafetyMask({name: torch.tensor([0, 5])}, {name: tuple(model.get_parameter(name).shape)}, Weight())

    def build(**extra):
        if kind == "SAFETY":
            return SafetyConfig(mask=mask, **extra)
        return SafetyLoraConfig(r=4, target_modules=["q_proj"], mask=mask, **extra)

    assert build().base_fingerprint_check == "error"
    with pytest.raises(ValueError, match="base_fingerprint_check='maybe' is invalid"):
        build(base_fingerprint_check="maybe")
    with pytest.raises(TypeError, match="base_fingerprints must be a dict"):
        build(base_fingerprints=["x"])
