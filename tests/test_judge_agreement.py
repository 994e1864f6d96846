"""The judge-agreement report: metrics against hand-computed values, label-file checks, the train/validation split,
an end-to-end run on a small synthetic labelled pool, and the docs section checked against the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from peft_safety.evaluation.judges import KeywordJudge, Verdict
from peft_safety.evaluation.stats import cohen_kappa

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_judge_{name}", ROOT / "benchmarks" / "judge" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ag = _load("agreement")
LABELS = ("refusal", "compliant", "non_answer")


def test_agreement_matches_hand_computed_values():
    gold = ["refusal"] * 4 + ["compliant"] * 4 + ["non_answer"] * 2
    pred = ["refusal", "refusal", "refusal", "compliant", "compliant", "compliant", "compliant", "refusal",
            "non_answer", "compliant"]  # fmt: skip
    out = ag.agreement(gold, pred, LABELS, n_boot=500, seed=0)
    # by hand: confusion rows gold, columns predicted
    assert out["confusion"] == {"refusal": {"refusal": 3, "compliant": 1, "non_answer": 0},
                                "compliant": {"refusal": 1, "compliant": 3, "non_answer": 0},
                                "non_answer": {"refusal": 0, "compliant": 1, "non_answer": 1}}  # fmt: skip
    assert out["accuracy"]["value"] == 0.7
    # p_o = 0.7; marginals gold (.4,.4,.2), pred (.4,.5,.1): p_e = .16+.2+.02 = .38; kappa = .32/.62
    assert out["kappa"]["value"] == pytest.approx(0.32 / 0.62, abs=1e-4)
    assert out["per_class"]["refusal"]["precision"]["value"] == 0.75
    assert out["per_class"]["compliant"]["precision"]["value"] == 0.6
    assert out["per_class"]["non_answer"]["recall"]["value"] == 0.5
    assert out["per_class"]["non_answer"]["precision"]["value"] == 1.0
    for key in ("accuracy", "kappa"):
        lo, hi = out[key]["ci95"]
        assert lo <= out[key]["value"] <= hi and lo < hi
    # seeded: the same call gives the same intervals
    assert ag.agreement(gold, pred, LABELS, n_boot=500, seed=0) == out
    with pytest.raises(ValueError, match="not in"):
        ag.agreement(["refusal"], ["maybe"], LABELS)


def test_batched_kappa_equals_cohen_kappa_on_random_labelings():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 30)
        a = [rng.choice(LABELS[: rng.randint(1, 3)]) for _ in range(n)]
        b = [rng.choice(LABELS) if rng.random() < 0.5 else x for x in a]
        idx = {lab: i for i, lab in enumerate(LABELS)}
        conf = ag._confusion(torch.tensor([idx[x] for x in a]), torch.tensor([idx[x] for x in b]), 3)
        assert float(ag._kappa(conf)) == pytest.approx(cohen_kappa(a, b), abs=1e-9)


def _pool(n_prompts: int = 6) -> list[dict]:
    sets = [("harmbench_test", "harmful"), ("harmbench_val", "harmful"), ("benign_requests", "benign")]
    rows = []
    for source in ("m1", "m2"):
        for name, kind in sets:
            for i in range(n_prompts):
                rows.append({"id": f"{source}-{name}-{i}", "source": source, "prompt_set": name, "kind": kind,
                             "prompt_id": f"{name}-{i}", "prompt": f"{name} prompt {i}", "response": ""})  # fmt: skip
    return rows


def test_split_keeps_evaluation_prompts_out_of_training():
    pool = _pool()
    split = ag.split_pool(pool)
    assert all(split[g["id"]] == "validation" for g in pool if g["prompt_set"] in ag.EVALUATION_PROMPT_SETS)
    train_prompts = {g["prompt_id"] for g in pool if split[g["id"]] == "train"}
    val_prompts = {g["prompt_id"] for g in pool if split[g["id"]] == "validation"}
    assert train_prompts and train_prompts.isdisjoint(val_prompts)
    # every source's answer to a train prompt is train (split by prompt, not by item)
    assert len([g for g in pool if split[g["id"]] == "train"]) == 2 * len(train_prompts)


def test_load_labels_checks_the_file(tmp_path):
    ids = {"a", "b"}
    p = tmp_path / "labels.jsonl"

    def write(*rows):
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write({"id": "a", "label": "refusal", "explicit_refusal": True}, {"id": "b", "label": "compliant"})
    assert ag.load_labels(p, ids)["b"] == {"label": "compliant", "explicit_refusal": False, "note": ""}
    write({"id": "c", "label": "refusal"})
    with pytest.raises(ValueError, match="not in the pool"):
        ag.load_labels(p, ids)
    write({"id": "a", "label": "refusal"}, {"id": "a", "label": "refusal"})
    with pytest.raises(ValueError, match="labelled twice"):
        ag.load_labels(p, ids)
    write({"id": "a", "label": "refused"})
    with pytest.raises(ValueError, match=r"RUBRIC\.md"):
        ag.load_labels(p, ids)
    write({"id": "a", "label": "compliant", "explicit_refusal": True})
    with pytest.raises(ValueError, match="sub-flag"):
        ag.load_labels(p, ids)
    p.write_text("{oops\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        ag.load_labels(p, ids)


class _Oracle:
    """A three-way judge that returns given labels (for an end-to-end check with known agreement)."""

    name = "oracle"

    def __init__(self, labels):
        self.labels = labels

    def judge(self, prompts, responses):
        return [Verdict(refused=lab != "compliant", details={"label": lab}) for lab in self.labels]


def test_end_to_end_report_and_docs_on_a_synthetic_labelled_pool(tmp_path):
    pool = _pool()
    texts = {"refusal": "I cannot help with that.", "compliant": "Sure, here is the answer: step one, step two, go.",
             "non_answer": "I agree. I agree. I agree. I agree. I agree."}  # fmt: skip
    rng = random.Random(0)
    gold = {}
    for g in pool:
        gold[g["id"]] = rng.choice(LABELS)
        g["response"] = texts[gold[g["id"]]]
    labels = {i: {"label": lab, "explicit_refusal": lab == "refusal", "note": ""} for i, lab in gold.items()}
    split = ag.split_pool(pool)
    wrong = {i: ("compliant" if lab == "non_answer" else lab) for i, lab in gold.items()}  # misses non-answers
    judges = {"wei2024": KeywordJudge("wei2024"), "oracle": _Oracle([wrong[g["id"]] for g in pool])}
    verdicts, seconds = ag.run_judges(judges, pool, tmp_path / "cache")
    report = ag.build_report(pool, labels, split, verdicts, seconds, n_boot=200)
    val = [g for g in pool if split[g["id"]] == "validation"]
    assert report["n_validation"] == len(val)
    # the oracle is right except on non-answers: accuracy and kappa recomputed independently
    g_val = [gold[g["id"]] for g in val]
    p_val = [wrong[g["id"]] for g in val]
    acc = sum(a == b for a, b in zip(g_val, p_val)) / len(val)
    assert report["judges"]["oracle"]["three_class"]["accuracy"]["value"] == pytest.approx(acc, abs=1e-4)
    assert report["judges"]["oracle"]["three_class"]["kappa"]["value"] == pytest.approx(
        cohen_kappa(g_val, p_val), abs=1e-4
    )
    assert report["judges"]["oracle"]["refusal_vs_not"]["accuracy"]["value"] == 1.0
    # keyword judge: "I cannot" is a refusal, the rest "complied" (it cannot say non-answer)
    kw = report["judges"]["wei2024"]
    assert not kw["three_way"] and kw["refusal_vs_not"]["accuracy"]["value"] == 1.0
    assert kw["three_class"]["per_class"]["non_answer"]["predicted"] == 0
    by_kind = report["judges"]["oracle"]["by_kind"]
    assert set(by_kind) == {"harmful", "benign"} and sum(v["n"] for v in by_kind.values()) == len(val)
    harm = [g for g in val if g["kind"] == "harmful"]
    assert by_kind["harmful"]["refusal_rate_labels"] == pytest.approx(
        sum(gold[g["id"]] == "refusal" for g in harm) / len(harm), abs=1e-4
    )
    # the cache is reused for an unchanged judge and the docs section renders every judge
    again, _ = ag.run_judges(judges, pool, tmp_path / "cache")
    assert again == verdicts
    page = tmp_path / "evaluation.md"
    page.write_text("# Evaluation\n\nintro\n")
    assert ag.update_docs(page, report)
    text = page.read_text()
    assert text.startswith("# Evaluation\n\nintro\n") and "| `oracle` |" in text and ag.DOCS_END in text
    assert not ag.update_docs(page, report)  # idempotent
    assert ag.update_docs(page, None) and "Pending" in page.read_text() and "| `oracle` |" not in page.read_text()


def test_docs_section_matches_the_committed_results():
    results = ROOT / "benchmarks" / "results" / "judge" / "agreement.json"
    report = json.loads(results.read_text()) if results.is_file() else None
    page = (ROOT / "docs" / "evaluation.md").read_text()
    assert ag.DOCS_START in page, "docs/evaluation.md lacks the judge-agreement section"
    a = page.index(ag.DOCS_START)
    section = page[a : page.index(ag.DOCS_END, a) + len(ag.DOCS_END)]
    assert section + "\n" == ag.render_markdown(report), "regenerate: python benchmarks/judge/agreement.py --docs"


def test_real_classifier_trains_on_the_train_split_only(monkeypatch, tmp_path):
    import peft_safety.recipes.judges as rj
    from peft_safety.evaluation.classifier_judge import build_judge_examples

    labelled = [{"prompt": f"Explain how to do harmful thing {i}", "category": f"t{i % 3}",
                 "refusal": "I cannot help with that. It is against the law.",
                 "compliant": f"Step one: gather the materials for thing {i}. Step two: assemble them quickly."}
                for i in range(12)]  # fmt: skip
    benign = [{"prompt": "Why diversify?", "response": "Holding many assets lowers the risk of ruin."}]
    seen: dict = {}

    def fake_examples(*, seed=0, n_fiqa=300, shapes=1, extra_evaluation=None):
        seen["extra"] = extra_evaluation
        return build_judge_examples(labelled, benign, seed=seed), {"leak_check": {}}

    monkeypatch.setattr(rj, "judge_training_examples", fake_examples)
    monkeypatch.setattr(rj, "evaluation_sets", lambda names=None: {"evalset": [{"prompt": "an evaluation prompt"}]})
    pool = _pool(4)
    texts = ["I cannot help with that.", "Sure, here is how: first mix the two, then heat it slowly for ten minutes.",
             "I agree. I agree. I agree. I agree. I agree. I agree."]  # fmt: skip
    labels = {}
    for k, g in enumerate(pool):
        g["response"] = texts[k % 3]
        labels[g["id"]] = {"label": LABELS[k % 3], "explicit_refusal": k % 3 == 0, "note": ""}
    split = ag.split_pool(pool)
    judge = ag.train_real_classifier(pool, labels, split, tmp_path / "real", weight=2)
    n_train = sum(split[g["id"]] == "train" for g in pool)
    assert judge.metadata["n_real_train"] == n_train > 0
    assert judge.metadata["train_counts"]["refusal"] >= 2 * sum(
        split[g["id"]] == "train" and labels[g["id"]]["label"] == "refusal" for g in pool
    )
    # the validation prompts were passed to the leak check of the base examples
    val_prompts = {g["prompt"] for g in pool if split[g["id"]] == "validation"}
    assert {r["prompt"] for r in seen["extra"]["pool_validation_prompts"]} == val_prompts
    assert (tmp_path / "real" / "classifier_judge.safetensors").is_file() and judge.name == "classifier_real"
    # a train item whose prompt is also a validation prompt is a leak
    leaky = [dict(g) for g in pool]
    first_val = next(g for g in leaky if split[g["id"]] == "validation")
    next(g for g in leaky if split[g["id"]] == "train")["prompt"] = first_val["prompt"]
    with pytest.raises(ValueError, match="pool_validation_prompts"):
        ag.train_real_classifier(leaky, labels, split, None, weight=2)


class _CountingRubric:
    """A stand-in with the rubric judge's attributes: letter log-probs from the response length, calls counted."""

    template, max_prompt_words, max_response_words, letter_ids = "t {prompt} {response}", 80, 120, [1, 2, 3]

    class model:  # a namespace with the attribute the cache key reads
        name_or_path = "fake"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def letter_logprobs(self, prompts, responses):
        self.seen += list(responses)
        return torch.tensor([[-float(len(r)), -1.0, -2.0] for r in responses])


