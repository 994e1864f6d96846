"""The fuzz corpus behind docs/reliability.md: its classifier (clear / unclear / crash / silent) on cases whose outcome
is known, and the published table against the committed result file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "robustness.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_bench_robustness", ROOT / "benchmarks" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _outcome(bench, fn, **kw) -> str:
    case = bench.Case("entry", "case", fn, **kw)
    bench.classify(case)
    return case.outcome


def test_the_classifier_tells_the_four_outcomes_apart(bench):
    from peft_safety.errors import SafetyError, SafetyFileError

    def raises(err):
        def fn():
            raise err

        return fn

    assert (
        _outcome(bench, raises(SafetyFileError("/x/adapter_config.json: empty")), needle="/x/adapter_config.json")
        == "clear"
    )
    assert _outcome(bench, raises(SafetyError("something is wrong")), needle="/x/adapter_config.json") == "unclear"
    assert _outcome(bench, raises(ValueError("/x/adapter_config.json: bad")), needle="/x") == "unclear"
    assert _outcome(bench, raises(RecursionError("deep")), needle="x") == "crash"
    assert _outcome(bench, raises(AttributeError("'list' object has no attribute 'collate'"))) == "crash"
    assert _outcome(bench, lambda: None, needle="x") == "silent"
    assert _outcome(bench, raises(bench.Wrong("wrote through the link")), expect="result") == "silent"
    assert _outcome(bench, lambda: None, expect="result") == "clear"


def test_the_classifier_reads_the_command_line(bench, capsys):
    def exit_code(code, line=""):
        def fn():
            print(line, file=sys.stderr)
            return code

        return fn

    assert _outcome(bench, exit_code(2, "peft-safety x: error: --k must be >= 1"), needle="--k", cli=True) == "clear"
    assert _outcome(bench, exit_code(2, "peft-safety x: error: bad"), needle="--k", cli=True) == "unclear"
    assert _outcome(bench, exit_code(0), needle="--k", cli=True) == "silent"


def test_a_hang_is_a_crash(bench, monkeypatch):
    import time

    monkeypatch.setattr(bench, "TIMEOUT_S", 1)
    assert _outcome(bench, lambda: time.sleep(5), needle="x") == "crash"


def test_the_published_table_is_the_committed_result(bench):
    payload = json.loads(RESULT.read_text(encoding="utf-8"))
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    block = text[text.index(bench.BEGIN) + len(bench.BEGIN) : text.index(bench.END)].strip()
    assert block == bench.render(payload)
    totals = payload["totals"]
    assert totals["tried"] == sum(1 for c in payload["cases"] if c["open"] is None)
    # what the page claims: no crash, no silent acceptance, unclear errors only on PEFT's own path
    assert totals["crash"] == 0 and totals["silent"] == 0
    assert totals["unclear"] == totals["unclear_on_peft_path"]
    for case in payload["cases"]:
        if case["open"] is None and case["outcome"] == "unclear":
            assert case["route"] == "peft", case
