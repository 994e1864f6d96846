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


def test_a_hang_or_a_dead_interpreter_is_a_crash(bench, tmp_path):
    import os
    import time

    hang = bench.Case("entry", "hang", lambda: time.sleep(30), needle="x")
    bench.classify_isolated(hang, timeout_s=1)
    assert (hang.outcome, hang.detail) == ("crash", "hang: no answer within 1 s")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def native_block():  # blocks inside safetensors' Rust code, where no Python signal handler can run
        from safetensors import safe_open

        safe_open(str(fifo), framework="pt")

    blocked = bench.Case("entry", "fifo", native_block, needle="x")
    bench.classify_isolated(blocked, timeout_s=2)
    assert blocked.outcome == "crash" and blocked.detail.startswith("hang")
    died = bench.Case("entry", "died", lambda: os._exit(3), needle="x")
    bench.classify_isolated(died)
    assert died.outcome == "crash" and "died" in died.detail
    fine = bench.Case("entry", "clear", lambda: (_ for _ in ()).throw(ValueError("x")), needle="x")
    bench.classify_isolated(fine)
    assert fine.outcome == "unclear"  # a plain ValueError, whatever it says, is not one of our checks


def test_the_published_table_is_the_committed_result(bench):
    payload = json.loads(RESULT.read_text(encoding="utf-8"))
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    block = text[text.index(bench.BEGIN) + len(bench.BEGIN) : text.index(bench.END)].strip()
    assert block == bench.render(payload)
    totals = payload["totals"]
    assert totals["tried"] == sum(1 for c in payload["cases"] if c["open"] is None)
    # what the page claims: every outcome that is not a clear error comes from PEFT's own code (docs/footguns.md)
    for kind in ("unclear", "crash", "silent"):
        assert totals[kind] == totals[f"{kind}_on_peft_path"], kind
    for case in payload["cases"]:
        if case["open"] is None and case["outcome"] != "clear":
            assert case["route"] == "peft", case
