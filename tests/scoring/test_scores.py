"""Scores: validation, granularity/shape checks, derived scores, histogram, explicit safetensors round trip."""

from __future__ import annotations

import pytest
import torch

from peft_safety.mask.granularity import Head, Layer, Neuron, Weight
from peft_safety.scoring.scores import Scores, expected_score_shape


def _scores(seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(
        {"a": torch.rand(4, 3, generator=g), "b": torch.rand(2, 3, 5, generator=g, dtype=torch.float64)},
        provenance={"method": "magnitude", "seed": seed},
    )


def test_converts_to_contiguous_fp32_and_keeps_order():
    base = torch.rand(3, 4).t()  # non-contiguous
    s = Scores({"z": torch.rand(2, dtype=torch.bfloat16), "a": base})
    assert s.names == ("z", "a")
    assert list(s) == ["z", "a"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for _, t in s.items())
    assert torch.equal(s["a"], base)
    assert s.shapes == {"z": (2,), "a": (4, 3)}
    assert s.granularity_of("a") == Weight()
    assert len(s) == 2 and "a" in s and "q" not in s
    assert s.numel() == 14


def test_nonfinite_scores_name_parameter_and_counts():
    bad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), float("nan")])
    with pytest.raises(ValueError, match=r"scores\['layer.w'\] has 2 NaN and 2 inf"):
        Scores({"ok": torch.ones(2), "layer.w": bad})


def test_fp64_overflow_to_inf_is_caught():
    with pytest.raises(ValueError, match="0 NaN and 1 inf"):
        Scores({"w": torch.tensor([1e300], dtype=torch.float64)})


def test_type_errors():
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        Scores({"w": torch.arange(3)})
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        Scores({"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="mapping name -> tensor"):
        Scores([torch.ones(2)])
    with pytest.raises(TypeError, match=r"granularity\[.w.\] must be a Granularity"):
        Scores({"w": torch.ones(2)}, granularity={"w": "weight"})


def test_granularity_shapes():
    n = Scores({"w": torch.rand(12)}, granularity=Neuron(1), shapes={"w": (2, 3, 6)})  # fused experts: E * d_in
    assert n.numel() == 12 and n.shapes["w"] == (2, 3, 6)
    h = Scores({"q": torch.rand(4)}, granularity=Head(head_dim=2), shapes={"q": (8, 5)})
    assert h.numel() == 4
    lay = Scores(
        {"a": torch.tensor(2.0), "b": torch.tensor(1.0)}, granularity=Layer(), shapes={"a": (3, 3), "b": (4,)}
    )
    assert lay.numel() == 2
    assert expected_score_shape((3, 4), Neuron(0)) == (3,)
    assert expected_score_shape((3, 4), Layer()) == ()


def test_granularity_errors():
    with pytest.raises(ValueError, match=r"needs scores of shape \(12,\)"):
        Scores({"w": torch.rand(6)}, granularity=Neuron(1), shapes={"w": (2, 3, 6)})
    with pytest.raises(ValueError, match=r"shapes\['w'\] is needed"):
        Scores({"w": torch.rand(6)}, granularity=Neuron(0))
    with pytest.raises(ValueError, match="not divisible by head_dim=3"):
        Scores({"q": torch.rand(2)}, granularity=Head(head_dim=3), shapes={"q": (8, 5)})
    with pytest.raises(ValueError, match="granularity has no entry"):
        Scores({"a": torch.rand(2), "b": torch.rand(2)}, granularity={"a": Weight()})
    with pytest.raises(ValueError, match=r"needs scores of shape \(2, 2\)"):
        Scores({"w": torch.rand(4)}, shapes={"w": (2, 2)})


def test_restrict_filter_to_map_arithmetic():
    s = _scores()
    assert s.restrict(["b", "a"]).names == ("a", "b")  # keeps the scores' order
    assert s.filter(lambda n: n == "b").names == ("b",)
    with pytest.raises(KeyError, match="unscored names"):
        s.restrict(["nope"])
    with pytest.raises(KeyError, match="no scores for 'nope'"):
        s["nope"]
    neg = -s
    assert torch.equal(neg.abs()["a"], s["a"])
    comb = s.map(lambda x, y: x - 0.5 * y, s * 2.0)
    assert torch.allclose(comb["b"], torch.zeros_like(comb["b"]))
    assert comb.provenance["derived"] is True and comb.provenance["method"] == "magnitude"
    assert torch.allclose((1 + s / 2)["a"], 1 + s["a"] / 2)
    assert torch.allclose((s + s - s)["a"], s["a"])
    assert s.to("cpu")["a"].data_ptr() == s["a"].data_ptr()  # no copy when already there
    with pytest.raises(ValueError, match="different names"):
        s.map(torch.add, s.restrict(["a"]))
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        s.map(lambda t: t.sum())
    with pytest.raises(TypeError, match="combines Scores only"):
        s.map(torch.add, {"a": torch.ones(4, 3)})


def test_repr():
    r = repr(_scores())
    assert r == "Scores(2 tensors, 42 units, granularity=Weight(), method='magnitude', device=cpu)"


def test_histogram_matches_torch_histc_on_concatenation():
    s = _scores(3)
    counts, edges = s.histogram(7, chunk=5)  # chunks smaller than the tensors
    flat = torch.cat([t.flatten() for _, t in s.items()])
    ref = torch.histc(flat, bins=7, min=float(flat.min()), max=float(flat.max())).long()
    assert torch.equal(counts, ref)
    assert counts.sum() == s.numel() and edges.shape == (8,)
    assert edges[0] == pytest.approx(float(flat.min())) and edges[-1] == pytest.approx(float(flat.max()))
    c2, _ = s.histogram(2, range=(0.0, 0.5))
    assert c2.sum() == int((flat <= 0.5).sum())
    with pytest.raises(ValueError, match="bins=0 must be an int >= 1"):
        s.histogram(0)
    with pytest.raises(ValueError, match="low > high"):
        s.histogram(3, range=(1.0, 0.0))


def test_safetensors_round_trip(tmp_path):
    s = Scores(
        {"w": torch.rand(12), "v": torch.rand(3)},
        granularity={"w": Neuron(1), "v": Neuron(0)},
        shapes={"w": (2, 3, 6), "v": (3, 4)},
        provenance={"method": "wanda", "seed": 1},
    )
    path = tmp_path / "sub" / "scores.safetensors"
    s.to_safetensors(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".scores-")]  # temp file gone
    back = Scores.from_safetensors(path)
    assert back.names == s.names
    assert back.granularity == s.granularity and back.shapes == s.shapes
    assert back.provenance == {"method": "wanda", "seed": 1}
    assert all(torch.equal(back[n], s[n]) for n in s)
    assert back == s and back != s * 2.0 and s != {"w": s["w"]}


def test_from_plain_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.rand(2, 2), "y": torch.rand(3)}, str(tmp_path / "raw.safetensors"))
    s = Scores.from_safetensors(tmp_path / "raw.safetensors")
    assert set(s.names) == {"x", "y"} and s.granularity_of("x") == Weight()
    with pytest.raises(FileNotFoundError, match="no scores file"):
        Scores.from_safetensors(tmp_path / "missing.safetensors")
