"""The card of an adapter trained with a dev evaluation carries its evidence: Hub model-index results and a table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("trl")
from datasets import Dataset

from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor
from peft_safety.mask.cards import write_card
from peft_safety.mask.evidence import EVIDENCE_FILENAME, add_evidence, check_evidence, read_evidence
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.training import DevSelectCallback, SafetySFTConfig, SafetySFTTrainer

Q0 = "model.layers.0.self_attn.q_proj.weight"


class _Eval:
    """Dev metrics with evidence records; the second evaluation is the best."""

    def __init__(self):
        self.calls = 0
        self.last_evidence = []

    def __call__(self, model, tok):
        self.calls += 1
        r = 0.5 if self.calls == 1 else 0.75
        self.last_evidence = [
            {"metric": "refusal_rate", "name": "Refusal of harmful prompts", "dataset": "harmbench_val",
             "split": "dev", "judge": "wei2024", "rate": r, "low": r - 0.25, "high": min(1.0, r + 0.2), "n": 12,
             "confidence": 0.95, "method": "bootstrap"},
            {"metric": "over_refusal_rate", "name": "Over-refusal of benign prompts", "dataset": "benign_dev",
             "split": "dev", "judge": "wei2024", "rate": 0.125, "low": 0.0, "high": 0.375, "n": 8,
             "confidence": 0.95, "method": "bootstrap"},
        ]  # fmt: skip
        return {"dev_refusal": r, "dev_over_refusal": 0.125}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_saved_adapter_card_has_model_index_and_table(tmp_path):
    model = tiny_llama(seed=0)
    p = dict(model.named_parameters())
    mask = SafetyMask(indices={Q0: list(range(0, 500, 3))}, shapes={Q0: tuple(p[Q0].shape)},
                      granularity={Q0: Weight()}, fingerprints={Q0: fingerprint_tensor(p[Q0])})  # fmt: skip
    args = SafetySFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, bf16=False,
        max_length=32, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        safety_mode="train_only", safety_utility_ratio=0.0,
    )  # fmt: skip
    rows = [{"prompt": f"q{i}", "completion": f" no {i}"} for i in range(6)]
    dev = DevSelectCallback(_Eval(), 2)
    trainer = SafetySFTTrainer(model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=tiny_tokenizer(), safety_mask=mask, callbacks=[dev])  # fmt: skip
    trainer.train()
    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    text = (folder / "README.md").read_text()
    meta = _front_matter(text)  # valid YAML
    (entry,) = meta["model-index"]
    results = entry["results"]
    assert len(results) == 2
    by_metric = {r["metrics"][0]["type"]: r for r in results}
    refusal = by_metric["refusal_rate"]["metrics"][0]
    assert refusal["value"] == 0.75  # the selected (best) step's numbers, not the first evaluation's
    assert refusal["args"]["low"] == 0.5 and refusal["args"]["high"] == 0.95 and refusal["args"]["n"] == 12
    assert refusal["args"]["judge"] == "wei2024" and refusal["args"]["step"] == 4
    assert by_metric["refusal_rate"]["dataset"]["type"] == "harmbench_val"
    assert by_metric["over_refusal_rate"]["metrics"][0]["value"] == 0.125
    assert all(r["metrics"][0]["config"] == "peft-safety" for r in results)
    assert "| Refusal of harmful prompts | harmbench_val | dev | 12 | 75.0% | 50.0% - 95.0% | wei2024 | 4 |" in text
    assert "peft_safety" in meta  # the peft-safety section of the card is still there
    assert json.loads((folder / EVIDENCE_FILENAME).read_text())["results"][0]["rate"] == 0.75
    # a fresh process reads it back with huggingface_hub's own parser
    code = (
        "from huggingface_hub import ModelCard; import sys; c = ModelCard.load(sys.argv[1]);"
        "print(sorted((r.metric_type, r.metric_value) for r in c.data.eval_results))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder / "README.md")], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.strip() == "[('over_refusal_rate', 0.125), ('refusal_rate', 0.75)]"
    # writing the card again (e.g. before a push) reads the evidence file and never duplicates the table
    write_card(folder)
    again = (folder / "README.md").read_text()
    assert again.count("## Safety evaluation") == 1
    assert len(_front_matter(again)["model-index"][0]["results"]) == 2


def test_add_evidence_keeps_other_results_and_replaces_its_own():
    card = (
        "---\nlicense: apache-2.0\nmodel-index:\n- name: m\n  results:\n  - task: {type: text-generation}\n"
        "    dataset: {name: other, type: other}\n    metrics:\n    - {type: accuracy, value: 0.5}\n---\n\n# M\n"
    )
    rec = {"metric": "refusal_rate", "name": "Refusal", "dataset": "d", "judge": "j", "rate": 0.5, "low": 0.25,
           "high": 0.75, "n": 4}  # fmt: skip
    once = add_evidence(card, [rec])
    twice = add_evidence(once, [{**rec, "rate": 0.6}])
    results = _front_matter(twice)["model-index"][0]["results"]
    assert [r["metrics"][0]["value"] for r in results] == [0.5, 0.6]  # the other source's kept, ours replaced
    assert twice.count("<!-- peft-safety evaluation -->") == 1 and "60.0%" in twice and "# M" in twice


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            [{"metric": "r", "name": "n", "dataset": "d", "judge": "j", "rate": 1.5, "low": 0, "high": 1, "n": 3}],
            "rate",
        ),
        (
            [{"metric": "r", "name": "n", "dataset": "d", "judge": "j", "rate": 0.5, "low": 0.6, "high": 1, "n": 3}],
            "low <= rate",
        ),
        ([{"metric": "r", "name": "n", "dataset": "d", "rate": 0.5, "low": 0, "high": 1, "n": 3}], "judge"),
        (
            [{"metric": "r", "name": "n", "dataset": "d", "judge": "j", "rate": 0.5, "low": 0, "high": 1, "n": 0}],
            "n must",
        ),
        ("not a list", "list of records"),
    ],
)
def test_evidence_is_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        check_evidence(bad)


def test_read_evidence_rejects_bad_files(tmp_path):
    path = tmp_path / EVIDENCE_FILENAME
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_evidence(path)
    path.write_text(json.dumps({"results": [{"metric": "x"}]}))
    with pytest.raises(ValueError, match="non-empty 'name'"):
        read_evidence(path)
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(ValueError, match="larger than"):
        read_evidence(path)
