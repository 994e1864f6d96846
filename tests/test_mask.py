"""SafetyMask and granularity classes: construction, validation, algebra, conversions, summary, validate()."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_safety.mask import (
    Head,
    Layer,
    MaskSummary,
    Neuron,
    SafetyMask,
    Weight,
    fingerprint_tensor,
    granularity_from_dict,
    layer_index_of,
    module_type_of,
)

W = "model.layers.0.mlp.down_proj.weight"
Q = "model.layers.1.self_attn.q_proj.weight"
SHAPES = {W: (8, 16), Q: (16, 8)}


def _idx(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------------------
# granularity
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [Weight(), Neuron(0), Neuron(axis=1), Head(8), Head(head_dim=4, axis=1), Layer()])
def test_granularity_dict_round_trip(g):
    d = g.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert granularity_from_dict(d) == g
    assert hash(g) == hash(granularity_from_dict(d))  # frozen dataclasses are usable as dict keys


@pytest.mark.parametrize(
    "build, exc, fragment",
    [
        (lambda: Neuron(axis=2), ValueError, "axis=0 (rows"),
        (lambda: Neuron(axis=True), TypeError, "must be an int"),
        (lambda: Head(head_dim=0), ValueError, "head_dim must be > 0"),
        (lambda: Head(head_dim=8.0), TypeError, "must be an int"),
        (lambda: Head(8, axis=-1), ValueError, "axis=1 (columns)"),
        (lambda: granularity_from_dict({"type": "neurons"}), ValueError, "Unknown granularity type 'neurons'"),
        (lambda: granularity_from_dict({"type": "weight", "axis": 0}), ValueError, "Unexpected field(s) ['axis']"),
        (lambda: granularity_from_dict({"type": "head"}), ValueError, "needs a 'head_dim'"),
        (lambda: granularity_from_dict("weight"), TypeError, "expects a dict"),
    ],
)
def test_granularity_bad_values(build, exc, fragment):
    with pytest.raises(exc, match=None) as info:
        build()
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------------------------------------
# construction and basic properties
# ---------------------------------------------------------------------------------------------------------------------


def test_basic_properties():
    m = SafetyMask({W: _idx(3, 17, 40)}, SHAPES, provenance={"method": "snip", "seed": 0})
    assert len(m) == 3 and m.numel() == 3 and m.total_numel() == 256
    assert m.density == pytest.approx(3 / 256)
    assert m.names == (W,)
    assert W in m and Q not in m and "nope" not in m
    assert m[W].dtype == torch.int32 and m[W].tolist() == [3, 17, 40]
    assert m[Q].numel() == 0  # eligible, no entry
    assert [(n, t.tolist()) for n, t in m] == [(W, [3, 17, 40])]
    assert list(dict(m.items())) == [W]
    assert m.granularity == Weight() and m.granularity_of(Q) == Weight()
    assert m.provenance["library_version"]  # filled in from peft_safety._version
    assert "SafetyMask(parameters=1/2, units=3" in repr(m) and "method='snip'" in repr(m)


def test_constructor_copies_inputs():
    t = _idx(1, 2)
    prov = {"method": "snip", "extra": [1]}
    m = SafetyMask({W: t}, SHAPES, provenance=prov)
    t[0] = 5
    prov["extra"].append(2)
    assert m[W].tolist() == [1, 2]
    assert m.provenance["extra"] == [1]
    p = m.provenance
    p["method"] = "other"
    assert m.provenance["method"] == "snip"


def test_neuron_head_layer_counts():
    m = SafetyMask(
        {W: _idx(1, 3), Q: _idx(0)},
        SHAPES,
        granularity={W: Neuron(axis=1), Q: Head(head_dim=4, axis=0)},
    )
    # down columns cover 8 rows each; a q head covers 4 rows of 8 columns
    assert len(m) == 3 and m.numel() == 2 * 8 + 32
    lay = SafetyMask({W: _idx(0)}, SHAPES, granularity=Layer())
    assert len(lay) == 1 and lay.numel() == 128


def test_list_indices_and_int64_rule():
    m = SafetyMask({W: [0, 5]}, SHAPES)
    assert m[W].dtype == torch.int32
    big = {"huge": (2**16, 2**15)}  # exactly 2**31 entries: flat indices need int64 (no tensor of that size is built)
    mb = SafetyMask({"huge": torch.tensor([0, 2**31 - 1])}, big)
    assert mb["huge"].dtype == torch.int64 and mb.numel() == 2
    small_of_big = SafetyMask({"huge": _idx(3)}, big, granularity=Neuron(0))
    assert small_of_big["huge"].dtype == torch.int64  # the rule follows the tensor size, not the unit count


BAD_INPUTS = [
    # (description, kwargs, exception, message fragment)
    ("unsorted", {"indices": {W: _idx(5, 3)}, "shapes": SHAPES}, ValueError, "are not sorted"),
    ("duplicates", {"indices": {W: _idx(3, 3)}, "shapes": SHAPES}, ValueError, "contain duplicates"),
    ("out of range", {"indices": {W: _idx(128)}, "shapes": SHAPES}, ValueError, "out of range: found 128"),
    ("negative", {"indices": {W: _idx(-1)}, "shapes": SHAPES}, ValueError, "out of range: found -1"),
    ("2-D", {"indices": {W: torch.zeros(1, 2, dtype=torch.int32)}, "shapes": SHAPES}, ValueError, "must be 1-D"),
    ("float dtype", {"indices": {W: torch.tensor([1.0])}, "shapes": SHAPES}, ValueError, "must be an integer tensor"),
    ("bool dtype", {"indices": {W: torch.tensor([True])}, "shapes": SHAPES}, ValueError, "SafetyMask.from_dense"),
    (
        "name not in shapes",
        {"indices": {"model.layers.0.mlp.down_proj.weigth": _idx(1)}, "shapes": SHAPES},
        ValueError,
        f"Did you mean '{W}'",
    ),
    (
        "head_dim does not divide",
        {"indices": {}, "shapes": SHAPES, "granularity": Head(head_dim=3)},
        ValueError,
        "not divisible by head_dim=3",
    ),
    (
        "Neuron(1) on 1-D",
        {"indices": {}, "shapes": {"b": (8,)}, "granularity": Neuron(1)},
        ValueError,
        "needs a tensor with at least 2 dimensions",
    ),
    (
        "neuron index beyond rows",
        {"indices": {W: _idx(8)}, "shapes": SHAPES, "granularity": Neuron(0)},
        ValueError,
        "has 8 units",
    ),
    (
        "layer index other than 0",
        {"indices": {W: _idx(1)}, "shapes": SHAPES, "granularity": Layer()},
        ValueError,
        "valid 0..0",
    ),
    (
        "provenance not JSON",
        {"indices": {}, "shapes": SHAPES, "provenance": {"seed": torch.tensor(1)}},
        ValueError,
        "provenance['seed']",
    ),
    (
        "provenance NaN",
        {"indices": {}, "shapes": SHAPES, "provenance": {"sparsity": float("nan")}},
        ValueError,
        "not JSON-serialisable",
    ),
    (
        "granularity dict incomplete",
        {"indices": {}, "shapes": SHAPES, "granularity": {W: Weight()}},
        ValueError,
        "must cover every name in shapes",
    ),
    (
        "granularity wrong type",
        {"indices": {}, "shapes": SHAPES, "granularity": "weight"},
        TypeError,
        "granularity must be Weight()",
    ),
    ("indices wrong type", {"indices": {W: "1,2"}, "shapes": SHAPES}, TypeError, "must be a 1-D integer torch.Tensor"),
    ("shape wrong type", {"indices": {}, "shapes": {W: "8x16"}}, TypeError, "must be a tuple of ints"),
    (
        "fingerprint unknown name",
        {"indices": {}, "shapes": SHAPES, "fingerprints": {"x": "f"}},
        ValueError,
        "fingerprints has parameter 'x'",
    ),
]


@pytest.mark.parametrize("desc, kwargs, exc, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_constructor_rejects_bad_inputs(desc, kwargs, exc, fragment):
    with pytest.raises(exc) as info:
        SafetyMask(**kwargs)
    assert fragment in str(info.value)


def test_getitem_unknown_name_suggests():
    m = SafetyMask({}, SHAPES)
    with pytest.raises(KeyError, match="Did you mean"):
        m["model.layers.0.mlp.down_proj.wieght"]


# ---------------------------------------------------------------------------------------------------------------------
# dense conversions and to_weight against hand-built masks
# ---------------------------------------------------------------------------------------------------------------------

E3 = (3, 4, 6)  # a fused expert tensor (E, d_out, d_in)


def _hand_dense(shape, gran, units):
    """The expected dense mask, built entry by entry from the definitions in docs/concepts.md."""
    d = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 1:
        d3 = d.view(1, shape[0], 1)
    else:
        d3 = d.view(-1, shape[-2], shape[-1])
    _lead, rows, cols = d3.shape
    for u in units:
        if isinstance(gran, Layer):
            d3[:] = True
        elif isinstance(gran, Weight):
            d.view(-1)[u] = True
        elif isinstance(gran, Neuron) and gran.axis == 0:
            d3[u // rows, u % rows, :] = True
        elif isinstance(gran, Neuron):
            d3[u // cols, :, u % cols] = True
        elif gran.axis == 0:
            per = rows // gran.head_dim
            e, h = divmod(u, per)
            d3[e, h * gran.head_dim : (h + 1) * gran.head_dim, :] = True
        else:
            per = cols // gran.head_dim
            e, h = divmod(u, per)
            d3[e, :, h * gran.head_dim : (h + 1) * gran.head_dim] = True
    return d


CONVERSIONS = [
    ((8, 16), Weight(), [0, 17, 127]),
    ((8, 16), Neuron(0), [1, 7]),
    ((8, 16), Neuron(1), [0, 5, 15]),
    ((8, 16), Head(4, 0), [1]),
    ((8, 16), Head(4, 1), [0, 3]),
    ((8, 16), Layer(), [0]),
    (E3, Neuron(0), [0, 5, 11]),  # row 0 of expert 0, row 1 of expert 1, row 3 of expert 2
    (E3, Neuron(1), [2, 6, 17]),  # column 2 of expert 0, column 0 of expert 1, column 5 of expert 2
    (E3, Head(2, 0), [1, 4]),
    (E3, Head(3, 1), [1, 2, 5]),
    (E3, Layer(), [0]),
    ((6,), Neuron(0), [0, 4]),  # a bias: one entry per row
]


@pytest.mark.parametrize("shape, gran, units", CONVERSIONS, ids=[f"{c[1]!r}-{c[0]}" for c in CONVERSIONS])
def test_to_dense_and_to_weight_match_hand_built(shape, gran, units):
    expected = _hand_dense(shape, gran, units)
    m = SafetyMask({"p": torch.tensor(units)}, {"p": shape}, granularity=gran)
    assert torch.equal(m.to_dense("p"), expected)
    w = m.to_weight()
    assert w.granularity == Weight()
    assert w["p"].tolist() == expected.reshape(-1).nonzero().reshape(-1).tolist()
    assert w.numel() == m.numel() == int(expected.sum())
    # from_dense inverts to_dense at the same granularity
    assert SafetyMask.from_dense({"p": expected}, granularity=gran) == m


def test_from_dense_partial_unit_is_an_error():
    d = torch.zeros(4, 3, dtype=torch.bool)
    d[1, :2] = True
    with pytest.raises(ValueError, match=r"unit 1 of 'w' is only partly selected.*granularity=Weight\(\)"):
        SafetyMask.from_dense({"w": d}, granularity=Neuron(0))
    with pytest.raises(ValueError, match="pass a bool tensor"):
        SafetyMask.from_dense({"w": d.int()})
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        SafetyMask.from_dense({"w": [[True]]})


def test_to_dense_unknown_name():
    with pytest.raises(KeyError, match="not a parameter of this mask"):
        SafetyMask({}, SHAPES).to_dense("x")


# ---------------------------------------------------------------------------------------------------------------------
# algebra
# ---------------------------------------------------------------------------------------------------------------------

ALG_SHAPES = {"a.layers.0.x.weight": (4, 5), "a.layers.1.y.weight": (3, 3), "lm_head.weight": (2, 7)}


@st.composite
def masks(draw, granularity=None):
    granularity = granularity or Weight()
    indices = {}
    for name, shape in ALG_SHAPES.items():
        n = granularity.num_units(shape)
        chosen = draw(st.sets(st.integers(0, n - 1), max_size=n))
        indices[name] = torch.tensor(sorted(chosen), dtype=torch.int64)
    return SafetyMask(indices, ALG_SHAPES, granularity=granularity)


def _dense_all(m):
    return {n: m.to_dense(n) for n in ALG_SHAPES}


@settings(max_examples=60, deadline=None)
@given(masks(), masks())
def test_algebra_properties(a, b):
    union, inter, diff = a | b, a & b, a - b
    assert union.numel() + inter.numel() == a.numel() + b.numel()
    assert a.iou(b) == pytest.approx(b.iou(a))
    assert (diff & b).numel() == 0
    assert (diff | inter) == a
    assert (a | a) == a and (a & a) == a and (a - a).numel() == 0
    da, db = _dense_all(a), _dense_all(b)
    for n in ALG_SHAPES:
        assert torch.equal(union.to_dense(n), da[n] | db[n])
        assert torch.equal(inter.to_dense(n), da[n] & db[n])
        assert torch.equal(diff.to_dense(n), da[n] & ~db[n])
    u = union.numel()
    assert a.iou(b) == pytest.approx(inter.numel() / u if u else 1.0)
    for t in (union, inter, diff):  # results keep the invariants of the constructor
        for _, idx in t:
            assert idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())


@settings(max_examples=30, deadline=None)
@given(masks(Neuron(0)), masks())
def test_iou_across_granularities_equals_dense(a, b):
    da, db = _dense_all(a), _dense_all(b)
    inter = sum(int((da[n] & db[n]).sum()) for n in ALG_SHAPES)
    union = sum(int((da[n] | db[n]).sum()) for n in ALG_SHAPES)
    assert a.iou(b) == pytest.approx(inter / union if union else 1.0)
    per = a.iou(b, per_parameter=True)
    for n, v in per.items():
        u = int((da[n] | db[n]).sum())
        assert v == pytest.approx(int((da[n] & db[n]).sum()) / u)
    assert (a.to_weight() | b) == (a.to_weight() | b.to_weight())


def test_algebra_errors_and_granularity_mixing():
    a = SafetyMask({W: _idx(1)}, SHAPES, granularity=Neuron(1))
    b = SafetyMask({W: _idx(1)}, SHAPES)
    with pytest.raises(ValueError, match=r"Neuron\(axis=1\) in one mask and Weight\(\) in the other.*to_weight\(\)"):
        a | b
    assert (a.to_weight() | b).granularity == Weight()
    # a parameter with entries on one side only takes that side's granularity
    c = SafetyMask({Q: _idx(0)}, SHAPES)
    mixed = a | c
    assert mixed.granularity_of(W) == Neuron(1) and mixed.granularity_of(Q) == Weight()
    other_shape = SafetyMask({}, {W: (16, 8)})
    with pytest.raises(ValueError, match=r"has shape \(8, 16\) in one mask and \(16, 8\)"):
        b & other_shape
    with pytest.raises(TypeError, match="expects another SafetyMask"):
        b | {W: _idx(1)}
    fa = SafetyMask({}, SHAPES, fingerprints={W: "x"})
    fb = SafetyMask({}, SHAPES, fingerprints={W: "y"})
    with pytest.raises(ValueError, match="different fingerprints"):
        fa | fb


def test_algebra_provenance_and_union_of_shapes():
    a = SafetyMask({W: _idx(1)}, {W: (8, 16)}, provenance={"method": "snip", "base_model": "m"})
    b = SafetyMask({Q: _idx(2)}, {Q: (16, 8)}, provenance={"method": "wanda", "base_model": "m"})
    u = a | b
    assert u.shapes == SHAPES and u.names == (W, Q)
    p = u.provenance
    assert p["operation"] == "|" and p["base_model"] == "m" and "method" not in p
    assert [o["method"] for o in p["operands"]] == ["snip", "wanda"]


def test_iou_edge_cases():
    empty = SafetyMask({}, SHAPES)
    assert empty.iou(empty) == 1.0
    a = SafetyMask({W: _idx(1, 2)}, SHAPES)
    assert a.iou(empty) == 0.0
    assert a.iou(a, per_parameter=True) == {W: 1.0}


def test_restrict_and_filter():
    m = SafetyMask({W: _idx(1), Q: _idx(2)}, SHAPES, fingerprints={W: "f", Q: "g"}, provenance={"method": "snip"})
    r = m.restrict([W])
    assert r.names == (W,) and r.shapes == {W: (8, 16)} and r.fingerprints == {W: "f"}
    assert r.provenance["method"] == "snip"
    f = m.filter(lambda n: "self_attn" in n)
    assert f.names == (Q,)
    with pytest.raises(ValueError, match="Did you mean"):
        m.restrict(["model.layers.1.self_attn.q_proj.weigt"])
    with pytest.raises(TypeError, match="callable"):
        m.filter("self_attn")


def test_equality_ignores_metadata_but_not_sets():
    a = SafetyMask({W: _idx(1)}, SHAPES, provenance={"method": "snip"})
    b = SafetyMask({W: torch.tensor([1])}, SHAPES, provenance={"method": "esi"})
    assert a == b
    assert a != SafetyMask({W: _idx(2)}, SHAPES)
    assert a != SafetyMask({W: _idx(1)}, SHAPES, granularity=Neuron(0))
    assert a != SafetyMask({W: _idx(1)}, {W: (8, 16)})
    assert (a == "mask") is False


# ---------------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------------


def test_layer_and_module_parsing():
    assert layer_index_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index_of("vit.blocks.0.mlp.fc1.weight") == 0
    assert layer_index_of("model.embed_tokens.weight") is None
    assert layer_index_of("model.players.1.x") is None  # "players" is not "layers"
    assert module_type_of("model.layers.0.mlp.experts.down_proj") == "mlp.experts.down_proj"
    assert module_type_of("model.layers.0.self_attn.q_proj.bias") == "self_attn.q_proj.bias"
    assert module_type_of("model.layers.2.block_sparse_moe.experts.7.w2.weight") == "block_sparse_moe.experts.*.w2"
    assert module_type_of("lm_head.weight") == "lm_head"


def test_summary_on_tiny_moe(tiny_moe):
    params = dict(tiny_moe.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    down = "model.layers.1.mlp.experts.down_proj"
    gran = {n: Weight() for n in shapes}
    gran[down] = Neuron(axis=1)
    m = SafetyMask(
        {down: torch.tensor([0, 16, 63]), "lm_head.weight": torch.tensor([5])},
        shapes,
        granularity=gran,
        provenance={"method": "snip"},
    )
    s = m.summary()
    assert isinstance(s, MaskSummary)
    assert s.total["numel"] == m.numel() == 3 * 32 + 1 and s.total["total"] == m.total_numel()
    assert s.per_layer[1]["units"] == 3 and s.per_layer[1]["numel"] == 96 and s.per_layer[0]["numel"] == 0
    assert s.per_module["mlp.experts.down_proj"]["parameters"] == 2
    assert s.per_module["mlp.experts.down_proj"]["total"] == 2 * 4 * 32 * 16
    assert s.per_module["lm_head"]["numel"] == 1 and s.outside_layers["numel"] == 1
    assert sum(c["total"] for c in s.per_layer.values()) + s.outside_layers["total"] == s.total["total"]
    assert s.granularity == {"Weight()": len(shapes) - 1, "Neuron(axis=1)": 1}
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d and "1" in d["per_layer"]
    text = str(s)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "params", "units", "entries", "of", "density"]
    # aligned: every row of the first table has the header's width
    table = lines[: lines.index("")]
    assert len({len(line) for line in table}) == 1
    assert "mlp.experts.down_proj" in text and "(none)" in text


# ---------------------------------------------------------------------------------------------------------------------
# fingerprints and validate()
# ---------------------------------------------------------------------------------------------------------------------


def test_fingerprint_properties():
    torch.manual_seed(0)
    w = torch.randn(100, 200)
    fp = fingerprint_tensor(w)
    assert fp.startswith("bf16s4096b2b:") and len(fp.split(":")[1]) == 32
    assert fingerprint_tensor(w.to(torch.bfloat16)) == fp  # dtype-robust for bf16 casts
    assert fingerprint_tensor(w.clone()) == fp
    assert fingerprint_tensor(w.reshape(200, 100)) != fp  # the shape is part of it
    w2 = w.clone()
    w2[0, 0] += 1.0
    assert fingerprint_tensor(w2) != fp
    small = torch.randn(3, 4)
    assert fingerprint_tensor(small) != fingerprint_tensor(small * 2)
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor"):
        fingerprint_tensor([1.0])
    with pytest.raises(ValueError, match="meta device"):
        fingerprint_tensor(torch.empty(2, 2, device="meta"))


def test_fingerprint_positions_are_fixed_for_large_tensors():
    w = torch.zeros(4096 * 3)
    base = fingerprint_tensor(w)
    w[1] = 1.0  # not a sampled position (positions are multiples of 3 here)
    assert fingerprint_tensor(w) == base
    w[3] = 1.0
    assert fingerprint_tensor(w) != base


def _llama_mask(model, **kw):
    params = dict(model.named_parameters())
    names = [n for n in params if ".layers." in n and n.endswith("proj.weight")]
    shapes = {n: tuple(params[n].shape) for n in names}
    fps = {n: fingerprint_tensor(params[n]) for n in names}
    return SafetyMask({names[0]: _idx(0, 5)}, shapes, fingerprints=fps, **kw)


def test_validate_accepts_matching_model_and_state_dict(tiny_llama):
    m = _llama_mask(tiny_llama)
    m.validate(tiny_llama)
    m.validate(tiny_llama.state_dict())
    m.validate(tiny_llama.to(torch.bfloat16))  # fingerprints survive a bf16 cast


def test_validate_errors(tiny_llama):
    m = _llama_mask(tiny_llama)
    sd = dict(tiny_llama.state_dict())
    name = m.names[0]
    renamed = {("base_model.model." + k if k == name else k): v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"is not in the model\. Did you mean 'base_model\.model\.model\.layers"):
        m.validate(renamed)
    reshaped = dict(sd)
    reshaped[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\) in the model but \(32, 32\) in the mask"):
        m.validate(reshaped)
    changed = dict(sd)
    changed[name] = sd[name] + 1.0
    with pytest.raises(ValueError, match="fingerprint mismatch for 1 parameter"):
        m.validate(changed)
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        m.validate(changed, fingerprint_check="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.validate(changed, fingerprint_check="ignore")
    with pytest.raises(ValueError, match="fingerprint_check='maybe' is not valid"):
        m.validate(sd, fingerprint_check="maybe")
    with pytest.raises(TypeError, match="named_parameters"):
        m.validate([1, 2])


def test_validate_index_out_of_range_for_model():
    # a state dict whose tensor has the recorded shape but a granularity that addresses fewer units cannot occur
    # through the constructor; out-of-range is caught at construction, with the parameter named
    with pytest.raises(ValueError, match=r"indices\['w'\] out of range"):
        SafetyMask({"w": _idx(4)}, {"w": (2, 2)}, granularity=Neuron(0))


# ---------------------------------------------------------------------------------------------------------------------
# import discipline: peft_safety.mask uses only torch, safetensors and the standard library
# ---------------------------------------------------------------------------------------------------------------------

MASK_DIR = Path(__file__).resolve().parents[1] / "peft_safety" / "mask"


def test_mask_package_static_imports():
    allowed = {"torch", "safetensors", *sys.stdlib_module_names}
    for path in sorted(MASK_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the package or peft_safety._version / peft_safety.mask.hub (lazy)
                    if node.level >= 2:
                        assert node.module in ("_version", "_io", "_files", "errors", "vocab"), (
                            f"{path.name} imports ..{node.module}"
                        )
                    elif node.module == "hub":
                        # only inside a function (lazy), never at module level
                        assert node not in tree.body, f"{path.name} imports hub at module level"
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                if root == "huggingface_hub":  # Hub I/O only: imported inside the functions that use it
                    assert node not in tree.body, f"{path.name} imports huggingface_hub at module level"
                    continue
                assert root in allowed, f"{path.name} imports {root}"


def test_mask_package_runtime_imports():
    # import peft_safety.mask with an empty parent package so that only the mask package's own imports count
    code = (
        "import sys, types, importlib.util, pathlib\n"
        f"root = pathlib.Path({str(MASK_DIR.parent)!r})\n"
        "pkg = types.ModuleType('peft_safety'); pkg.__path__ = [str(root)]; sys.modules['peft_safety'] = pkg\n"
        "import peft_safety.mask, peft_safety.mask.serialization\n"
        "bad = [m for m in ('transformers', 'peft', 'trl', 'huggingface_hub', 'accelerate', 'datasets') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "", f"peft_safety.mask pulled {out.stdout.strip()}"


def test_total_numel_of_empty_mask():
    m = SafetyMask({}, {})
    assert m.total_numel() == 0 and m.density == 0.0 and len(m) == 0 and m.numel() == 0
    assert math.isclose(m.iou(m), 1.0)
