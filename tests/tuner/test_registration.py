"""Registration of the SAFETY and SAFETY_LORA PEFT types: idempotent, guarded, noticed when upstream makes it
unnecessary, and needed: without ``import peft_safety`` PEFT refuses both types instead of loading them wrongly."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_safety
from peft_safety.tuner import (
    SafetyConfig,
    SafetyLoraConfig,
    SafetyLoraModel,
    SafetyModel,
    SafetyPeftType,
    _registration,
)

ROOT = Path(__file__).resolve().parents[2]


def test_tables_hold_our_classes_under_the_plain_string():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY"] is SafetyConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SAFETY"] is SafetyModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SAFETY"] == "safety_"
    assert SafetyPeftType.SAFETY == "SAFETY" and SafetyPeftType.SAFETY.value == "SAFETY"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY_LORA"] is SafetyLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SAFETY_LORA"] is SafetyLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SAFETY_LORA"] == "lora_"
    assert _registration.is_registered()


def test_register_is_idempotent_and_survives_reload():
    sizes = (len(PEFT_TYPE_TO_CONFIG_MAPPING), len(PEFT_TYPE_TO_TUNER_MAPPING), len(PEFT_TYPE_TO_PREFIX_MAPPING))
    _registration.register()
    _registration.register()
    importlib.reload(_registration)  # new enum object, same value: still one entry per table
    after = (len(PEFT_TYPE_TO_CONFIG_MAPPING), len(PEFT_TYPE_TO_TUNER_MAPPING), len(PEFT_TYPE_TO_PREFIX_MAPPING))
    assert after == sizes


@pytest.mark.parametrize(("table", "key"), [("tuner", "SAFETY"), ("config", "SAFETY_LORA")])
def test_refuses_to_overwrite_a_foreign_registration(monkeypatch, table, key):
    class Foreign:
        pass

    tables = {"tuner": PEFT_TYPE_TO_TUNER_MAPPING, "config": PEFT_TYPE_TO_CONFIG_MAPPING}
    monkeypatch.setitem(tables[table], key, Foreign)
    with pytest.raises(RuntimeError, match=f"'{key}' is already registered"):
        _registration.register()


def test_config_from_peft_type_string(tmp_path):
    config = PeftConfig.from_peft_type(
        peft_type="SAFETY", mask_layout={"a": {"kind": "rows", "n": 1, "shape": [2, 2]}}
    )
    assert isinstance(config, SafetyConfig)


def test_workaround_still_needed_register_peft_method_rejects_new_names():
    """Fails when upstream accepts new names: then switch `_registration` to `register_peft_method`."""
    from peft.utils import register_peft_method

    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="safety_upstream_probe", config_cls=SafetyConfig, model_cls=SafetyModel)


def test_workaround_still_needed_peft_type_lacks_safety():
    """Fails when PeftType gains SAFETY upstream: then drop our enum and use PEFT's member."""
    assert "SAFETY" not in PeftType.__members__


def test_public_exports():
    assert peft_safety.SafetyConfig is SafetyConfig
    assert peft_safety.SafetyModel is SafetyModel
    assert peft_safety.SafetyLoraConfig is SafetyLoraConfig
    assert peft_safety.tuner.SafetyPeftType is SafetyPeftType


_SCRIPT = """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
assert "peft_safety" not in sys.modules
for adapter in sys.argv[2:]:
    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), adapter)
    except KeyError as exc:
        print("WITHOUT-IMPORT KEYERROR", exc)
    else:
        print("WITHOUT-IMPORT LOADED")
import peft_safety  # the documented fix
for adapter in sys.argv[2:]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), adapter)
    print("WITH-IMPORT LOADED", type(model.peft_config["default"]).__name__)
"""


def test_loading_needs_import_peft_safety(tmp_path):
    """A plain peft refuses both types (for masked LoRA that is the point: it cannot load it as unmasked LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peft_safety.mask import SafetyMask
    from peft_safety.testing import tiny_llama

    name = "model.layers.0.self_attn.q_proj.weight"
    mask = SafetyMask(indices={name: torch.tensor([1, 2], dtype=torch.int32)}, shapes={name: (32, 32)})
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, SafetyConfig(mask=mask)).save_pretrained(tmp_path / "set")
    lora = SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules=["q_proj"]), mask)
    get_peft_model(tiny_llama(seed=0), lora).save_pretrained(tmp_path / "lora")

    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "base"), str(tmp_path / "set"), str(tmp_path / "lora")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WITHOUT-IMPORT KEYERROR 'SAFETY'" in proc.stdout
    assert "WITHOUT-IMPORT KEYERROR 'SAFETY_LORA'" in proc.stdout
    assert "WITHOUT-IMPORT LOADED" not in proc.stdout
    assert "WITH-IMPORT LOADED SafetyConfig" in proc.stdout
    assert "WITH-IMPORT LOADED SafetyLoraConfig" in proc.stdout
