"""Choosing the classifier's feature set and example shapes: the tie rule, prompt-grouped folds, the script reads no
validation label (permuting them changes nothing), and the default recipe uses the committed choice."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_judge_{name}_sel", ROOT / "benchmarks" / "judge" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sc = _load("select_classifier")
LABELS = ("refusal", "compliant", "non_answer")


def test_choose_prefers_the_simpler_candidate_within_the_tie():
    assert sc.choose({"f1_s1": 0.80, "f2_s2": 0.804}) == "f1_s1"  # within 0.005: the simpler
    assert sc.choose({"f1_s1": 0.80, "f2_s2": 0.81}) == "f2_s2"
    assert sc.choose({"f2_s1": 0.7, "f1_s2": 0.7}) == "f1_s2"  # CANDIDATES order: (1, 2) before (2, 1)
    with pytest.raises(ValueError, match="at least one"):
        sc.choose({})


def test_prompt_folds_keep_every_answer_to_a_prompt_together():
    items = [{"id": f"{m}-{i}", "prompt": f"prompt {i}"} for m in ("a", "b", "c") for i in range(7)]
    folds = sc.prompt_folds(items, 3)
    by_prompt: dict[str, set[int]] = {}
    for g in items:
        by_prompt.setdefault(g["prompt"], set()).add(folds[g["id"]])
    assert all(len(f) == 1 for f in by_prompt.values()) and set(folds.values()) == {0, 1, 2}
    with pytest.raises(ValueError, match="cannot make 9 folds"):
        sc.prompt_folds(items, 9)


def _pool() -> list[dict]:
    sets = [("harmbench_test", "harmful"), ("harmbench_val", "harmful"), ("benign_requests", "benign")]
    texts = {"refusal": "I cannot help with that request.", "compliant": "Sure: first do this, then that, then finish.",
             "non_answer": "Hello. Hello. Hello. Hello. Hello."}  # fmt: skip
    rng = random.Random(0)
    rows = []
    for source in ("m1", "m2"):
        for name, kind in sets:
            for i in range(6):
                lab = rng.choice(LABELS)
                rows.append({"id": f"{source}-{name}-{i}", "source": source, "prompt_set": name, "kind": kind,
                             "prompt_id": f"{name}-{i}", "prompt": f"{name} question number {i} about topic {i}",
                             "response": texts[lab], "_label": lab})  # fmt: skip
    return rows


def test_selection_reads_no_validation_label(tmp_path, monkeypatch):
    import peft_safety.recipes.judges as rj
    from peft_safety.evaluation.classifier_judge import build_judge_examples

    labelled = [{"prompt": f"Explain how to do harmful thing {i}", "category": f"t{i % 3}",
                 "refusal": "I cannot help with that. It is against the law.",
                 "compliant": f"Step one: gather the materials for thing {i}. Step two: assemble them quickly."}
                for i in range(9)]  # fmt: skip
    benign = [{"prompt": "Why diversify?", "response": "Holding many assets lowers the risk of ruin."}]
    monkeypatch.setattr(rj, "judge_training_examples",
                        lambda *, seed=0, n_fiqa=300, shapes=1, extra_evaluation=None:
                        (build_judge_examples(labelled, benign, seed=seed, shapes=shapes), {}))  # fmt: skip
    monkeypatch.setattr(rj, "_CLASSIFIER_SETTINGS", {**rj._CLASSIFIER_SETTINGS, "hash_bits": 10, "max_iter": 30})
    pool = _pool()
    ag = sc._agreement_module()
    split = ag.split_pool(pool)
    outs = []
    for trial in range(2):
        rng = random.Random(trial)
        res = tmp_path / f"r{trial}"
        res.mkdir()
        (res / "generations.jsonl").write_text("".join(json.dumps({k: v for k, v in g.items() if k != "_label"}) + "\n"
                                                       for g in pool))  # fmt: skip
        labels = []
        for g in pool:  # validation labels differ between the trials; TRAIN labels are the same
            lab = g["_label"] if split[g["id"]] == "train" else rng.choice(LABELS)
            labels.append({"id": g["id"], "label": lab, "explicit_refusal": False})
        (res / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels))
        assert sc.main(["--results", str(res), "--folds", "2"]) == 0
        out = json.loads((res / "selection.json").read_text())
        outs.append({k: v for k, v in out.items() if k not in ("seconds_total",)})
        for c in outs[-1]["candidates"].values():
            c.pop("seconds")
    assert outs[0] == outs[1]
    n_train = sum(split[g["id"]] == "train" for g in pool)
    assert outs[0]["n_train_items"] == n_train and outs[0]["validation_labels_read"] is False


def test_default_recipe_uses_the_committed_choice():
    from peft_safety.recipes.judges import _CLASSIFIER_SETTINGS

    chosen = json.loads((ROOT / "benchmarks" / "results" / "judge" / "selection.json").read_text())["chosen"]
    assert {k: _CLASSIFIER_SETTINGS[k] for k in ("features", "shapes")} == chosen["classifier"]
    shipped = ROOT / "benchmarks" / "results" / "judge" / "classifier"
    from peft_safety.evaluation.classifier_judge import ClassifierJudge

    judge = ClassifierJudge.from_pretrained(shipped)
    assert judge.features == chosen["classifier"]["features"]
    assert judge.metadata["settings"]["shapes"] == chosen["classifier"]["shapes"]
