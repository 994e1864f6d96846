"""docs/leaderboard.md is generated from benchmarks/results/hft/hft.json, and says only what that file holds."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.hft import report  # noqa: E402


def test_committed_leaderboard_matches_the_pooled_result():
    data = report.load()
    page = (ROOT / "docs" / "leaderboard.md").read_text(encoding="utf-8")
    assert page == report.render(data), "docs/leaderboard.md is stale: run python -m benchmarks.hft --report"
    if data is not None:
        assert (ROOT / "benchmarks" / "results" / "hft" / report.FIGURE).is_file()
        assert data["status"]["finished"] == len({r["id"] for r in data["runs"]})
        # every run the pooled file names is committed next to it, with its generations
        for run in data["runs"]:
            assert (ROOT / "benchmarks" / "results" / "hft" / "runs" / f"{run['id']}.jsonl").is_file()


def _rate(rate, low, high):
    return {"rate": rate, "low": low, "high": high, "seeds": 2, "n": 10}


def _result(arm, p, harmful, acc, vs=None):
    block = {f"safe/{j}": _rate(1 - harmful, 1 - harmful - 0.1, 1 - harmful + 0.1) for j in ("wei2024", "classifier")}
    block["label/compliant"] = _rate(harmful, max(0.0, harmful - 0.1), harmful + 0.1)
    block["label/refusal"] = _rate(0.5, 0.4, 0.6)
    markers = {"leading_quote": 0.0, "greeting": 0.0, "option_letter": 0.25, "repetitive": 0.05, "empty": 0.0,
               "truncated_words": 0.0, "mean_words": 30.0}  # fmt: skip
    safety = {s: {**block, "markers": markers} for s in ("harmbench", "strongreject", "lookalike")}
    out = {"arm": arm, "p": p, "seeds": [0, 1] if p is not None else [None], "runs": [], "safety": safety,
           "task_accuracy": _rate(acc, acc - 0.05, acc + 0.05), "rows_seen": [], "curves": []}  # fmt: skip
    if vs is not None:
        out["vs_lora"] = vs
    return out


def _data():
    settings = {"model": "m", "threads": 2, "task": "arc_easy", "n_train": 400, "harmful_sources": "a,b", "steps": 100,
                "batch_size": 4, "lr": 2e-4, "max_length": 256, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                "max_new_tokens": 64, "replay_ratio": 0.1, "realign_fraction": 0.2, "density": 0.01,
                "n_resamples": 1000, "second_harmful": "strongreject"}  # fmt: skip
    vs = {"safe/harmbench": {"estimate": 0.2, "low": 0.05, "high": 0.31},
          "safe/strongreject": {"estimate": -0.02, "low": -0.1, "high": 0.07},
          "task_accuracy": {"estimate": -0.013, "low": -0.04, "high": 0.01},
          "criterion": {"per_seed": [{"seed": 0, "meets": True}, {"seed": 1, "meets": False}],
                        "recommendation": "not established"}}  # fmt: skip
    return {
        "settings": settings, "status": {"planned": 4, "finished": 3, "missing": ["x"], "not_available": ["lisa"]},
        "data": {"n_task_test": 200, "eval_sets": {"harmbench": 100}}, "primary_judge": "classifier",
        "judge_names": ["wei2024", "classifier"], "criterion": {"text": "the criterion"}, "cuts": [], "preset": "cpu",
        "checks": {"runs": 3}, "train_set_markers": None,
        "results": [_result("aligned", None, 0.30, 0.60), _result("lora", 0.1, 0.62, 0.70),
                    _result("replay", 0.1, 0.42, 0.687, vs)],
    }  # fmt: skip


def test_rendered_rows_carry_the_numbers_of_the_result():
    text = report.render(_data())
    headline = next(line for line in text.splitlines() if line.startswith("| replay |"))  # the p table comes first
    cells = [c.strip() for c in headline.strip("|").split("|")]
    # harmful share of the classifier (compliant label), its interval, and the change vs LoRA as a harmful change
    assert cells[2] == "42.0 [32.0, 52.0]"
    assert cells[3] == "-20.0 [-31.0, -5.0]"  # safe +0.2 [0.05, 0.31] is harmful -0.2 [-0.31, -0.05]
    assert cells[5] == "+2.0 [-7.0, +10.0]"
    assert cells[7] == "68.7 [63.7, 73.7]" and cells[8] == "-1.3 [-4.0, +1.0]"
    assert cells[9] == "s0: yes, s1: no" and cells[10] == "not established"
    assert "3 of 4 planned runs finished; still to run: x." in text
    assert "not in the library yet (not run): lisa" in text


def test_page_without_results_says_so():
    text = report.render(None)
    assert "No pooled result yet" in text and not re.search(r"\d+\.\d", text)


def test_report_writes_page_and_figure(tmp_path):
    out = tmp_path / "hft"
    out.mkdir()
    (out / "hft.json").write_text(json.dumps(_data()))
    page = tmp_path / "leaderboard.md"
    text = report.write_report(out, page)
    assert page.read_text() == text and (out / report.FIGURE).stat().st_size > 1000
