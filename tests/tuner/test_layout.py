"""``peft_safety.tuner._layout``: the storage kinds, their limits and the one check of a ``mask_layout`` and of an
index tensor, shared by both adapter types; and a guard that the tuner defines none of them a second time."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_safety.mask import Head, Layer, Neuron, Weight
from peft_safety.tuner._layout import (
    LORA_KINDS,
    SET_KINDS,
    check_indices,
    check_layout,
    storage_of,
    unit_limit,
)
from peft_safety.vocab import STORAGE_KINDS

TUNER = Path(__file__).resolve().parents[2] / "peft_safety" / "tuner"
SHAPE = (6, 4)  # d_out, d_in
LIMITS = {"entries": 24, "rows": 6, "cols": 4, "whole": 1}


def test_kinds_are_the_vocabulary_words():
    assert SET_KINDS == STORAGE_KINDS == ("entries", "rows", "cols", "whole")
    assert LORA_KINDS == ("entries", "rows", "cols")  # a Layer() mask is excluded from LoRA, never stored


@pytest.mark.parametrize("kind", list(LIMITS))
def test_unit_limit(kind):
    assert unit_limit(kind, SHAPE) == LIMITS[kind]
    assert unit_limit(kind, list(SHAPE)) == LIMITS[kind]


@pytest.mark.parametrize(
    ("granularity", "units", "kind", "expected"),
    [
        (Weight(), [7, 2, 19], "entries", [2, 7, 19]),
        (Neuron(axis=0), [4, 1], "rows", [1, 4]),
        (Neuron(axis=1), [3], "cols", [3]),
        (Head(head_dim=2, axis=0), [2, 0], "rows", [0, 1, 4, 5]),  # head h covers rows 2h, 2h + 1
        (Head(head_dim=2, axis=1), [1], "cols", [2, 3]),
        (Layer(), [0], "whole", [0]),
    ],
)
def test_storage_of_each_granularity(granularity, units, kind, expected):
    got_kind, got = storage_of(granularity, torch.tensor(units, dtype=torch.int32), "w")
    assert got_kind == kind
    assert got.dtype == torch.int64 and got.tolist() == expected  # sorted, unique, int64


def test_storage_of_an_unknown_granularity_names_the_parameter():
    with pytest.raises(TypeError, match=r"'layer\.w'"):
        storage_of(object(), torch.tensor([0]), "layer.w")


def entry(kind="entries", n=3, shape=(6, 4)):
    return {"kind": kind, "n": n, "shape": list(shape)}


@pytest.mark.parametrize("kind", list(LIMITS))
def test_the_n_rule_is_one_to_the_limit(kind):
    kinds = SET_KINDS
    assert check_layout({"m": entry(kind, 1)}, kinds=kinds)["m"]["n"] == 1
    assert check_layout({"m": entry(kind, LIMITS[kind])}, kinds=kinds)["m"]["n"] == LIMITS[kind]
    for bad in (0, LIMITS[kind] + 1, -1):
        with pytest.raises(ValueError, match=rf"\['m'\]\['n'\] = {bad} must be an int between 1 and {LIMITS[kind]}"):
            check_layout({"m": entry(kind, bad)}, kinds=kinds)


def test_layout_is_normalised():
    out = check_layout({"m": {"kind": "rows", "n": np.int64(2), "shape": (6, 4)}}, kinds=LORA_KINDS)
    assert out == {"m": {"kind": "rows", "n": 2, "shape": [6, 4]}}
    assert type(out["m"]["n"]) is int


@pytest.mark.parametrize(
    ("layout", "kinds", "fragment"),
    [
        ([], SET_KINDS, "must be a non-empty dict"),
        ({}, SET_KINDS, "must be a non-empty dict"),
        ({"": entry()}, SET_KINDS, "non-empty module names"),
        ({1: entry()}, SET_KINDS, "non-empty module names"),
        ({"m": [1, 2]}, SET_KINDS, "exactly the keys"),
        ({"m": {"kind": "rows", "n": 1}}, SET_KINDS, "exactly the keys"),
        ({"m": {**entry(), "x": 0}}, SET_KINDS, "exactly the keys"),
        ({"m": entry("dense", 1)}, SET_KINDS, r"'dense' is not a storage kind"),
        ({"m": entry("whole", 1)}, LORA_KINDS, r"'whole' is not a storage kind"),
        ({"m": entry("row", 1)}, SET_KINDS, "Did you mean 'rows'"),
        ({"m": entry(shape=(6,))}, SET_KINDS, r"\['shape'\]"),
        ({"m": entry(shape=(6, 0))}, SET_KINDS, r"\['shape'\]"),
        ({"m": entry(shape=(6, True))}, SET_KINDS, r"\['shape'\]"),
        ({"m": {"kind": "rows", "n": 1, "shape": "6x4"}}, SET_KINDS, r"\['shape'\]"),
        ({"m": entry(n=True)}, SET_KINDS, r"\['n'\] = True"),
        ({"m": entry(n=2.0)}, SET_KINDS, r"\['n'\] = 2.0"),
        ({"m": entry(n="2")}, SET_KINDS, r"\['n'\] = '2'"),
    ],
)
def test_bad_layouts(layout, kinds, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_layout(layout, kinds=kinds)


def test_empty_layout_where_allowed():
    assert check_layout({}, kinds=LORA_KINDS, allow_empty=True) == {}


def idx(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    ("tensor", "kind", "fragment"),
    [
        (idx(0, 5, 23), "entries", None),
        (idx(0, 5, 23, dtype=torch.int64), "entries", None),
        (idx(5), "rows", None),
        (idx(0), "whole", None),
        (idx(24), "entries", r"in \[24, 24\], out of range \[0, 24\)"),
        (idx(-2, 3), "rows", "out of range"),
        (idx(4), "cols", "out of range"),
        (idx(1), "whole", "out of range"),
        (idx(0, 0), "whole", "more than"),
        (torch.arange(7, dtype=torch.int32), "rows", "holds 7 rows indices, more than"),
        (idx(3, 1), "rows", "strictly increasing"),
        (idx(1, 1), "rows", "strictly increasing"),
        (idx(-1, -1), "rows", "placeholder"),
        (idx(), "rows", "non-empty"),
        (idx(1, 2).view(1, 2), "rows", "1-D"),
        (idx(1, 2, dtype=torch.int16), "rows", "int32/int64"),
        (torch.tensor([1.0]), "rows", "int32/int64"),
        (torch.tensor([True]), "rows", "int32/int64"),
        ([1, 2], "rows", "int32/int64"),
    ],
)
def test_check_indices(tensor, kind, fragment):
    if fragment is None:
        check_indices(tensor, kind, SHAPE, "t")
        return
    with pytest.raises(ValueError, match=fragment) as err:
        check_indices(tensor, kind, SHAPE, "the tensor 'q.idx'")
    assert "'q.idx'" in str(err.value)


def test_meta_indices_are_checked_by_shape_only():
    check_indices(torch.empty(3, dtype=torch.int32, device="meta"), "rows", SHAPE, "t")
    with pytest.raises(ValueError, match="more than"):
        check_indices(torch.empty(7, dtype=torch.int32, device="meta"), "rows", SHAPE, "t")


# ---- one definition ----------------------------------------------------------------------------------------------------


def _tuner_modules():
    return {p.relative_to(TUNER).as_posix(): ast.parse(p.read_text(encoding="utf-8")) for p in TUNER.rglob("*.py")}


def _second_copies(modules: dict) -> list[str]:
    """Where a tuner module other than ``_layout`` defines a layout validator, a limit table or its own list of
    storage kinds, or where any tuner module spells the fingerprint policies itself (they are ``peft_safety.vocab``'s).
    """
    kind_words = set(STORAGE_KINDS) | {"dense"}
    validators = {"validate_layout", "check_layout", "layout_limit", "unit_limit", "granularity_kind", "storage_of"}
    found = []
    for path, tree in modules.items():
        for node in ast.walk(tree):
            own = isinstance(node, ast.FunctionDef) and path != "_layout.py"
            if own and (node.name in validators or node.name.lstrip("_") in {"is_int", "granularity_to_kind"}):
                found.append(f"{path}: def {node.name}")
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2:
                words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                if path != "_layout.py" and len(words & kind_words) >= 2:
                    found.append(f"{path}:{node.lineno}: storage kinds {sorted(words)}")
                if words >= {"error", "warn", "ignore"}:
                    found.append(f"{path}:{node.lineno}: fingerprint policies {sorted(words)}")
    return found


def test_the_layout_rules_are_defined_once():
    found = _second_copies(_tuner_modules())
    assert not found, "rules written again outside peft_safety.tuner._layout / peft_safety.vocab:\n" + "\n".join(found)


def test_the_guard_finds_a_second_copy():
    copies = {
        "safety/model.py": ast.parse(
            'KINDS = ("entries", "rows", "cols", "dense")\ndef _is_int(v):\n    return True\n'
        ),
        "provenance.py": ast.parse('POLICIES = ("error", "warn", "ignore")\n'),
        "safety_lora/config.py": ast.parse("def layout_limit(kind, shape):\n    return 1\n"),
    }
    assert len(_second_copies(copies)) == 4
