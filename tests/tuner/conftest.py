"""Fixtures of the tuner tests: one random-mask builder, token batches, a short AdamW loop, a saved tiny base model.

The builders are session fixtures that return functions (pytest's factory-fixture pattern), so that a test, a
parametrised case table or a module-scoped fixture can call them with its own arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch

import peft_safety  # noqa: F401  (registers the SAFETY and SAFETY_LORA types before any test loads an adapter)


def _random_mask(
    model: torch.nn.Module,
    granularity: Mapping,
    fraction: float = 0.25,
    seed: int = 0,
    fingerprints: bool = False,
):
    """A ``SafetyMask`` with ``max(1, int(units * fraction))`` random units per parameter (one for ``Layer()``).

    Args:
        model: the model whose parameter shapes (and, with ``fingerprints``, weights) the mask describes.
        granularity: ``{parameter name: granularity}``, in the order the units are drawn.
        fraction: share of each parameter's units selected.
        seed: seed of the draw (the same seed gives the same mask).
        fingerprints: record the model's weight fingerprints in the mask.
    """
    from peft_safety.mask import Layer, SafetyMask, fingerprint_tensor

    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, gran in granularity.items():
        shape = tuple(params[name].shape)
        units = gran.num_units(shape)
        k = 1 if isinstance(gran, Layer) else max(1, int(units * fraction))
        indices[name] = torch.randperm(units, generator=gen)[:k].sort().values.to(torch.int32)
        shapes[name] = shape
    prints = {n: fingerprint_tensor(params[n]) for n in granularity} if fingerprints else None
    return SafetyMask(indices=indices, shapes=shapes, granularity=dict(granularity), fingerprints=prints)


def _tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    """Random token ids of the tiny models' vocabulary (special tokens left out)."""
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _train(model: torch.nn.Module, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.1) -> None:
    """A few AdamW steps (with weight decay, which would move any stored parameter) on random tokens, then eval."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        ids = _tokens(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="session")
def random_mask() -> Callable:
    """The mask builder (see `_random_mask`)."""
    return _random_mask


@pytest.fixture(scope="session")
def tokens() -> Callable:
    """The token-batch builder (see `_tokens`)."""
    return _tokens


@pytest.fixture(scope="session")
def train() -> Callable:
    """The short training loop (see `_train`)."""
    return _train


@pytest.fixture(scope="session")
def lora_config() -> Callable:
    """``LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **overrides)``."""
    from peft import LoraConfig

    def build(**overrides):
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **overrides)

    return build


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A tiny Llama (seed 0) and its tokenizer saved to a folder, for loaders that read the base model from disk."""
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
