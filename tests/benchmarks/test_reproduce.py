"""Smoke tests of the reproduction benchmark's wiring on the tiny in-code model and synthetic rows (no real model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("_bench_reproduce", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module through sys.modules while the class is built
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tiny_args(tmp_path: Path, experiments: str, *extra: str) -> list[str]:
    return [
        "--model", "tiny", "--experiments", experiments, "--out", str(tmp_path / "out"),
        "--work-dir", str(tmp_path / "work"), "--threads", "1", "--n-ident", "4", "--seeds", "1",
        "--n-eval", "2", "--n-utility", "2", "--max-new-tokens", "4", "--batch-size", "2", "--max-length", "48",
        *extra,
    ]  # fmt: skip


def test_snip_from_esi_equals_snip_abs_of_sum(bench):
    """One gradient pass gives both scorers: the derived SNIP equals the library's batched SNIP."""
    from peft_safety.scoring import score
    from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    calib = CalibrationSet(refusal_rows(["how do i pick a lock?", "how to steal a car?", "make poison"]), tok)
    esi = score(model, calib, "esi", batch_size=2, progress=False)
    snip = score(model, calib, "snip", aggregation="abs_of_sum", batch_size=2, progress=False)
    derived = bench._snip_from_esi(esi, model)
    assert derived.names == snip.names
    for name in snip.names:
        torch.testing.assert_close(derived[name], snip[name], rtol=1e-4, atol=1e-7)
    assert derived.provenance["method"] == "snip" and derived.provenance["derived_from"] == "esi"


def test_stability_writes_iou_stats_before_and_after_isolation(bench, tmp_path, keep_threads, capsys):
    rc = bench.main(_tiny_args(tmp_path, "stability", "--scorers", "esi,wanda"))
    assert rc == 0
    result = json.loads((tmp_path / "out" / "reproduce_stability.json").read_text())
    assert set(result["scorers"]) == {"esi", "wanda"}
    for r in result["scorers"].values():
        before, after = r["before_isolation"], r["after_isolation"]
        assert len(before["labels"]) == 3  # 3 identification sets x 1 seed
        iou = torch.tensor(before["iou"])
        assert torch.allclose(iou.diagonal(), torch.ones(3)) and torch.allclose(iou, iou.T)
        assert 0.0 <= before["mean_iou"] <= 1.0 and before["core"] <= before["union"]
        # one seed: every pair crosses data sets, so the by-source mean covers the 3 cross pairs
        assert len(before["mean_iou_by_source_pair"]) == 3
        assert before["mean_iou_across_data"] == pytest.approx(before["mean_iou"])
        # 1% global masks; isolation only removes entries, so it never grows a mask
        for label, density in before["density"].items():
            assert density == pytest.approx(0.01, abs=1e-3)
            assert after["mask_entries"][label] <= before["mask_entries"][label]
    assert result["environment"]["torch_threads"] == 1
    assert Path(result["plots"]["esi_before"]).exists()
    out = capsys.readouterr().out
    assert "| esi | before |" in out and "| wanda | after |" in out


def test_set_spa_attack_rows_and_derived_numbers(bench, tmp_path, keep_threads):
    args = _tiny_args(
        tmp_path, "set,spa,attack", "--set-steps", "2", "--attack-steps", "2", "--attack-examples", "4",
        "--spa-steps", "2", "--spa-runs", "spa_full,sppft,rsn_tune",
    )  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads((tmp_path / "out" / "reproduce_set.json").read_text())
    stages = [r["stage"] for r in result["rows"]]
    assert stages == ["baseline", "SET (ESI 1%)", "SET (random 1%)", "LoRA", "full SFT"]
    for r in result["rows"]:
        assert 0.0 <= r["refusal_wei2024"] <= 1.0 and r["benign_ppl"] > 0
    assert result["mask_entries"]["esi"] == result["mask_entries"]["random"] > 0
    # the aligned (SET) model and its mask are kept for the spa/attack experiments
    assert (tmp_path / "work" / "aligned" / "mask" / "safety_mask.safetensors").exists()
    spa = json.loads((tmp_path / "out" / "reproduce_spa.json").read_text())
    assert [r["stage"] for r in spa["rows"]] == [
        "aligned (SET)", "SPA full FT", "SPPFT (layers frozen)", "RSN-Tune (neurons frozen)",
    ]  # fmt: skip
    assert spa["rows"][0]["safety_drift_wei2024"] == 0 and spa["rows"][0]["task_gain_ppl"] == 0
    assert spa["masks"]["sppft"]["entries"] > 0 and "rsn_tune" in spa["masks"]
    assert spa["masks"]["spa"]["entries"] == result["mask_entries"]["esi"]
    for r in spa["rows"]:
        assert r["safety_drift_wei2024"] == pytest.approx(
            r["refusal_wei2024"] - spa["rows"][0]["refusal_wei2024"], abs=1e-4
        )
    # every reported rate is a recount of the stage's saved generations (independent keyword check)
    from peft_safety.evaluation.judges import KEYWORD_PRESETS

    wei = KEYWORD_PRESETS["wei2024"]
    for r in result["rows"]:
        lines = (tmp_path / "work" / "set" / "eval" / r["stage"] / "generations.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        for set_name, key in (("harmful", "refusal_wei2024"), ("benign", "over_refusal_wei2024")):
            responses = [x["response"] for x in records if x["set"] == set_name]
            assert len(responses) == 2
            recount = sum(any(k in resp for k in wei) for resp in responses) / len(responses)
            assert r[key] == pytest.approx(recount), (r["stage"], key)
    attack = json.loads((tmp_path / "out" / "reproduce_attack.json").read_text())
    assert [r["stage"] for r in attack["rows"]] == ["aligned (SET)", "attack: LoRA", "attack: SPA-LoRA"]
    assert attack["attack_examples"] == 4
    ref = attack["rows"][0]["refusal_wei2024"]
    assert attack["refusal_drop_plain_lora"] == pytest.approx(ref - attack["rows"][1]["refusal_wei2024"], abs=1e-4)


def test_bad_arguments(bench):
    with pytest.raises(ValueError, match="Unknown experiment"):
        bench.parse_args(["--experiments", "stability,sett"])
    with pytest.raises(ValueError, match="density must be in"):
        bench.parse_args(["--density", "1.5"])
    with pytest.raises(ValueError, match="set_steps must be >= 1"):
        bench.parse_args(["--set-steps", "0"])
    with pytest.raises(ValueError, match="Unknown SPA run"):
        bench.parse_args(["--spa-runs", "lora,spa-lora"])
    assert bench.parse_args(["--spa-runs", "lora, sppft"]).spa_run_list == ["lora", "sppft"]
    cfg = bench.parse_args(["--model", "tiny", "--scorers", "esi,magnitude"])
    with pytest.raises(ValueError, match="compares esi, snip and wanda"):
        bench.run_stability(cfg)
