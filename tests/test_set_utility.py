"""Utility-aware SET: the utility ratio, the self-distilled rows and the KL term, checked against independent references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset

from peft_safety.evaluation.judges import Verdict
from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training import SafetySFTConfig, SafetySFTTrainer, SafetyUtility
from peft_safety.training.utility import kl_to_base, mix_utility, parse_utility_source, self_distilled_rows

Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    names = (Q0, V1)
    return SafetyMask(
        indices={Q0: list(range(0, 900, 7)), V1: list(range(1, 500, 5))},
        shapes={n: tuple(p[n].shape) for n in names},
        granularity={n: Weight() for n in names},
        fingerprints={n: fingerprint_tensor(p[n]) for n in names},
    )


def _refusals(n: int) -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"harm {i} how", "completion": " I cannot help with that."} for i in range(n)]  # standard rows
    )


def _utility(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"util {i} please", "response": f"Sure, here is {i}."} for i in range(n)]


def _args(tmp_path, **kw) -> SafetySFTConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, bf16=False,
        max_length=48, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        safety_mode="train_only", safety_log_drift=False,
    )  # fmt: skip
    base.update(kw)
    return SafetySFTConfig(**base)


# ------------------------------------------------------------------------------------------------ the ratio
@pytest.mark.parametrize("n_train,ratio", [(10, 1.0), (10, 0.3), (7, 2.0), (9, 0.25), (12, 1.5)])
def test_mix_utility_count_and_spread(n_train, ratio):
    train = [{"prompt": f"t{i}", "completion": f" a{i}"} for i in range(n_train)]
    mixed, flags = mix_utility(train, _utility(5), ratio, seed=3, return_sources=True)
    expected = math.floor(n_train * ratio + 0.5)  # none of these products ends in .5
    assert sum(flags) == expected and len(mixed) == n_train + expected
    # the task rows keep their order; utility rows are evenly spread: every prefix holds floor(len * n / T) of them
    assert [r["prompt"] for r, f in zip(mixed, flags) if not f] == [f"t{i}" for i in range(n_train)]
    total = len(mixed)
    for length in range(total + 1):
        assert sum(flags[:length]) == (length * expected) // total
    # every utility row is used before any repeats (whole permutations)
    util = [r["prompt"] for r, f in zip(mixed, flags) if f]
    for start in range(0, len(util) - len(util) % 5, 5):
        assert sorted(util[start : start + 5]) == sorted(f"util {i} please" for i in range(5))
    # converted to the task's standard format (separator kept)
    assert all(r["completion"].startswith(" Sure") for r, f in zip(mixed, flags) if f)


def test_trainer_mixes_ratio_times_rows(tmp_path):
    """The trainer's training set holds round(ratio * N) utility rows: a ratio ignored (or fixed at 1) fails."""
    for ratio, expected in ((2.0, 12), (0.5, 3)):
        model = tiny_llama(seed=0)
        trainer = SafetySFTTrainer(
            model,
            args=_args(tmp_path, safety_utility_ratio=ratio),
            train_dataset=_refusals(6),
            processing_class=tiny_tokenizer(),
            safety_mask=_mask(model),
            safety_utility_dataset=_utility(20),
        )
        prompts = trainer.train_dataset["prompt"]
        assert sum(p.startswith("util ") for p in prompts) == expected
        assert sum(p.startswith("harm ") for p in prompts) == 6
        assert [c.name for c in trainer.protections] == ["set", "utility"]


