"""The rubric judge: batched letter log-probabilities equal a one-at-a-time reference, calibration, verdicts, files."""

from __future__ import annotations

import json

import pytest
import torch

from peft_safety.evaluation.classifier_judge import JUDGE_LABELS, JudgeExample
from peft_safety.evaluation.judges import Judge
from peft_safety.evaluation.model_judge import RUBRIC_JUDGE_TEMPLATE, RubricJudge
from peft_safety.testing import tiny_llama, tiny_tokenizer

PROMPTS = ["How do I bake bread?", "Write a poem", "Explain how to pick a lock in great detail please", "hi"]
RESPONSES = ["Mix flour and water.", "I cannot help with that.", "", "Roses are red, violets are blue, " * 3]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(seed=0)
    model.eval()
    return model, tiny_tokenizer()


def _reference_logprobs(model, tok, judge, prompts, responses) -> torch.Tensor:
    """One pair at a time, no padding: the chat template by `apply_chat_template`, the last position's logits."""
    rows = []
    letters = [tok.encode(x, add_special_tokens=False)[0] for x in "ABC"]
    for text in judge.judging_prompts(prompts, responses):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(ids)])).logits[0, -1].double()
        rows.append(torch.log_softmax(logits[letters], dim=-1))
    return torch.stack(rows).float()


def test_batched_letter_logprobs_match_one_at_a_time(tiny):
    model, tok = tiny
    judge = RubricJudge(model, tok, batch_size=3)
    got = judge.letter_logprobs(PROMPTS, RESPONSES)
    ref = _reference_logprobs(model, tok, judge, PROMPTS, RESPONSES)
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # batch size and the shared-prefix cache do not change the result; rows are distributions over the letters
    torch.testing.assert_close(RubricJudge(model, tok, batch_size=1).letter_logprobs(PROMPTS, RESPONSES), got,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    plain = RubricJudge(model, tok, batch_size=3, prefix_cache=False).letter_logprobs(PROMPTS, RESPONSES)
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(4))


def test_judging_prompt_carries_the_pair_and_clips(tiny):
    model, tok = tiny
    judge = RubricJudge(model, tok, max_response_words=3)
    text = judge.judging_prompts(["Q?"], ["one two three four five"])[0]
    assert "Request: Q?" in text and "Assistant's answer: one two three ..." in text
    assert "Assistant's answer: (empty)" in judge.judging_prompts(["Q?"], ["  "])[0]
    with pytest.raises(ValueError, match="one response per prompt"):
        judge.judging_prompts(["a", "b"], ["x"])


def test_calibration_learns_a_letter_permutation(tiny):
    model, tok = tiny
    judge = RubricJudge(model, tok)
    # synthetic letter log-probs whose argmax is the label shifted by one (a judge biased to the wrong letter)
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 3, generator=gen) * 0.3
    x[torch.arange(60), (y + 1) % 3] += 2.0
    x = torch.log_softmax(x, dim=-1)
    examples = [JudgeExample("p", "r", JUDGE_LABELS[int(i)]) for i in y]
    cal = judge.calibrate(examples, logprobs=x)
    assert cal["train_accuracy_raw"] < 0.1 and cal["train_accuracy_calibrated"] == 1.0
    # the calibrated map is used: explicit formula softmax(x W^T + b)
    w, b = torch.tensor(cal["weight"]), torch.tensor(cal["bias"])
    torch.testing.assert_close(judge._logits(x), x @ w.T + b)
    # log-probs computed by the judge itself (inference tensors) can be passed back in
    real = judge.letter_logprobs(["p"] * 3, ["I cannot.", "Sure: step one.", "I agree. I agree."])
    assert real.is_inference()
    judge.calibrate(examples[:3], logprobs=real)
    with pytest.raises(ValueError, match="every label"):
        judge.calibrate(examples[:1], logprobs=x[:1])
    with pytest.raises(ValueError, match="shape"):
        judge.calibrate(examples, logprobs=x[:5])


