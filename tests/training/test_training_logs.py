"""Safety metrics join the training log: in ``trainer.state.log_history`` and in what every ``report_to`` integration
receives, next to (never instead of) ``loss``, ``grad_norm`` and ``learning_rate``.

No reporting integration is installed here, so a recording callback stands in for one at the place transformers puts
integrations (right after ``DefaultFlowCallback``, before user callbacks).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.callbacks import RefusalEvalCallback, SafetyDriftCallback
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"
TRAIN_KEYS = ("loss", "grad_norm", "learning_rate")


class Recorder(TrainerCallback):
    """Stands in for a report_to integration: keeps a copy of every logs dict it is handed."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}, step=state.global_step))


def _as_integration(trainer, recorder):
    trainer.callback_handler.callbacks.insert(1, recorder)  # where transformers places report_to callbacks
    return recorder


def _data(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": f"q{i}?", "completion": f" a{i}."} for i in range(n)])


def _train_entries(history: list[dict]) -> list[dict]:
    return [h for h in history if "train_runtime" not in h]


@pytest.mark.parametrize(("logging_steps", "eval_steps"), [(1, 1), (1, 2), (2, 2), (3, 2)])
def test_refusal_eval_keeps_loss_grad_norm_and_learning_rate(tmp_path, logging_steps, eval_steps, mask_on):
    steps = 6
    model = tiny_llama(seed=0)
    args = SafetySFTConfig(str(tmp_path / "o"), max_steps=steps, logging_steps=logging_steps, report_to="none",
                           save_strategy="no", safety_mode="freeze", safety_eval_steps=eval_steps,
                           per_device_train_batch_size=2, activation_checkpointing=False)  # fmt: skip
    rates = iter([0.25, 0.5, 0.75, 1.0, 0.0, 0.125])
    trainer = SafetySFTTrainer(model, args=args, train_dataset=_data(), processing_class=tiny_tokenizer(),
                               safety_mask=mask_on(model, {Q0: [0, 5, 77]}, provenance={}),
                               safety_evaluator=lambda m, t: {"refusal_rate": next(rates)})  # fmt: skip
    recorder = _as_integration(trainer, Recorder())
    trainer.train()
    entries = _train_entries(trainer.state.log_history)
    log_steps = sorted(
        set(range(logging_steps, steps + 1, logging_steps)) | set(range(eval_steps, steps + 1, eval_steps))
    )
    assert [h["step"] for h in entries] == log_steps  # one entry per step that logs or evaluates, no extra entry
    for h in entries:
        for key in TRAIN_KEYS:
            assert key in h, f"step {h['step']}: {key} missing from {sorted(h)}"
        assert h["safety/masked_drift"] == 0.0 and h["safety/unmasked_drift"] > 0.0  # frozen vs trained entries
        assert ("safety/refusal_rate" in h) is (h["step"] % eval_steps == 0)
    expected = [0.25, 0.5, 0.75, 1.0, 0.0, 0.125][: steps // eval_steps]
    assert [h["safety/refusal_rate"] for h in entries if "safety/refusal_rate" in h] == expected
    # the integration saw exactly what log_history holds
    assert entries == _train_entries(recorder.seen)


def test_drift_callback_with_plain_trainer_reaches_log_history_and_integrations(tmp_path, mask_on):
    model = tiny_llama(seed=0)
    mask = mask_on(model, {Q0: [0, 5, 77]}, provenance={})
    tok = tiny_tokenizer()
    data = Dataset.from_list([{"input_ids": tok(f"sample {i} text")["input_ids"]} for i in range(8)])

    def collate(rows):
        ids = torch.tensor([r["input_ids"][:8] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(str(tmp_path / "o"), max_steps=4, logging_steps=2, report_to="none", save_strategy="no",
                             per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                             remove_unused_columns=False)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    recorder = _as_integration(trainer, Recorder())
    callback = SafetyDriftCallback(mask, "freeze").attach(trainer)
    assert trainer.callback_handler.callbacks.index(callback) < trainer.callback_handler.callbacks.index(recorder)
    before = model.get_parameter(Q0).detach().clone()
    trainer.train()
    entries = _train_entries(trainer.state.log_history)
    assert [h["step"] for h in entries] == [2, 4]
    after = model.get_parameter(Q0).detach()
    dense = mask.to_dense(Q0)
    # the logged numbers match the formula on the weights themselves (no freezing here: the masked entries moved too)
    expected_unmasked = float((after - before)[~dense].norm() / before[~dense].norm())
    expected_masked = float((after - before)[dense].norm() / before[dense].norm())
    last = entries[-1]
    for key in TRAIN_KEYS:
        assert key in last
    assert last["safety/unmasked_drift"] == pytest.approx(expected_unmasked, rel=1e-5)
    assert last["safety/masked_drift"] == pytest.approx(expected_masked, rel=1e-5)
    assert last["safety/violations"] == 3.0  # the masked entries moved in "freeze" mode: counted, not hidden
    assert _train_entries(recorder.seen) == entries


def test_refusal_callback_with_plain_trainer(tmp_path):
    model = tiny_llama(seed=0)
    tok = tiny_tokenizer()
    data = Dataset.from_list([{"input_ids": tok(f"sample {i} text")["input_ids"]} for i in range(8)])

    def collate(rows):
        ids = torch.tensor([r["input_ids"][:8] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    args = TrainingArguments(str(tmp_path / "o"), max_steps=4, logging_steps=4, report_to="none", save_strategy="no",
                             per_device_train_batch_size=2, use_cpu=True, remove_unused_columns=False)  # fmt: skip
    callback = RefusalEvalCallback(lambda m, t: {"refusal_rate": 0.5}, eval_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[callback])
    trainer.train()
    entries = _train_entries(trainer.state.log_history)
    assert [h["step"] for h in entries] == [2, 4]
    assert all(h["safety/refusal_rate"] == 0.5 and all(k in h for k in TRAIN_KEYS) for h in entries)
