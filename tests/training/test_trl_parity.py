"""Drop-in parity with TRL's ``SFTTrainer``: TRL's core SFT trainer checks, rerun with a freeze mask.

Each test follows one of the checks TRL runs on its own trainer (every trainable parameter changed after training,
for each data format, with packing, completion-only loss and PEFT) and adds the SPA guarantee: the mask's entries are
bit-identical to the weights before training, and the other entries of the covered tensors moved. The references are
the weights before training (a copy), never the library's own bookkeeping. Written for this project; no code copied.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from transformers import TrainingArguments

from peft_safety.mask import Neuron, SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"

#: what TRL's tests leave at its defaults stays at the defaults here (gradient checkpointing on, lr 2e-5, bf16 unset);
#: only the run length, logging and output are fixed
RUN = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
}


def _mask(model, names=(Q0, V1, DOWN0)) -> SafetyMask:
    p = dict(model.named_parameters())
    indices = {Q0: [0, 3, 33, 100, 500, 1000], V1: [1, 4], DOWN0: [2, 17]}
    granularity = {Q0: Weight(), V1: Neuron(axis=0), DOWN0: Neuron(axis=1)}
    return SafetyMask(
        indices={n: indices[n] for n in names},
        shapes={n: tuple(p[n].shape) for n in names},
        granularity={n: granularity[n] for n in names},
        fingerprints={n: fingerprint_tensor(p[n]) for n in names},
        provenance={"method": "test"},
    )


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_frozen_exact_rest_trained(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], mask) -> None:
    """TRL's check (every trainable parameter changed) plus SPA's: masked entries bit-identical, the others moved."""
    for name, old in before.items():
        new = after[name]
        assert new.dtype == old.dtype, f"{name}: dtype changed to {new.dtype}"
        if name in mask.shapes:
            frozen = mask.to_dense(name)
            assert torch.equal(new[frozen], old[frozen]), f"{name}: masked entries moved"
            assert not torch.equal(new[~frozen], old[~frozen]), f"{name}: unmasked entries did not change"
        else:
            assert not torch.equal(new, old), f"{name}: parameter has not changed"


def _rows(kind: str, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = f"What is {i} plus {i}?", f"It is {2 * i}."
        if kind == "text":
            rows.append({"text": f"{q} {a}"})
        elif kind == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif kind == "prompt_completion":
            rows.append({"prompt": q, "completion": " " + a})
        elif kind == "conversational_prompt_completion":
            rows.append(
                {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            )
        else:  # pragma: no cover - test bug
            raise AssertionError(kind)
    return rows


def _train_full(tmp_path, kind: str, **config) -> tuple[SafetySFTTrainer, dict, SafetyMask]:
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = _snapshot(model)
    args = SafetySFTConfig(str(tmp_path / "out"), safety_mode="freeze", **RUN, **config)
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(_rows(kind)), processing_class=tiny_tokenizer(),
        safety_mask=mask,
    )  # fmt: skip
    trainer.train()
    _assert_frozen_exact_rest_trained(_snapshot(trainer.model), before, mask)
    return trainer, before, mask


@pytest.mark.parametrize("kind", ["text", "messages", "prompt_completion", "conversational_prompt_completion"])
def test_every_data_format_trains_and_keeps_the_mask(tmp_path, kind):
    trainer, _, _ = _train_full(tmp_path, kind)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_packing(tmp_path):
    trainer, _, _ = _train_full(tmp_path, "text", packing=True, max_length=32)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch or "seq_lengths" in batch  # TRL's packed (padding-free) batches


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_completion_only_loss(tmp_path, completion_only_loss):
    trainer, _, _ = _train_full(tmp_path, "prompt_completion", completion_only_loss=completion_only_loss)
    batch = next(iter(trainer.get_train_dataloader()))
    prompt_positions = batch["completion_mask"] == 0 if "completion_mask" in batch else None
    if prompt_positions is not None:
        labels_at_prompt = batch["labels"][prompt_positions & (batch["attention_mask"] == 1)]
        # completion-only loss: the prompt positions carry no label (-100); otherwise they are trained too
        assert bool((labels_at_prompt == -100).all()) is completion_only_loss


def test_assistant_only_loss(tmp_path):
    _train_full(tmp_path, "messages", assistant_only_loss=True)


def test_peft_lora_masked_entries_zero_update(tmp_path):
    from peft import LoraConfig

    model = tiny_llama(seed=0)
    mask = _mask(model, names=(Q0, V1))
    before = _snapshot(model)
    args = SafetySFTConfig(str(tmp_path / "out"), safety_mode="freeze", learning_rate=1e-2, **RUN)
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(_rows("messages")), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), safety_mask=mask,
    )  # fmt: skip
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    merged = _snapshot(trainer.model.merge_and_unload())
    for name, old in before.items():
        if name in mask.shapes:
            frozen = mask.to_dense(name)
            assert torch.equal(merged[name][frozen], old[frozen]), f"{name}: masked entries moved"
            assert not torch.equal(merged[name][~frozen], old[~frozen]), f"{name}: LoRA did not train"
        elif name.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(merged[name], old), f"{name}: LoRA did not train"
        else:
            assert torch.equal(merged[name], old), f"{name}: outside LoRA's target modules, yet changed"


# ---------------------------------------------------------------------------- every way SFTTrainer takes args/model


@pytest.fixture
def saved_model(tmp_path):
    """A tiny Llama saved in bfloat16 with its tokenizer, as a Hub snapshot would be."""
    folder = tmp_path / "tiny-llama"
    tiny_llama(seed=0, dtype=torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_args_none_is_a_default_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SFTTrainer writes to "<model name>-SFT" in the working directory
    model = tiny_llama(seed=0)
    trainer = SafetySFTTrainer(
        model, train_dataset=Dataset.from_list(_rows("text")), processing_class=tiny_tokenizer(), safety_mask=None
    )
    assert isinstance(trainer.args, SafetySFTConfig)
    assert trainer.args.output_dir.endswith("-SFT") and trainer.args.safety_log_drift
    assert trainer.args.bf16 is False or torch.cuda.is_available()  # resolved by the hardware, no crash on CPU
    trainer.args.max_steps = 2
    before = _snapshot(model)
    trainer.train()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


def test_plain_training_arguments_with_a_mask(tmp_path):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = _snapshot(model)
    args = TrainingArguments(str(tmp_path / "out"), learning_rate=1e-3, weight_decay=0.1, **RUN)
    with pytest.raises(ValueError, match="safety_mode"):  # a plain TrainingArguments has no mode: say which one
        SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(_rows("text")), safety_mask=mask,
                         processing_class=tiny_tokenizer())  # fmt: skip
    args = TrainingArguments(str(tmp_path / "out"), learning_rate=1e-3, weight_decay=0.1, **RUN)
    trainer = SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(_rows("text")),
                               processing_class=tiny_tokenizer())  # fmt: skip
    assert isinstance(trainer.args, SafetySFTConfig)
    assert (trainer.args.learning_rate, trainer.args.weight_decay, trainer.args.bf16) == (1e-3, 0.1, False)
    trainer.train()  # no mask: behaves as SFTTrainer (every parameter trains)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())


def test_plain_sft_config_keeps_every_value(tmp_path):
    from trl import SFTConfig

    model = tiny_llama(seed=0)
    args = SFTConfig(str(tmp_path / "out"), bf16=False, use_cpu=True, eos_token="</s>", weight_decay=0.1, **RUN)
    with pytest.raises(ValueError, match="safety_mode is not set"):  # a mask needs a mode, and the error says so
        SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(_rows("text")),
                         processing_class=tiny_tokenizer(), safety_mask=_mask(model))  # fmt: skip
    trainer = SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(_rows("text")),
                               processing_class=tiny_tokenizer())  # fmt: skip
    assert isinstance(trainer.args, SafetySFTConfig)
    assert (trainer.args.eos_token, trainer.args.weight_decay) == ("</s>", 0.1)  # every value kept, tokens included
    assert trainer.processing_class.eos_token == "</s>"


def test_model_path_loaded_like_trl_float32_by_default(tmp_path, saved_model):
    """A model id/path with a mask goes through TRL's loader: float32 by default (the folder holds bf16 weights), the
    tokenizer loaded from the same folder, and training moves every unmasked entry."""
    reference = tiny_llama(seed=0, dtype=torch.bfloat16)
    mask = _mask(reference)
    before = {n: p.detach().float() for n, p in reference.named_parameters()}
    args = SafetySFTConfig(str(tmp_path / "out"), safety_mode="freeze", safety_fingerprint_check="ignore", **RUN)
    trainer = SafetySFTTrainer(str(saved_model), args=args, train_dataset=Dataset.from_list(_rows("messages")),
                               safety_mask=mask)  # fmt: skip
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.train()
    _assert_frozen_exact_rest_trained(_snapshot(trainer.model), before, mask)


def test_model_path_honours_model_init_kwargs_and_trust_remote_code(tmp_path, saved_model, monkeypatch):
    import trl.trainer.utils as trl_utils

    calls = []
    real = trl_utils.create_model_from_path

    def spy(model_id, **kwargs):
        calls.append((model_id, dict(kwargs)))
        return real(model_id, **kwargs)

    monkeypatch.setattr(trl_utils, "create_model_from_path", spy)
    mask = _mask(tiny_llama(seed=0))
    args = SafetySFTConfig(
        str(tmp_path / "out"), safety_mode="freeze", safety_fingerprint_check="ignore", trust_remote_code=True,
        model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"}, **RUN,
    )  # fmt: skip
    trainer = SafetySFTTrainer(str(saved_model), args=args, train_dataset=Dataset.from_list(_rows("text")),
                               safety_mask=mask)  # fmt: skip
    assert calls == [
        (str(saved_model), {"dtype": "bfloat16", "attn_implementation": "eager", "trust_remote_code": True})
    ]
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert trainer.args.model_init_kwargs == {"dtype": "bfloat16", "attn_implementation": "eager"}  # left as given


def test_quantization_config_both_places_is_an_error(tmp_path, saved_model):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_8bit=True)
    args = SafetySFTConfig(str(tmp_path / "out"), safety_mode="freeze", model_init_kwargs={"quantization_config": q},
                           **RUN)  # fmt: skip
    with pytest.raises(ValueError, match="quantization_config was given both"):
        SafetySFTTrainer(str(saved_model), args=args, train_dataset=Dataset.from_list(_rows("text")),
                         safety_mask=_mask(tiny_llama(seed=0)), quantization_config=q)  # fmt: skip
