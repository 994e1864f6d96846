"""Scorer registry: lazy built-ins, aliases, duplicates, helpful errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peft_safety.scoring.registry import SCORERS, Registry


def test_builtins_listed_and_lazy():
    for name in ("snip", "esi", "wanda", "random", "magnitude", "safety_neurons", "safety_layers"):
        assert name in SCORERS
    code = "import sys, peft_safety.scoring; print('peft_safety.scoring.gradient' in sys.modules, 'datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_lookup_and_aliases():
    assert SCORERS.get("snip").__name__ == "snip"
    assert SCORERS.get("wandg") is SCORERS.get("snip")
    assert SCORERS.get("ESI") is SCORERS.get("esi")


def test_unknown_suggests():
    with pytest.raises(ValueError, match=r"Unknown scorer 'snp'\. Did you mean 'snip'\? Available: .*wanda"):
        SCORERS.get("snp")
    with pytest.raises(TypeError, match="must be a str"):
        SCORERS.get(3)


def test_register_duplicate_and_override():
    reg = Registry("thing")

    @reg.register("a", aliases=("alpha",))
    def a(*args, **kwargs):
        return 1

    assert reg.get("alpha") is a and reg.names() == ["a"]
    with pytest.raises(ValueError, match="already registered"):

        @reg.register("alpha")
        def other(*args, **kwargs):
            return 2

    @reg.register("a", override=True)
    def a2(*args, **kwargs):
        return 3

    assert reg.get("a") is a2
    with pytest.raises(TypeError, match="non-empty str"):
        reg.register("")
