"""SET as a repair after fine-tuning: the mask of the aligned model, trained on the fine-tuned weights, shipped as a SAFETY
adapter that loads on the fine-tuned model only."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("trl")
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_safety.cli.main import main
from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor, fingerprints_of
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training import repair
from peft_safety.training.repair import fingerprint_digest, repair_mask

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
REFUSALS = [{"prompt": f"how to harm {i}", "response": "I cannot help with that."} for i in range(6)]
UTILITY = [{"prompt": f"a recipe {i}", "response": f"Mix flour and water, step {i}."} for i in range(6)]


def _aligned_and_finetuned():
    aligned = tiny_llama(seed=0)
    finetuned = copy.deepcopy(aligned)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a merged fine-tuning update on every weight
        for p in finetuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    p = dict(aligned.named_parameters())
    mask = SafetyMask(
        indices={Q0: list(range(0, 600, 5)), V1: list(range(0, 300, 7))},
        shapes={n: tuple(p[n].shape) for n in (Q0, V1)},
        granularity={Q0: Weight(), V1: Weight()},
        fingerprints={n: fingerprint_tensor(p[n]) for n in (Q0, V1)},
        provenance={"method": "test", "base_model": "aligned-model"},
    )
    return aligned, finetuned, mask


def _repair(finetuned, mask, tmp_path, **kw):
    return repair(
        finetuned, tiny_tokenizer(), mask, output_dir=tmp_path / "repair", refusal_rows=REFUSALS,
        utility_dataset=UTILITY, max_steps=2, batch_size=2, max_length=32, use_cpu=True, bf16=False, **kw,
    )  # fmt: skip


def test_repair_mask_refingerprints_and_checks_the_aligned_model():
    aligned, finetuned, mask = _aligned_and_finetuned()
    checked = repair_mask(mask, finetuned, aligned_model=aligned)
    assert checked.fingerprints == fingerprints_of(finetuned, [Q0, V1])
    assert checked.fingerprints != mask.fingerprints
    assert checked.provenance["repair_of"] == {
        "fingerprint_digest": fingerprint_digest(mask.fingerprints),
        "base_model": "aligned-model",
    }
    with pytest.raises(ValueError, match="not scored on this aligned model"):
        repair_mask(mask, finetuned, aligned_model=tiny_llama(seed=3))
    no_prints = SafetyMask(indices=dict(mask.indices), shapes=mask.shapes, granularity=mask.granularity)
    with pytest.raises(ValueError, match="no weight fingerprints"):
        repair_mask(no_prints, finetuned, aligned_model=aligned)


def test_repair_adapter_loads_on_the_finetuned_base_only(tmp_path):
    aligned, finetuned, mask = _aligned_and_finetuned()
    aligned.save_pretrained(tmp_path / "aligned")
    finetuned.save_pretrained(tmp_path / "finetuned")
    trainer = _repair(finetuned, mask, tmp_path, aligned_model=aligned, kl_weight=1.0)
    # refusal rows and as many utility rows (ratio 1), only the mask's entries trained
    assert [c.name for c in trainer.protections] == ["set", "utility"]
    assert trainer.protections[1].info["utility_rows"] == 6
    folder = tmp_path / "repair"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SAFETY"
    saved_mask = SafetyMask.from_pretrained(folder)
    assert saved_mask.provenance["repair_of"]["fingerprint_digest"] == fingerprint_digest(mask.fingerprints)
    # on the fine-tuned weights it loads, and the trained deltas are there
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "finetuned")
    net = PeftModel.from_pretrained(base, folder)
    deltas = [p for n, p in net.named_parameters() if "safety_values" in n]
    assert deltas and any(float(d.abs().sum()) > 0 for d in deltas)
    # on the aligned model (the wrong base) it is refused by the base-fingerprint check
    wrong = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned")
    with pytest.raises(ValueError, match=r"(?i)fingerprint"):
        PeftModel.from_pretrained(wrong, folder)


def test_repair_refuses_a_peft_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    _, finetuned, mask = _aligned_and_finetuned()
    lora = get_peft_model(finetuned, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        _repair(lora, mask, tmp_path)


def test_repair_cli(tmp_path):
    aligned, finetuned, mask = _aligned_and_finetuned()
    aligned.save_pretrained(tmp_path / "aligned")
    finetuned.save_pretrained(tmp_path / "finetuned")
    tiny_tokenizer().save_pretrained(tmp_path / "finetuned")
    mask.save_pretrained(tmp_path / "mask")
    util = tmp_path / "utility.jsonl"
    util.write_text("".join(json.dumps(r) + "\n" for r in UTILITY))
    out = tmp_path / "out"
    argv = ["repair", "--model", str(tmp_path / "finetuned"), "--mask", str(tmp_path / "mask"), "--aligned",
            str(tmp_path / "aligned"), "--output_dir", str(out), "--max_steps", "1", "--n_rows", "4",
            "--utility_dataset", str(util), "--batch_size", "2", "--max_length", "32", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "adapter_config.json").is_file() and (out / "safety_mask.safetensors").is_file()
    # the wrong aligned model is refused before training
    other = tiny_llama(seed=5)
    other.save_pretrained(tmp_path / "other")
    bad = list(argv)
    bad[bad.index("--aligned") + 1] = str(tmp_path / "other")
    bad[bad.index("--output_dir") + 1] = str(tmp_path / "out2")
    assert main(bad) == 2
    assert main([*argv[:-2], "--device", "cpu", "--utility_ratio", "-1"]) == 2
