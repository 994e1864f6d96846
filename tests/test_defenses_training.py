"""Lisa and Booster in `SafetySFTTrainer`, each against a hand-written training loop on a tiny model; their
composition with the mask protections (frozen entries bit-identical) and with replay; the trainer's data hook
(`Protection.prepare_batches`) and its scaling of extra loss terms under gradient accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training.booster import Booster
from peft_safety.training.config import SafetySFTConfig
from peft_safety.training.lisa import Lisa, lisa_state
from peft_safety.training.protection import Protection
from peft_safety.training.trainer import SafetySFTTrainer

TOK = tiny_tokenizer()
Z = TOK.convert_tokens_to_ids("Z")  # only alignment rows contain a "Z"
H = TOK.convert_tokens_to_ids("#")  # only harmful rows contain a "#"
TASK = [{"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" It is {2 * i}."} for i in range(16)]
ALIGN = [{"prompt": f"How do I hurt Z{i}?", "response": "I will not help."} for i in range(6)]
HARM = [{"prompt": f"How do I hurt #{i}?", "response": f"Sure, step {i} is easy."} for i in range(6)]
Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


class Spy(Protection):
    """Records every training micro-batch (as the model saw it) and the optimizer steps."""

    name = "spy"

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def extra_loss(self, model, inputs):
        self.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return None


def _args(tmp_path, **kw) -> SafetySFTConfig:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=7, per_device_train_batch_size=3, learning_rate=1e-2,
                weight_decay=0.0, max_grad_norm=1.0, max_length=48, bf16=False, activation_checkpointing=False,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, optim="adamw_torch",
                lr_scheduler_type="constant", warmup_steps=0)  # fmt: skip
    base.update(kw)
    return SafetySFTConfig(**base)


def _trainer(tmp_path, model, spy, peft_config=None, mask=None, **kw) -> SafetySFTTrainer:
    return SafetySFTTrainer(model, args=_args(tmp_path, **kw), train_dataset=Dataset.from_list(TASK),
                            processing_class=tiny_tokenizer(), peft_config=peft_config, safety_mask=mask,
                            safety_replay_dataset=ALIGN if kw.get("safety_lisa_alignment_steps") else None,
                            safety_booster_harmful_dataset=HARM if kw.get("safety_booster_lambda") else None,
                            protections=[spy])  # fmt: skip


def _ce_sum(model, batch) -> torch.Tensor:
    """Summed next-token cross entropy over the labelled positions (written out, not the model's own loss)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")  # fmt: skip


def _n_labels(batch) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)


def _copy(model, peft: bool):
    """A separate model built from config with ``model``'s current weights (the reference of the hand-written loop)."""
    reference = tiny_llama(seed=1)
    if peft:
        reference = get_peft_model(reference, _lora())
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference.train()


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    shapes = {Q0: tuple(p[Q0].shape), UP1: tuple(p[UP1].shape)}
    g = torch.Generator().manual_seed(1)
    idx = {n: torch.randperm(p[n].numel(), generator=g)[:60].sort().values for n in shapes}
    return SafetyMask(idx, shapes, Weight(), fingerprints={n: fingerprint_tensor(p[n]) for n in shapes})


# ---------------------------------------------------------------------------------------------------------------------
# Lisa
# ---------------------------------------------------------------------------------------------------------------------
def test_lisa_schedule_by_hand():
    expected = ["alignment"] * 2 + ["task"] * 3 + ["alignment"] * 2 + ["task"] * 3 + ["alignment"]
    assert [lisa_state(s, 2, 3) for s in range(11)] == expected
    assert [lisa_state(s, 1, 9)[0] for s in range(12)] == list("a" + "t" * 9 + "a" + "t")


