"""CalibrationSet: templates, loss policies, padding, truncation, subsampling, hashing, builders."""

from __future__ import annotations

import pytest
import torch

from peft_safety.scoring.calibration import CalibrationSet, refusal_rows, utility_rows
from peft_safety.scoring.rows import build_refusal_set, build_utility_set
from peft_safety.testing import tiny_llama, tiny_tokenizer

ROWS = refusal_rows(["How do I pick a lock?", "hi", "Write malware"], lambda p: "No: " + p[::-1])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("template", ["chat", "raw", "inst", "alpaca"])
def test_response_labels_decode_to_response(tok, template):
    calib = CalibrationSet(ROWS, tok, template=template)
    for i in range(len(calib)):
        ex = calib.example(i)
        labelled = ex["input_ids"][ex["labels"] != -100]
        text = tok.decode(labelled.tolist(), skip_special_tokens=True)
        assert text.strip().startswith(ROWS[i]["response"])
        assert ex["labels"][0] == -100  # prompt positions never carry a label


def test_padding_never_reaches_labels(tok):
    calib = CalibrationSet(ROWS, tok)
    batch = next(calib.batches(3))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (batch["labels"][pad] == -100).all()
    assert (batch["input_ids"][pad] == tok.pad_token_id).all()
    # right padding: every row's real tokens come first
    assert (batch["attention_mask"].diff(dim=1) <= 0).all()


def test_left_padding_has_position_ids(tok):
    calib = CalibrationSet(ROWS, tok, padding_side="left")
    batch = next(calib.batches(3))
    assert batch["attention_mask"][:, -1].all()
    real = batch["attention_mask"].bool()
    for r in range(3):
        assert batch["position_ids"][r][real[r]].tolist() == list(range(int(real[r].sum())))


def test_loss_policies(tok):
    full = CalibrationSet(ROWS, tok, loss="full_text").example(0)
    assert (full["labels"] == full["input_ids"]).all()
    last = CalibrationSet(ROWS, tok, loss="last_token").example(0)
    assert (last["labels"] != -100).sum() == 1 and last["labels"][-1] == last["input_ids"][-1]
    none = CalibrationSet(ROWS, tok, loss="none")
    ex = none.example(0)
    assert (ex["labels"] == -100).all()
    assert len(ex["input_ids"]) < len(full["input_ids"])  # responses dropped


def test_datasets_input_and_messages(tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    assert CalibrationSet(ds, tok).data_hash == CalibrationSet(ROWS, tok).data_hash
    msgs = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
        for r in ROWS
    ]
    assert CalibrationSet(msgs, tok).data_hash == CalibrationSet(ROWS, tok).data_hash


def test_hash_subsample_and_rows(tok):
    calib = CalibrationSet(ROWS, tok)
    assert len(calib) == 3 and len(calib.rows) == 3
    assert calib.data_hash == CalibrationSet(ROWS, tok).data_hash
    assert calib.data_hash != CalibrationSet(ROWS, tok, loss="full_text").data_hash
    assert calib.data_hash != CalibrationSet(ROWS, tok, template="inst").data_hash
    a, b = calib.subsample(2, seed=1), calib.subsample(2, seed=1)
    assert len(a) == 2 and a.data_hash == b.data_hash
    hashes = {calib.subsample(2, seed=s).data_hash for s in range(8)}
    assert len(hashes) > 1
    assert calib.provenance()["data_hash"] == calib.data_hash


def test_truncation_warns_and_drops(tok):
    rows = [{"prompt": "p" * 40, "response": "r" * 10}, {"prompt": "q", "response": "s" * 10}]
    with pytest.warns(UserWarning, match=r"1 of 2 rows were truncated.*1 of them lost their whole response"):
        calib = CalibrationSet(rows, tok, template="raw", max_length=12)
    assert len(calib) == 1
    assert all(len(calib.example(i)["input_ids"]) <= 12 for i in range(len(calib)))
    with pytest.raises(ValueError, match="more than max_length=12"):
        CalibrationSet(rows, tok, template="raw", max_length=12, truncation="error")
    with pytest.raises(ValueError, match="Every response was truncated away"):
        CalibrationSet(rows[:1], tok, template="raw", max_length=12)


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="empty"):
        CalibrationSet([], tok)
    with pytest.raises(ValueError, match="needs a response in every row"):
        CalibrationSet([{"prompt": "hi"}], tok)
    with pytest.raises(ValueError, match=r"no chat template.*template='raw', 'inst' or 'alpaca'"):
        CalibrationSet(ROWS, tiny_tokenizer(chat_template=None))
    assert CalibrationSet(ROWS, tiny_tokenizer(chat_template=None), chat_fallback="inst").template == "inst"
    with pytest.raises(ValueError, match="Unknown template 'llama'"):
        CalibrationSet(ROWS, tok, template="llama")
    with pytest.raises(ValueError, match="Unknown loss policy"):
        CalibrationSet(ROWS, tok, loss="all")
    with pytest.raises(TypeError, match="Row 0 is a str"):
        CalibrationSet(["hi"], tok)
    with pytest.raises(ValueError, match="neither 'messages' nor 'prompt'"):
        CalibrationSet([{"text": "hi"}], tok)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(CalibrationSet(ROWS, tok).batches(0))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        utility_rows(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="not a single string"):
        refusal_rows("a prompt")


def test_builders(tok):
    model = tiny_llama(seed=0)
    fixed = build_refusal_set(None, tok, ["a", "b"], refusal="I won't.")
    assert [r["response"] for r in fixed.rows] == ["I won't.", "I won't."]
    gen = build_refusal_set(model, tok, ["a", "bb"], generate=True, refusal_prefix="I cannot", max_new_tokens=4)
    assert all(r["response"].startswith("I cannot") for r in gen.rows)
    again = build_refusal_set(model, tok, ["a", "bb"], generate=True, refusal_prefix="I cannot", max_new_tokens=4)
    assert gen.data_hash == again.data_hash  # greedy: deterministic
    util = build_utility_set(model, tok, ["x"], max_new_tokens=3)
    assert len(util) == 1 and util.loss == "response_only"
    assert model.training is False
    assert torch.is_tensor(next(util.batches(1))["input_ids"])
