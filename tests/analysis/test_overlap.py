"""Mask analysis: IoU matrices, stability, distributions, plots."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch

from peft_safety.analysis import (
    LayerDistribution,
    StabilityReport,
    iou_matrix,
    layer_distribution,
    overlap_report,
    plot_angle_gap,
    plot_iou_matrix,
    plot_layer_heatmap,
    stability,
)
from peft_safety.mask import Neuron, SafetyMask
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import select

Q0, D0, Q1, D1 = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
)
SHAPES = {Q0: (4, 4), D0: (4, 4), Q1: (4, 4), D1: (4, 4), "lm_head.weight": (2, 4)}


def _mask(indices: dict[str, list[int]], **kwargs) -> SafetyMask:
    return SafetyMask(
        indices={n: torch.tensor(v, dtype=torch.int32) for n, v in indices.items()}, shapes=SHAPES, **kwargs
    )


A = _mask({Q0: [0, 1, 2, 3], D1: [5]})
B = _mask({Q0: [2, 3, 4], D1: [5], "lm_head.weight": [0]})
C = _mask({Q1: [0]})


def _sets(m: SafetyMask) -> set[tuple[str, int]]:
    return {(n, int(i)) for n, idx in m.to_weight() for i in idx}


def test_iou_matrix_global_by_hand():
    labels, m = iou_matrix({"a": A, "b": B, "c": C})
    assert labels == ["a", "b", "c"]
    assert m.dtype == torch.float64 and torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(3))
    assert m[0, 1].item() == pytest.approx(3 / 7)  # |{q0:2,3; d1:5}| / |{q0:0..4; d1:5; lm:0}|
    assert m[0, 2].item() == 0.0
    for (i, x), (j, y) in itertools.combinations(enumerate([A, B, C]), 2):
        sx, sy = _sets(x), _sets(y)
        assert m[i, j].item() == pytest.approx(len(sx & sy) / len(sx | sy))
        assert m[i, j].item() == pytest.approx(x.iou(y))


def test_iou_matrix_per_module():
    _labels, mats = iou_matrix({"a": A, "b": B}, per_module=True)
    assert set(mats) == {"self_attn.q_proj", "mlp.down_proj", "lm_head"}
    assert mats["self_attn.q_proj"][0, 1].item() == pytest.approx(2 / 5)
    assert mats["mlp.down_proj"][0, 1].item() == 1.0
    assert mats["lm_head"][0, 1].item() == 0.0


def test_iou_mixed_granularity_counts_weight_entries():
    rows = SafetyMask(indices={Q0: torch.tensor([0], dtype=torch.int32)}, shapes=SHAPES, granularity=Neuron(0))
    flat = _mask({Q0: [0, 1, 4]})
    _, m = iou_matrix({"rows": rows, "flat": flat})
    assert m[0, 1].item() == pytest.approx(2 / 5)  # row 0 = entries 0..3


def test_stability_report_by_hand():
    rep = stability({"a": A, "b": B, "c": C})
    assert isinstance(rep, StabilityReport)
    assert rep.sizes == {"a": 5, "b": 5, "c": 1}
    assert rep.pairwise["a|b"] == pytest.approx(3 / 7) and rep.pairwise["b|c"] == 0.0
    assert rep.mean_iou == pytest.approx((3 / 7 + 0 + 0) / 3) and rep.min_iou == 0.0
    assert rep.core == 0 and rep.union == 5 + 1 + 1 + 1  # q0:0..4, d1:5, lm:0, q1:0
    assert rep.core_fraction == 0.0
    two = stability({"a": A, "b": B})
    assert two.core == 3 and two.union == 7 and two.core_fraction == pytest.approx(3 / 7)
    assert two.per_layer[0]["core"] == 2 and two.per_layer[0]["union"] == 5
    assert two.per_layer[1]["mean_iou"] == 1.0
    assert two.per_layer["(none)"]["union"] == 1 and two.per_layer["(none)"]["mean_iou"] == 0.0
    assert two.per_module["self_attn.q_proj"]["mean_iou"] == pytest.approx(2 / 5)
    assert list(two.per_layer) == [0, 1, "(none)"]
    json.dumps(two.to_dict())
    text = str(two)
    assert "mean IoU: 0.4286" in text and "self_attn.q_proj" in text


def test_stability_single_mask_and_errors():
    rep = stability({"only": A})
    assert rep.mean_iou == 1.0 and rep.core == rep.union == 5
    with pytest.raises(ValueError, match="at least 1 mask"):
        stability({})
    with pytest.raises(TypeError, match=r"masks\['x'\] must be a SafetyMask"):
        stability({"x": {"w": [0]}})
    with pytest.raises(TypeError, match="dict label -> SafetyMask"):
        iou_matrix([A, B])


def test_stability_of_seeded_selections_is_consistent(tiny_llama):
    params = {n: p.detach() for n, p in tiny_llama.named_parameters() if p.dim() == 2 and ".layers." in n}
    masks = {}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = Scores({n: p.abs() + 0.02 * torch.rand(p.shape, generator=g) for n, p in params.items()})
        masks[f"seed{seed}"] = select(scores, fraction=0.05)
    rep = stability(masks)
    _, m = iou_matrix(masks)
    off = [m[i, j].item() for i, j in itertools.combinations(range(3), 2)]
    assert rep.mean_iou == pytest.approx(sum(off) / 3) and rep.min_iou == pytest.approx(min(off))
    core, union = masks["seed0"] & masks["seed1"] & masks["seed2"], masks["seed0"] | masks["seed1"] | masks["seed2"]
    assert rep.core == core.numel() and rep.union == union.numel()
    assert 0.0 < rep.mean_iou < 1.0  # same magnitudes, different noise: partial overlap
    assert sum(r["union"] for r in rep.per_layer.values()) == rep.union


def test_overlap_report_text_and_dict():
    text = overlap_report({"a": A, "b": B})
    assert "IoU (weight entries, global)" in text and "0.4286" in text and "density" in text
    d = overlap_report({"a": A, "b": B}, as_dict=True)
    assert d["labels"] == ["a", "b"] and d["iou"][0][1] == pytest.approx(3 / 7)
    json.dumps(d)


def test_layer_distribution():
    dist = layer_distribution(A)
    assert isinstance(dist, LayerDistribution)
    assert dist.layers == [0, 1, "(none)"]
    assert dist.modules == ["lm_head", "mlp.down_proj", "self_attn.q_proj"]
    r0, q = dist.layers.index(0), dist.modules.index("self_attn.q_proj")
    assert dist.numel[r0, q] == 4 and dist.total[r0, q] == 16
    assert dist.density[r0, q].item() == 0.25
    assert torch.isnan(dist.density[dist.layers.index("(none)"), q])  # no q_proj outside the layers
    assert int(dist.numel.sum()) == A.numel() and int(dist.total.sum()) == A.total_numel()
    d = dist.to_dict()
    json.dumps(d)
    assert d["density"][2][2] is None
    assert "25.0000%" in str(dist)
    with pytest.raises(TypeError, match="expects a SafetyMask"):
        layer_distribution({"w": [0]})


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    p1 = plot_layer_heatmap(A, tmp_path / "heat.png")
    p2 = plot_iou_matrix({"a": A, "b": B, "c": C}, tmp_path / "iou.png", title="overlap")
    p3 = plot_angle_gap(torch.tensor([0.0, 1.0, 5.0, 20.0, 30.0]), tmp_path / "sub" / "gap.png", safety_layers=(1, 4))
    for p in (p1, p2, p3):
        assert _is_png(p)
        assert (tmp_path / p).stat().st_size > 1000
    assert not list(tmp_path.rglob(".plot-*"))  # no temp files left


def test_plot_angle_gap_errors(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plot_angle_gap([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plot_angle_gap([[1.0, 2.0]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="1 non-finite"):
        plot_angle_gap([1.0, float("nan")], tmp_path / "x.png")
    with pytest.raises(ValueError, match="end exclusive"):
        plot_angle_gap([1.0, 2.0], tmp_path / "x.png", safety_layers=(1, 3))
    assert not (tmp_path / "x.png").exists()


def test_plots_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install peft-safety\[plot\]"):
        plot_layer_heatmap(A, tmp_path / "heat.png")
    with pytest.raises(ImportError, match=r"pip install peft-safety\[plot\]"):
        plot_angle_gap([1.0, 2.0], tmp_path / "gap.png")


def test_cli_compare(tmp_path, capsys):
    from peft_safety.cli.main import main

    for name, m in (("a", A), ("b", B), ("c", C)):
        m.save_pretrained(tmp_path / name)
    paths = [str(tmp_path / n) for n in "abc"]
    assert main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "IoU (weight entries, global)" in out and "0.4286" in out and "core/union" in out
    assert main(["compare", *paths[:2], "--json", "--labels", "x", "y"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["labels"] == ["x", "y"] and d["stability"]["core"] == 3
    pytest.importorskip("matplotlib")
    assert main(["compare", *paths, "--plot", str(tmp_path / "iou.png")]) == 0
    assert _is_png(tmp_path / "iou.png")


def test_cli_compare_errors(tmp_path, capsys):
    from peft_safety.cli.main import main

    A.save_pretrained(tmp_path / "a")
    assert main(["compare", str(tmp_path / "a"), "--labels", "x", "y"]) == 2
    assert "--labels has 2 entries for 1 masks" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nothing")]) == 2
