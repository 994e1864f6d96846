"""select(): exact global top-k without concatenation, per_tensor / per_row, tie-break, exclude, isolate."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import (
    TIE_BREAK,
    count_for_fraction,
    isolate,
    select,
    topk_indices,
    topk_indices_per_row,
)

# ---------------------------------------------------------------------------------------------------------------------
# references: a stable sort of the concatenation (the documented tie-break)
# ---------------------------------------------------------------------------------------------------------------------


def _reference_global(tensors: list[torch.Tensor], k: int, largest: bool) -> list[list[int]]:
    cat = torch.cat([t.reshape(-1) for t in tensors])
    order = torch.sort(cat, descending=largest, stable=True).indices[:k]
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        inside = order[(order >= offset) & (order < offset + n)] - offset
        out.append(sorted(inside.tolist()))
        offset += n
    return out


def _reference_rows(t: torch.Tensor, k: int, largest: bool) -> list[int]:
    rows = t.reshape(-1, t.shape[-1])
    out = []
    for r in range(rows.shape[0]):
        order = torch.sort(rows[r], descending=largest, stable=True).indices[:k]
        out += sorted((order + r * rows.shape[1]).tolist())
    return out


# tensors with many ties (small integers), some -0.0, empty tensors and scalars allowed
_values = st.integers(min_value=-3, max_value=3)


@st.composite
def tensor_lists(draw, min_total: int = 1):
    n = draw(st.integers(1, 5))
    tensors = []
    for _ in range(n):
        shape = draw(st.sampled_from([(), (0,), (1,), (7,), (3, 4), (2, 3, 5), (5, 2)]))
        numel = 1
        for d in shape:
            numel *= d
        vals = draw(st.lists(_values, min_size=numel, max_size=numel))
        t = torch.tensor(vals, dtype=torch.float32).reshape(shape)
        if draw(st.booleans()):
            t = t * 0.0  # turns negatives into -0.0: must tie with +0.0
        tensors.append(t)
    if sum(t.numel() for t in tensors) < min_total:
        tensors.append(torch.tensor([float(draw(_values))]))
    return tensors


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_lists(), data=st.data(), largest=st.booleans(), chunk=st.sampled_from([1, 2, 5, 9, 1 << 20]))
def test_topk_equals_stable_sort_of_concatenation(tensors, data, largest, chunk):
    total = sum(t.numel() for t in tensors)
    k = data.draw(st.integers(1, total))
    got = topk_indices(tensors, k, largest=largest, chunk=chunk)
    assert [g.tolist() for g in got] == _reference_global(tensors, k, largest)
    assert all(g.dtype == torch.int32 for g in got)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), largest=st.booleans())
def test_topk_random_floats(data, largest):
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(int(torch.randint(1, 300, (1,), generator=g)), generator=g) for _ in range(4)]
    tensors[1][::3] = tensors[0][0]  # exact ties across tensors
    total = sum(t.numel() for t in tensors)
    k = data.draw(st.integers(1, total))
    got = topk_indices(tensors, k, largest=largest, chunk=64)
    assert [x.tolist() for x in got] == _reference_global(tensors, k, largest)


def test_topk_extreme_values_and_sign():
    t = torch.tensor([0.0, -0.0, 3.4e38, -3.4e38, 1e-45, -1e-45, 1.0, -1.0])
    desc = [2, 6, 4, 0, 1, 5, 7, 3]  # -0.0 ties with +0.0 and keeps index order
    asc = [3, 7, 5, 0, 1, 4, 6, 2]
    for k in range(1, 9):
        assert topk_indices([t], k)[0].tolist() == sorted(desc[:k])
        assert topk_indices([t], k, largest=False)[0].tolist() == sorted(asc[:k])


def test_topk_errors():
    with pytest.raises(ValueError, match="k=4 is out of range: there are 3 units"):
        topk_indices([torch.ones(3)], 4)
    with pytest.raises(TypeError, match="float32"):
        topk_indices([torch.ones(3, dtype=torch.float64)], 1)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), largest=st.booleans())
def test_per_row_equals_rowwise_stable_sort(data, largest):
    rows, cols = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 7))
    lead = data.draw(st.sampled_from([(), (2,)]))
    vals = data.draw(st.lists(_values, min_size=rows * cols * (2 if lead else 1), max_size=rows * cols * 2))
    t = torch.tensor(vals[: rows * cols * (2 if lead else 1)], dtype=torch.float32).reshape(*lead, rows, cols)
    k = data.draw(st.integers(0, cols))
    got = topk_indices_per_row(t, k, largest=largest, chunk=data.draw(st.integers(1, 20)))
    assert got.tolist() == _reference_rows(t, k, largest)


def test_count_for_fraction():
    assert count_for_fraction(0.29, 100) == 29  # floor would give 28 (0.29 * 100 == 28.999999999999996)
    assert count_for_fraction(0.5, 3) == 2  # half rounds up
    assert count_for_fraction(0.01, 10) == 0
    assert count_for_fraction(1.0, 7) == 7


# ---------------------------------------------------------------------------------------------------------------------
# select()
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_lists(), data=st.data(), largest=st.booleans())
def test_select_global_fraction_matches_reference(tensors, data, largest):
    scores = Scores({f"p{i}": t for i, t in enumerate(tensors)})
    total = scores.numel()
    fraction = data.draw(st.floats(min_value=0.5 / total + 1e-9, max_value=1.0))
    k = count_for_fraction(fraction, total)
    mask = select(scores, fraction=fraction, largest=largest)
    ref = _reference_global(list(tensors), k, largest)
    for name, r in zip(scores.names, ref):
        assert (mask[name].tolist() if name in mask.names else []) == r
    assert len(mask) == k
    assert mask.shapes == scores.shapes


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_lists(), fraction=st.floats(min_value=0.01, max_value=1.0), largest=st.booleans())
def test_select_per_tensor_matches_reference(tensors, fraction, largest):
    scores = Scores({f"p{i}": t for i, t in enumerate(tensors)})
    mask = select(scores, fraction=fraction, scope="per_tensor", largest=largest)
    for name in scores.names:
        t = scores[name]
        ref = _reference_global([t], count_for_fraction(fraction, t.numel()), largest)[0] if t.numel() else []
        assert (mask[name].tolist() if name in mask.names else []) == ref


def test_select_per_row_wanda_group():
    t = torch.tensor([[1.0, 5.0, 5.0, 0.0], [2.0, 2.0, 2.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    mask = select(Scores({"w": t}), fraction=0.5, scope="per_row")
    assert mask["w"].tolist() == [1, 2, 4 + 0, 4 + 3, 8, 9]
    mask_k = select(Scores({"w": t}), k=1, scope="per_row", largest=False)
    assert mask_k["w"].tolist() == [3, 4, 8]


def test_select_k_and_tie_break_follows_scores_order():
    scores = Scores({"b": torch.ones(3), "a": torch.ones(3)})  # insertion order, not alphabetical, breaks ties
    mask = select(scores, k=4)
    assert mask["b"].tolist() == [0, 1, 2] and mask["a"].tolist() == [0]
    assert "a" in mask.shapes and "b" in mask.shapes


def test_select_neuron_and_layer_scores_give_same_granularity():
    shapes = {"q": (4, 3), "down": (3, 4)}
    s = Scores(
        {"q": torch.tensor([0.1, 0.9, 0.3, 0.2]), "down": torch.tensor([0.8, 0.0, 0.7, 0.6])},
        granularity={"q": Neuron(0), "down": Neuron(1)},
        shapes=shapes,
    )
    mask = select(s, k=3)
    assert mask.granularity_of("q") == Neuron(0) and mask.granularity_of("down") == Neuron(1)
    assert mask["q"].tolist() == [1] and mask["down"].tolist() == [0, 2]
    assert mask.numel() == 3 + 3 + 3
    layers = Scores(
        {"l0.w": torch.tensor(1.0), "l1.w": torch.tensor(3.0), "l2.w": torch.tensor(2.0)},
        granularity=Layer(),
        shapes={"l0.w": (2, 2), "l1.w": (2, 2), "l2.w": (2, 2)},
    )
    lm = select(layers, k=2)
    assert lm.names == ("l1.w", "l2.w") and lm.granularity_of("l1.w") == Layer()
    assert lm["l1.w"].tolist() == [0]


def test_select_provenance():
    s = Scores({"w": torch.arange(10.0)}, provenance={"method": "snip", "seed": 3})
    mask = select(s, fraction=0.2, provenance={"note": "x"})
    p = mask.provenance
    assert p["method"] == "snip" and p["seed"] == 3 and p["note"] == "x"
    assert p["selection_scope"] == "global" and p["selection_fraction"] == 0.2 and p["selection_k"] == 2
    assert p["sparsity"] == 0.2 and p["selection_tie_break"] == TIE_BREAK and p["selection_largest"] is True
    assert mask["w"].tolist() == [8, 9]


def test_select_accepts_numpy_numbers():
    import numpy as np

    s = Scores({"w": torch.arange(10.0)})
    assert select(s, k=np.int64(3))["w"].tolist() == [7, 8, 9]
    mask = select(s, fraction=np.float32(0.2))
    assert mask["w"].tolist() == [8, 9] and isinstance(mask.provenance["selection_fraction"], float)


def test_select_accepts_plain_mapping():
    mask = select({"w": torch.tensor([[0.1, 0.9], [0.5, 0.5]])}, k=2)
    assert mask["w"].tolist() == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({}, ValueError, "exactly one of fraction="),
        ({"fraction": 0.1, "k": 2}, ValueError, "exactly one of fraction="),
        ({"fraction": 0.0}, ValueError, "fraction=0.0 must lie in (0, 1]"),
        ({"fraction": 1.5}, ValueError, "fraction=1.5 must lie in (0, 1]"),
        ({"fraction": float("nan")}, ValueError, "must lie in (0, 1]"),
        ({"fraction": "0.1"}, TypeError, "fraction must be a number in (0, 1]"),
        ({"k": 0}, ValueError, "k=0 must be >= 1"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": 13}, ValueError, "k=13 is larger than the number of units (12)"),
        ({"fraction": 0.01}, ValueError, "selects no unit"),
        ({"k": 5, "scope": "per_tensor"}, ValueError, "k=5 per tensor is larger than the 4 units of 'b'"),
        ({"k": 1, "scope": "globl"}, ValueError, "Unknown scope 'globl'. Did you mean 'global'?"),
        ({"k": 1, "scope": "per_row"}, ValueError, "scope='per_row' needs Weight() scores with at least 2 dim"),
        ({"k": 1, "largest": 1}, TypeError, "largest must be a bool"),
    ],
)
def test_select_errors(kwargs, exc, fragment):
    scores = Scores({"a": torch.rand(2, 4), "b": torch.rand(4)})
    with pytest.raises(exc, match=_escape(fragment)):
        select(scores, **kwargs)


def _escape(s: str) -> str:
    import re

    return re.escape(s)


def test_select_per_row_k_too_large_and_empty_scores():
    with pytest.raises(ValueError, match=r"k=5 per row is larger than the rows of 'a' \(4 entries\)"):
        select(Scores({"a": torch.rand(2, 4)}), k=5, scope="per_row")
    with pytest.raises(ValueError, match="scores is empty"):
        select(Scores({}), k=1)
    with pytest.raises(TypeError, match="scores must be a Scores, a ScoreFiles or a mapping"):
        select([torch.ones(2)], k=1)


# ---------------------------------------------------------------------------------------------------------------------
# exclude / isolate
# ---------------------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(tensors=tensor_lists(min_total=2), data=st.data())
def test_exclude_is_set_difference_after_selection(tensors, data):
    scores = Scores({f"p{i}": t for i, t in enumerate(tensors)})
    k = data.draw(st.integers(1, scores.numel()))
    base = select(scores, k=k)
    other_k = data.draw(st.integers(1, scores.numel()))
    other = select(scores, k=other_k, largest=False)
    got = select(scores, k=k, exclude=other)
    for name in scores.names:
        a = set(base[name].tolist()) if name in base.names else set()
        b = set(other[name].tolist()) if name in other.names else set()
        assert (set(got[name].tolist()) if name in got.names else set()) == a - b
    assert got.provenance["selection_excluded"] == len(base) - len(got)


def test_exclude_errors():
    scores = Scores({"w": torch.rand(4, 3)})
    neuron_mask = SafetyMask(
        indices={"w": torch.tensor([0], dtype=torch.int32)}, shapes={"w": (4, 3)}, granularity=Neuron(0)
    )
    with pytest.raises(ValueError, match=r"granularity Neuron\(axis=0\) for 'w'.*exclude.to_weight\(\)"):
        select(scores, k=2, exclude=neuron_mask)
    assert len(select(scores, k=12, exclude=neuron_mask.to_weight())) == 9
    other_shape = SafetyMask(indices={"w": torch.tensor([0], dtype=torch.int32)}, shapes={"w": (3, 4)})
    with pytest.raises(ValueError, match="different models"):
        select(scores, k=2, exclude=other_shape)
    with pytest.raises(TypeError, match="exclude must be a SafetyMask"):
        select(scores, k=2, exclude={"w": [0]})


def test_isolate_matches_wei_set_difference_per_matrix():
    g = torch.Generator().manual_seed(0)
    safety = Scores(
        {"a": torch.rand(8, 8, generator=g), "b": torch.rand(4, 6, generator=g)}, provenance={"method": "snip"}
    )
    utility = Scores(
        {"a": torch.rand(8, 8, generator=g), "b": torch.rand(4, 6, generator=g)}, provenance={"data": "u"}
    )
    mask = isolate(safety, utility, p=0.25, q=0.5)
    for name in safety.names:
        s, u = safety[name].flatten(), utility[name].flatten()
        n = s.numel()
        top_s = set(torch.topk(s, count_for_fraction(0.5, n)).indices.tolist())  # random floats: no ties
        top_u = set(torch.topk(u, count_for_fraction(0.25, n)).indices.tolist())
        assert set(mask[name].tolist()) == top_s - top_u
    assert mask.density <= 0.5
    prov = mask.provenance
    assert prov["isolation_p"] == 0.25 and prov["isolation_q"] == 0.5 and prov["isolation_utility"] == {"data": "u"}
    assert prov["method"] == "snip" and prov["selection_scope"] == "per_tensor"


def test_isolate_errors():
    a = Scores({"a": torch.rand(2, 2)})
    with pytest.raises(ValueError, match="same parameters in the same order"):
        isolate(a, Scores({"b": torch.rand(2, 2)}), p=0.1, q=0.1)
    with pytest.raises(ValueError, match="safety and utility scores differ for 'a'"):
        isolate(a, Scores({"a": torch.rand(4)}), p=0.1, q=0.1)
    with pytest.raises(ValueError, match=r"p=0.0 must lie in \(0, 1\]"):
        isolate(a, a, p=0, q=0.1)
    with pytest.raises(TypeError, match=r"q must be a number"):
        isolate(a, a, p=0.1, q="0.1")


def test_select_granularity_reinterprets_scores():
    s = Scores({"w": torch.tensor([0.3, 0.9, 0.1])}, shapes={"w": (3,)})
    mask = select(s, k=1, granularity=Neuron(0))
    assert mask.granularity_of("w") == Neuron(0) and mask["w"].tolist() == [1]
    with pytest.raises(ValueError, match=r"needs scores of shape \(\)"):
        select(s, k=1, granularity=Layer())


def test_weight_default_granularity():
    mask = select(Scores({"w": torch.rand(3, 3)}), k=1)
    assert mask.granularity_of("w") == Weight()


# ---------------------------------------------------------------------------------------------------------------------
# CLI: peft-safety select
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_select_round_trip(tmp_path, capsys):
    from peft_safety.cli.main import main

    g = torch.Generator().manual_seed(0)
    scores = Scores(
        {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, generator=g)}, provenance={"method": "snip"}
    )
    scores.to_safetensors(tmp_path / "scores.safetensors")
    rc = main(["select", str(tmp_path / "scores.safetensors"), "--fraction", "0.2", "--out", str(tmp_path / "m")])
    assert rc == 0
    assert "selected 7 units" in capsys.readouterr().out
    mask = SafetyMask.from_pretrained(tmp_path / "m")
    assert mask == select(scores, fraction=0.2)
    assert mask.provenance["method"] == "snip"

    # --exclude: the set difference with another mask
    util = select(scores, k=3, largest=False)
    util.save_pretrained(tmp_path / "u")
    args = ["select", str(tmp_path / "scores.safetensors"), "--k", "33", "--exclude", str(tmp_path / "u")]
    assert main([*args, "--out", str(tmp_path / "iso")]) == 0
    iso = SafetyMask.from_pretrained(tmp_path / "iso")
    assert len(iso) == 31  # the top 33 of 34 units minus the 2 of the bottom 3 they contain
    assert iso == select(scores, k=33, exclude=util)


def test_cli_select_errors(tmp_path, capsys):
    from peft_safety.cli.main import main

    Scores({"a": torch.rand(2, 2)}).to_safetensors(tmp_path / "s.safetensors")
    rc = main(["select", str(tmp_path / "s.safetensors"), "--fraction", "2", "--out", str(tmp_path / "m")])
    assert rc == 2 and "--fraction=2.0 is outside (0, 1]" in capsys.readouterr().err
    rc = main(["select", str(tmp_path / "s.safetensors"), "--k", "1", "--scope", "pertensor", "--out", str(tmp_path)])
    assert rc == 2 and "Did you mean 'per_tensor'?" in capsys.readouterr().err
    rc = main(["select", str(tmp_path / "missing.safetensors"), "--k", "1", "--out", str(tmp_path / "m")])
    assert rc == 2 and "no scores file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# benchmark smoke run
# ---------------------------------------------------------------------------------------------------------------------


def test_selection_benchmark_smoke(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"
    spec = importlib.util.spec_from_file_location("_bench_selection", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--small", "--in-process", "--threads", "1", "--out", str(tmp_path / "sel.json")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads((tmp_path / "sel.json").read_text())
    assert result["same_selection"] is True
    assert result["config"]["threads"] == 1 and result["config"]["tensors"] == 20
    assert result["ours"]["selected"] == result["naive"]["selected"] == result["config"]["k"]
    assert result["ours"]["time_s"] > 0 and result["time_ratio_naive_over_ours"] > 0
    assert "time ratio naive/ours" in capsys.readouterr().out


@pytest.mark.parametrize("largest", [True, False])
def test_global_selection_equals_torch_topk_of_the_concatenation(largest):
    """Distinct random scores over tensors of several shapes: the mask is exactly torch.topk of the concatenation,
    with the count taken by hand as floor(fraction * n + 1/2)."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (13, 7), "b": (50,), "c": (3, 4, 5), "d": (1, 1), "e": (64, 9)}
    tensors = {n: torch.randn(s, generator=g, dtype=torch.float64).float() for n, s in shapes.items()}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    assert flat.unique().numel() == flat.numel()  # no ties: torch.topk's choice is unique
    for fraction in (0.003, 0.01, 0.1, 0.37, 1.0):
        k = int(fraction * flat.numel() + 0.5)
        if k == 0:
            continue
        mask = select(Scores(dict(tensors)), fraction=fraction, largest=largest)
        top = set(torch.topk(flat, k, largest=largest).indices.tolist())
        offset, got = 0, set()
        for name, t in tensors.items():
            if name in mask.names:
                got |= {offset + int(i) for i in mask[name].tolist()}
            offset += t.numel()
        assert got == top, fraction
        assert len(mask) == k
