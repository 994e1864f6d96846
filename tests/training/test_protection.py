"""The protection interface: every implementation installs, verifies and removes cleanly, and the trainer runs a list
of them (composition) through every hook of the protocol."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("trl")
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.adapters import MaskedLora, SetAdapter, mask_protection
from peft_safety.training.apply import apply_mask_
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.freeze import Freezer
from peft_safety.training.protection import FreezeReport, FreezeViolationError, Protection
from peft_safety.training.replay import SafetyReplay
from peft_safety.training.trainer import SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"
O1 = "model.layers.1.self_attn.o_proj.weight"


#: one unit of each granularity, on the weights of two layers
MIXED = {
    Q0: ([0, 3, 33, 100, 500], Weight()),
    V1: ([1, 4], Neuron(axis=0)),
    DOWN0: ([2, 17], Neuron(axis=1)),
    O1: ([0], Layer()),
}


def _dense(mask: SafetyMask, name: str) -> torch.Tensor:
    """The mask of one parameter built from its indices by hand (independent of ``to_dense``)."""
    rows, cols = mask.shapes[name]
    out = torch.zeros(rows, cols, dtype=torch.bool)
    gran, idx = mask.granularity_of(name), mask[name].tolist()
    if isinstance(gran, Layer):
        out[:] = True
    elif isinstance(gran, Neuron):
        if gran.axis == 0:
            out[idx, :] = True
        else:
            out[:, idx] = True
    else:
        for i in idx:
            out[i // cols, i % cols] = True
    return out


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 3) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(6, 128, (2, 10), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()


def _hooks(model: nn.Module) -> int:
    """Gradient and forward hooks registered anywhere on the model."""
    grad = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
               for p in model.parameters())  # fmt: skip
    return grad + sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# each implementation alone
# ---------------------------------------------------------------------------------------------------------------------
def test_freezer_installs_verifies_removes(mask_on):
    model = tiny_llama(seed=0)
    mask = mask_on(model, MIXED, provenance={"method": "test"})
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    freezer = Freezer(mask, "freeze", log_drift=True)
    assert isinstance(freezer, Protection)
    assert freezer.prepare_model(model, "cfg") == (model, "cfg")
    assert not params[O1].requires_grad  # a Layer() entry: out of the optimizer before it exists
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert freezer.install(model, optimizer) is freezer
    assert _hooks(model) == 3  # Q0, V1, DOWN0 (O1 is switched off: a checksum, no hook)
    _steps(model, optimizer)
    report = freezer.verify()
    expected = sum(int(_dense(mask, n).sum()) for n in mask.shapes)
    assert isinstance(report, FreezeReport) and report.ok and report.checked_entries == expected
    for n in mask.shapes:
        assert torch.equal(params[n].detach()[_dense(mask, n)], before[n][_dense(mask, n)]), n
    metrics = freezer.metrics()
    assert metrics["safety/frozen_entries"] == expected and metrics["safety/masked_drift"] == 0.0
    assert metrics["safety/unmasked_drift"] > 0
    assert freezer.state()["protection"] == "freezer"
    freezer.remove()
    assert _hooks(model) == 0 and not optimizer._optimizer_step_post_hooks
    assert all(p.requires_grad for p in model.parameters())  # O1 given back
    assert freezer.metrics() == {}
    freezer.remove()  # twice is fine
    # apply_mask_ is prepare_model + install, and returns this protection
    with apply_mask_(model, mask, "freeze", fingerprint_check="ignore") as handle:  # the weights trained above
        assert isinstance(handle, Freezer) and not params[O1].requires_grad
    assert params[O1].requires_grad


def test_freezer_verify_catches_a_moved_entry(mask_on):
    model = tiny_llama(seed=0)
    freezer = Freezer(mask_on(model, MIXED, provenance={"method": "test"}), "freeze")
    freezer.prepare_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with freezer.install(model, optimizer):
        with torch.no_grad():
            dict(model.named_parameters())[Q0].view(-1)[33] += 1.0
        with pytest.raises(FreezeViolationError, match="1 of"):
            freezer.verify()
        assert freezer.verify(strict=False).changed == {Q0: 1}


def _effective_update_leak(module: nn.Module) -> None:
    """Make an adapted layer's forward leak: add a constant to its output (its merge helper is untouched)."""
    module.register_forward_hook(lambda _m, _args, out: out + 1e-3)


