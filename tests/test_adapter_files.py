"""Adapter folders on disk: damaged files are named before PEFT reads them, and every save of a peft-safety type
writes its config atomically (never through a planted symlink) and peft-safety's card.

References are independent of the code under test: PEFT's own config writer for the bytes of
``adapter_config.json``, the file system for what was (not) written, and the raw exception PEFT raises for the
same damage where peft-safety cannot intercept it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin

from peft_safety import SafetyConfig
from peft_safety.errors import SafetyError, SafetyFileError, SafetyFileNotFoundError
from peft_safety.mask import SafetyMask
from peft_safety.testing import tiny_llama
from peft_safety.tuner import get_masked_lora_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    return SafetyMask(
        {n: torch.arange(0, p[n].numel(), 37, dtype=torch.int32) for n in (Q0, V1)},
        {n: tuple(p[n].shape) for n in (Q0, V1)},
        provenance={"method": "snip"},
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    mask = _mask(base)
    set_model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    set_model.base_model.model.name_or_path = str(root / "base")
    set_model.save_pretrained(root / "set")
    spa = get_masked_lora_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), mask)
    spa.base_model.model.name_or_path = str(root / "base")
    spa.save_pretrained(root / "spa")
    return root


def _damaged(root, kind: str, what: str):
    folder = root / f"{kind}-{what}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / kind, folder)
    cfg, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if what == "cfg_empty":
        cfg.write_bytes(b"")
    elif what == "cfg_truncated":
        cfg.write_bytes(cfg.read_bytes()[:200])
    elif what == "cfg_list":
        cfg.write_text("[]")
    elif what == "cfg_nested":
        cfg.write_text("{" + '"a":{' * 50_000 + "}" * 50_001)
    elif what == "cfg_unknown_type":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "peft_type": "NOPE"}))
    elif what == "w_empty":
        weights.write_bytes(b"")
    elif what == "w_truncated":
        weights.write_bytes(weights.read_bytes()[:-1])
    elif what == "w_trailing":
        weights.write_bytes(weights.read_bytes() + b"\0")
    elif what == "w_devzero":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif what == "w_missing":
        weights.unlink()
    return folder


WEIGHT_DAMAGE = {
    "w_empty": "0 bytes",
    "w_truncated": "truncated",
    "w_trailing": "followed by bytes no tensor uses",
    "w_devzero": "not a regular file",
}


@pytest.mark.parametrize("kind", ["set", "spa"])
@pytest.mark.parametrize("what", sorted(WEIGHT_DAMAGE))
def test_peft_loaders_name_a_damaged_weights_file(saved, kind, what):
    """PeftModel.from_pretrained and PeftModel.load_adapter read our config class first: it names the file.
    (transformers' ``model.load_adapter`` builds the config through PEFT's generic ``PeftConfig``, which our class
    never sees with a path: that route is listed in docs/footguns.md.)"""
    folder = _damaged(saved, kind, what)
    with pytest.raises(SafetyFileError, match=re.escape(WEIGHT_DAMAGE[what])) as info:
        PeftModel.from_pretrained(tiny_llama(seed=0), str(folder))
    assert str(folder / "adapter_model.safetensors") in str(info.value)
    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(saved / kind))
    with pytest.raises(SafetyFileError, match=re.escape(WEIGHT_DAMAGE[what])):
        model.load_adapter(str(folder), adapter_name="second")


def test_without_the_check_peft_fails_inside_safetensors(saved, monkeypatch):
    """What the pre-check replaces: the same damaged file reaches safetensors, whose error names no file."""
    import peft_safety.tuner._config_files as config_files

    folder = _damaged(saved, "set", "w_empty")
    monkeypatch.setattr(config_files, "check_adapter_weights", lambda folder: None)
    with pytest.raises(Exception) as info:
        PeftModel.from_pretrained(tiny_llama(seed=0), str(folder))
    assert not isinstance(info.value, SafetyError) and str(folder) not in str(info.value)


OUR_LOADER_DAMAGE = {
    "cfg_empty": "is empty (0 bytes)",
    "cfg_truncated": "the file is truncated",
    "cfg_list": "must hold a JSON object",
    "cfg_nested": "nested too deeply",
    "cfg_unknown_type": "peft_type 'NOPE' is not an adapter type",
    "w_missing": "no weights file",
    **WEIGHT_DAMAGE,
}


@pytest.mark.parametrize("what", sorted(OUR_LOADER_DAMAGE))
def test_load_model_names_the_file_before_the_base_loads(saved, what, monkeypatch):
    import peft_safety.sources.models as models

    folder = _damaged(saved, "set", what)
    monkeypatch.setattr(models, "_load_folder", lambda *a, **k: pytest.fail("the base model loaded first"))
    for call in (
        lambda: models.load_model(str(folder)),
        lambda: models.load_model(str(saved / "base"), adapter=str(folder)),
    ):
        with pytest.raises(
            (SafetyFileError, SafetyFileNotFoundError), match=re.escape(OUR_LOADER_DAMAGE[what])
        ) as info:
            call()
        assert str(folder) in str(info.value)


def test_intact_folders_still_load(saved):
    x = torch.arange(12).reshape(2, 6) % 100
    for kind in ("set", "spa"):
        model = PeftModel.from_pretrained(tiny_llama(seed=0), str(saved / kind))
        assert torch.isfinite(model(input_ids=x).logits).all()


# ------------------------------------------------------------------------------------------------ saving
@pytest.mark.parametrize("kind", ["set", "spa"])
def test_save_writes_the_config_peft_would_and_our_card(saved, kind, tmp_path):
    """The standard PEFT save (model.save_pretrained) of either type: adapter_config.json byte-identical to PEFT's
    own writer, and a README that carries the import line with the right type name."""
    folder = saved / kind
    config = PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)).peft_config["default"]
    reference = tmp_path / "reference"
    PeftConfigMixin.save_pretrained(config, str(reference))  # PEFT's writer, bypassing our override
    ours = json.loads((folder / "adapter_config.json").read_text())
    theirs = json.loads((reference / "adapter_config.json").read_text())
    ours.pop("weights_digest"), theirs.pop("weights_digest")  # written with the digest of the folder's weights
    assert ours == theirs
    PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)).save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_config.json").read_text() == (folder / "adapter_config.json").read_text()
    card = (folder / "README.md").read_text()
    peft_type = {"set": "SAFETY", "spa": "SAFETY_LORA"}[kind]
    assert "import peft_safety" in card and f"KeyError: '{peft_type}'" in card
    assert {"set": "SET (`train_only`)", "spa": "SPA (`freeze`)"}[kind] in card
    assert "- PEFT" in card  # PEFT's own card is kept, with peft-safety's section added once
    assert card.count("<!-- peft-safety:begin -->") == 1


def test_a_planted_config_symlink_is_replaced_not_written_through(saved, tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text('{"keep": true}')
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").symlink_to(victim)
    PeftModel.from_pretrained(tiny_llama(seed=0), str(saved / "set")).save_pretrained(out)
    assert victim.read_text() == '{"keep": true}'
    assert not (out / "adapter_config.json").is_symlink()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SAFETY"


def test_a_failed_config_write_keeps_the_previous_config(saved, tmp_path, monkeypatch):
    """PEFT's writer opens the file for writing (truncating it) before serialising: a failure then leaves 0 bytes.
    Ours serialises first and replaces the file in one rename."""
    out = tmp_path / "out"
    shutil.copytree(saved / "set", out)
    before = (out / "adapter_config.json").read_bytes()
    model = PeftModel.from_pretrained(tiny_llama(seed=0), str(saved / "set"))

    real_dumps = json.dumps

    def disk_full(value, *args, **kwargs):  # fails while the adapter config is written, nothing else
        if isinstance(value, dict) and "peft_type" in value:
            raise OSError(28, "No space left on device")
        return real_dumps(value, *args, **kwargs)

    import peft_safety._io as io_module

    monkeypatch.setattr(io_module.json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(out)
    monkeypatch.undo()
    assert (out / "adapter_config.json").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    # PEFT's own writer, for contrast: the same failure truncates the file
    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError):
        PeftConfigMixin.save_pretrained(model.peft_config["default"], str(out))
    monkeypatch.undo()
    assert (out / "adapter_config.json").read_bytes() == b""


def test_plain_trl_sft_trainer_saves_our_card(tmp_path):
    """A SAFETY adapter trained by TRL's own SFTTrainer (not SafetySFTTrainer) still gets the import line."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from peft_safety.testing import tiny_tokenizer

    model = tiny_llama(seed=0)
    args = SFTConfig(str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, max_length=32, bf16=False,
                     use_cpu=True, report_to=[], save_strategy="no")  # fmt: skip
    data = Dataset.from_list([{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(4)])
    trainer = SFTTrainer(model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                         peft_config=SafetyConfig(mask=_mask(model), task_type="CAUSAL_LM"))  # fmt: skip
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "import peft_safety" in card and "KeyError: 'SAFETY'" in card
