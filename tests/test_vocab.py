"""The shared words (`peft_safety.vocab`): each helper against explicit expectations, and a lint that keeps the stages
from writing their own copies again."""

from __future__ import annotations

import math
import re
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from peft_safety import vocab
from peft_safety.vocab import (
    FINGERPRINT_POLICIES,
    MODES,
    STORAGE_KINDS,
    base_name,
    check_choice,
    check_fingerprint_policy,
    check_fraction,
    check_mode,
    did_you_mean,
    environment,
    is_int,
    layer_index,
    split_layer,
)

PKG = Path(__file__).resolve().parents[1] / "peft_safety"


def test_the_words():
    assert MODES == ("freeze", "train_only")
    assert FINGERPRINT_POLICIES == ("error", "warn", "ignore")
    assert STORAGE_KINDS == ("entries", "rows", "cols", "whole")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
        ("module._orig_mod.model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
        ("module.module.lm_head.weight", "lm_head.weight"),
        ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight",
         "model.layers.0.mlp.up_proj.weight"),
        # an adapter's own tensors keep their adapter components
        ("base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight",
         "model.layers.1.self_attn.v_proj.lora_A.default.weight"),
        # "module" or "base_model" inside a name (not a wrapper prefix) stays
        ("model.module.weight", "model.module.weight"),
        ("x.base_model.model.y", "x.base_model.model.y"),
    ],
)  # fmt: skip
def test_base_name(raw, expected):
    assert base_name(raw) == expected


@pytest.mark.parametrize(
    ("name", "index", "after"),
    [
        ("model.layers.12.self_attn.q_proj.weight", 12, "self_attn.q_proj.weight"),
        ("transformer.h.3.attn.c_attn.weight", 3, "attn.c_attn.weight"),
        ("vit.blocks.0.mlp.fc1.weight", 0, "mlp.fc1.weight"),
        ("encoder.block.5.layer.1.DenseReluDense.wi.weight", 5, "layer.1.DenseReluDense.wi.weight"),  # T5: first one
        ("bert.encoder.layer.7.attention.self.query.weight", 7, "attention.self.query.weight"),
        ("model.layers.3", 3, ""),
        ("model.embed_tokens.weight", None, "model.embed_tokens.weight"),
        ("model.players.1.x", None, "model.players.1.x"),  # "players" is not "layers"
        ("lm_head.weight", None, "lm_head.weight"),
    ],
)
def test_split_layer_and_layer_index(name, index, after):
    assert split_layer(name) == (index, after)
    assert layer_index(name) == index


def test_did_you_mean():
    assert did_you_mean("snp", ["snip", "esi"]) == " Did you mean 'snip'? Available: 'snip', 'esi'."
    assert did_you_mean("zzz", ["snip", "esi"]) == " Available: 'snip', 'esi'."
    assert did_you_mean("zzz", ["snip"], available=False) == ""
    # an alias is matched and the name it stands for is suggested; the list holds names only
    assert did_you_mean("sntune", ["safety_neurons"], aliases={"sn_tune": "safety_neurons"}) == (
        " Did you mean 'safety_neurons'? Available: 'safety_neurons'."
    )
    # a name that differs by a wrapper prefix wins over a closer-looking sibling
    names = ["model.layers.1.mlp.up_proj.weight", "base_model.model.model.layers.0.mlp.up_proj.weight"]
    assert did_you_mean("model.layers.0.mlp.up_proj.weight", names, n=3, available=False) == (
        " Did you mean 'base_model.model.model.layers.0.mlp.up_proj.weight'?"
    )
    # a mapping gives its keys; a value that is not a string gets no suggestion
    assert did_you_mean("b", {"a": 1, "bb": 2}) == " Did you mean 'bb'? Available: 'a', 'bb'."
    assert did_you_mean(3, ["a"]) == " Available: 'a'."


def test_check_choice_mode_and_policy():
    assert check_choice("a", ("a", "b"), where="x") == "a"
    with pytest.raises(ValueError, match=r"^x='c' is not valid\. Available: 'a', 'b'\.$"):
        check_choice("c", ("a", "b"), where="x")
    with pytest.raises(ValueError, match=r"^x=1 is not valid\."):
        check_choice(1, ("a", "b"), where="x")
    assert [check_mode(m) for m in MODES] == list(MODES)
    with pytest.raises(ValueError, match=r"^safety_mode='freez' is not valid\. Did you mean 'freeze'\? Use 'freeze'"):
        check_mode("freez", where="safety_mode")
    assert check_fingerprint_policy("warn") == "warn"
    with pytest.raises(ValueError, match=r"^fingerprint_check='maybe' is not valid\. Use 'error', 'warn' or 'ignore'"):
        check_fingerprint_policy("maybe")


