"""``peft-safety eval`` and ``peft-safety fetch`` end to end on a tiny saved model and local files. No network."""

from __future__ import annotations

import json

import pytest

from peft_safety.cli.main import main


@pytest.fixture
def tiny_folder(tmp_path, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_eval_cli_writes_reports(tmp_path, tiny_folder, capsys):
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"harmful request {i}"}) + "\n" for i in range(5)))
    benign = tmp_path / "benign.csv"
    benign.write_text("prompt,response\nsay hi,hello\nbake bread,mix and bake\n")
    out = tmp_path / "out"
    code = main(["eval", str(tiny_folder), "--harmful", str(harmful), "--benign", str(benign), "--utility",
                 str(benign), "--n", "3", "--max-new-tokens", "3", "--batch-size", "2", "--judges", "wei2024",
                 "gcg_extended", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| wei2024 |" in printed and "| gcg_extended |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["n_harmful"] == 3 and report["config"]["n_benign"] == 2
    assert report["perplexity"] > 1
    assert len((out / "generations.jsonl").read_text().splitlines()) == 5


def test_eval_cli_user_errors_exit_2(tmp_path, tiny_folder, capsys):
    code = main(["eval", str(tiny_folder), "--harmful", "advbnch", "--no-progress"])
    assert code == 2
    assert "Unknown data source 'advbnch'" in capsys.readouterr().err
    code = main(["eval", str(tiny_folder), "--n", "0"])
    assert code == 2
    assert "--n and --n-utility must be >= 1" in capsys.readouterr().err


def test_fetch_cli_prints_paths_and_sizes(tmp_path, monkeypatch, capsys):
    import peft_safety.sources.datasets as ds
    import peft_safety.sources.models as models

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"x" * 2048)
    data_file = tmp_path / "data.csv"
    data_file.write_text("goal,target\n")
    fetched = []
    monkeypatch.setattr(models, "ensure_default_model", lambda: model_dir)
    monkeypatch.setattr(ds, "fetch_source", lambda name: fetched.append(name) or [data_file])
    assert main(["fetch", "--data", "advbench", "harmbench_test"]) == 0
    out = capsys.readouterr().out
    assert str(model_dir) in out and "advbench" in out and str(data_file) in out
    assert fetched == ["advbench", "harmbench_test"]
    assert main(["fetch", "--no-model", "--all"]) == 0
    assert sorted(fetched[2:]) == sorted(ds.DATA_SOURCES)
    assert main(["fetch", "--no-model", "--data", "nope"]) == 2
