"""The TRL paths a user takes by default, end to end: what ``SafetySFTTrainer`` saves loads back with PEFT's loaders,
and a mask that TRL's own setup invalidates is refused when the trainer is built, not late in ``train()``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from peft_safety.mask import Neuron, SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
UP1 = "model.layers.1.mlp.up_proj"
IDS = torch.arange(3, 19).view(2, 8)


def _dataset(n: int = 8) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i}+{i}?", "completion": f" It is {2 * i}."} for i in range(n)])


def _args(tmp_path, **kw) -> SafetySFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_length": 48,
        "bf16": False,
        "activation_checkpointing": False,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
    }
    return SafetySFTConfig(**{**base, **kw})


def _mask(model, layout: dict) -> SafetyMask:
    p = dict(model.named_parameters())
    names = {f"{key}.weight": value for key, value in layout.items()}
    return SafetyMask(
        indices={n: idx for n, (idx, _) in names.items()},
        shapes={n: tuple(p[n].shape) for n in names},
        granularity={n: gran for n, (_, gran) in names.items()},
        fingerprints={n: fingerprint_tensor(p[n]) for n in names},
    )


# ---- the default TRL path: LoraConfig() with a mask over modules LoRA does not target -------------------------------


def test_default_lora_config_with_an_mlp_mask_saves_an_adapter_that_reloads(tmp_path, base_dir):
    """``LoraConfig()`` targets q_proj and v_proj on Llama; the mask also covers MLP weights, which that LoRA never
    changes. The saved adapter records masks only where it has LoRA layers and loads with PeftModel.from_pretrained;
    the merged model keeps every masked entry (and the untouched MLP weights) bit-identical."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _mask(
        model,
        {
            Q0: (list(range(0, 1024, 5)), Weight()),
            V1: ([1, 6], Neuron(axis=0)),
            DOWN0: ([3, 30], Neuron(axis=0)),
            UP1: ([7, 100, 1500], Weight()),
        },
    )
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze"),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8),  # TRL's usual defaults: no target_modules
        safety_mask=mask,
    )
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SAFETY_LORA"
    assert set(saved["mask_layout"]) == {Q0, V1}  # the masked modules LoRA adapts; MLP modules need no mask
    card = (out / "README.md").read_text()
    assert "this LoRA does not adapt: 2" in card and f"{DOWN0}.weight" in card

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, trainer.model(IDS).logits)
    merged = dict(loaded.merge_and_unload().named_parameters())
    moved_free = 0
    for name in mask.names:
        protected = mask.to_dense(name)
        assert torch.equal(merged[name][protected], base[name][protected]), name
        moved_free += int((merged[name][~protected] != base[name][~protected]).sum())
    assert moved_free > 0  # LoRA did train the masked attention modules' other entries
    for name in (f"{DOWN0}.weight", f"{UP1}.weight"):
        assert torch.equal(merged[name], base[name])  # not adapted at all


def test_adapter_saved_with_untargeted_masked_modules_in_its_layout_loads(tmp_path, base_dir):
    """Adapters written before the layout was limited to adapted modules list the untargeted masked modules (with no
    mask tensor): they load, and the loaded config drops those entries."""
    from peft import get_peft_model

    from peft_safety.tuner import SafetyLoraConfig

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mask = _mask(model, {Q0: (list(range(0, 1024, 5)), Weight()), DOWN0: ([3, 30], Neuron(axis=0))})
    peft_model = get_peft_model(model, SafetyLoraConfig(r=4, target_modules=["q_proj", "v_proj"], mask=mask))
    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(cfg["mask_layout"]) == {Q0}
    cfg["mask_layout"][DOWN0] = {"kind": "rows", "n": 2, "shape": [32, 64]}  # what an earlier save wrote
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    assert set(loaded.peft_config["default"].mask_layout) == {Q0}


# ---- chat_template_path resizes the embeddings after the mask was checked --------------------------------------------


@pytest.fixture
def template_source(tmp_path):
    """A tokenizer folder with two tokens the tiny tokenizer lacks: TRL's clone_chat_template adds them and resizes the
    embeddings (to a multiple of 64: 128 -> 192 rows)."""
    tok = tiny_tokenizer()
    tok.add_tokens(["<tool>", "</tool>"])
    folder = tmp_path / "template-source"
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    ("mode", "peft_config"),
    [("freeze", None), ("train_only", None)],
    ids=["full-finetune-freeze", "set-adapter"],
)
def test_chat_template_resize_of_a_masked_lm_head_is_refused_at_construction(
    tmp_path, template_source, mode, peft_config
):
    model = tiny_llama(seed=0)
    mask = _mask(model, {"lm_head": ([1, 5, 9], Neuron(axis=0)), Q0: (list(range(0, 1024, 7)), Weight())})
    with pytest.raises(
        ValueError, match=r"TRL changed 'lm_head\.weight' from \(128, 32\) to \(192, 32\).*chat_template_path"
    ):
        SafetySFTTrainer(
            model,
            args=_args(tmp_path, safety_mode=mode, chat_template_path=template_source),
            train_dataset=_dataset(),
            processing_class=tiny_tokenizer(),
            peft_config=peft_config,
            safety_mask=mask,
        )


def test_chat_template_resize_is_fine_when_the_mask_is_elsewhere(tmp_path, template_source):
    model = tiny_llama(seed=0)
    mask = _mask(model, {Q0: (list(range(0, 1024, 7)), Weight()), DOWN0: ([3, 30], Neuron(axis=0))})
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze", chat_template_path=template_source, max_steps=1),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        safety_mask=mask,
    )
    assert trainer.model.get_output_embeddings().weight.shape[0] == 192
    trainer.train()  # the freezer installs and verifies: nothing late fails
