"""Safety replay: exact ratio over the epoch, even spread, format conversion, trainer integration."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from peft_safety.training.replay import mix_replay, replay_count, replay_positions

REFUSALS = [{"prompt": f"harmful {j}", "response": f"I can't help with {j}."} for j in range(3)]


def _task(n: int) -> list[dict]:
    return [{"prompt": f"task {i}", "completion": f" answer {i}"} for i in range(n)]


@pytest.mark.parametrize(("n", "ratio"), [(90, 0.1), (100, 0.25), (7, 0.5), (33, 0.05), (10, 0.0)])
def test_ratio_is_exact_over_the_epoch(n, ratio):
    mixed, flags = mix_replay(_task(n), REFUSALS, ratio, seed=1, return_sources=True)
    r = round(n * ratio / (1 - ratio))  # explicit formula
    assert replay_count(n, ratio) == r
    assert len(mixed) == n + r and sum(flags) == r
    # task rows all present, once, in their order
    assert [row for row, f in zip(mixed, flags) if not f] == _task(n)
    # replay rows are refusal rows, converted to the task format (prompt/completion strings, task's leading space)
    for row, f in zip(mixed, flags):
        if f:
            j = int(row["prompt"].split()[1])
            assert row == {"prompt": f"harmful {j}", "completion": f" I can't help with {j}."}
    if r:
        assert abs(r / (n + r) - ratio) <= 1 / (n + r)


def test_positions_match_a_naive_even_spread():
    total, k = 23, 5
    flags = replay_positions(total, k)
    # naive reference: every prefix of length L holds floor(L * k / total) replay rows
    count = 0
    for i in range(total):
        count += flags[i]
        assert count == math.floor((i + 1) * k / total)
    # never two replay rows closer than floor(total / k) - 1 task rows apart
    pos = [i for i, f in enumerate(flags) if f]
    assert all(b - a >= total // k for a, b in itertools.pairwise(pos))


def test_replay_rows_cycle_through_a_permutation_and_are_seeded():
    mixed, flags = mix_replay(_task(60), REFUSALS, 0.2, seed=3, return_sources=True)
    used = [row["prompt"] for row, f in zip(mixed, flags) if f]
    assert len(used) == 15
    # every block of 3 consecutive replay rows is a permutation of the 3 refusals (no repeats before all are used)
    for b in range(0, 15, 3):
        assert sorted(used[b : b + 3]) == [f"harmful {j}" for j in range(3)]
    assert mix_replay(_task(60), REFUSALS, 0.2, seed=3) == mixed
    assert mix_replay(_task(60), REFUSALS, 0.2, seed=4) != mixed


def test_messages_and_conversational_formats():
    task = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(9)]  # fmt: skip
    replay = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "bad"},
                            {"role": "assistant", "content": "No."}]}]  # fmt: skip
    mixed, flags = mix_replay(task, replay, 0.1, return_sources=True)
    assert sum(flags) == 1
    assert [r for r, f in zip(mixed, flags) if f] == [
        {"messages": [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "No."}]}
    ]
    conv = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "a"}]}
            for i in range(9)]  # fmt: skip
    out, flags = mix_replay(conv, REFUSALS[:1], 0.1, return_sources=True)
    assert [r for r, f in zip(out, flags) if f] == [
        {"prompt": [{"role": "user", "content": "harmful 0"}],
         "completion": [{"role": "assistant", "content": "I can't help with 0."}]}
    ]  # fmt: skip


def test_datasets_stay_datasets():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_task(18))
    out = mix_replay(ds, datasets.Dataset.from_list(REFUSALS), 0.1)
    assert isinstance(out, datasets.Dataset) and len(out) == 20 and out.column_names == ["prompt", "completion"]


def test_errors():
    with pytest.raises(ValueError, match=r"safety_replay_ratio must be in \[0, 1\)"):
        mix_replay(_task(3), REFUSALS, 1.0)
    with pytest.raises(ValueError, match="replay data set is empty"):
        mix_replay(_task(10), [], 0.5)
    with pytest.raises(ValueError, match="needs a prompt and a response"):
        mix_replay(_task(10), [{"prompt": "only a prompt"}], 0.5)
    with pytest.raises(ValueError, match="Cannot mix replay rows into training rows with columns"):
        mix_replay([{"text": "x"}] * 4, REFUSALS, 0.5)
    with pytest.raises(TypeError, match="IterableDataset"):
        mix_replay(iter(_task(3)), REFUSALS, 0.5)


def test_trainer_mixes_replay_rows_into_its_training_set(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset

    from peft_safety.testing import tiny_llama, tiny_tokenizer
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    path = tmp_path / "refusals.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in REFUSALS))
    args = SafetySFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_length=48,
        report_to=[], use_cpu=True, save_strategy="no", bf16=False, safety_replay_dataset=str(path),
        safety_replay_ratio=0.2, seed=0,
    )  # fmt: skip
    tok = tiny_tokenizer()
    trainer = SafetySFTTrainer(tiny_llama(seed=0), args=args, train_dataset=Dataset.from_list(_task(16)),
                               processing_class=tok)  # fmt: skip
    ds = trainer.train_dataset
    assert len(ds) == 20  # 16 task rows + round(16 * 0.2 / 0.8) = 4 replay rows
    texts = [tok.decode(ids) for ids in ds["input_ids"]]
    assert sum("harmful" in t for t in texts) == 4
    trainer.train()
    # rows given directly override the config's file
    trainer2 = SafetySFTTrainer(tiny_llama(seed=0), args=args, train_dataset=Dataset.from_list(_task(16)),
                                processing_class=tok, safety_replay_dataset=REFUSALS[:1])  # fmt: skip
    texts = [tok.decode(ids) for ids in trainer2.train_dataset["input_ids"]]
    assert sum("harmful 0" in t for t in texts) == 4


def test_config_validates_replay_fields(tmp_path):
    pytest.importorskip("trl")
    from peft_safety.training.config import SafetySFTConfig

    with pytest.raises(ValueError, match=r"safety_replay_ratio=1\.5 must be in \[0, 1\)"):
        SafetySFTConfig(output_dir=str(tmp_path), safety_replay_ratio=1.5, report_to=[])
    with pytest.raises(ValueError, match="safety_replay_ratio is 0"):
        SafetySFTConfig(output_dir=str(tmp_path), safety_replay_dataset="x.jsonl", report_to=[])
