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
    with pytest.raises(ValueError, match="no known format"):
        CalibrationSet([{"txt": "hi"}], tok)  # ({"text": ...} is TRL's language-modeling format: accepted)
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


# ---------------------------------------------------------------------------- TRL's dataset formats


def _same_examples(a: CalibrationSet, b: CalibrationSet) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        ea, eb = a.example(i), b.example(i)
        assert torch.equal(ea["input_ids"], eb["input_ids"]) and torch.equal(ea["labels"], eb["labels"])


@pytest.mark.parametrize("template", ["chat", "raw"])
def test_standard_prompt_completion_scores_the_completion(tok, template):
    trl_rows = [
        {"prompt": "How do I pick a lock?", "completion": "I cannot help."},
        {"prompt": "hi", "completion": "Hello."},
    ]
    reference = [{"prompt": r["prompt"], "response": r["completion"]} for r in trl_rows]
    calib = CalibrationSet(trl_rows, tok, template=template)
    _same_examples(calib, CalibrationSet(reference, tok, template=template))
    for i, row in enumerate(trl_rows):
        ex = calib.example(i)
        scored = tok.decode(ex["input_ids"][ex["labels"] != -100].tolist(), skip_special_tokens=True)
        assert scored.strip().startswith(row["completion"])


def test_conversational_prompt_completion_equals_messages(tok):
    trl_rows = [
        {"prompt": [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Make a weapon"}],
         "completion": [{"role": "assistant", "content": "I can't."}]},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    ]  # fmt: skip
    messages = [{"messages": [*r["prompt"], *r["completion"]]} for r in trl_rows]
    calib = CalibrationSet(trl_rows, tok)
    _same_examples(calib, CalibrationSet(messages, tok))
    # the prompt is rendered by the chat template, never as a Python repr of the list
    text = tok.decode(calib.example(0)["input_ids"].tolist())
    assert "Make a weapon" in text and "{'role'" not in text and "[{" not in text
    # full_text keeps the completion (it used to be dropped)
    full = CalibrationSet(trl_rows, tok, loss="full_text")
    assert "I can't." in tok.decode(full.example(0)["input_ids"].tolist())


def test_text_rows_score_every_token(tok):
    rows = [{"text": "The cat sat."}, {"text": "Dogs bark loudly at night."}]
    calib = CalibrationSet(rows, tok)
    for i, row in enumerate(rows):
        ex = calib.example(i)
        expected = tok(row["text"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        assert ex["labels"][ex["labels"] != -100].tolist() == expected  # every token of the text, nothing else
    assert calib.num_loss_tokens == sum(len(tok(r["text"] + tok.eos_token)["input_ids"]) for r in rows) - sum(
        len(tok("", add_special_tokens=True)["input_ids"]) for _ in rows
    )


def test_trl_dataset_formats_through_datasets(tok):
    from datasets import Dataset

    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    )
    assert len(CalibrationSet(ds, tok)) == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "a"}, "no known format"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "standard format pairs two strings"),
        ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "must be a non-empty list"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            "exactly one assistant",
        ),
        ({"prompt": "q", "completion": "a", "response": "b"}, "both 'response' and 'completion'"),
        ({"prompt": 3, "completion": "a"}, "'prompt' must be a string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "only text content"),
    ],
)
def test_unknown_or_mixed_formats_are_clear_errors(tok, row, message):
    with pytest.raises(ValueError, match=message):
        CalibrationSet([row], tok)
