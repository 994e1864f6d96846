"""Registration of the SAFETY PEFT type: idempotent, guarded, and noticed when upstream makes it unnecessary."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_safety
from peft_safety.tuner import SafetyConfig, SafetyModel, SafetyPeftType, _registration


def test_tables_hold_our_classes_under_the_plain_string():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY"] is SafetyConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SAFETY"] is SafetyModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SAFETY"] == "safety_"
    assert SafetyPeftType.SAFETY == "SAFETY" and SafetyPeftType.SAFETY.value == "SAFETY"
    assert _registration.is_registered()


def test_register_is_idempotent_and_survives_reload():
    sizes = (len(PEFT_TYPE_TO_CONFIG_MAPPING), len(PEFT_TYPE_TO_TUNER_MAPPING), len(PEFT_TYPE_TO_PREFIX_MAPPING))
    _registration.register()
    _registration.register()
    importlib.reload(_registration)  # new enum object, same value: still one entry per table
    after = (len(PEFT_TYPE_TO_CONFIG_MAPPING), len(PEFT_TYPE_TO_TUNER_MAPPING), len(PEFT_TYPE_TO_PREFIX_MAPPING))
    assert after == sizes


def test_refuses_to_overwrite_a_foreign_registration(monkeypatch):
    class Foreign:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "SAFETY", Foreign)
    with pytest.raises(RuntimeError, match="already registered"):
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
    assert peft_safety.SafetyPeftType is SafetyPeftType


_SCRIPT = """
import sys
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[2])
assert "peft_safety" not in sys.modules
try:
    PeftModel.from_pretrained(base, sys.argv[1])
except KeyError as exc:
    print("WITHOUT-IMPORT KEYERROR", exc)
else:
    print("WITHOUT-IMPORT LOADED")
import peft_safety  # the documented fix
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[2]), sys.argv[1])
print("WITH-IMPORT LOADED")
"""


def test_loading_needs_import_peft_safety(tmp_path):
    import torch
    from peft import get_peft_model

    from peft_safety.mask import SafetyMask
    from peft_safety.testing import tiny_llama

    name = "model.layers.0.self_attn.q_proj.weight"
    mask = SafetyMask(indices={name: torch.tensor([1, 2], dtype=torch.int32)}, shapes={name: (32, 32)})
    base = tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, SafetyConfig(mask=mask)).save_pretrained(tmp_path / "adapter")

    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "base")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WITHOUT-IMPORT KEYERROR 'SAFETY'" in proc.stdout
    assert "WITH-IMPORT LOADED" in proc.stdout
