"""What an adapter folder holds, read from its weights file (`peft_safety.tuner.detect_adapter_type`), and the
refusal of a folder whose ``adapter_config.json`` was relabelled (``"peft_type": "LORA"``) by peft-safety's loader,
``peft-safety eval`` and the card tooling. PEFT's own loaders cannot be stopped (no code of ours runs for a ``LORA``
config): the last tests pin what they do, as ``docs/footguns.md`` says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight, write_card
from peft_safety.tuner import SafetyConfig, SafetyLoraConfig, check_adapter_type, detect_adapter_type

Q = "model.layers.0.self_attn.q_proj.weight"
V = "model.layers.1.self_attn.v_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
IDS = torch.arange(3, 19).view(2, 8)


def _mask(model, layer_only: bool = False) -> SafetyMask:
    p = dict(model.named_parameters())
    if layer_only:
        return SafetyMask({UP: torch.tensor([0])}, {UP: tuple(p[UP].shape)}, granularity={UP: Layer()})
    return SafetyMask(
        {Q: torch.arange(0, 1024, 7), V: torch.tensor([2, 5])},
        {Q: tuple(p[Q].shape), V: tuple(p[V].shape)},
        granularity={Q: Weight(), V: Neuron(axis=0)},
    )


def _configs(model):
    return {
        "SAFETY": SafetyConfig(mask=_mask(model), init_weights=False),
        "SAFETY_LORA": SafetyLoraConfig(r=4, target_modules="all-linear", mask=_mask(model)),
        "LORA": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory, base_dir):
    """Per type and serialisation, a saved adapter with non-trivial weights (LoRA's B drawn at random)."""
    root = tmp_path_factory.mktemp("detect")
    out = {}
    for kind in ("SAFETY", "SAFETY_LORA", "LORA"):
        for safe in (True, False):
            model = AutoModelForCausalLM.from_pretrained(base_dir)
            peft_model = get_peft_model(model, _configs(model)[kind])
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
            folder = root / f"{kind}-{'st' if safe else 'bin'}"
            peft_model.save_pretrained(folder, safe_serialization=safe)
            out[kind, safe] = folder
    return out


def relabel(folder, tmp_path, peft_type):
    copy = tmp_path / f"relabelled-{folder.name}"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("kind", ["SAFETY", "SAFETY_LORA", "LORA"])
def test_the_weights_file_says_what_the_adapter_is(folders, kind, safe):
    assert detect_adapter_type(folders[kind, safe]) == kind
    assert check_adapter_type(folders[kind, safe]) == kind


def test_layer_only_masked_lora_holds_plain_lora_factors(tmp_path, base_dir):
    # a Layer()-only mask leaves its modules out of LoRA and stores no mask: consistent with its SAFETY_LORA config
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, SafetyLoraConfig(r=4, target_modules="all-linear", mask=_mask(model, True))).save_pretrained(
        tmp_path
    )
    assert detect_adapter_type(tmp_path) == "LORA"
    assert check_adapter_type(tmp_path) == "LORA"


def test_no_weights_file(tmp_path):
    assert detect_adapter_type(tmp_path) is None
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: cannot read the tensor names"):
        detect_adapter_type(tmp_path)


RELABELS = [("SAFETY", "LORA", "SET index/value tensors"), ("SAFETY_LORA", "LORA", "masked-LoRA mask tensors")]
RELABELS += [("SAFETY", "SAFETY_LORA", "SET index/value"), ("LORA", "SAFETY", "LoRA factors only")]


@pytest.mark.parametrize(("kind", "label", "holds"), RELABELS, ids=[f"{k}-as-{lab}" for k, lab, _ in RELABELS])
def test_relabelled_folders_are_refused_by_our_loader_eval_and_cards(folders, tmp_path, base_dir, kind, label, holds):
    from peft_safety.cli.main import main
    from peft_safety.sources.models import load_model

    folder = relabel(folders[kind, True], tmp_path, label)
    fragment = rf"adapter_config\.json says peft_type '{label}', but .*adapter_model\.safetensors holds {holds}"
    with pytest.raises(ValueError, match=fragment):
        check_adapter_type(folder)
    with pytest.raises(ValueError, match=fragment):
        load_model(str(base_dir), adapter=str(folder))  # what `peft-safety eval --adapter` loads with
    card = (folder / "README.md").read_text()
    with pytest.raises(ValueError, match=fragment):
        write_card(folder)
    assert (folder / "README.md").read_text() == card  # not rewritten
    assert main(["eval", str(base_dir), "--adapter", str(folder), "--no-progress"]) == 2  # refused before loading


def test_relabelled_set_adapter_through_peft_loads_as_an_identity_lora(folders, tmp_path, base_dir):
    """What docs/footguns.md says PEFT's own path does (no code of ours runs for a LORA config): every SET delta is
    dropped with only PEFT's missing-keys warning."""
    folder = relabel(folders["SAFETY", True], tmp_path, "LORA")
    with pytest.warns(UserWarning, match="missing adapter keys"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, AutoModelForCausalLM.from_pretrained(base_dir)(IDS).logits)


def test_relabelled_masked_lora_through_peft_loads_unmasked(folders, tmp_path, base_dir):
    """...and a relabelled masked LoRA loads as a plain LoRA: the protected entries of the merged weight move."""
    folder = relabel(folders["SAFETY_LORA", True], tmp_path, "LORA")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    merged = model.merge_and_unload().get_parameter(Q)
    original = AutoModelForCausalLM.from_pretrained(base_dir).get_parameter(Q)
    protected = torch.zeros(1024, dtype=torch.bool)
    protected[::7] = True  # the Weight() entries of _mask on q_proj
    assert int((merged.reshape(-1)[protected] != original.reshape(-1)[protected]).sum()) > 0
