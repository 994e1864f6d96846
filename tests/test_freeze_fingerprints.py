"""``Freezer.install`` checks the mask's weight fingerprints, as `apply_mask_` and the trainer check them: a mask
computed on other weights is refused (or warned about, or ignored, as the caller chooses), and nothing stays installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask, Weight, fingerprint_tensor
from peft_safety.testing import tiny_llama
from peft_safety.training.apply import apply_mask_
from peft_safety.training.freeze import Freezer

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def _mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    return SafetyMask(
        {Q: torch.arange(0, 1024, 9), DOWN: torch.tensor([1, 7])},
        {Q: tuple(p[Q].shape), DOWN: tuple(p[DOWN].shape)},
        granularity={Q: Weight(), DOWN: Neuron(axis=0)},
        fingerprints={n: fingerprint_tensor(p[n]) for n in (Q, DOWN)},
    )


def _other():
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.get_parameter(DOWN).mul_(-3)
    return model


def test_install_refuses_a_mask_of_other_weights_and_leaves_nothing_installed():
    mask = _mask(tiny_llama(seed=0))
    model = _other()
    freezer = Freezer(mask)
    with pytest.raises(ValueError, match=rf"fingerprint of '{DOWN}' differs.*fingerprint_check='warn' or 'ignore'"):
        freezer.install(model)
    assert not freezer.installed and freezer.num_frozen == 0
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_install_on_the_weights_the_mask_was_made_on():
    model = tiny_llama(seed=0)
    with Freezer(_mask(model)).install(model) as freezer:
        assert freezer.installed and freezer.num_frozen > 0


def test_the_caller_can_warn_or_ignore():
    mask = _mask(tiny_llama(seed=0))
    with pytest.warns(UserWarning, match=DOWN):
        Freezer(mask, fingerprint_check="warn").install(_other()).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Freezer(mask, fingerprint_check="ignore").install(_other()).remove()
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        Freezer(mask, fingerprint_check="maybe")


def test_apply_mask_keeps_its_own_policy():
    mask = _mask(tiny_llama(seed=0))
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        apply_mask_(_other(), mask)
    with pytest.warns(UserWarning) as record:
        apply_mask_(_other(), mask, fingerprint_check="warn").remove()
    assert len([w for w in record if DOWN in str(w.message)]) == 1  # warned once, not again by the Freezer