def test_set_adapter_installs_verifies_removes(mask_on):
    model = tiny_llama(seed=0)
    mask = mask_on(model, MIXED, provenance={"method": "test"}).restrict([Q0, V1, DOWN0])
    set_ = SetAdapter(mask)
    same, cfg = set_.prepare_model(model, None)
    assert same is model and cfg.mask is mask and type(cfg).__name__ == "SafetyConfig"
    peft_model = get_peft_model(model, cfg)  # what TRL does with the returned config
    set_.on_wrapped(peft_model)
    hooks = _hooks(peft_model)
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    set_.install(peft_model, optimizer)
    _steps(peft_model, optimizer)
    report = set_.verify()
    # SET keeps everything outside the mask: the covered entries minus the mask's
    outside = sum(_dense(mask, n).numel() - int(_dense(mask, n).sum()) for n in mask.shapes)
    assert report.ok and report.checked_entries == outside
    assert report.metrics["safety/violations"] == 0 and report.metrics["safety/masked_drift"] > 0
    assert set(set_.metrics()) == set()  # drift logging is off unless asked
    set_.remove()
    assert _hooks(peft_model) == hooks and grads == {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert set_.verify().ok  # the adapted model stays checkable after training
    _effective_update_leak(peft_model.base_model.model.model.layers[0].self_attn.q_proj)
    with pytest.raises(FreezeViolationError, match="entries that must stay unchanged moved"):
        set_.verify()


def test_masked_lora_installs_verifies_removes(mask_on):
    model = tiny_llama(seed=0)
    mask = mask_on(model, MIXED, provenance={"method": "test"}).restrict([Q0, V1])
    lora = MaskedLora(mask, log_drift=True)
    peft_model, cfg = lora.prepare_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert cfg is None and peft_model.peft_config["default"].peft_type == "SAFETY_LORA"
    hooks = _hooks(peft_model)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    lora.install(peft_model, optimizer)
    _steps(peft_model, optimizer)
    report = lora.verify()
    assert report.ok and report.checked_entries == sum(int(_dense(mask, n).sum()) for n in mask.shapes)
    assert lora.metrics()["safety/masked_drift"] == 0.0 and lora.metrics()["safety/unmasked_drift"] > 0
    lora.remove()
    assert _hooks(peft_model) == hooks
    _effective_update_leak(peft_model.base_model.model.model.layers[1].self_attn.v_proj)
    report = lora.verify(strict=False)
    assert report.changed == {V1: int(_dense(mask, V1).sum())}
    with pytest.raises(FreezeViolationError):
        lora.verify()


def test_mask_protection_table(mask_on):
    from peft_safety.tuner import SafetyConfig

    model = tiny_llama(seed=0)
    mask = mask_on(model, MIXED, provenance={"method": "test"})
    full = SafetySFTConfig(output_dir="x", report_to=[], use_cpu=True, safety_train_only_full_weights=True)
    assert type(mask_protection(mask, "train_only")) is SetAdapter
    assert type(mask_protection(mask, "train_only", SafetyConfig(mask=mask))) is SetAdapter
    assert type(mask_protection(mask, "train_only", None, full)) is Freezer
    assert mask_protection(mask, "train_only", None, full).mode == "train_only"
    assert type(mask_protection(mask, "freeze")) is Freezer
    assert type(mask_protection(mask, "freeze", LoraConfig(r=2))) is MaskedLora
    with pytest.raises(ValueError, match="LoRA cannot express"):
        mask_protection(mask, "train_only", LoraConfig(r=2))
    with pytest.raises(ValueError, match="cannot freeze them"):
        mask_protection(mask, "freeze", SafetyConfig(mask=mask))


def test_replay_protection_mixes_rows():
    task = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(12)]
    args = SafetySFTConfig(output_dir="x", report_to=[], use_cpu=True, safety_replay_ratio=0.25, seed=3)
    replay = SafetyReplay([{"prompt": "bad", "response": "No."}])
    mixed = replay.prepare_dataset(task, args)
    assert len(mixed) == 16 and sum(r["prompt"] == "bad" for r in mixed) == 4  # round(12 * 0.25 / 0.75)
    assert replay.state() == {"protection": "replay", "replay_rows": 4}
    assert SafetyReplay().prepare_dataset(task, SafetySFTConfig(output_dir="x", report_to=[], use_cpu=True)) is task


# ---------------------------------------------------------------------------------------------------------------------
# composition in the trainer: every hook, in order
# ---------------------------------------------------------------------------------------------------------------------
class Recorder(Protection):
    """A protection that records every hook call, adds a constant to the loss and feeds its own batch on even steps."""

    name = "recorder"

    def __init__(self, special: dict[str, torch.Tensor] | None = None, constant: float = 0.0) -> None:
        self.calls: list[tuple] = []
        self.special, self.constant = special, constant
        self.seen: list[torch.Tensor] = []

    def prepare_dataset(self, train_dataset, args=None):
        self.calls.append(("prepare_dataset", len(train_dataset)))
        return train_dataset

    def prepare_model(self, model, peft_config=None, args=None):
        self.calls.append(("prepare_model", type(model).__name__))
        return model, peft_config

    def on_wrapped(self, model):
        self.calls.append(("on_wrapped",))

    def install(self, model, optimizer=None):
        self.calls.append(("install", optimizer is not None))
        return self

    def batch_source(self, step):
        self.calls.append(("batch_source", step))
        if self.special is not None and step % 2 == 0:
            return iter([dict(self.special)])
        return None

    def extra_loss(self, model, inputs):
        self.seen.append(inputs["input_ids"].detach().clone())
        return torch.tensor(self.constant)

    def before_clip(self, model):
        self.calls.append(("before_clip",))

    def after_optimizer_step(self, step):
        self.calls.append(("after_optimizer_step", step))

    def metrics(self):
        return {"safety/recorder": 7.0}

    def verify(self, *, strict=True):
        self.calls.append(("verify",))
        return FreezeReport(checked_entries=5)

    def save_pretrained(self, folder):
        self.calls.append(("save_pretrained",))

    def remove(self):
        self.calls.append(("remove",))