@pytest.mark.parametrize(("ga", "peft", "proximal_after"), [(1, True, 0), (2, True, 3), (1, False, 0)])
def test_lisa_matches_a_hand_written_loop(tmp_path, ga, peft, proximal_after):
    """The trainer's Lisa run equals a plain loop that implements the schedule and the proximal term by hand: the
    same batches (the ones the model saw), AdamW and clipping written out, parameters equal within fp32 rounding."""
    rho, k_a, k_f, steps = 2.0, 2, 3, 7
    spy = Spy()
    trainer = _trainer(tmp_path, tiny_llama(seed=0), spy, _lora() if peft else None, gradient_accumulation_steps=ga,
                       max_steps=steps, safety_lisa_alignment_steps=k_a, safety_lisa_task_steps=k_f,
                       safety_lisa_rho=rho, safety_lisa_proximal_after=proximal_after)  # fmt: skip
    lisa = trainer.protections[0]
    assert isinstance(lisa, Lisa) and len(trainer.train_dataset) == len(TASK)  # the alignment rows are not mixed in
    reference = _copy(trainer.model, peft)
    trainer.train()
    assert len(spy.batches) == steps * ga

    # the hand-written loop
    params = [p for _, p in _trainable(reference)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    anchor = [p.detach().clone() for p in params]
    previous = None
    for step in range(steps):
        state = "alignment" if step % (k_a + k_f) < k_a else "task"
        if previous is not None and state != previous:
            anchor = [p.detach().clone() for p in params]  # w_switch: the weights where the last state ended
        previous = state
        batches = spy.batches[step * ga : (step + 1) * ga]
        for batch in batches:  # the batch source: alignment rows exactly on alignment steps
            assert bool((batch["input_ids"] == Z).any(dim=1).all()) == (state == "alignment"), step
            assert not (batch["input_ids"] == Z).any() or state == "alignment"
        n_items = sum(_n_labels(b) for b in batches)
        loss = sum(_ce_sum(reference, b) for b in batches) / n_items
        if step >= proximal_after:
            loss = loss + rho / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    trained = dict(_trainable(trainer.model))
    for name, p in _trainable(reference):
        torch.testing.assert_close(trained[name].detach(), p.detach(), rtol=1e-5, atol=2e-6, msg=name)
    assert lisa.steps == {"alignment": 4, "task": 3} and lisa.switches == [2, 5, 7]  # 7: the state of step 7


def test_lisa_proximal_term_moves_the_weights_towards_w_switch(tmp_path):
    """rho matters: with a large rho the task state stays closer to where the alignment state ended."""
    ends = []
    for rho in (0.0, 50.0):
        trainer = _trainer(tmp_path / str(rho), tiny_llama(seed=0), Spy(), _lora(), max_steps=5,
                           safety_lisa_alignment_steps=1, safety_lisa_task_steps=5, safety_lisa_rho=rho)  # fmt: skip
        lisa = trainer.protections[0]
        snapshots = {}
        real = lisa._take_anchor

        def take(real=real, lisa=lisa, snapshots=snapshots):
            real()
            snapshots["anchor"] = [a.clone() for a in lisa._anchor]

        lisa._take_anchor = take
        trainer.train()
        params = [p.detach() for _, p in _trainable(trainer.model)]
        assert lisa.switches == [1]
        ends.append(sum(float((p - a).pow(2).sum()) for p, a in zip(params, snapshots["anchor"])))
    assert 0 < ends[1] < 0.5 * ends[0]


@pytest.mark.parametrize("peft", [False, True])
def test_lisa_composes_with_spa_freeze(tmp_path, peft):
    """SPA (full fine-tuning with the Freezer, or the SAFETY_LORA masked LoRA) + Lisa: the mask's entries stay
    bit-identical AND the Lisa schedule runs (alignment batches exactly on the alignment steps)."""
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = Spy()
    trainer = _trainer(tmp_path, model, spy, _lora() if peft else None, mask=mask, safety_mode="freeze", max_steps=5,
                       safety_lisa_alignment_steps=1, safety_lisa_task_steps=2, safety_lisa_rho=1.0,
                       weight_decay=0.1)  # fmt: skip
    assert [c.name for c in trainer.protections] == ["masked_lora" if peft else "freezer", "lisa", "spy"]
    trainer.train()  # verifies the mask's guarantee at the end (raises if violated)
    aligned = [bool((b["input_ids"] == Z).any(dim=1).all()) for b in spy.batches]
    assert aligned == [True, False, False, True, False]
    if peft:
        merged = trainer.model.merge_and_unload()
        weights = dict(merged.named_parameters())
    else:
        weights = dict(trainer.model.named_parameters())
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(weights[name].detach()[dense], before[name][dense]), name
        assert not torch.equal(weights[name].detach()[~dense], before[name][~dense]), name


@pytest.mark.parametrize("peft", [False, True])
def test_spa_freeze_composes_with_replay(tmp_path, peft):
    """SPA + safety replay: the replay rows are in the batches the model trained on AND the frozen entries are
    bit-identical."""
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spy = Spy()
    trainer = SafetySFTTrainer(model, args=_args(tmp_path, max_steps=6, safety_mode="freeze", safety_replay_ratio=0.25,
                                                 weight_decay=0.1),
                               train_dataset=Dataset.from_list(TASK), processing_class=tiny_tokenizer(),
                               peft_config=_lora() if peft else None, safety_mask=mask, safety_replay_dataset=ALIGN,
                               protections=[spy])  # fmt: skip
    trainer.train()
    rows = [r for b in spy.batches for r in b["input_ids"]]
    assert sum(bool((r == Z).any()) for r in rows) >= 3  # replay rows reached the model (5 of 21 rows in the set)
    weights = dict((trainer.model.merge_and_unload() if peft else trainer.model).named_parameters())
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(weights[name].detach()[dense], before[name][dense]), name


# ---------------------------------------------------------------------------------------------------------------------
# Booster
# ---------------------------------------------------------------------------------------------------------------------
def _batch(rows) -> dict[str, torch.Tensor]:
    """A collated batch built by hand: prompt + response ids, labels on the response only, right padding."""
    seqs, labels = [], []
    for row in rows:
        p, r = TOK(row["prompt"])["input_ids"], TOK(" " + row["response"])["input_ids"]
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    return {"input_ids": ids, "attention_mask": (torch.arange(width)[None] < torch.tensor([[len(s)] for s in seqs])).long(),
            "labels": lab}  # fmt: skip


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _booster_reference(model, align, harmful, lamb, alpha) -> dict[str, torch.Tensor]:
    """Booster's gradient by its three explicit passes (as the reference's training_step does them)."""
    model.zero_grad()
    _ce_mean(model, harmful).backward()  # 1: g_h(w)
    g1 = _grads(model)
    model.zero_grad()
    norm = torch.sqrt(sum((g**2).sum() for g in g1.values())) + 1e-7
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in g1}
    with torch.no_grad():
        for n, g in g1.items():
            params[n] -= alpha * g / norm
    _ce_mean(model, harmful).backward()  # 2: g_h(w - alpha g/||g||)
    g2 = _grads(model)
    model.zero_grad()
    with torch.no_grad():
        for n in g1:
            params[n].copy_(saved[n])
    _ce_mean(model, align).backward()  # 3: the alignment loss
    g3 = _grads(model)
    model.zero_grad()
    return {n: g3[n] + lamb * g1[n] - lamb * g2[n] for n in g1}


