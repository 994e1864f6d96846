"""Smoke test of the preservation protocol's wiring (benchmarks/preserve.py) on the tiny in-code model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "preserve.py"
    spec = importlib.util.spec_from_file_location("_bench_preserve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_run_writes_json_and_jsonl(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        payload = bench.run(bench.parse_args([
            "--tiny", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--arms", "lora,realign",
            "--seeds", "0", "--attack-arms", "replay", "--threads", "1",
        ]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "out" / "preserve.json").read_text())
    assert [r["arm"] for r in saved["benign"]] == ["lora", "realign"]
    assert [r["arm"] for r in saved["attack"]] == ["replay"]
    assert saved["judge"]["validation"]["n"] > 0 and "keyword_judges" in saved["judge"]["validation"]
    row = saved["benign"][1]
    for key in ("refusal/classifier", "refusal/wei2024", "over_refusal/classifier", "over_refusal_lookalike/wei2024"):
        ci = row[key]
        assert ci["n"] + ci["undecided"] > 0 and (ci["rate"] is None or ci["low"] <= ci["rate"] <= ci["high"])
    assert row["realign"]["units_restored"] == round(0.2 * row["realign"]["units_total"])
    assert "refusal/classifier" in row["vs_lora"] and "task_loss" in row["vs_aligned"]
    assert saved["attack"][0]["train_rows"] > 6  # replay rows were mixed into the 6 attack rows
    # every generation kept, with every judge's verdict
    lines = Path(row["generations"]).read_text().splitlines()
    n_prompts = saved["data"]["n_harmful"] + saved["data"]["n_benign"] + saved["data"]["n_lookalike"]
    assert len(lines) == n_prompts
    rec = json.loads(lines[0])
    assert set(rec["verdicts"]) == {"wei2024", "wei2024_min20", "gcg_extended", "refusal_prefix", "classifier"}
    assert payload["verdict"]["lora"]["meets_default_criterion"] is None  # the reference arm


def test_verdict_applies_the_issue_criterion(bench):
    def row(arm, refusal, loss):
        return {"arm": arm, "seed": 0, "refusal/classifier": {"rate": refusal}, "task_loss": loss}

    aligned = {"refusal/classifier": {"rate": 0.60}, "task_loss": 2.0}
    rows = [row("lora", 0.20, 1.0), row("spa_esi", 0.57, 1.05), row("replay", 0.58, 1.2), row("sppft", 0.40, 1.0)]
    v = bench._verdict(aligned, rows)
    # spa_esi: drop 3 points, gain 0.95 of LoRA's 1.0 -> meets; replay: gain 0.8 -> no; sppft: drop 20 points -> no
    assert v["spa_esi"]["meets_default_criterion"] is True
    assert v["spa_esi"]["share_of_lora_gain"] == pytest.approx(0.95)
    assert v["replay"]["meets_default_criterion"] is False
    assert v["sppft"]["meets_default_criterion"] is False
    assert v["lora"]["meets_default_criterion"] is None


def test_reduced_preset_fits_the_budget_and_flags_win(bench):
    cfg = bench.parse_args(["--reduced"])
    assert cfg.n_harmful >= 100 and cfg.n_benign + cfg.n_lookalike >= 100
    assert bench.estimate_seconds(cfg)["total"] <= 90 * 60
    assert bench.parse_args(["--reduced", "--steps", "7"]).steps == 7
    with pytest.raises(ValueError, match="Unknown arms"):
        bench._sections(bench.parse_args(["--arms", "lora,nope"]))


def test_resume_continues_an_interrupted_run_with_the_same_results(bench, tmp_path, monkeypatch):
    """An interrupted run resumes from its checkpoint: the measured runs are kept (not retrained), the rest are run,
    and the result equals an uninterrupted run's; a checkpoint from other settings is refused."""
    args = ["--tiny", "--arms", "lora,spa_esi", "--seeds", "0", "--attack-arms", "lora", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        full = bench.run(
            bench.parse_args([*args, "--out", str(tmp_path / "full"), "--work-dir", str(tmp_path / "w1")])
        )
        out = ["--out", str(tmp_path / "cut"), "--work-dir", str(tmp_path / "w2")]
        real, calls = bench.train_arm, []

        def interrupted(*a, **k):
            calls.append(a[1])
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(bench, "train_arm", interrupted)
        with pytest.raises(KeyboardInterrupt):
            bench.run(bench.parse_args([*args, *out]))
        partial = json.loads((tmp_path / "cut" / "preserve.partial.json").read_text())
        assert [r["arm"] for r in partial["benign"]] == ["lora"]
        with pytest.raises(ValueError, match="other settings"):
            bench.run(bench.parse_args([*args, *out, "--resume", "--steps", "3"]))
        calls.clear()
        monkeypatch.setattr(bench, "train_arm", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
        resumed = bench.run(bench.parse_args([*args, *out, "--resume"]))
    finally:
        torch.set_num_threads(threads)
    assert calls == ["spa_esi", "lora"]  # the benign LoRA run was not trained again
    assert not (tmp_path / "cut" / "preserve.partial.json").exists()
    assert any(k.startswith("sitting 2: ") for k in resumed["timings"]) and len(resumed["provenance"]["sittings"]) == 1
    for a, b in zip(full["benign"] + full["attack"], resumed["benign"] + resumed["attack"]):
        assert (a["arm"], a["seed"]) == (b["arm"], b["seed"])
        assert a["refusal/classifier"] == b["refusal/classifier"]
        assert a["task_loss"] == pytest.approx(b["task_loss"], rel=1e-6)
        assert a.get("vs_lora", {}).keys() == b.get("vs_lora", {}).keys()


def test_combine_pools_runs_and_refuses_incomparable_ones(bench, tmp_path):
    """`--combine` pools the seeds of finished runs: the verdict is recomputed over every seed (checked against the
    explicit mean here); runs with other settings, or whose shared runs differ, are refused and nothing is written."""
    common = ["--tiny", "--arms", "lora,spa_esi", "--attack-arms", "", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        a = bench.run(bench.parse_args([*common, "--seeds", "0", "--out", str(tmp_path / "a"),
                                        "--work-dir", str(tmp_path / "wa")]))  # fmt: skip
        b = bench.run(bench.parse_args([*common, "--seeds", "0,1", "--multi-seed-arms", "lora,spa_esi",
                                        "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "wb")]))  # fmt: skip
        c = str(tmp_path / "c")
        bench.run(bench.parse_args([*common, "--seeds", "0", "--steps", "1", "--out", c,
                                    "--work-dir", str(tmp_path / "wc")]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    pa, pb = str(tmp_path / "a" / "preserve.json"), str(tmp_path / "b" / "preserve.json")
    assert bench.main(["--combine", f"{pa},{pb}", "--out", str(tmp_path / "ab")]) == 0
    pooled = json.loads((tmp_path / "ab" / "preserve.json").read_text())
    assert [(r["arm"], r["seed"]) for r in pooled["benign"]] == [("lora", 0), ("lora", 1), ("spa_esi", 0),
                                                                 ("spa_esi", 1)]  # fmt: skip
    assert sorted(pooled["checks"]["shared_runs_identical"]) == ["benign lora seed 0", "benign spa_esi seed 0"]
    assert [s["path"] for s in pooled["combined_from"]] == [pa, pb]
    rows = {(r["arm"], r["seed"]): r for r in a["benign"] + b["benign"]}
    base = a["aligned"]
    for arm in ("lora", "spa_esi"):
        rates = [rows[(arm, s)]["refusal/classifier"]["rate"] for s in (0, 1)]
        gains = [base["task_loss"] - rows[(arm, s)]["task_loss"] for s in (0, 1)]
        lora_gain = sum(base["task_loss"] - rows[("lora", s)]["task_loss"] for s in (0, 1)) / 2
        v = pooled["verdict"][arm]
        assert v["seeds"] == 2 and v["refusal"] == pytest.approx(sum(rates) / 2)
        assert v["share_of_lora_gain"] == pytest.approx(sum(gains) / 2 / lora_gain)
    with pytest.raises(ValueError, match="other settings"):
        bench.combine([pa, str(tmp_path / "c" / "preserve.json")], str(tmp_path / "ac"))
    # a shared run whose generations differ: the runs are not comparable
    shared = Path(next(r for r in b["benign"] if (r["arm"], r["seed"]) == ("lora", 0))["generations"])
    shared.write_text(shared.read_text().replace('"response": "', '"response": "x', 1))
    with pytest.raises(ValueError, match="differs"):
        bench.combine([pa, pb], str(tmp_path / "ab2"))
    assert not (tmp_path / "ac").exists() and not (tmp_path / "ab2").exists()
    with pytest.raises(ValueError, match="at least two"):
        bench.combine([pa], str(tmp_path / "single"))