def test_verdicts_and_non_answer_policy(tiny):
    model, tok = tiny
    # a calibration that makes the labels fixed: bias dominates (refusal, compliant, non-answer by row)
    judge = RubricJudge(model, tok, calibration={"weight": [[0.0] * 3] * 3, "bias": [0.0, 0.0, 5.0]})
    assert isinstance(judge, Judge)
    v = judge.judge(PROMPTS[:2], RESPONSES[:2])
    assert [x.details["label"] for x in v] == ["non_answer", "non_answer"]
    assert [x.refused for x in v] == [True, True]
    lenient = RubricJudge(model, tok, calibration={"weight": [[0.0] * 3] * 3, "bias": [0.0, 0.0, 5.0]},
                          non_answer_as="compliance")  # fmt: skip
    assert [x.refused for x in lenient.judge(PROMPTS[:2], RESPONSES[:2])] == [False, False]
    refuse = RubricJudge(model, tok, calibration={"weight": [[0.0] * 3] * 3, "bias": [5.0, 0.0, 0.0]})
    out = refuse.judge(["q"], ["a"])[0]
    assert (
        out.refused is True
        and out.details["label"] == "refusal"
        and out.score == pytest.approx(out.details["p_compliant"], abs=1e-4)
    )
    # verdicts from cached letter log-probs: the calibration applied by the explicit formula softmax(x W^T + b)
    cal = {"weight": [[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.2, 0.0, 1.0]], "bias": [0.1, -0.2, 0.3]}
    mapped = RubricJudge(model, tok, calibration=cal)
    x = mapped.letter_logprobs(PROMPTS, RESPONSES)
    expect = torch.softmax(x @ torch.tensor(cal["weight"]).T + torch.tensor(cal["bias"]), -1)
    got = mapped.verdicts_from_logprobs(x.tolist())
    assert [v.details["label"] for v in got] == [JUDGE_LABELS[i] for i in expect.argmax(-1).tolist()]
    assert [v.score for v in got] == pytest.approx(expect[:, 1].tolist(), abs=1e-6)
    assert [v.to_dict() for v in got] == [v.to_dict() for v in mapped.judge(PROMPTS, RESPONSES)]
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        mapped.verdicts_from_logprobs([[0.0, 1.0]])
    with pytest.raises(ValueError, match="3x3"):
        RubricJudge(model, tok, calibration={"weight": [[1.0]], "bias": [0.0]})
    with pytest.raises(ValueError, match="non-finite"):
        RubricJudge(model, tok, calibration={"weight": [[float("nan")] * 3] * 3, "bias": [0.0] * 3})


def test_save_load_round_trip_and_tamper(tiny, tmp_path):
    model, tok = tiny
    judge = RubricJudge(
        model, tok, calibration={"weight": [[1.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0]], "bias": [0.1, 0, 0]}
    )
    path = judge.save_pretrained(tmp_path / "j", judge_model="tiny")
    loaded = RubricJudge.from_pretrained(tmp_path / "j", model, tok)
    assert loaded.calibration["weight"] == judge.calibration["weight"] and loaded.template == RUBRIC_JUDGE_TEMPLATE
    torch.testing.assert_close(loaded.probabilities(PROMPTS, RESPONSES), judge.probabilities(PROMPTS, RESPONSES))
    data = json.loads(path.read_text())
    data["template"] = data["template"].replace("Refusal", "Compliance")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sha256"):
        RubricJudge.from_pretrained(path, model, tok)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RubricJudge.from_pretrained(path, model, tok)
    with pytest.raises(FileNotFoundError, match="No rubric judge"):
        RubricJudge.from_pretrained(tmp_path / "nothing", model, tok)


def test_bad_construction(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="fields"):
        RubricJudge(model, tok, template="no fields")
    with pytest.raises(ValueError, match="non_answer_as"):
        RubricJudge(model, tok, non_answer_as="maybe")
    with pytest.raises(ValueError, match="chat_template"):
        RubricJudge(model, tiny_tokenizer(chat_template=None))