def _trainer(tmp_path, model, protections, **kw) -> SafetySFTTrainer:
    rows = [{"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" It is {2 * i}."} for i in range(12)]
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, max_grad_norm=0.5, max_length=48, bf16=False, activation_checkpointing=False,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)  # fmt: skip
    base.update(kw)
    return SafetySFTTrainer(model, args=SafetySFTConfig(**base), train_dataset=Dataset.from_list(rows),
                            processing_class=tiny_tokenizer(), protections=protections)  # fmt: skip


def test_trainer_runs_a_list_of_protections(tmp_path, mask_on):
    model = tiny_llama(seed=0)
    mask = mask_on(model, MIXED, provenance={"method": "test"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder = Recorder()
    replay_rows = [{"prompt": "How do I hurt someone?", "response": "I can't help with that."}]
    trainer = SafetySFTTrainer(
        model,
        args=SafetySFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, max_length=48, bf16=False,
                             activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, safety_mode="freeze", safety_replay_ratio=0.25),
        train_dataset=Dataset.from_list([{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(12)]),
        processing_class=tiny_tokenizer(),
        safety_mask=mask,
        safety_replay_dataset=replay_rows,
        protections=[recorder],
    )  # fmt: skip
    assert [c.name for c in trainer.protections] == ["replay", "freezer", "recorder"]
    assert len(trainer.train_dataset) == 16  # the replay protection ran first: 12 + 4 rows
    assert recorder.calls == [("prepare_dataset", 16), ("prepare_model", "LlamaForCausalLM"), ("on_wrapped",)]
    trainer.train()
    calls = [c[0] for c in recorder.calls[3:]]
    assert calls[0] == "install" and recorder.calls[3] == ("install", True)
    per_step = [c for c in recorder.calls[4:] if c[0] in ("batch_source", "before_clip", "after_optimizer_step")]
    assert per_step == [
        ("batch_source", 0), ("before_clip",), ("after_optimizer_step", 1),
        ("batch_source", 1), ("before_clip",), ("after_optimizer_step", 2),
        ("batch_source", 2), ("before_clip",), ("after_optimizer_step", 3),
    ]  # fmt: skip
    assert calls[-2:] == ["verify", "remove"]
    assert len(recorder.seen) == 3  # extra_loss: one call per micro-batch, training only
    # the Freezer composed with the others: the mask's entries never moved, the rest did
    for name, p in trainer.model.named_parameters():
        if name in mask.shapes:
            dense = _dense(mask, name)
            assert torch.equal(p.detach()[dense], before[name][dense]), name
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["safety/recorder"] == 7.0 and h["safety/frozen_entries"] == mask.numel() for h in logs)
    assert trainer.freezer is None and all(p.requires_grad for p in trainer.model.parameters())
    trainer.save_model()
    assert ("save_pretrained",) in recorder.calls and (tmp_path / "out" / "safety_mask.safetensors").is_file()


def test_extra_loss_is_added_to_the_training_loss(tmp_path):
    losses = []
    for constant in (0.0, 5.0):
        trainer = _trainer(tmp_path / str(constant), tiny_llama(seed=0), [Recorder(constant=constant)])
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    # a constant has no gradient: the runs are identical except for the logged loss, 5 higher at every step
    assert len(losses[0]) == 3
    assert all(abs((b - a) - 5.0) < 1e-3 for a, b in zip(*losses))


def test_batch_source_replaces_the_step_batches(tmp_path):
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("zzzz zzzz zzzz")["input_ids"]] * 4)
    special = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    recorder = Recorder(special=special)
    trainer = _trainer(tmp_path, tiny_llama(seed=0), [recorder])
    trainer.train()
    used = [torch.equal(seen, ids) for seen in recorder.seen]
    assert used == [True, False, True]  # steps 0 and 2 drew from the protection, step 1 from the training set


def test_protections_must_be_protections_and_their_checks_add_up(tmp_path):
    with pytest.raises(TypeError, match="protections must be Protection objects"):
        _trainer(tmp_path, tiny_llama(seed=0), [object()])
    trainer = _trainer(tmp_path, tiny_llama(seed=0), [Recorder(), Recorder()])
    assert trainer.verify_safety() == {"checked_entries": 10}  # 5 entries checked by each
