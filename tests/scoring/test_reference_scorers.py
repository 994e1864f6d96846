"""Scorers against independent references: ESI's judge-guided objective (Qi et al. 2026) term by term.

The references re-derive each quantity from its formula (the ESI reference code's steps 3-6: guard gradient,
vocabulary transfer, Gumbel-softmax surrogate) with plain loops, fp64 and autograd, never from the library's own
intermediate results:

* the vocabulary transfer ``M[g, l] = 1/|pieces(g)|`` (each guard token's row sums to 1);
* the guard gradient ``g_G = dJ/dZ`` with ``J = -logit_last[safe]`` of the guard reading ``prefix + softmax(Z) E + suffix``
  (rebuilt here and differentiated by autograd on a float64 copy of the guard);
* the surrogate ``L = -sum_t sum_v g_T[t, v] p[t, v]`` with ``g_T = g_G M`` and ``p`` the Gumbel-softmax of the
  response logits: at a large temperature ``p`` is uniform to first order, so ``dL/dlogits[t, v] =
  -(g_T[t, v] - mean_v g_T[t, v]) / (tau V)`` whatever the noise.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
from peft_safety.scoring.gradient import JudgeObjective
from peft_safety.testing import tiny_llama, tiny_tokenizer

TEMPLATE = "Is the following response safe or unsafe?\nResponse: {response}\nAnswer:"
#: the reference's -17 makes softmax(Z) one-hot to 4e-8, and every gradient ~1e-10; -2 keeps the same formula
#: with gradients a test can resolve
OFF = -2.0


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def guard():
    model = tiny_llama(seed=1, num_hidden_layers=1)
    return model


def naive_transfer(tok_guard, tok_target, v_guard, v_target):
    m = torch.zeros(v_guard, v_target, dtype=torch.float64)
    for g in range(min(v_guard, len(tok_guard))):
        token = tok_guard.convert_ids_to_tokens(g)
        if token is None:
            continue
        text = token.replace("\u0120", " ").replace("\u2581", " ")
        pieces = [p for p in tok_target(text, add_special_tokens=False)["input_ids"] if p < v_target]
        for p in pieces:
            m[g, p] += 1.0 / len(pieces)
    return m


def reference_guard_gradient(guard, tok, text, safe_id, off_logit=OFF):
    """dJ/dZ in fp64 by autograd through a float64 copy of the guard, J = -logit_last[safe]."""
    g64 = copy.deepcopy(guard).to(torch.float64)
    emb = g64.get_input_embeddings().weight.detach()
    before, after = TEMPLATE.split("{response}")
    prefix = tok(before, add_special_tokens=True)["input_ids"]
    suffix = tok(after, add_special_tokens=False)["input_ids"]
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def objective(z):
        soft = torch.softmax(z, -1) @ emb
        embeds = torch.cat([emb[prefix], soft, emb[suffix]])[None]
        return -g64(inputs_embeds=embeds).logits[0, -1, safe_id]

    z = torch.full((len(ids), emb.shape[0]), off_logit, dtype=torch.float64)
    z[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(z), z)
    return grad, objective, z.detach()


def test_transfer_matrix_matches_a_naive_loop_and_rows_are_normalised(guard, tok):
    judge = JudgeObjective(guard, tok, tok, safe_token="s", template=TEMPLATE)
    dense = judge.transfer_matrix(128).to_dense().double()
    expected = naive_transfer(tok, tok, 128, 128)
    torch.testing.assert_close(dense, expected, rtol=1e-6, atol=1e-7)
    sums = expected.sum(1)
    has_pieces = sums > 0
    torch.testing.assert_close(dense.sum(1)[has_pieces], torch.ones(int(has_pieces.sum()), dtype=torch.float64))
    # multi-piece guard tokens exist here (special tokens re-tokenised character by character): normalisation matters
    assert int(((expected > 0).sum(1) > 1).sum()) > 0


def test_guard_gradient_matches_fp64_autograd(guard, tok):
    judge = JudgeObjective(guard, tok, tok, safe_token="s", template=TEMPLATE, off_logit=OFF)
    text = "No. I will not."
    got = judge.guard_gradient(text).double()
    expected, _, _ = reference_guard_gradient(guard, tok, text, judge.safe_id)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
    assert expected.abs().max() > 1e-4  # the guard matters: a non-trivial gradient
    # the guard's parameters got no gradient and keep their flags
    assert all(p.grad is None and p.requires_grad for p in guard.parameters())


class _LogitsModel(nn.Module):
    """A 'model' whose logits are a leaf parameter, to read dL/dlogits off the objective."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, input_ids=None, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.logits)


def test_judge_objective_gradient_matches_the_formula(guard, tok):
    tau = 1e5
    judge = JudgeObjective(guard, tok, tok, safe_token="s", template=TEMPLATE, tau=tau, seed=3, off_logit=OFF)
    calib = CalibrationSet(refusal_rows(["How do I pick a lock?"], "No. I will not."), tok)
    batch = calib.collate([0])
    labels = batch["labels"][0]
    vocab = 128
    logits = torch.randn(1, labels.shape[0], vocab, generator=torch.Generator().manual_seed(0))
    fake = _LogitsModel(logits)
    loss = judge(fake, batch, 0)
    loss.backward()
    # reference: response positions p predict labels[p + 1]; g_T = g_G[:n] @ M over the first n of them
    targets = labels[1:]
    positions = (targets != -100).nonzero().reshape(-1)
    text = tok.decode(targets[positions].tolist(), skip_special_tokens=True)
    g_guard, _, _ = reference_guard_gradient(guard, tok, text, judge.safe_id)
    n = min(g_guard.shape[0], positions.numel())
    g_target = g_guard[:n] @ naive_transfer(tok, tok, 128, vocab)
    expected = torch.zeros(labels.shape[0], vocab, dtype=torch.float64)
    expected[positions[:n]] = -(g_target - g_target.mean(-1, keepdim=True)) / (tau * vocab)
    got = fake.logits.grad[0].double()
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-3 * float(scale))
    # and the value itself: L = -sum_t sum_v g_T p, with p uniform to first order
    value = float(-g_target.sum() / vocab)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-2, abs=1e-3 * float(g_target.abs().sum()) / vocab)
