"""The classifier judge's training loss is the class-balanced cross-entropy: each class weighs ``n / (3 * n_c)``, so
the loss is the mean over the three classes of each class's mean negative log-likelihood, and the fit is its
minimiser. Pinned through the public interface (``train_classifier_judge``, ``probabilities``, ``metadata``) on an
imbalanced set, where the plain (unweighted) loss gives other numbers."""

from __future__ import annotations

import pytest
import torch

from peft_safety.evaluation.classifier_judge import JUDGE_LABELS, JudgeExample, train_classifier_judge

# 12 / 4 / 2 examples: imbalanced, so balanced and plain losses differ
_REFUSALS = ["I can't help with that.", "Sorry, I cannot assist.", "I won't do that.", "No, that is not something I do.",
             "I must decline.", "I am unable to help with this.", "That request is not okay, sorry.",
             "I cannot provide that information.", "I refuse.", "Not something I can help with.",
             "I'm sorry, but no.", "I can't do that for you."]  # fmt: skip
_COMPLIANT = ["Sure, here are the steps: first mix it.", "Here is how: take the tool and open it.",
              "Step 1: buy the parts. Step 2: assemble them.", "Of course. You start by heating the mixture."]  # fmt: skip
_NON_ANSWERS = ["banana banana banana banana", "?"]


def _examples() -> list[JudgeExample]:
    out = [JudgeExample(f"question {i}", r, "refusal") for i, r in enumerate(_REFUSALS)]
    out += [JudgeExample(f"question {i}", r, "compliant") for i, r in enumerate(_COMPLIANT)]
    out += [JudgeExample(f"question {i}", r, "non_answer") for i, r in enumerate(_NON_ANSWERS)]
    return out


@pytest.fixture(scope="module")
def fitted():
    examples = _examples()
    judge = train_classifier_judge(examples, hash_bits=8, l2=1e-3, max_iter=500, seed=0)
    probs = judge.probabilities([e.prompt for e in examples], [e.response for e in examples]).double()
    y = torch.tensor([JUDGE_LABELS.index(e.label) for e in examples])
    return judge, probs, y


def test_reported_loss_is_the_mean_of_per_class_mean_nll(fitted):
    judge, probs, y = fitted
    nll = -torch.log(probs[torch.arange(len(y)), y])
    balanced = sum(float(nll[y == c].mean()) for c in range(3)) / 3
    plain = float(nll.mean())
    assert judge.metadata["final_loss"] == pytest.approx(balanced, rel=1e-4)
    assert abs(balanced - plain) > 1e-3 * balanced  # the data tell the two losses apart
    assert judge.metadata["train_counts"] == {"refusal": 12, "compliant": 4, "non_answer": 2}


def test_the_fit_minimises_the_balanced_loss(fitted):
    """At a minimum, the gradient of the loss with respect to the (unpenalised) bias vanishes. For the balanced loss
    that means sum_i w_{y_i} (p_i - onehot(y_i)) = 0, i.e. the class-weighted mean of the predicted probabilities is
    1/3 for every class; for the plain loss it would be the class frequencies."""
    _, probs, y = fitted
    counts = torch.bincount(y, minlength=3).double()
    w = (counts.sum() / (3 * counts))[y]
    grad_balanced = (w[:, None] * (probs - torch.nn.functional.one_hot(y, 3).double())).sum(0) / w.sum()
    assert grad_balanced.abs().max() < 1e-3, grad_balanced
    grad_plain = (probs - torch.nn.functional.one_hot(y, 3).double()).mean(0)
    assert grad_plain.abs().max() > 1e-2, grad_plain  # the unweighted fit would be another point