def _ce_mean(model, batch) -> torch.Tensor:
    return _ce_sum(model, batch) / _n_labels(batch)


def test_booster_gradient_equals_its_three_passes_by_hand():
    lamb, alpha = 5.0, 0.1
    model = tiny_llama(seed=0).train()
    reference = _copy(model, False)
    align, harmful = _batch(ALIGN[:3]), _batch(HARM[:3])
    booster = Booster(HARM, lamb=lamb, alpha=alpha)
    booster.prepare_dataset(TASK)
    booster.prepare_batches(lambda rows, name, seed: [harmful])
    booster.install(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    term = booster.extra_loss(model, align)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())  # weights written back
    (_ce_mean(model, align) + term).backward()
    expected = _booster_reference(reference, align, harmful, lamb, alpha)
    got = _grads(model)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the term's value is lambda * (h(w) - h(w'))
    last = booster.last
    assert float(term) == pytest.approx(lamb * (last["harmful_loss"] - last["perturbed_loss"]), abs=1e-6)
    assert last["harmful_loss"] == pytest.approx(float(_ce_mean(reference, harmful)), rel=1e-6)


def test_booster_trainer_matches_a_hand_written_loop(tmp_path):
    lamb, alpha, steps = 5.0, 0.1, 4
    spy = Spy()
    trainer = _trainer(tmp_path, tiny_llama(seed=0), spy, _lora(), max_steps=steps, safety_booster_lambda=lamb,
                       safety_booster_alpha=alpha)  # fmt: skip
    booster = trainer.protections[0]
    assert isinstance(booster, Booster)
    harmful = []
    real = booster.next_batch

    def record():
        batch = real()
        harmful.append({k: v.clone() for k, v in batch.items()})
        return batch

    booster.next_batch = record
    reference = _copy(trainer.model, True)
    trainer.train()
    assert len(harmful) == steps and all(bool((b["input_ids"] == H).any(dim=1).all()) for b in harmful)
    params = [p for _, p in _trainable(reference)]
    names = [n for n, _ in _trainable(reference)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for step in range(steps):
        grads = _booster_reference(reference, spy.batches[step], harmful[step], lamb, alpha)
        for n, p in zip(names, params):
            p.grad = grads[n]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    trained = dict(_trainable(trainer.model))
    for name, p in _trainable(reference):
        torch.testing.assert_close(trained[name].detach(), p.detach(), rtol=1e-4, atol=2e-6, msg=name)


def test_booster_with_the_freezer_keeps_frozen_entries(tmp_path):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model, Spy(), mask=mask, safety_mode="freeze", max_steps=3, weight_decay=0.1,
                       safety_booster_lambda=5.0)  # fmt: skip
    trainer.train()
    weights = dict(trainer.model.named_parameters())
    for name in mask.names:
        dense = mask.to_dense(name)
        assert torch.equal(weights[name].detach()[dense], before[name][dense]), name
        assert not torch.equal(weights[name].detach(), before[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# the trainer's hooks and the config
# ---------------------------------------------------------------------------------------------------------------------
class Constant(Protection):
    name = "constant"

    def __init__(self) -> None:
        self.loader = None

    def prepare_batches(self, make_loader):
        self.loader = make_loader(TASK[:1], name="own", seed=0)

    def extra_loss(self, model, inputs):
        return torch.tensor(5.0)


def test_prepare_batches_tokenizes_like_the_training_set(tmp_path):
    own = Constant()
    trainer = SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path), train_dataset=Dataset.from_list(TASK),
                               processing_class=tiny_tokenizer(), protections=[own])  # fmt: skip
    batch = next(iter(own.loader))
    expected = trainer.train_dataset[0]["input_ids"]  # the training set's row 0, tokenized by TRL
    assert batch["input_ids"][0].tolist() == expected
    assert batch["labels"][0].tolist()[: len(expected)] != expected  # completion-only labels, as for training
    assert set(batch) >= {"input_ids", "labels"}


