"""Shared fixtures: tiny models built from config, a character-level tokenizer, no network."""

from __future__ import annotations

import os

import pytest
import torch

# fixtures of the offline-source tests (`offline_cache`, `fake_pip`), shared by several modules
pytest_plugins = ["_fake_wheels"]

# never reach the network from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny test tensors gain nothing from a second intra-op thread, and on a loaded machine its barrier waits made
# generation tests 10-100x slower (0.1 s -> 11 s per test measured on 2 shared cores). Benchmarks set their own count.
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    from peft_safety.testing import tiny_llama as build

    return build(seed=0)


@pytest.fixture
def tiny_moe():
    from peft_safety.testing import tiny_qwen2_moe

    return tiny_qwen2_moe(seed=0)


@pytest.fixture
def tiny_tokenizer():
    from peft_safety.testing import tiny_tokenizer as build

    return build()


def _mask_on(model, units, *, fingerprints: bool = True, provenance=None):
    """A `SafetyMask` on ``model``'s own parameters. ``units``: ``{name: indices}`` (``Weight()`` units) or
    ``{name: (indices, granularity)}``; shapes, and unless ``fingerprints=False`` the weights' fingerprints, are read
    from the model, so a test states only which units it masks."""
    from peft_safety.mask import SafetyMask, Weight, fingerprint_tensor

    params = dict(model.named_parameters())
    indices, granularity = {}, {}
    for name, spec in units.items():
        idx, unit = spec if isinstance(spec, tuple) else (spec, Weight())
        indices[name], granularity[name] = idx, unit
    kwargs = {} if provenance is None else {"provenance": provenance}
    return SafetyMask(
        indices=indices,
        shapes={n: tuple(params[n].shape) for n in units},
        granularity=granularity,
        fingerprints={n: fingerprint_tensor(params[n]) for n in units} if fingerprints else None,
        **kwargs,
    )


@pytest.fixture
def mask_on():
    """``mask_on(model, {name: indices or (indices, granularity)}, fingerprints=True, provenance=None)``: the tiny
    masks tests build on a model's own weights, written once (see `_mask_on`)."""
    return _mask_on