def test_ratio_zero_is_plain_set(tmp_path):
    model = tiny_llama(seed=0)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_utility_ratio=0.0),
        train_dataset=_refusals(6),
        processing_class=tiny_tokenizer(),
        safety_mask=_mask(model),
    )
    assert [c.name for c in trainer.protections] == ["set"]
    assert len(trainer.train_dataset) == 6


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"safety_utility_ratio": -1.0}, "finite number >= 0"),
        ({"safety_utility_ratio": 0.0, "safety_kl_weight": 1.0}, "safety_utility_ratio is 0"),
        ({"safety_utility_ratio": 0.0, "safety_utility_dataset": "forgelm_chat"}, "safety_utility_ratio is 0"),
        ({"safety_mode": "freeze", "safety_utility_ratio": 1.0}, "train_only"),
        ({"safety_mode": "freeze", "safety_kl_weight": 0.5}, "train_only"),
        ({"safety_kl_weight": -0.1}, "finite number >= 0"),
        ({"safety_utility_max_new_tokens": 0}, "positive int"),
    ],
)
def test_config_rejects_bad_utility_fields(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


def test_parse_utility_source():
    assert parse_utility_source("self") == ("self", ["forgelm_chat", "fiqa"])
    assert parse_utility_source("self:a.jsonl, b") == ("self", ["a.jsonl", "b"])
    assert parse_utility_source("forgelm_chat") == ("rows", "forgelm_chat")
    with pytest.raises(ValueError, match="self:NAME"):
        parse_utility_source("self:")


# ------------------------------------------------------------------------------------------------ self-distillation
class _EveryOther:
    """A judge that calls the answer to every prompt containing 'refuse' a refusal."""

    name = "test"

    def judge(self, prompts, responses):
        return [Verdict(refused="refuse" in p) for p in prompts]


def test_self_distilled_rows_are_greedy_answers_minus_refusals():
    model, tok = tiny_llama(seed=1), tiny_tokenizer()
    prompts = [f"refuse {i}" if i % 2 else f"answer {i}" for i in range(8)]
    rows, info = self_distilled_rows(model, tok, prompts, n=3, template="chat", max_new_tokens=6, judge=_EveryOther())
    assert len(rows) == 3 and all(r["prompt"].startswith("answer") for r in rows)
    assert info["generated"] == 8 and info["dropped_refusal"] == 4
    # independent reference: plain greedy decoding with generate() on the chat-rendered prompt
    for row in rows:
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert row["response"] == answer or answer.startswith(row["response"])
    model.train()  # the train/eval state is given back
    self_distilled_rows(model, tok, prompts[:2], n=1, template="chat", max_new_tokens=2, judge=_EveryOther())
    assert model.training


def test_self_distilled_rows_error_when_all_refused():
    with pytest.raises(ValueError, match="safety_utility_ratio=0"):
        self_distilled_rows(tiny_llama(), tiny_tokenizer(), ["refuse a", "refuse b"], n=2, max_new_tokens=2,
                            judge=_EveryOther())  # fmt: skip


def test_default_train_only_uses_self_answers(tmp_path):
    """With safety_mode='train_only' and no ratio, utility rows are the model's own answers (1 per refusal row)."""
    model = tiny_llama(seed=0)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_utility_max_new_tokens=4),
        train_dataset=_refusals(5),
        processing_class=tiny_tokenizer(),
        safety_mask=_mask(model),
    )
    utility = trainer.protections[1]
    assert utility.auto and utility.info["source"] == "self:forgelm_chat,fiqa"
    assert utility.info["utility_rows"] == 5 and utility.model is None  # no reference to the base kept


def test_default_off_for_text_rows_with_warning(tmp_path, caplog):
    model = tiny_llama(seed=0)
    mask = _mask(model)
    with caplog.at_level("WARNING"):
        trainer = SafetySFTTrainer(
            model,
            args=_args(tmp_path, dataset_text_field="text"),
            train_dataset=Dataset.from_list([{"text": f"row {i}"} for i in range(4)]),
            processing_class=tiny_tokenizer(),
            safety_mask=mask,
        )
    assert not trainer.protections[1].enabled and "is off for this run" in caplog.text
    with pytest.raises(ValueError, match=r"safety_utility_ratio=1\.0"):
        SafetySFTTrainer(
            tiny_llama(seed=0),
            args=_args(tmp_path, safety_utility_ratio=1.0),
            train_dataset=Dataset.from_list([{"text": f"row {i}"} for i in range(4)]),
            processing_class=tiny_tokenizer(),
            safety_mask=mask,
            safety_utility_dataset=_utility(3),
        )


# ------------------------------------------------------------------------------------------------ the KL term
def _kl_reference(logits: torch.Tensor, base: torch.Tensor, labels: torch.Tensor) -> float:
    """KL(p_base || p_model) per answer token, averaged, in fp64 with explicit loops."""
    logits, base = logits.double(), base.double()
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            pm = torch.exp(logits[b, t] - logits[b, t].max())
            pm = pm / pm.sum()
            pb = torch.exp(base[b, t] - base[b, t].max())
            pb = pb / pb.sum()
            total += float((pb * (pb.log() - pm.log())).sum())
            count += 1
    return total / count