def test_check_fraction():
    assert check_fraction(0.01) == 0.01 and type(check_fraction(1)) is float and check_fraction(1) == 1.0
    assert check_fraction(np.float32(0.5)) == 0.5
    assert check_fraction(0, allow_zero=True) == 0.0
    for bad in (0, 0.0, -0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="must lie in"):
            check_fraction(bad)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="must be a number"):
            check_fraction(bad, where="fraction")


def test_is_int():
    assert is_int(3) and is_int(np.int64(3)) and is_int(-1)
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(np.float64(3))


def test_environment():
    record = environment(command="x")
    assert record["command"] == "x"
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["torch"] == metadata.version("torch") and record["peft"] == metadata.version("peft")
    if "torch" in sys.modules:
        assert record["torch_threads"] == sys.modules["torch"].get_num_threads()
    from peft_safety import __version__

    assert record["peft_safety"] == __version__


# ---------------------------------------------------------------------------------------------------------------------
# lint: no stage writes its own copy of a shared word
# ---------------------------------------------------------------------------------------------------------------------
#: a shared rule that must live only in vocab.py: (what, regex on source text)
COPIES = [
    ("did-you-mean (difflib)", re.compile(r"get_close_matches")),
    ("fingerprint policy tuple", re.compile(r"""\(\s*["']error["']\s*,\s*["']warn["']\s*,\s*["']ignore["']\s*\)""")),
    ("mode tuple", re.compile(r"""\(\s*["']freeze["']\s*,\s*["']train_only["']\s*\)""")),
    ("PEFT prefix strip", re.compile(r"""removeprefix\(\s*["']base_model\.model\.["']\s*\)""")),
    ("layer-index regex", re.compile(r"_LAYER_RE|\(\?:layers\|h\|")),
    ("base-name function", re.compile(r"def canonical_name\b|_WRAPPER_PARTS")),
    ("environment record", re.compile(r"def environment_info\b|platform\.python_version\(\)")),
]

#: files whose owners adopt `peft_safety.vocab` in their own change (tuner/ and cli/ are being restructured, and
#: scoring/selection.py is being rewritten for distributed selection); each entry is removed with that change
PENDING: dict[str, set[str]] = {}


def _copies() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "vocab.py":
            continue
        text = path.read_text(encoding="utf-8")
        hits = {what for what, pattern in COPIES if pattern.search(text)}
        if hits:
            found[rel] = hits
    return found


def test_no_stage_redefines_a_shared_word():
    found = _copies()
    new = {rel: hits - PENDING.get(rel, set()) for rel, hits in found.items()}
    new = {rel: sorted(hits) for rel, hits in new.items() if hits}
    assert not new, f"a stage writes its own copy of a word of peft_safety/vocab.py; import it instead: {new}"


def test_pending_list_is_current():
    """A pending entry whose copy is gone must leave the list, so that the copy cannot come back unnoticed."""
    found = _copies()
    stale = {rel: sorted(hits - found.get(rel, set())) for rel, hits in PENDING.items()}
    stale = {rel: hits for rel, hits in stale.items() if hits}
    assert not stale, f"these files no longer hold the copy: remove them from PENDING: {stale}"


def test_the_lint_sees_a_copy(tmp_path, monkeypatch):
    """The patterns match the copies they are meant to catch (each one written the way the old code wrote it)."""
    samples = {
        "did-you-mean (difflib)": "close = difflib.get_close_matches(name, choices, n=1)",
        "fingerprint policy tuple": "if policy not in ('error', 'warn', 'ignore'):",
        "mode tuple": 'SAFETY_MODES = ("freeze", "train_only")',
        "PEFT prefix strip": 'name.removeprefix("base_model.model.")',
        "layer-index regex": r'_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)")',
        "base-name function": "def canonical_name(name):",
        "environment record": "def environment_info():",
    }
    for what, pattern in COPIES:
        assert pattern.search(samples[what]), what
    assert vocab.__file__.endswith("vocab.py")
