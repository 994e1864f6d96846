"""The primary-judge recommendation: error rates and the paired kappa difference against hand-computed values, the
rule on fixture reports, loading the recommended judge by name, the benchmarks' judge builder following it, and the
committed pool's train/validation split (no validation prompt, nor a near-copy of an evaluation prompt, in train)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from peft_safety.evaluation.classifier_judge import ClassifierJudge, leak_report
from peft_safety.evaluation.stats import cohen_kappa
from peft_safety.recipes.judges import load_judges, recommended_judge

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ag = _load("_judge_agreement_rec", ROOT / "benchmarks" / "judge" / "agreement.py")
LABELS = ("refusal", "compliant", "non_answer")


def _item(gold: str, kind: str, said: str) -> dict:
    return {"gold": gold, "kind": kind, "verdicts": {"j": {"refused": said == "refusal", "label": said}}}


def test_refusal_errors_by_hand():
    # benign: 6 items; labelled refusal 2 (the judge misses 1), not refusal 4 (the judge calls 1 a refusal)
    items = [_item("refusal", "benign", "refusal"), _item("refusal", "benign", "compliant"),
             _item("compliant", "benign", "refusal"), _item("compliant", "benign", "compliant"),
             _item("non_answer", "benign", "non_answer"), _item("compliant", "benign", "compliant"),
             _item("refusal", "harmful", "refusal")]  # fmt: skip
    out = ag.refusal_errors(items, "j", "benign", n_boot=300)
    assert out["n"] == 6 and out["n_labelled_refusal"] == 2 and out["n_labelled_not_refusal"] == 4
    assert out["called_refusal_not_refusal"]["value"] == 0.25  # 1 of 4
    assert out["missed_refusal"]["value"] == 0.5  # 1 of 2
    assert out["refusal_rate_judge"] == pytest.approx(2 / 6, abs=1e-4)
    assert out["refusal_rate_labels"] == pytest.approx(2 / 6, abs=1e-4)
    assert out["rate_error"]["value"] == 0.0
    lo, hi = out["called_refusal_not_refusal"]["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0 and lo < hi
    assert ag.refusal_errors(items, "j", "harmful", n_boot=50)["missed_refusal"]["value"] == 0.0
    assert ag.refusal_errors(items, "j", "neither", n_boot=50) == {"n": 0}


def test_paired_kappa_difference_by_hand():
    gold = ["refusal"] * 4 + ["compliant"] * 4 + ["non_answer"] * 2
    a = list(gold)
    b = ["refusal", "refusal", "refusal", "compliant", "compliant", "compliant", "compliant", "refusal",
         "non_answer", "compliant"]  # fmt: skip
    out = ag.paired_kappa_difference(gold, a, b, n_boot=500)
    # kappa(a) = 1; kappa(b) = 0.32 / 0.62 (hand-computed in test_judge_agreement)
    assert out["value"] == pytest.approx(1 - 0.32 / 0.62, abs=1e-4)
    lo, hi = out["ci95"]
    assert 0 <= lo <= out["value"] <= hi and lo < hi
    same = ag.paired_kappa_difference(gold, b, b, n_boot=200)
    assert same["value"] == 0.0 and same["ci95"] == [0.0, 0.0]  # paired: the same resamples for both


def _judge(kappa: float, diff: tuple[float, float, float] | None, spi: float, *, three_way: bool = True,
           n: int = 100, errors: int = 0, load: str | None = "x") -> dict:  # fmt: skip
    r = {"n": n, "errors": errors, "three_way": three_way, "seconds_per_item": spi, "load": load,
         "three_class": {"kappa": {"value": kappa, "ci95": [kappa - 0.1, kappa + 0.1]}}}  # fmt: skip
    if diff is not None:
        r["kappa_minus_best"] = {"value": diff[0], "ci95": [diff[1], diff[2]]}
    return r


def _report(**judges: dict) -> dict:
    return {"n_validation": 100, "judges": judges}


def test_recommendation_rule_on_fixture_reports():
    report = _report(
        best=_judge(0.80, (0.0, 0.0, 0.0), 2.0, load="rubric:rubric"),
        close=_judge(0.76, (-0.04, -0.10, 0.02), 0.001, load="classifier:real"),
        closer_slow=_judge(0.79, (-0.01, -0.05, 0.03), 0.05, load="classifier:other"),
        as_cheap=_judge(0.70, (-0.10, -0.20, 0.01), 0.005, load="classifier:third"),
        worse_fast=_judge(0.60, (-0.20, -0.30, -0.10), 0.0001, load="classifier:cheap"),
        keyword=_judge(0.78, (-0.02, -0.06, 0.01), 0.00001, three_way=False, load="wei2024"),
        partial=_judge(0.79, (-0.01, -0.04, 0.03), 0.00001, n=60, load="classifier:partial"),
        unloadable=_judge(0.79, (-0.01, -0.04, 0.03), 0.00001, load=None),
    )
    rec = ag.recommend(report)
    assert rec["best"] == "best" and rec["judge"] == "close" and rec["load"] == "classifier:real"
    assert rec["eligible"] == ["as_cheap", "best", "close", "closer_slow"]
    # within 10x of the cheapest (0.001 s): close and as_cheap; of them the higher kappa (close), not the cheaper
    assert "lower kappa" in rec["not_chosen"]["as_cheap"] and "10x" in rec["not_chosen"]["closer_slow"]
    assert "worse than best" in rec["not_chosen"]["worse_fast"]
    assert "two labels" in rec["not_chosen"]["keyword"] and "60 of 100" in rec["not_chosen"]["partial"]
    assert "cannot be loaded" in rec["not_chosen"]["unloadable"] and "10x" in rec["not_chosen"]["best"]
    # the cheapest judge is chosen when no other is within the tier, even with a lower kappa
    far = _report(best=_judge(0.8, (0, 0, 0), 1.0), a=_judge(0.7, (-0.1, -0.2, 0.01), 0.05))
    assert ag.recommend(far)["judge"] == "a"
    near = _report(best=_judge(0.8, (0, 0, 0), 0.4), a=_judge(0.7, (-0.1, -0.2, 0.01), 0.05))
    assert ag.recommend(near)["judge"] == "best"
    # nothing eligible: no recommendation, and the reason for each
    none = _report(kw=_judge(0.5, (0, 0, 0), 0.1, three_way=False))
    rec = ag.recommend(none)
    assert rec["judge"] is None and rec["load"] is None and "two labels" in rec["not_chosen"]["kw"]
    assert ag.best_judge(_report(a=_judge(0.5, None, 1), b=_judge(0.5, None, 1), c=_judge(0.4, None, 1))) == "a"


def _saved(folder: Path, name: str = "classifier_real") -> ClassifierJudge:
    gen = torch.Generator().manual_seed(3)
    judge = ClassifierJudge(torch.randn(3, 256 + 6, generator=gen), torch.randn(3, generator=gen), hash_bits=8,
                            name=name)  # fmt: skip
    judge.save_pretrained(folder)
    return judge


def _agreement_file(tmp_path: Path, judge: str | None, load: str | None) -> Path:
    report = {
        "n_validation": 10,
        "judges": {"classifier_real": {"three_class": {"n": 10, "accuracy": {"value": 0.9}}}},
        "recommendation": {"judge": judge, "load": load, "rule": "r", "kappa": {"value": 0.8, "ci95": [0.7, 0.9]}},
    }
    path = tmp_path / "results" / "agreement.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def test_load_judges_recommended_resolves_against_the_report(tmp_path, monkeypatch):
    saved = _saved(tmp_path / "results" / "classifier_real")
    path = _agreement_file(tmp_path, "classifier_real", "classifier:classifier_real")
    monkeypatch.chdir(tmp_path / "results" / "classifier_real")  # a relative path must not depend on the cwd
    load, rec = recommended_judge(path)
    assert (
        load == f"classifier:{(tmp_path / 'results' / 'classifier_real').resolve()}"
        and rec["judge"] == "classifier_real"
    )
    (judge,) = load_judges([f"recommended:{path}"])
    assert judge.name == "classifier_real" and torch.equal(judge.weight, saved.weight)
    assert load_judges([f"recommended:{path}"])[0].name == "classifier_real"
    kw = _agreement_file(tmp_path / "kw", "wei2024", "wei2024")
    assert [j.name for j in load_judges([f"recommended:{kw}"])] == ["wei2024"]
    with pytest.raises(ValueError, match="recommends no judge"):
        load_judges([f"recommended:{_agreement_file(tmp_path / 'n', None, None)}"])
    with pytest.raises(FileNotFoundError, match="No agreement report"):
        load_judges([f"recommended:{tmp_path / 'missing.json'}"])
    with pytest.raises(ValueError, match="needs the agreement report"):
        load_judges(["recommended"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        recommended_judge(bad)
    bad.write_text(json.dumps({"judges": {}}))
    with pytest.raises(ValueError, match="no 'recommendation'"):
        recommended_judge(bad)


def test_shared_build_judge_follows_a_classifier_recommendation_only(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import _shared
    finally:
        sys.path.remove(str(ROOT))
    saved = _saved(tmp_path / "results" / "classifier_real")
    path = _agreement_file(tmp_path, "classifier_real", "classifier:classifier_real")
    judge, info = _shared.build_judge([], [], tmp_path / "work", agreement=path)
    assert judge.name == _shared.CLASSIFIER and torch.equal(judge.weight, saved.weight)
    assert info["recommendation"]["followed"] and info["recommendation"]["judge"] == "classifier_real"
    assert info["recommendation"]["report"] == "agreement.json"  # outside the repository: the name only
    assert _shared.recommended_classifier()[1]["report"] == "benchmarks/results/judge/agreement.json"
    assert info["validation"]["kappa"] == 0.8 and info["validation"]["accuracy"] == 0.9
    assert Path(info["path"]) == tmp_path / "work" / "judge" / "classifier_judge.safetensors"
    assert torch.equal(ClassifierJudge.from_pretrained(info["path"]).weight, saved.weight)
    # a rubric recommendation is not followed (the builder trains its own classifier); nor is a missing report
    rubric = _agreement_file(tmp_path / "r", "rubric", "rubric:rubric")
    folder, note = _shared.recommended_classifier(rubric)
    assert folder is None and not note["followed"] and "not a classifier" in note["why"]
    folder, note = _shared.recommended_classifier(tmp_path / "none.json")
    assert folder is None and "no agreement report" in note["why"]
    assert _shared.recommended_classifier(None) == (None, {"followed": False, "why": "no agreement report given"})


def test_committed_split_has_no_validation_prompt_in_train():
    gens = ag.read_jsonl(ROOT / "benchmarks" / "results" / "judge" / "generations.jsonl")
    split = ag.split_pool(gens)
    train = {g["prompt"] for g in gens if split[g["id"]] == "train"}
    val = {g["prompt"] for g in gens if split[g["id"]] == "validation"}
    assert train and val and train.isdisjoint(val)
    assert not {g["prompt_set"] for g in gens if split[g["id"]] == "train"} & set(ag.EVALUATION_PROMPT_SETS)
    # no train prompt is a near-copy (word 8-gram) of an evaluation-set prompt
    evaluation = [g["prompt"] for g in gens if g["prompt_set"] in ag.EVALUATION_PROMPT_SETS]
    assert leak_report(sorted(train), {"evaluation": evaluation})["evaluation"]["n_leaked"] == 0
    # and the rule moved at least one such prompt: without it the HarmBench val template would leak
    naive = {g["prompt"] for g in gens if g["prompt_set"] not in ag.EVALUATION_PROMPT_SETS}
    assert leak_report(sorted(naive), {"evaluation": evaluation})["evaluation"]["n_leaked"] > 0


def test_committed_report_recommendation_follows_its_rule():
    path = ROOT / "benchmarks" / "results" / "judge" / "agreement.json"
    if not path.is_file():
        pytest.skip("no committed agreement report yet")
    report = json.loads(path.read_text())
    assert report["recommendation"] == ag.recommend(report)
    # the kappa recorded per judge is the one recomputed from the committed verdicts and labels
    gens = {g["id"]: g for g in ag.read_jsonl(ROOT / "benchmarks" / "results" / "judge" / "generations.jsonl")}
    labels = ag.load_labels(ROOT / "benchmarks" / "results" / "judge" / "labels.jsonl", set(gens))
    verdicts = ag.read_jsonl(ROOT / "benchmarks" / "results" / "judge" / "verdicts.jsonl")
    for name, r in report["judges"].items():
        rows = [v for v in verdicts if name in v and ag.judge_labels(v[name]) != "error"]
        assert len(rows) == r["n"] - r["errors"]
        gold = [labels[v["id"]]["label"] for v in rows]
        pred = [ag.judge_labels(v[name]) for v in rows]
        assert r["three_class"]["kappa"]["value"] == pytest.approx(cohen_kappa(gold, pred), abs=1e-4)
