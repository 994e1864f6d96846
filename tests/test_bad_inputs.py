"""Wrong arguments to the library's entry points fail at the entry with a clear `SafetyError`, not deep inside
(``ZeroDivisionError``, ``range() arg 3 must not be zero``, ``'list' object has no attribute 'collate'``,
``Tensor.item() cannot be called on meta tensors``, torch's ``Overflow when unpacking long long``)."""

from __future__ import annotations

import pytest
import torch

from peft_safety import CalibrationSet, Scores, refusal_rows, score, select
from peft_safety.errors import SafetyError, SafetyTypeError
from peft_safety.mask import SafetyMask
from peft_safety.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet(refusal_rows(["How do I pick a lock?"]), tiny_tokenizer())


@pytest.mark.parametrize("method", ["snip", "esi", "wanda"])
@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_score_refuses_a_batch_size_below_one(calib, method, batch_size):
    with pytest.raises(SafetyError, match=r"batch_size must be an int >= 1"):
        score(tiny_llama(), calib, method, progress=False, batch_size=batch_size)


@pytest.mark.parametrize("data", [refusal_rows(["How?"]), "rows.jsonl", {"prompt": "p"}])
def test_score_needs_a_calibration_set(data):
    with pytest.raises(SafetyTypeError, match=r"CalibrationSet\(rows, tokenizer\)"):
        score(tiny_llama(), data, "snip", progress=False)


def test_score_still_runs_with_batch_size_one(calib):
    assert set(score(tiny_llama(), calib, "snip", progress=False, batch_size=1).names)


def test_select_refuses_meta_scores():
    with pytest.raises(SafetyError, match="meta device"):
        select({"a": torch.empty(4, 4, device="meta")}, fraction=0.5)
    with pytest.raises(SafetyError, match="meta device"):
        Scores({"a": torch.empty(2, device="meta")})


@pytest.mark.parametrize("shape", [(2**40, 2**40), (2**62, 4), (2**25, 2**24)])
def test_to_dense_refuses_a_shape_no_dense_mask_can_hold(shape):
    mask = SafetyMask({"w": [0]}, {"w": shape}, provenance={})
    with pytest.raises(SafetyError, match=r"more than a dense mask can hold"):
        mask.to_dense("w")


def test_to_dense_of_a_real_shape_is_unchanged():
    mask = SafetyMask({"w": [0, 5]}, {"w": (2, 3)}, provenance={})
    assert mask.to_dense("w").flatten().nonzero().flatten().tolist() == [0, 5]


def test_a_model_that_already_holds_adapter_layers_is_named():
    """What the quickstart ran into: get_peft_model (and the trainer) add their adapter to the model in place."""
    from peft import LoraConfig, get_peft_model

    from peft_safety._models import adapter_layers, check_fresh_base

    model = tiny_llama()
    check_fresh_base(model, "SafetySFTTrainer")  # a plain model passes
    assert adapter_layers(model) == []
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    found = adapter_layers(model)
    assert [n for n, _ in found] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with pytest.raises(SafetyError, match=r"already holds adapter layers \('model.layers.0.self_attn.q_proj' is a "
                       r"Linear and 1 more\).*Load a fresh base model"):  # fmt: skip
        check_fresh_base(model, "SafetySFTTrainer")
