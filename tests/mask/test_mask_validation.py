"""Untrusted mask files: every declared size, shape, granularity and nesting is checked before anything is built,
and the errors are `ValueError`s naming the file and the field. `Freezer.install` compares shapes before allocating.

The figures of docs/reliability.md for masks come from `BAD_INPUTS` below (one row per bad input) and
`test_reliability_tally`."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from peft_safety.mask import Layer, Neuron, SafetyMask, Weight, load_mask, mask_from_bytes, serialization
from peft_safety.mask.serialization import MASK_FILENAME

GOOD_META = {
    "format_version": "1",
    "library": "peft-safety",
    "library_version": "0.1.0",
    "shapes": json.dumps({"w": [4, 48]}),
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


def _raw(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _with_header(data: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    return _raw(header, data[8 + n :])


def _deep_header() -> bytes:
    # the nesting sits in the safetensors header itself, outside the metadata strings
    return struct.pack("<Q", 2 * 100_000 + 20) + b'{"x": ' + _nested(100_000).encode() + b"}" + b" " * 13


BAD_INPUTS = [
    # (id, bytes, fragment of the expected ValueError)
    ("granularity without default", _file(granularity=json.dumps({"per_parameter": {}})), "no 'default'"),
    ("granularity default not an object", _file(granularity=json.dumps({"default": "neuron"})), "'default'"),
    (
        "per_parameter names an unknown tensor",
        _file(granularity=json.dumps({"default": {"type": "weight"}, "per_parameter": {"v": {"type": "layer"}}})),
        "'v'",
    ),
    ("nested provenance", _file(provenance='{"a": ' + _nested(50_000) + "}"), "nested more than"),
    ("nested shapes", _file(shapes=_nested(5_000)), "nested more than"),
    ("nested header", _deep_header(), "nested more than"),
    ("absurd shape", _file(shapes=json.dumps({"w": [2**40, 2**40]})), "entries"),
    ("too many dimensions", _file(shapes=json.dumps({"w": [1] * 40})), "dimensions"),
    ("float dimension", _file(shapes=json.dumps({"w": [4.0, 48]})), "ints"),
    ("bool dimension", _file(shapes=json.dumps({"w": [True, 48]})), "ints"),
    ("negative dimension", _file(shapes=json.dumps({"w": [-4, 48]})), "negative"),
    ("2-D index tensor", _file({"w": torch.tensor([[1, 2]], dtype=torch.int32)}), "1-D"),
    ("more indices than units", _file({"w": torch.arange(300, dtype=torch.int32)}), "more indices"),
    (
        "header shape disagrees with offsets",
        _with_header(_file(), lambda h: h["w"].update(shape=[1_000_000_000])),
        "bytes",
    ),
    (
        "offsets beyond the file",
        _with_header(_file(), lambda h: h["w"].update(data_offsets=[0, 8_000_000_000], shape=[2_000_000_000])),
        "bytes",
    ),
    ("trailing bytes", _file() + b"\0" * 16, "bytes"),
    ("fingerprints not strings", _file(fingerprints=json.dumps({"w": 3})), "fingerprints"),
    ("fingerprint of unknown tensor", _file(fingerprints=json.dumps({"v": "x"})), "'v'"),
    ("provenance not an object", _file(provenance="[1]"), "provenance"),
    ("metadata value not a string", _raw({"__metadata__": {**GOOD_META, "shapes": {"w": [4, 48]}}}), "shapes"),
    ("tensor info not an object", _raw({"__metadata__": GOOD_META, "w": [1, 2]}), "'w'"),
    ("duplicate indices", _file({"w": torch.tensor([2, 2], dtype=torch.int32)}), "duplicates"),
    ("negative index", _file({"w": torch.tensor([-1, 2], dtype=torch.int32)}), "out of range"),
    ("bool indices", _file({"w": torch.tensor([True, False])}), "integers"),
    (
        "neuron granularity, bad axis",
        _file(granularity=json.dumps({"default": {"type": "neuron", "axis": 7}})),
        "axis",
    ),
]


@pytest.mark.parametrize("desc, data, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("entry", ["from_bytes", "from_pretrained", "load_mask"])
def test_bad_mask_inputs_raise_clear_value_errors(desc, data, fragment, entry, tmp_path):
    path = tmp_path / MASK_FILENAME
    path.write_bytes(data)
    with pytest.raises(ValueError) as info:
        if entry == "from_bytes":
            SafetyMask.from_bytes(data, where=str(path))
        elif entry == "from_pretrained":
            SafetyMask.from_pretrained(tmp_path)
        else:
            load_mask(path)
    assert fragment in str(info.value), str(info.value)
    assert str(path) in str(info.value)  # the message names the file


def test_neuron_mask_without_default_is_not_read_as_weights():
    # the reported case: a neuron mask whose default granularity was dropped protected 3 entries instead of 192
    m = SafetyMask({"w": [0, 1, 2]}, {"w": (4, 64)}, Neuron(0))
    assert m.numel() == 192
    data = m.to_bytes()
    edited = _with_header(
        data,
        lambda h: h["__metadata__"].update(granularity=json.dumps({"per_parameter": {}})),
    )
    with pytest.raises(ValueError, match="no 'default'"):
        mask_from_bytes(edited)


def test_header_size_limit(monkeypatch):
    monkeypatch.setattr(serialization, "MAX_HEADER_BYTES", 64)
    with pytest.raises(ValueError, match=r"header of \d+ bytes"):
        mask_from_bytes(_file())


def test_file_is_checked_before_it_is_read_whole(tmp_path, monkeypatch):
    # a header that declares far more data than the file holds is refused from the header alone
    data = _with_header(_file(), lambda h: h["w"].update(data_offsets=[0, 8_000_000_000], shape=[2_000_000_000]))
    path = tmp_path / MASK_FILENAME
    path.write_bytes(data)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: Spy(real_open(p, *a, **k)))
    with pytest.raises(ValueError, match="bytes"):
        load_mask(path)
    assert -1 not in reads  # never "read everything"


def test_writing_refuses_what_reading_would_refuse():
    prov: dict = {}
    inner = prov
    for _ in range(serialization.MAX_JSON_DEPTH + 5):
        inner["a"] = {}
        inner = inner["a"]
    m = SafetyMask({"w": [1]}, {"w": (4, 4)}, Weight(), provenance=prov)
    with pytest.raises(ValueError, match="nested more than"):
        m.to_bytes()


def test_good_files_still_load():
    m = SafetyMask({"w": [1, 5]}, {"w": (4, 48), "l": (3, 3)}, {"w": Weight(), "l": Layer()})
    again = mask_from_bytes(m.to_bytes())
    assert again == m
    deep = SafetyMask({"w": [1]}, {"w": (4, 4)}, provenance={"ops": json.loads(_nested(100))})
    assert mask_from_bytes(deep.to_bytes()).provenance["ops"] == json.loads(_nested(100))


def test_reliability_tally(tmp_path):
    """Count clear errors / crashes / silent acceptances over BAD_INPUTS and the three entry points."""
    tally = {"clear": 0, "crash": 0, "silent": 0}
    path = tmp_path / MASK_FILENAME
    loaders = (SafetyMask.from_bytes, lambda _: SafetyMask.from_pretrained(tmp_path), lambda _: load_mask(path))
    for _desc, data, _fragment in BAD_INPUTS:
        path.write_bytes(data)
        for load in loaders:
            try:
                load(data)
                tally["silent"] += 1
            except ValueError:
                tally["clear"] += 1
            except Exception:
                tally["crash"] += 1
    assert tally == {"clear": 3 * len(BAD_INPUTS), "crash": 0, "silent": 0}


def test_load_mask_paths(tmp_path):
    m = SafetyMask({"w": [1]}, {"w": (4, 4)})
    m.save_pretrained(tmp_path / "m")
    assert load_mask(tmp_path / "m") == m  # a folder works like the file inside it
    with pytest.raises(FileNotFoundError, match=r"No safety_mask\.safetensors"):
        load_mask(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "absent.safetensors")
    with pytest.raises(TypeError, match="file or folder path"):
        load_mask(3)
