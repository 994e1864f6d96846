"""SafetySFTTrainer's saved folders: the mask carries the base weights' fingerprints, and the folder's one card (PEFT's
adapter card or TRL's) states peft-safety, the import line, the mode and the mask's provenance."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig

from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def _args(tmp_path, **kw) -> SafetySFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "max_length": 32,
        "bf16": False,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
    }
    base.update(kw)
    return SafetySFTConfig(**base)


def _dataset() -> Dataset:
    return Dataset.from_list([{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(4)])


def _mask_without_fingerprints(model) -> SafetyMask:
    p = dict(model.named_parameters())
    return SafetyMask(
        {Q0: [0, 5, 9], V1: [2]},
        {n: tuple(p[n].shape) for n in (Q0, V1)},
        Weight(),
        provenance={"method": "snip", "sparsity": 0.01, "data_hash": "abc", "base_model": "org/tiny"},
    )


@pytest.mark.parametrize("mode", ["freeze", "train_only"])
def test_trainer_saves_mask_with_fingerprints_and_one_card(tmp_path, mode):
    model = tiny_llama(seed=0)
    base_fps = {n: fingerprint_tensor(w) for n, w in model.named_parameters() if n in (Q0, V1)}
    peft_config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if mode == "freeze" else None
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode=mode),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
        safety_mask=_mask_without_fingerprints(model),
    )
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    saved = SafetyMask.from_pretrained(out)
    assert saved.fingerprints == base_fps  # the weights the mask was applied to, not the trained ones
    other = tiny_llama(seed=0)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3.0)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        saved.validate(other)
    saved.validate(tiny_llama(seed=0))

    card = ModelCard((out / "README.md").read_text())
    assert card.text.count("(peft-safety)\n") == 1
    peft_type = "SAFETY_LORA" if mode == "freeze" else "SAFETY"  # the type the folder holds, named exactly
    assert "import peft_safety" in card.text and f"KeyError: '{peft_type}'`" in card.text
    expected = "SPA (`freeze`)" if mode == "freeze" else "SET (`train_only`)"
    assert expected in card.text
    for field in ("| method | snip |", "| sparsity | 0.01 |", "| data_hash | abc |", "| base_model | org/tiny |"):
        assert field in card.text
    assert "peft-safety" in card.data.tags
    assert card.data.library_name == "peft"  # PEFT's adapter card was updated, not replaced
    assert "- PEFT" in card.text
    # TRL's card (written at the end of training / on push) is merged too, once
    trainer.create_model_card(model_name="tiny")
    card = ModelCard((out / "README.md").read_text())
    assert card.text.count("(peft-safety)\n") == 1 and "import peft_safety" in card.text
