"""``Freezer.install`` checks the mask's weight fingerprints, as `apply_mask_` and the trainer check them: a mask
computed on other weights is refused (or warned about, or ignored, as the caller chooses), and nothing stays installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from peft_safety.mask import Neuron, Weight
from peft_safety.testing import tiny_llama
from peft_safety.training.apply import apply_mask_
from peft_safety.training.freeze import Freezer

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


UNITS = {Q: (torch.arange(0, 1024, 9), Weight()), DOWN: (torch.tensor([1, 7]), Neuron(axis=0))}


def _other():
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.get_parameter(DOWN).mul_(-3)
    return model


def test_install_refuses_a_mask_of_other_weights_and_leaves_nothing_installed(mask_on):
    mask = mask_on(tiny_llama(seed=0), UNITS)
    model = _other()
    freezer = Freezer(mask)
    with pytest.raises(ValueError, match=rf"fingerprint of '{DOWN}' differs.*fingerprint_check='warn' or 'ignore'"):
        freezer.install(model)
    assert not freezer.installed and freezer.num_frozen == 0
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_install_on_the_weights_the_mask_was_made_on(mask_on):
    model = tiny_llama(seed=0)
    with Freezer(mask_on(model, UNITS)).install(model) as freezer:
        assert freezer.installed and freezer.num_frozen > 0


def test_the_caller_can_warn_or_ignore(mask_on):
    mask = mask_on(tiny_llama(seed=0), UNITS)
    with pytest.warns(UserWarning, match=DOWN):
        Freezer(mask, fingerprint_check="warn").install(_other()).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Freezer(mask, fingerprint_check="ignore").install(_other()).remove()
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        Freezer(mask, fingerprint_check="maybe")


def test_apply_mask_keeps_its_own_policy(mask_on):
    mask = mask_on(tiny_llama(seed=0), UNITS)
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        apply_mask_(_other(), mask)
    with pytest.warns(UserWarning) as record:
        apply_mask_(_other(), mask, fingerprint_check="warn").remove()
    assert len([w for w in record if DOWN in str(w.message)]) == 1  # warned once, not again by the Freezer
