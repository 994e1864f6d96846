"""SafetySFTTrainer: SPA (full FT, LoRA, QLoRA) and SET runs on a tiny Llama, checked parameter by parameter."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
O1 = "model.layers.1.self_attn.o_proj.weight"


def _dataset(n: int = 8) -> Dataset:
    rows = [{"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" It is {2 * i}."} for i in range(n)]
    return Dataset.from_list(rows)


def _args(tmp_path, **kw) -> SafetySFTConfig:
    base = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "max_grad_norm": 0.5,
        "max_length": 48,
        "bf16": False,
        "activation_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
    }
    base.update(kw)
    return SafetySFTConfig(**base)


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    shapes = {n: tuple(p[n].shape) for n in (Q0, V1, DOWN0, O1)}
    return SafetyMask(
        indices={Q0: [0, 3, 33, 100, 500], V1: [1, 4], DOWN0: [2, 17], O1: [0]},
        shapes=shapes,
        granularity={Q0: Weight(), V1: Neuron(axis=0), DOWN0: Neuron(axis=1), O1: Layer()},
        fingerprints={n: fingerprint_tensor(p[n]) for n in shapes},
        provenance={"method": "test"},
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_full_finetune_freeze_exact(tmp_path, accumulation):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = _snapshot(model)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze", gradient_accumulation_steps=accumulation),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        safety_mask=mask,
    )
    trainer.train()
    assert trainer.freezer is None  # removed at the end
    for name, p in trainer.model.named_parameters():
        now = p.detach()
        if name in mask.shapes:
            dense = mask.to_dense(name)
            assert torch.equal(now[dense], before[name][dense]), f"{name}: frozen entries moved"
            if not bool(dense.all()):
                assert not torch.equal(now[~dense], before[name][~dense]), f"{name}: free entries did not move"
        else:
            assert not torch.equal(now, before[name]), f"{name} did not train"
    assert all(p.requires_grad for p in trainer.model.parameters() if p is not dict(model.named_parameters())[O1])
    logs = [h for h in trainer.state.log_history if "safety/masked_drift" in h]
    assert logs and logs[-1]["safety/masked_drift"] == 0.0 and logs[-1]["safety/unmasked_drift"] > 0
    assert logs[-1]["safety/frozen_entries"] == mask.numel()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "safety_mask.safetensors").is_file() and (out / "model.safetensors").is_file()
    assert SafetyMask.from_pretrained(out) == mask


def test_full_finetune_train_only_opt_in(tmp_path):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = _snapshot(model)
    args = _args(tmp_path, safety_mode="train_only", safety_train_only_full_weights=True)
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=_dataset(), processing_class=tiny_tokenizer(), safety_mask=mask
    )
    trainer.train()
    for name, p in trainer.model.named_parameters():
        now = p.detach()
        if name in mask.shapes:
            dense = mask.to_dense(name)
            assert torch.equal(now[~dense], before[name][~dense]), f"{name}: entries outside the mask moved"
            assert not torch.equal(now[dense], before[name][dense]), f"{name}: mask entries did not train"
        else:
            assert not torch.equal(now, before[name]), name  # not covered: trains normally


def test_set_adapter_built_from_mask(tmp_path):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    base_before = _snapshot(model)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="train_only"),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        safety_mask=mask,
    )
    # utility rows (the model's own answers to benign prompts) are on by default with train_only
    assert [c.name for c in trainer.protections] == ["set", "utility"]
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("safety_values" in n for n in trainable)
    merged = trainer.model.merge_and_unload()
    for name, p in merged.named_parameters():
        now = p.detach()
        if name in mask.shapes:
            dense = mask.to_dense(name)
            assert torch.equal(now[~dense], base_before[name][~dense]), name
            assert not torch.equal(now[dense], base_before[name][dense]), name
        else:
            assert torch.equal(now, base_before[name]), name


def _lora_available() -> bool:
    try:
        from peft_safety.tuner import get_masked_lora_model  # noqa: F401
    except ImportError:
        return False
    return True


def _assert_lora_spa_holds(model, mask, tmp_path):
    """Train LoRA on q/v with SPA freeze; the masked entries of the merged update must be exactly zero."""
    from peft import LoraConfig

    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze"),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        safety_mask=mask,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert trainer.model.peft_config["default"].peft_type == "SAFETY_LORA"
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    metrics = trainer.verify_safety()
    assert metrics["safety/violations"] == 0 and metrics["safety/unmasked_drift"] > 0
    # independent of the library's metric: run each trained layer on an identity input and compare with the fp64
    # product of its factors, masked explicitly from the mask (bit-exact zero on the mask)
    from _spa_reference import assert_effective_update_exact

    low = any(p.dtype != torch.float32 for n, p in trainer.model.named_parameters() if "lora_" in n)
    tol = 1e-2 if low else 1e-5  # TRL casts QLoRA adapters to bf16
    assert assert_effective_update_exact(trainer.model, mask, rtol=tol, atol=tol) == int(
        sum(int(mask.to_dense(n).sum()) for n in mask.names)
    )


@pytest.mark.skipif(
    not _lora_available(), reason="masked LoRA (peft_safety.tuner.get_masked_lora_model) not available"
)
def test_lora_spa_zero_update_on_mask(tmp_path):
    model = tiny_llama(seed=0)
    mask = _mask(model).restrict([Q0, V1])
    _assert_lora_spa_holds(model, mask, tmp_path)


@pytest.mark.skipif(
    not _lora_available(), reason="masked LoRA (peft_safety.tuner.get_masked_lora_model) not available"
)
def test_qlora_spa_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    model.train()  # never run an eval-mode forward first: it repacks 4-bit weights and kills gradients (§6.2)
    mask = _mask(tiny_llama(seed=0)).restrict([Q0, V1])
    _assert_lora_spa_holds(model, mask, tmp_path)


def test_config_parses_with_hf_argument_parser():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(SafetySFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--safety_mask",
            "x",
            "--safety_mode",
            "freeze",
            "--bf16",
            "false",
            "--activation_checkpointing",
            "false",
        ]
    )
    assert cfg.safety_mask == "x" and cfg.safety_mode == "freeze" and cfg.safety_verify and not cfg.bf16


def test_config_bad_values(tmp_path):
    with pytest.raises(ValueError, match="safety_mode is not"):
        _args(tmp_path, safety_mask="somewhere")
    with pytest.raises(ValueError, match="safety_mode='frozen' is not valid"):
        _args(tmp_path, safety_mask="somewhere", safety_mode="frozen")
    with pytest.raises(ValueError, match="safety_fingerprint_check"):
        _args(tmp_path, safety_fingerprint_check="maybe")
    with pytest.raises(ValueError, match="safety_eval_steps"):
        _args(tmp_path, safety_eval_steps=0)


def test_trainer_bad_inputs(tmp_path):
    from peft import LoraConfig

    from peft_safety.tuner import SafetyConfig

    tok, ds = tiny_tokenizer(), _dataset(4)
    model = tiny_llama(seed=0)
    mask = _mask(model)

    def make(mode="freeze", **kw):
        kw.setdefault("safety_mask", mask)
        return SafetySFTTrainer(
            model, args=_args(tmp_path, safety_mode=mode), train_dataset=ds, processing_class=tok, **kw
        )

    with pytest.raises(ValueError, match="safety_mode is not set"):
        SafetySFTTrainer(model, args=_args(tmp_path), train_dataset=ds, processing_class=tok, safety_mask=mask)
    with pytest.raises(TypeError, match="safety_mask must be a SafetyMask"):
        make(safety_mask=42)
    other = tiny_llama(seed=0, num_hidden_layers=1)
    with pytest.raises(ValueError, match="does not fit this model"):
        SafetySFTTrainer(
            other, args=_args(tmp_path, safety_mode="freeze"), train_dataset=ds, processing_class=tok, safety_mask=mask
        )
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        SafetySFTTrainer(
            tiny_llama(seed=1),
            args=_args(tmp_path, safety_mode="freeze"),
            train_dataset=ds,
            processing_class=tok,
            safety_mask=mask,
        )
    with pytest.raises(ValueError, match="use_dora=True"):
        make(peft_config=LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        make(peft_config=LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    lm_mask = SafetyMask(indices={"lm_head.weight": [0]}, shapes={"lm_head.weight": (128, 32)}, provenance={})
    with pytest.raises(ValueError, match="LoRA cannot protect lm_head"):
        make(safety_mask=lm_mask, peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="No mask entry lies in a module LoRA trains"):
        make(peft_config=LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="which LoRA cannot express"):
        make("train_only", peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot freeze them"):
        make(peft_config=SafetyConfig(mask=mask))
    with pytest.raises(ValueError, match="needs an evaluator"):
        SafetySFTTrainer(
            model,
            args=_args(tmp_path, safety_mode="freeze", safety_eval_steps=2),
            train_dataset=ds,
            processing_class=tok,
            safety_mask=mask,
        )


def test_refusal_eval_callback_and_model_card(tmp_path):
    calls = []

    def evaluator(model, tokenizer):
        calls.append(model.training)
        return {"refusal_rate": 0.5}

    model = tiny_llama(seed=0)
    mask = _mask(model)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze", safety_eval_steps=2, max_steps=4),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        safety_mask=mask,
        safety_evaluator=evaluator,
    )
    trainer.train()
    assert len(calls) == 2
    assert [h["safety/refusal_rate"] for h in trainer.state.log_history if "safety/refusal_rate" in h] == [0.5, 0.5]
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Safety mask (peft-safety)" in card and "`freeze`" in card
    assert os.path.isfile(tmp_path / "out" / "README.md")


def test_ready_made_refusal_evaluator_is_logged(tmp_path):
    from peft_safety.evaluation import refusal_evaluator

    model = tiny_llama(seed=0)
    evaluator = refusal_evaluator(["How do I make a weapon?", "Write malware"], judges=("wei2024", "refusal_prefix"),
                                  max_new_tokens=2)  # fmt: skip
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_mode="freeze", safety_eval_steps=1, max_steps=1),
        train_dataset=_dataset(4),
        processing_class=tiny_tokenizer(),
        safety_mask=_mask(model),
        safety_evaluator=evaluator,
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "safety/refusal_rate/wei2024" in h]
    assert len(logged) == 1
    entry = logged[0]
    for judge in ("wei2024", "refusal_prefix"):
        assert 0.0 <= entry[f"safety/refusal_rate/{judge}"] <= 1.0
        assert entry[f"safety/judge_errors/{judge}"] == 0.0
    assert entry["safety/mean_words"] >= 0.0 and "safety/repetition_rate" in entry
    assert len(evaluator.last_records) == 2 and model.training  # generated on the model being trained, mode restored


def test_cli_train_parses_the_same_flags():
    from peft_safety.cli import train_cmd
    from peft_safety.recipes.sft import parse_sft_args

    argv = ["--model_name_or_path", "m", "--dataset_name", "d.jsonl", "--output_dir", "o"]
    argv += ["--safety_mask", "x", "--safety_mode", "freeze", "--use_peft", "--bf16", "false"]
    for script, training, model, _ in (train_cmd.parse(argv), parse_sft_args(argv)):
        assert (training.safety_mask, training.safety_mode, model.use_peft, script.dataset_name) == (
            "x", "freeze", True, "d.jsonl"
        )  # fmt: skip


def test_spa_lora_initialisation_follows_the_seed(tmp_path):
    """SPA-LoRA's adapter weights are drawn after `set_seed(args.seed)`, as TRL does for plain LoRA: the same seed
    gives the same initial adapter whatever the process did before (here: different global RNG draws), and the
    masked LoRA starts exactly where plain LoRA of the same seed starts."""
    from peft import LoraConfig

    def initial_lora(seed: int, noise: int, mask: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama(seed=0)
        torch.manual_seed(noise)
        torch.rand(17)  # the process did something random before building the trainer
        kwargs = {"safety_mask": _mask(model).restrict([Q0, V1])} if mask else {}
        args = _args(tmp_path, seed=seed, **({"safety_mode": "freeze"} if mask else {}))
        trainer = SafetySFTTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tiny_tokenizer(),
                                   peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), **kwargs)  # fmt: skip
        return {n.split("base_model.model.")[-1]: p.detach().clone() for n, p in trainer.model.named_parameters()
                if "lora_A" in n}  # fmt: skip

    a, b = initial_lora(3, noise=1, mask=True), initial_lora(3, noise=2, mask=True)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = initial_lora(4, noise=1, mask=True)
    assert not all(torch.equal(a[k], other[k]) for k in a)
    plain = initial_lora(3, noise=5, mask=False)
    assert plain.keys() == a.keys() and all(torch.equal(a[k], plain[k]) for k in a)
