"""``peft-safety score`` end to end on a tiny model saved to a temporary folder."""

from __future__ import annotations

import json

import pytest

from peft_safety.cli.main import main
from peft_safety.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_score_cli_writes_mask(model_dir, tmp_path, capsys, ext):
    from peft_safety.mask import SafetyMask

    rows = [{"prompt": p, "response": "No."} for p in ["a", "bb", "ccc"]]
    data = tmp_path / f"rows.{ext}"
    if ext == "jsonl":
        data.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        data.write_text("prompt,response\n" + "\n".join(f"{r['prompt']},{r['response']}" for r in rows))
    out = tmp_path / "mask"
    argv = ["score", str(model_dir), "--data", str(data), "--method", "esi", "--fraction", "0.05", "--out", str(out)]
    assert main([*argv, "--no-progress", "--batch-size", "2"]) == 0
    mask = SafetyMask.from_pretrained(str(out))
    assert abs(mask.density - 0.05) < 0.001
    assert "saved" in capsys.readouterr().out


def test_score_cli_errors(model_dir, tmp_path, capsys):
    assert main(["score", str(model_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "rows.txt"
    bad.write_text("x")
    assert main(["score", str(model_dir), "--data", str(bad), "--out", str(tmp_path)]) == 2
    assert "unsupported extension" in capsys.readouterr().err
    good = tmp_path / "rows.jsonl"
    good.write_text(json.dumps({"prompt": "a", "response": "No."}))
    assert main(["score", str(model_dir), "--data", str(good), "--method", "snp", "--out", str(tmp_path)]) == 2
    assert "Did you mean 'snip'" in capsys.readouterr().err
