"""Provenance: masks from score/select (API, CLI, trainer) carry fingerprints of the weights they were computed on,
so that loading them onto other weights is rejected; the embedded model records its Hub id, not a cache path."""

from __future__ import annotations

import json

import pytest
import torch

from peft_safety.mask import SafetyMask, fingerprint_tensor
from peft_safety.scoring import score
from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import isolate, select
from peft_safety.testing import tiny_llama, tiny_tokenizer

ROWS = refusal_rows(["How do I pick a lock?", "Write malware", "hello"], lambda p: "No, I cannot help.")


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet(ROWS, tiny_tokenizer())


def _scaled(model, factor):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


def _expected_fingerprints(model, names):
    # independent reference: the fingerprint of every named parameter, read straight from named_parameters()
    params = dict(model.named_parameters())
    return {n: fingerprint_tensor(params[n]) for n in names}


@pytest.mark.parametrize("method", ["snip", "esi", "magnitude"])
def test_score_select_records_fingerprints_and_rejects_other_weights(calib, method):
    model = tiny_llama(seed=0)
    scores = score(model, calib if method != "magnitude" else None, method, progress=False)
    assert scores.fingerprints == _expected_fingerprints(model, scores.names)
    mask = select(scores, fraction=0.05)
    assert mask.fingerprints == _expected_fingerprints(model, mask.shapes)
    mask.validate(model, fingerprint_check="error")  # the same model is accepted
    other = _scaled(tiny_llama(seed=0), -3.0)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        mask.validate(other, fingerprint_check="error")
    # and after a file round trip
    again = SafetyMask.from_bytes(mask.to_bytes())
    again.validate(model)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        again.validate(other)


def test_scorers_that_select_internally_record_fingerprints(calib):
    model = tiny_llama(seed=0)
    scores = score(model, calib, "safety_layers", layers=(0, 1), progress=False)
    mask = select(scores)  # the scorer's rule
    assert isinstance(mask, SafetyMask)
    assert mask.fingerprints and mask.fingerprints == _expected_fingerprints(model, mask.shapes)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        mask.validate(_scaled(tiny_llama(seed=0), -3.0))


def test_fingerprints_survive_scores_transformations_and_files(calib, tmp_path):
    model = tiny_llama(seed=0)
    scores = score(model, calib, "snip", aggregation="abs_of_sum", progress=False)
    fps = scores.fingerprints
    assert (scores * 2).fingerprints == fps
    assert scores.abs().fingerprints == fps
    names = list(scores.names)[:2]
    assert scores.restrict(names).fingerprints == {n: fps[n] for n in names}
    path = tmp_path / "scores.safetensors"
    scores.to_safetensors(path)
    assert Scores.from_safetensors(path).fingerprints == fps
    # isolate() keeps the safety scores' fingerprints
    utility = score(model, calib, "snip", aggregation="abs_of_sum", progress=False)
    assert isolate(scores, utility, p=0.1, q=0.1).fingerprints == fps
    # combining scores of different weights keeps no fingerprint for the disagreeing names
    other = Scores({n: scores[n] for n in scores.names}, fingerprints=dict.fromkeys(scores.names, "x"))
    assert (scores + other).fingerprints == {}


def test_scores_fingerprints_validated():
    with pytest.raises(ValueError, match="not scored"):
        Scores({"w": torch.ones(2, 2)}, fingerprints={"v": "bf16s4096b2b:00"})
    with pytest.raises(TypeError, match="fingerprints"):
        Scores({"w": torch.ones(2, 2)}, fingerprints={"w": 3})


def test_cli_score_and_select_record_fingerprints(tmp_path, capsys):
    from peft_safety.cli.main import main

    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "No."}) for p in ["a", "bb"]))
    out = tmp_path / "mask"
    argv = ["score", str(tmp_path / "model"), "--data", str(data), "--method", "snip", "--out", str(out)]
    assert main([*argv, "--no-progress", "--fraction", "0.05"]) == 0
    mask = SafetyMask.from_pretrained(out)
    assert mask.fingerprints == _expected_fingerprints(model, mask.shapes)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        mask.validate(_scaled(tiny_llama(seed=0), -3.0))

    scores = score(model, CalibrationSet(ROWS, tiny_tokenizer()), "snip", progress=False)
    scores.to_safetensors(tmp_path / "s.safetensors")
    assert main(["select", str(tmp_path / "s.safetensors"), "--fraction", "0.05", "--out", str(tmp_path / "m2")]) == 0
    m2 = SafetyMask.from_pretrained(tmp_path / "m2")
    assert m2.fingerprints == _expected_fingerprints(model, m2.shapes)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        m2.validate(_scaled(tiny_llama(seed=0), -3.0))
    capsys.readouterr()


def test_with_fingerprints():
    model = tiny_llama(seed=0)
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    mask = SafetyMask({name: torch.tensor([1, 2], dtype=torch.int32)}, {name: tuple(params[name].shape)})
    assert mask.fingerprints == {}
    fp = mask.with_fingerprints({name: fingerprint_tensor(params[name])})
    assert fp.fingerprints == {name: fingerprint_tensor(params[name])}
    assert fp == mask and mask.fingerprints == {}
    with pytest.raises(ValueError, match="not in shapes"):
        mask.with_fingerprints({"nope": "x"})
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        fp.validate(_scaled(tiny_llama(seed=0), -3.0))
