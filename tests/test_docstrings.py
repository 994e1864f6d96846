"""Docstrings say what and why; measured numbers live in docs generated from benchmark results.

A number measured once (a speed ratio, a time, a percentage) drifts from the code and the benchmarks the moment
either changes, and a docstring is never regenerated. The rule below flags, in every module, class and function
docstring of ``peft_safety/``:

* speed or size ratios: ``40x faster``, ``~3x``, ``2.5x cheaper``;
* durations: ``0.3 ms``, ``2 seconds``, ``30 minutes``, ``1.5 h``;
* percentages, except where a percentage is a setting or a definition rather than a measurement: a fraction of
  something (``1% of the weights``, ``10% of the run's steps``), a default (``1% by default``), a selection
  (``top 1%``) or a confidence level (``95% interval``, ``95% CI``).

Sizes (``1 MiB chunks``, ``2.5 GB, fp32``) are not flagged: they follow from a shape or a setting, not from a
measurement. What the rule would wrongly flag goes into `EXCEPTIONS`, each with its reason; an exception that no
longer matches anything fails too, so the list stays current.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "peft_safety"

_NUM = r"\d+(?:[.,]\d+)?"
RATIO = re.compile(
    rf"(?:~\s?{_NUM}\s?[x\u00d7]\b|\b{_NUM}\s?[x\u00d7]\s+(?:faster|slower|cheaper|quicker|less|more|fewer|smaller|larger|"
    rf"higher|lower|the\b))",
    re.IGNORECASE,
)
# a one-letter unit (s, h) needs a space or a decimal number ("3 s", "0.5s"), so that "the 1s and 0s" is no time
DURATION = re.compile(
    rf"\b(?:{_NUM}(?:\s?-\s?{_NUM})?\s?(?:ns|µs|us|ms|sec|secs|seconds?|minutes?|mins?|hours?)"
    rf"|\d+(?:\.\d+)?(?:\s?-\s?{_NUM})?\s[sh]|\d+\.\d+[sh])\b(?![-.]?\w)"
)
PERCENT = re.compile(rf"(?P<before>\btop\s+)?{_NUM}\s?%(?P<after>\s+\S+(?:\s+\S+)?)?", re.IGNORECASE)
#: what may follow a percentage that is a setting or a definition
PERCENT_ALLOWED_AFTER = re.compile(
    r"^\s+(?:of\b|by default|(?:Wilson\s+|bootstrap\s+)?interval|CI\b|confidence|quantile|percentile)", re.I
)

#: (path relative to peft_safety/, exact text of the match, why it is not a measurement)
EXCEPTIONS: list[tuple[str, str, str]] = []


def measured_numbers(text: str) -> list[str]:
    """The measured-number matches in ``text`` (one docstring), in order."""
    found = [m.group(0) for m in RATIO.finditer(text)]
    found += [m.group(0) for m in DURATION.finditer(text)]
    for m in PERCENT.finditer(text):
        if m.group("before") or (m.group("after") and PERCENT_ALLOWED_AFTER.match(m.group("after"))):
            continue
        found.append(m.group(0).rstrip())
    return found


def _docstrings(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield getattr(node, "name", "<module>"), doc


def _all_matches() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        for where, doc in _docstrings(path):
            out += [(rel, where, hit) for hit in measured_numbers(doc)]
    return out


@pytest.mark.parametrize(
    "text",
    [
        "a scatter-add is ~40x cheaper for small chunks",
        "SET trains 3.2x faster than LoRA",
        "about 0.1-0.3 ms each on a CPU",
        "the job runs in well under 30 minutes",
        "fingerprinting takes 2 seconds",
        "a step takes 1.5s on a CPU",
        "a full run takes 3 h",
        "the overhead is 12% on a 135M model",
        "refusal drops by 40.5 %",
    ],
)
def test_the_rule_flags_measurements(text):
    assert measured_numbers(text), text


@pytest.mark.parametrize(
    "text",
    [
        "a mask of 1% of the weights",
        "``fraction`` (1% by default)",
        "the global top 1% of the scores",
        "a 95% interval about +-10 points wide",
        "the 95% CI of the rate",
        "read in 1 MiB chunks",
        "(2.5 GB, fp32)",
        "a 3 x 4 matrix",
        "layers 0-3 keep their 16 heads",
        "``2^hash_bits`` buckets; seed 0",
        "the 1s and 0s of a boolean mask",
    ],
)
def test_the_rule_leaves_settings_and_definitions(text):
    assert measured_numbers(text) == [], text


def test_no_measured_numbers_in_docstrings():
    allowed = {(path, text) for path, text, _ in EXCEPTIONS}
    found = _all_matches()
    bad = [f"{path} ({where}): {text!r}" for path, where, text in found if (path, text) not in allowed]
    assert not bad, (
        "docstrings quote measured numbers; say why instead and point to the docs page that holds the generated "
        "number (or add a reasoned entry to EXCEPTIONS):\n" + "\n".join(bad)
    )
    stale = sorted(allowed - {(path, text) for path, _, text in found})
    assert not stale, f"EXCEPTIONS entries that no longer match anything (remove them): {stale}"
