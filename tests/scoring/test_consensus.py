"""Consensus masks against an explicit counting reference (Python sets and a vote dictionary)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask
from peft_safety.scoring.consensus import (
    agreement_counts,
    bootstrap_masks,
    bootstrap_row_indices,
    consensus,
    consensus_mask,
)
from peft_safety.scoring.scores import Scores

SHAPES = {"a.weight": (6, 8), "b.weight": (4, 5), "c.weight": (3, 3)}


def _random_masks(n: int, seed: int) -> list[SafetyMask]:
    rng = random.Random(seed)
    masks = []
    for _ in range(n):
        indices = {}
        for name, (r, c) in SHAPES.items():
            if rng.random() < 0.8:  # some masks leave a parameter out entirely
                indices[name] = sorted(rng.sample(range(r * c), rng.randint(0, r * c // 2)))
        masks.append(SafetyMask(indices, SHAPES, provenance={"method": "snip", "seed": rng.randint(0, 9)}))
    return masks


def _reference(masks: list[SafetyMask], k: int) -> dict[str, list[int]]:
    votes: dict[str, Counter] = {}
    for m in masks:
        for name in SHAPES:
            if name in m.names:
                votes.setdefault(name, Counter()).update(int(i) for i in m[name])
    return {name: sorted(i for i, v in c.items() if v >= k) for name, c in votes.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_consensus_matches_an_explicit_vote_count(seed, k):
    masks = _random_masks(4, seed)
    result = consensus(masks, min_agreement=k)
    ref = _reference(masks, k)
    for name in SHAPES:
        got = result[name].tolist() if name in result.names else []
        assert got == ref.get(name, []), name
    assert result.shapes == SHAPES
    assert result.provenance["min_agreement"] == k and result.provenance["n_masks"] == 4
    assert result.provenance["method"] == "snip"  # shared provenance is kept


def test_consensus_extremes_are_intersection_and_union():
    masks = _random_masks(3, 5)
    inter = masks[0] & masks[1] & masks[2]
    union = masks[0] | masks[1] | masks[2]
    assert consensus(masks, 1.0) == SafetyMask(
        dict(inter.indices), SHAPES, provenance=consensus(masks, 1.0).provenance
    )
    for name in SHAPES:
        got_all = consensus(masks, 3)[name].tolist() if name in consensus(masks, 3).names else []
        assert got_all == (inter[name].tolist() if name in inter.names else [])
        got_any = consensus(masks, 1)[name].tolist() if name in consensus(masks, 1).names else []
        assert got_any == (union[name].tolist() if name in union.names else [])


def test_float_agreement_is_a_share_of_the_masks():
    masks = _random_masks(3, 7)
    assert consensus(masks, 2 / 3) == consensus(masks, 2)
    assert consensus(masks, 0.5) == consensus(masks, 2)  # ceil(1.5) = 2
    assert consensus(masks, 0.34) == consensus(masks, 2)
    assert consensus(masks, 0.33) == consensus(masks, 1)


def test_agreement_counts_are_votes():
    masks = _random_masks(5, 3)
    counts = agreement_counts(masks)
    for name, (units, votes) in counts.items():
        ref = Counter(int(i) for m in masks if name in m.names for i in m[name])
        assert units.tolist() == sorted(ref)
        assert votes.tolist() == [ref[u] for u in sorted(ref)]


def test_consensus_errors():
    masks = _random_masks(2, 0)
    with pytest.raises(ValueError, match="at least two masks"):
        consensus(masks[:1])
    with pytest.raises(ValueError, match=r"min_agreement=3 must be between 1 and the number of masks \(2\)"):
        consensus(masks, 3)
    with pytest.raises(TypeError, match="not a bool"):
        consensus(masks, True)
    other = SafetyMask({"a.weight": [1]}, {"a.weight": (8, 6)})
    with pytest.raises(ValueError, match="shape"):
        consensus([masks[0], other])
    neuron = SafetyMask({"a.weight": [1]}, {"a.weight": (6, 8)}, granularity=Neuron(0))
    with pytest.raises(ValueError, match=r"to_weight\(\)"):
        consensus([masks[0], neuron])


def test_consensus_mask_matches_topk_then_vote():
    gen = torch.Generator().manual_seed(0)
    base = {name: torch.rand(shape, generator=gen) for name, shape in SHAPES.items()}
    # three correlated score sets: a shared signal plus independent noise
    scores_list = [
        Scores({n: t + 0.3 * torch.rand(t.shape, generator=gen) for n, t in base.items()}) for _ in range(3)
    ]
    total = sum(t.numel() for t in base.values())
    k_units = int(0.2 * total + 0.5)
    ref_votes: Counter = Counter()
    for s in scores_list:
        flat = torch.cat([s[n].flatten() for n in SHAPES])
        top = torch.topk(flat, k_units).indices.tolist()
        ref_votes.update(top)
    offsets, off = {}, 0
    for name, (r, c) in SHAPES.items():
        offsets[name] = off
        off += r * c
    result = consensus_mask(scores_list, fraction=0.2, min_agreement=2)
    got = sorted(offsets[n] + int(i) for n in result.names for i in result[n])
    assert got == sorted(i for i, v in ref_votes.items() if v >= 2)
    assert result.provenance["selection_fraction"] == 0.2


def test_bootstrap_row_indices_are_seeded_and_prefix_stable():
    a = bootstrap_row_indices(10, 4, seed=1)
    assert a == bootstrap_row_indices(10, 4, seed=1)
    assert bootstrap_row_indices(10, 2, seed=1) == a[:2]
    assert a != bootstrap_row_indices(10, 4, seed=2)
    assert all(len(r) == 10 and all(0 <= i < 10 for i in r) for r in a)
    # with replacement: some resample repeats a row (probability of none in 4 x 10 draws is ~1e-13)
    assert any(len(set(r)) < 10 for r in a)
    with pytest.raises(ValueError, match="n_rows must be a positive int"):
        bootstrap_row_indices(0, 2)


def test_bootstrap_masks_on_a_tiny_model():
    from peft_safety.scoring import score
    from peft_safety.scoring.calibration import CalibrationSet
    from peft_safety.scoring.selection import select
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    rows = [{"prompt": f"question {i}?", "response": f"I cannot help with {i}."} for i in range(6)]
    masks = bootstrap_masks(model, rows, tok, method="snip", fraction=0.05, n_resamples=3, seed=4)
    assert len(masks) == 3
    assert [m.provenance["resample"] for m in masks] == [0, 1, 2]
    # resample 1 equals scoring the rows drawn by bootstrap_row_indices by hand
    idx = bootstrap_row_indices(6, 3, seed=4)[1]
    by_hand = select(score(model, CalibrationSet([rows[j] for j in idx], tok), "snip", progress=False), fraction=0.05)
    assert masks[1].indices.keys() == by_hand.indices.keys()
    assert all(torch.equal(masks[1][n], by_hand[n]) for n in by_hand.names)
    combined = consensus(masks, 2)
    assert combined.numel() <= min(m.numel() for m in masks) * 3