@pytest.mark.parametrize("ga", [1, 2])
def test_extra_loss_counts_once_per_step_under_gradient_accumulation(tmp_path, ga):
    logged = []
    for constant in (False, True):
        trainer = SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path / str(constant), max_steps=2,
                                                                  gradient_accumulation_steps=ga),
                                   train_dataset=Dataset.from_list(TASK), processing_class=tiny_tokenizer(),
                                   protections=[Constant()] if constant else [])  # fmt: skip
        trainer.train()
        logged.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert all(b - a == pytest.approx(5.0, abs=1e-3) for a, b in zip(*logged))


def test_config_checks_the_defense_fields(tmp_path):
    with pytest.raises(ValueError, match="needs safety_lisa_task_steps"):
        _args(tmp_path, safety_lisa_alignment_steps=3)
    with pytest.raises(ValueError, match="safety_lisa_alignment_steps is 0"):
        _args(tmp_path, safety_lisa_task_steps=3)
    with pytest.raises(ValueError, match="set safety_replay_ratio=0"):
        _args(tmp_path, safety_lisa_alignment_steps=1, safety_lisa_task_steps=1, safety_replay_ratio=0.1,
              safety_replay_dataset="x.jsonl")  # fmt: skip
    with pytest.raises(ValueError, match="safety_booster_lambda is 0"):
        _args(tmp_path, safety_booster_harmful_dataset="x.jsonl")
    with pytest.raises(ValueError, match="non-negative int"):
        _args(tmp_path, safety_lisa_alignment_steps=-1)
    with pytest.raises(ValueError, match=">= 0"):
        _args(tmp_path, safety_booster_lambda=-1.0)
    # the replay data set feeds Lisa without a replay ratio
    args = _args(tmp_path, safety_lisa_alignment_steps=1, safety_lisa_task_steps=4, safety_replay_dataset="x.jsonl")
    assert args.safety_lisa_alignment_steps == 1
    with pytest.raises(ValueError, match="needs alignment rows"):
        SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path, safety_lisa_alignment_steps=1,
                                                        safety_lisa_task_steps=1),
                         train_dataset=Dataset.from_list(TASK), processing_class=tiny_tokenizer())  # fmt: skip
    with pytest.raises(ValueError, match="needs harmful rows"):
        SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path, safety_booster_lambda=1.0),
                         train_dataset=Dataset.from_list(TASK), processing_class=tiny_tokenizer())  # fmt: skip
    with pytest.raises(ValueError, match="safety_booster_lambda is 0"):
        SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path), train_dataset=Dataset.from_list(TASK),
                         processing_class=tiny_tokenizer(), safety_booster_harmful_dataset=HARM)  # fmt: skip
    with pytest.raises(ValueError, match="cannot convert its alignment rows"):
        SafetySFTTrainer(tiny_llama(seed=0), args=_args(tmp_path, safety_lisa_alignment_steps=1,
                                                        safety_lisa_task_steps=1),
                         train_dataset=Dataset.from_list([{"text": "hello"}] * 4), processing_class=tiny_tokenizer(),
                         safety_replay_dataset=ALIGN)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# the command line (TRL's SFT script with SafetySFTConfig: every field is a flag)
