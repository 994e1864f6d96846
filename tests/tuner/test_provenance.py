"""peft_safety.tuner.provenance: base-model references and base-weight fingerprints, recorded when an adapter of
either type is created and checked when it is loaded (``fingerprint_check``: error by default)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_safety.mask import Head, Neuron, Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig, SafetyLoraConfig
from peft_safety.tuner.provenance import (
    SOURCE_MARKER,
    base_model_reference,
    check_base_fingerprints,
    fingerprint_base,
    fingerprint_check_override,
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
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*fingerprint_check='warn'"):
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
    with pytest.raises(ValueError, match="fingerprint_check='raise' is not valid"):
        check_base_fingerprints(model, {}, policy="raise")
    with pytest.raises(ValueError, match="policy=True is not valid"), fingerprint_check_override(True):
        pass


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


# ---- both adapter types: recorded on creation, checked on load --------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.1.mlp.down_proj"
GRAN = {f"{Q}.weight": Weight(), f"{V}.weight": Neuron(axis=0), f"{DOWN}.weight": Head(head_dim=8, axis=1)}
IDS = torch.arange(3, 19).view(2, 8)
TYPES = pytest.mark.parametrize("adapter_type", ["SAFETY", "SAFETY_LORA"])


def config_of(adapter_type, mask):
    if adapter_type == "SAFETY":
        return SafetyConfig(mask=mask, init_weights=False)
    return SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules="all-linear"), mask)


def _scale_down(module):
    if hasattr(module, "down_proj"):
        with torch.no_grad():
            module.down_proj.weight.mul_(-3)


def other_base():
    """The tiny Llama with one targeted weight changed: another base for the adapter."""
    return tiny_llama(seed=0).apply(_scale_down)


@pytest.fixture
def saved(tmp_path, random_mask):
    """Per type, an adapter saved from tiny_llama(seed=0): {type: folder}."""
    out = {}
    for adapter_type in ("SAFETY", "SAFETY_LORA"):
        model = tiny_llama(seed=0)
        get_peft_model(model, config_of(adapter_type, random_mask(model, GRAN))).save_pretrained(
            tmp_path / adapter_type
        )
        out[adapter_type] = tmp_path / adapter_type
    return out


@TYPES
def test_configs_validate_the_provenance_fields(adapter_type, random_mask):
    mask = random_mask(tiny_llama(seed=0), GRAN)
    config = config_of(adapter_type, mask)
    assert config.fingerprint_check == "error"
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        config.fingerprint_check = "maybe"
    config.fingerprint_check = "warn"
    assert config.fingerprint_check == "warn" and "fingerprint_check" not in config.to_dict()
    with pytest.raises(TypeError, match="base_fingerprints must be a dict"):
        if adapter_type == "SAFETY":
            SafetyConfig(mask=mask, base_fingerprints=["x"])
        else:
            SafetyLoraConfig(r=4, mask=mask, base_fingerprints=["x"])


@TYPES
def test_fingerprints_and_hub_id_recorded(adapter_type, tmp_path, random_mask):
    base = tiny_llama(seed=0)
    base.config._name_or_path = "org/tiny-base"
    get_peft_model(base, config_of(adapter_type, random_mask(base, GRAN))).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-base" and cfg["base_model_source"] == "hub"
    assert set(cfg["base_fingerprints"]) == set(GRAN)
    assert "fingerprint_check" not in cfg  # the loader decides, not the file


@TYPES
def test_local_cache_path_recorded_as_hub_id(adapter_type, tmp_path, random_mask):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snap = tmp_path / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    base = tiny_llama(seed=0)
    base.config._name_or_path = str(snap)
    base.name_or_path = str(snap)
    get_peft_model(base, config_of(adapter_type, random_mask(base, GRAN))).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("org/tiny", commit)


@TYPES
def test_marked_local_copy_records_its_hub_id(adapter_type, tmp_path, random_mask):
    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    (base_dir / SOURCE_MARKER).write_text(json.dumps({"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, config_of(adapter_type, random_mask(model, GRAN))).save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["base_model_source"] == "hub"


@TYPES
def test_other_base_is_refused_and_the_loader_can_override(adapter_type, saved):
    path = saved[adapter_type]
    with pytest.raises(ValueError, match=rf"other base weights.*{DOWN}\.weight.*fingerprint_check='warn'"):
        PeftModel.from_pretrained(other_base(), path)
    with pytest.warns(UserWarning, match=DOWN):
        PeftModel.from_pretrained(other_base(), path, fingerprint_check="warn")
    loaded = PeftModel.from_pretrained(other_base(), path, fingerprint_check="ignore")
    assert loaded.peft_config["default"].fingerprint_check == "ignore"
    config = type(loaded.peft_config["default"]).from_pretrained(path, fingerprint_check="warn")
    with pytest.warns(UserWarning, match=DOWN):
        PeftModel.from_pretrained(other_base(), path, config=config)
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        PeftModel.from_pretrained(tiny_llama(seed=0), path, fingerprint_check="maybe")


@TYPES
def test_policy_written_into_the_file_does_not_weaken_the_check(adapter_type, saved):
    # the policy is the loader's choice: a value added to adapter_config.json by hand is not read, under any name
    path = saved[adapter_type]
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(fingerprint_check="ignore", base_fingerprint_check="ignore")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight"), pytest.warns(UserWarning, match="Unexpected keyword"):
        PeftModel.from_pretrained(other_base(), path)


@TYPES
def test_load_adapter_paths_check_and_the_override_context(adapter_type, saved):
    path = saved[adapter_type]
    with pytest.raises(ValueError, match="fingerprint_check"):
        other_base().load_adapter(str(path))  # transformers' integration
    model = PeftModel.from_pretrained(other_base(), path, fingerprint_check="ignore")
    with pytest.raises(ValueError, match="fingerprint_check_override"):
        model.load_adapter(path, adapter_name="second")
    with fingerprint_check_override("warn"), pytest.warns(UserWarning, match=DOWN):
        model.load_adapter(path, adapter_name="second")
    assert "second" in model.peft_config
    fine = PeftModel.from_pretrained(tiny_llama(seed=0), path)
    fine.load_adapter(path, adapter_name="again")
    assert "again" in fine.peft_config


@TYPES
def test_same_base_in_half_precision_passes(adapter_type, saved):
    for dtype in (torch.bfloat16, torch.float16):
        PeftModel.from_pretrained(tiny_llama(seed=0).to(dtype), saved[adapter_type])


@TYPES
def test_autopeft_checks_the_base_it_loads(adapter_type, tmp_path, random_mask):
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, config_of(adapter_type, random_mask(base, GRAN))).save_pretrained(tmp_path / "adapter")
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # same base: fine
    # the folder named by base_model_name_or_path now holds other weights
    other_base().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with fingerprint_check_override("ignore"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