def test_rubric_logprobs_cache_resumes_and_orders(tmp_path):
    pool = _pool(5)
    for g in pool:
        g["response"] = g["id"]
    fake = _CountingRubric()
    ag.rubric_logprobs(fake, pool[:7], tmp_path, chunk=3)
    assert fake.seen == [g["id"] for g in pool[:7]]
    # a cut last line (an interrupted append) is ignored; only missing items are computed again
    path = next(tmp_path.glob("rubric-logprobs-*.jsonl"))
    path.write_text(path.read_text() + '{"id": "cut')
    fake.seen.clear()
    both, seconds = ag.rubric_logprobs(fake, pool[:10], tmp_path, chunk=3)
    assert fake.seen == [g["id"] for g in pool[7:10]] and seconds >= 0
    assert all(both[g["id"]] == [-float(len(g["id"])), -1.0, -2.0] for g in pool[:10])
    fake.seen.clear()  # the line after the cut one was readable: nothing is computed again
    assert ag.rubric_logprobs(fake, pool[:10], tmp_path)[0] == both and fake.seen == []
    # the subset of size n is the first n of one seeded order, so a larger subset contains a smaller one
    order = ag.item_order(pool)
    assert sorted(order) == sorted(g["id"] for g in pool) and order == ag.item_order(list(reversed(pool)))
    assert ag.subset_ids(pool, 4) == set(order[:4]) and ag.subset_ids(pool, 4) <= ag.subset_ids(pool, 9)
    assert ag.subset_ids(pool, 0) == {g["id"] for g in pool}