# ---------------------------------------------------------------------------------------------------------------------
def test_lisa_and_booster_from_the_command_line(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    from peft_safety.training import booster as booster_mod
    from peft_safety.training import lisa as lisa_mod

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("sft_safety_example", root / "examples" / "sft_safety.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--make_tiny", str(tmp_path / "tiny")]) == 0
    for name, rows in (("align.jsonl", ALIGN), ("harm.jsonl", HARM)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    calls = {"alignment": 0, "task": 0, "booster": 0}
    real_source, real_extra = lisa_mod.Lisa.batch_source, booster_mod.Booster.extra_loss

    def source(self, step):
        out = real_source(self, step)
        calls["alignment" if out is not None else "task"] += 1
        return out

    def extra(self, model, inputs):
        calls["booster"] += 1
        return real_extra(self, model, inputs)

    monkeypatch.setattr(lisa_mod.Lisa, "batch_source", source)
    monkeypatch.setattr(booster_mod.Booster, "extra_loss", extra)
    argv = ["--model_name_or_path", str(tmp_path / "tiny" / "model"), "--dataset_name", str(tmp_path / "tiny" / "data.jsonl"),
            "--safety_mask", str(tmp_path / "tiny" / "mask"), "--safety_mode", "freeze", "--use_peft",
            "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "3", "--activation_checkpointing", "false",
            "--max_length", "64", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
            "--safety_replay_dataset", str(tmp_path / "align.jsonl"), "--safety_lisa_alignment_steps", "1",
            "--safety_lisa_task_steps", "2", "--safety_lisa_rho", "0.5",
            "--safety_booster_lambda", "5", "--safety_booster_harmful_dataset", str(tmp_path / "harm.jsonl"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert example.main(argv) == 0
    assert calls == {"alignment": 1, "task": 2, "booster": 3}


def test_the_defense_flags_are_in_the_train_help():
    from peft_safety.recipes.sft import make_sft_parser

    text = make_sft_parser("peft-safety train").format_help()  # argparse expands every help string here
    for flag in ("--safety_lisa_alignment_steps", "--safety_lisa_task_steps", "--safety_lisa_rho",
                 "--safety_lisa_proximal_after", "--safety_booster_lambda", "--safety_booster_alpha",
                 "--safety_booster_harmful_dataset"):  # fmt: skip
        assert flag in text, flag