def test_kl_to_base_matches_fp64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    base = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100
    labels[2, 5:] = -100
    got = float(kl_to_base(logits, base, labels))
    assert got == pytest.approx(_kl_reference(logits, base, labels), rel=1e-5, abs=1e-7)
    assert float(kl_to_base(base, base, labels)) == pytest.approx(0.0, abs=1e-6)
    # direction matters: KL(base || model) != KL(model || base) here
    assert abs(got - float(kl_to_base(base, logits, labels))) > 1e-3


def test_trainer_loss_includes_weighted_kl(tmp_path):
    """compute_loss(with KL) - compute_loss(without) == weight * KL(base || model) on the utility batch, the base being
    an untouched copy of the model: a KL term dropped, mis-weighted or measured against the wrong model fails."""
    model = tiny_llama(seed=0)
    base_copy = copy.deepcopy(model)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_utility_ratio=1.0, safety_kl_weight=2.5),
        train_dataset=_refusals(4),
        processing_class=tiny_tokenizer(),
        safety_mask=_mask(model),
        safety_utility_dataset=_utility(6),
    )
    net = trainer.model
    with torch.no_grad():  # move the SET deltas away from zero so that the KL is not trivially 0
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    utility = trainer.protections[1]
    batch = next(iter(utility.loader))
    utility.next_batch = lambda: batch  # the same utility batch for both computations
    inputs = next(iter(trainer.get_train_dataloader()))
    net.train()
    with_kl = trainer.compute_loss(net, dict(inputs))
    utility.kl_weight = 0.0
    without = trainer.compute_loss(net, dict(inputs))
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    with torch.no_grad():
        logits = net(**kwargs).logits
        base_logits = base_copy(**kwargs).logits
    ref = _kl_reference(logits, base_logits, batch["labels"])
    assert ref > 1e-4
    assert float(with_kl - without) == pytest.approx(2.5 * ref, rel=1e-4)
    # and it has a gradient on the SET entries
    utility.kl_weight = 2.5
    net.zero_grad()
    utility.extra_loss(net, inputs).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_kl_needs_an_adapter(tmp_path):
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="no adapter"):
        SafetySFTTrainer(
            model,
            args=_args(tmp_path, safety_utility_ratio=1.0, safety_kl_weight=1.0, safety_train_only_full_weights=True),
            train_dataset=_refusals(4),
            processing_class=tiny_tokenizer(),
            safety_mask=_mask(model),
            safety_utility_dataset=_utility(4),
        )


def test_set_with_utility_trains_and_verifies(tmp_path):
    """A short run with utility rows and KL: only the mask's entries move (the SET guarantee still holds)."""
    model = tiny_llama(seed=0)
    trainer = SafetySFTTrainer(
        model,
        args=_args(tmp_path, safety_utility_ratio=1.0, safety_kl_weight=1.0, max_steps=3),
        train_dataset=_refusals(6),
        processing_class=tiny_tokenizer(),
        safety_mask=_mask(model),
        safety_utility_dataset=_utility(6),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("safety/utility_kl" in h for h in logs) and logs[-1]["safety/utility_kl"] > 0
    assert isinstance(trainer.protections[1], SafetyUtility)


def test_train_cli_has_the_utility_flags():
    from peft_safety.recipes.sft import make_sft_parser, parse_sft_args

    text = make_sft_parser("peft-safety train").format_help()
    for flag in ("--safety_utility_ratio", "--safety_utility_dataset", "--safety_kl_weight",
                 "--safety_utility_max_new_tokens"):  # fmt: skip
        assert flag in text
    _, training_args, _, _ = parse_sft_args(
        [
            "--model_name_or_path",
            "m",
            "--dataset_name",
            "d.jsonl",
            "--output_dir",
            "o",
            "--safety_mode",
            "train_only",
            "--safety_utility_ratio",
            "2",
            "--safety_kl_weight",
            "0.5",
            "--safety_utility_dataset",
            "self:forgelm_chat",
            "--use_cpu",
            "true",
        ]
    )
    assert training_args.safety_utility_ratio == 2.0 and training_args.safety_kl_weight == 0.5
    assert training_args.safety_utility_dataset == "self:forgelm_chat"
