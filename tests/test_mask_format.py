"""Mask file format v1: round trips, the golden file, the byte layout, and every kind of bad file."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight, fingerprint_tensor, load_mask, mask_from_bytes
from peft_safety.mask.serialization import FORMAT_VERSION, MASK_FILENAME, mask_to_bytes, resolve_mask_file

GOLDEN = Path(__file__).parent / "data" / "golden_v1" / MASK_FILENAME


def _mask() -> SafetyMask:
    shapes = {"model.layers.0.mlp.down_proj.weight": (8, 16), "model.layers.0.self_attn.q_proj.weight": (16, 8)}
    return SafetyMask(
        {"model.layers.0.mlp.down_proj.weight": torch.tensor([1, 40, 99], dtype=torch.int32)},
        shapes,
        granularity={
            "model.layers.0.mlp.down_proj.weight": Weight(),
            "model.layers.0.self_attn.q_proj.weight": Head(4),
        },
        fingerprints={n: fingerprint_tensor(torch.ones(s)) for n, s in shapes.items()},
        provenance={"method": "esi", "sparsity": 0.01, "seed": 3, "nested": {"a": [1, 2.5, None, True]}},
    )


def _assert_identical(a: SafetyMask, b: SafetyMask) -> None:
    assert a == b
    assert a.shapes == b.shapes
    assert {n: a.granularity_of(n) for n in a.shapes} == {n: b.granularity_of(n) for n in b.shapes}
    assert a.fingerprints == b.fingerprints
    assert a.provenance == b.provenance
    for (na, ta), (nb, tb) in zip(a, b):
        assert na == nb and ta.dtype == tb.dtype and torch.equal(ta, tb)


# ---------------------------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------------------------


def test_round_trip_folder_and_file(tmp_path):
    m = _mask()
    path = m.save_pretrained(tmp_path / "out")
    assert path == str(tmp_path / "out" / MASK_FILENAME)
    _assert_identical(SafetyMask.from_pretrained(tmp_path / "out"), m)
    _assert_identical(SafetyMask.from_pretrained(path), m)
    _assert_identical(SafetyMask.from_pretrained(str(tmp_path / "out")), m)
    # only the final file remains: the temporary file was moved into place
    assert os.listdir(tmp_path / "out") == [MASK_FILENAME]


def test_overwrite_is_atomic_replace(tmp_path):
    m = _mask()
    m.save_pretrained(tmp_path)
    inode_before = os.stat(tmp_path / MASK_FILENAME).st_ino
    smaller = m.restrict(["model.layers.0.self_attn.q_proj.weight"])
    smaller.save_pretrained(tmp_path)
    assert os.stat(tmp_path / MASK_FILENAME).st_ino != inode_before  # a new file replaced the old one
    _assert_identical(SafetyMask.from_pretrained(tmp_path), smaller)
    assert os.listdir(tmp_path) == [MASK_FILENAME]


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        _mask().save_pretrained(tmp_path)
    assert os.listdir(tmp_path) == []


def test_empty_mask_keeps_shapes(tmp_path):
    m = SafetyMask({}, {"a.weight": (3, 4), "b.weight": (2,)}, granularity=Neuron(0), provenance={"method": "random"})
    m.save_pretrained(tmp_path)
    back = SafetyMask.from_pretrained(tmp_path)
    _assert_identical(back, m)
    assert back.total_numel() == 14 and len(back) == 0 and back.granularity == Neuron(0)


@st.composite
def random_masks(draw):
    grans = [Weight(), Neuron(0), Neuron(1), Head(2, 0), Head(2, 1), Layer()]
    shapes, gran, indices = {}, {}, {}
    for i in range(draw(st.integers(0, 4))):
        name = f"model.layers.{i}.block.w{i}"
        shape = draw(st.sampled_from([(4, 6), (2, 4, 2), (6, 2)]))
        g = draw(st.sampled_from(grans))
        n = g.num_units(shape)
        shapes[name], gran[name] = shape, g
        indices[name] = torch.tensor(sorted(draw(st.sets(st.integers(0, n - 1), max_size=n))), dtype=torch.int64)
    prov = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=8),
            st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=10), st.booleans(), st.none()),
            max_size=4,
        )
    )
    return SafetyMask(indices, shapes, granularity=gran, provenance=prov)


@settings(max_examples=50, deadline=None)
@given(random_masks())
def test_round_trip_property(m):
    _assert_identical(mask_from_bytes(mask_to_bytes(m)), m)


# ---------------------------------------------------------------------------------------------------------------------
# golden file and byte layout
# ---------------------------------------------------------------------------------------------------------------------


def test_golden_v1_every_field():
    m = load_mask(GOLDEN)
    q, up, down = (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    )
    experts, norm, head = (
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.input_layernorm.weight",
        "lm_head.weight",
    )
    assert m.shapes == {q: (8, 4), up: (6, 4), down: (4, 6), experts: (2, 4, 3), norm: (4,), head: (5, 4)}
    assert list(m.shapes) == [q, up, down, experts, norm, head]  # order survives the file
    assert {n: m.granularity_of(n) for n in m.shapes} == {
        q: Head(head_dim=2, axis=0),
        up: Neuron(axis=0),
        down: Neuron(axis=1),
        experts: Weight(),
        norm: Layer(),
        head: Weight(),
    }
    assert {n: t.tolist() for n, t in m} == {q: [1, 3], up: [0, 2, 5], down: [4], experts: [0, 7, 13, 23], norm: [0]}
    assert all(t.dtype == torch.int32 for _, t in m)
    assert m.names == (q, up, down, experts, norm) and head not in m
    assert len(m) == 11 and m.numel() == 40 and m.total_numel() == 128
    assert m.provenance == {
        "method": "snip",
        "aggregation": "sum",
        "sparsity": 0.25,
        "seed": 0,
        "score_sign": "abs",
        "data_hash": "sha256:" + "ab" * 32,
        "base_model": "peft-safety/tiny-llama",
        "base_model_revision": "0123456789abcdef0123456789abcdef01234567",
        "library_version": "0.1.0.dev0",
    }
    assert m.fingerprints == {
        q: "bf16s4096b2b:187cd6de5cd227a1e63800e09e4ceb9a",
        up: "bf16s4096b2b:99c8c74fc9c45e0f080e9fd24b1c7257",
        down: "bf16s4096b2b:33369dae9dfa046d221d8c857622e6d8",
        experts: "bf16s4096b2b:898df3c2d9842b43d19a857448e948ef",
        norm: "bf16s4096b2b:377384b561ab1b82e920c639d568ebb2",
        head: "bf16s4096b2b:307dc5bf3f9035ef8c26a70881f49744",
    }
    # the fingerprint scheme is part of the format: today's function must reproduce the recorded values
    for name, shape in m.shapes.items():
        weight = (torch.arange(torch.Size(shape).numel(), dtype=torch.float32) / 7).reshape(shape)
        assert fingerprint_tensor(weight) == m.fingerprints[name]
    expected_q = torch.zeros(8, 4, dtype=torch.bool)
    expected_q[2:4] = True
    expected_q[6:8] = True
    assert torch.equal(m.to_dense(q), expected_q)
    assert torch.equal(m.to_dense(down), torch.zeros(4, 6, dtype=torch.bool).index_fill_(1, torch.tensor([4]), True))


def test_byte_layout_matches_the_spec(tmp_path):
    data = mask_to_bytes(_mask())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    assert set(meta) == {
        "format_version",
        "library",
        "library_version",
        "shapes",
        "granularity",
        "fingerprints",
        "provenance",
    }
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format_version"] == str(FORMAT_VERSION) == "1" and meta["library"] == "peft-safety"
    assert json.loads(meta["shapes"]) == {
        "model.layers.0.mlp.down_proj.weight": [8, 16],
        "model.layers.0.self_attn.q_proj.weight": [16, 8],
    }
    assert json.loads(meta["granularity"]) == {
        "default": {"type": "weight"},
        "per_parameter": {"model.layers.0.self_attn.q_proj.weight": {"type": "head", "head_dim": 4, "axis": 0}},
    }
    info = header["model.layers.0.mlp.down_proj.weight"]
    assert info["dtype"] == "I32" and info["shape"] == [3]
    begin, end = info["data_offsets"]
    raw = data[8 + n + begin : 8 + n + end]
    assert struct.unpack("<3i", raw) == (1, 40, 99)
    assert "model.layers.0.self_attn.q_proj.weight" not in header  # no entries: only its shape is recorded


# ---------------------------------------------------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------------------------------------------------

GOOD_META = {
    "format_version": "1",
    "library": "peft-safety",
    "library_version": "0.1.0",
    "shapes": json.dumps({"w": [4, 4]}),
    "granularity": json.dumps({"default": {"type": "weight"}, "per_parameter": {}}),
    "fingerprints": "{}",
    "provenance": "{}",
}


def _file(tensors=None, **meta_overrides) -> bytes:
    meta = {**GOOD_META, **meta_overrides}
    meta = {k: v for k, v in meta.items() if v is not None}
    if tensors is None:
        tensors = {"w": torch.tensor([1, 2], dtype=torch.int32)}
    return st_save(tensors, metadata=meta)


def test_hand_built_good_file_loads():
    m = mask_from_bytes(_file())
    assert m["w"].tolist() == [1, 2] and m.shapes == {"w": (4, 4)}


BAD_FILES = [
    ("empty file", b"", "truncated file (0 bytes"),
    ("truncated header", _file()[:20], "truncated or corrupted file: the header claims"),
    ("truncated data", _file()[:-4], "the file is truncated or corrupted"),
    ("garbage header", struct.pack("<Q", 5) + b"{nope", "header is not valid JSON"),
    ("header not an object", struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    ("no metadata", st_save({"w": torch.tensor([1], dtype=torch.int32)}), "not a peft-safety mask file (no metadata"),
    ("other library", _file(library="someone-else"), "library='someone-else'"),
    ("newer format", _file(format_version="2"), "upgrade peft-safety"),
    ("format not int", _file(format_version="one"), "format_version 'one' is not a version number"),
    ("format with underscore", _file(format_version="1_0"), "format_version '1_0' is not a version number"),
    ("format with space", _file(format_version=" 1"), "format_version ' 1' is not a version number"),
    ("format non-ASCII digit", _file(format_version="\u0661"), "is not a version number"),
    ("format zero", _file(format_version="0"), "invalid format_version 0"),
    ("missing shapes", _file(shapes=None), "metadata lacks ['shapes']"),
    ("shapes not JSON", _file(shapes="{w: 4}"), "field 'shapes' is not valid JSON"),
    ("shapes not object", _file(shapes="[1]"), "field 'shapes' must be a JSON object"),
    ("float indices", _file({"w": torch.tensor([1.0, 2.0])}), "has dtype F32; mask indices must be integers"),
    ("unsorted indices", _file({"w": torch.tensor([3, 1], dtype=torch.int32)}), "are not sorted"),
    ("index out of range", _file({"w": torch.tensor([16], dtype=torch.int32)}), "out of range"),
    ("tensor without shape", _file({"v": torch.tensor([1], dtype=torch.int32)}), "tensor 'v' has no shape"),
    ("bad granularity", _file(granularity=json.dumps({"default": {"type": "row"}})), "Unknown granularity type 'row'"),
]


@pytest.mark.parametrize("desc, data, fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise_clear_value_errors(desc, data, fragment, tmp_path):
    path = tmp_path / MASK_FILENAME
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        SafetyMask.from_pretrained(tmp_path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)  # the message names the file


def test_foreign_model_weights_are_rejected(tmp_path, tiny_llama):
    save_file({k: v.contiguous() for k, v in tiny_llama.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"not a peft-safety mask file.*a model's or an adapter's weights"):
        SafetyMask.from_pretrained(tmp_path / "model.safetensors")


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No safety_mask\.safetensors in"):
        SafetyMask.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No such mask file or folder"):
        SafetyMask.from_pretrained(str(tmp_path / "missing" / "deeper"))
    with pytest.raises(FileNotFoundError, match="No such mask file or folder"):
        resolve_mask_file("./nothing-here.safetensors")
    with pytest.raises(ValueError, match="empty path"):
        resolve_mask_file("")
    with pytest.raises(TypeError, match=r"Hub repo id"):
        resolve_mask_file(3)
    with pytest.raises(ValueError, match=r"expects a folder"):
        _mask().save_pretrained(tmp_path / "x.safetensors")


def test_subfolder(tmp_path):
    m = _mask()
    m.save_pretrained(tmp_path / "sub")
    _assert_identical(SafetyMask.from_pretrained(tmp_path, subfolder="sub"), m)
