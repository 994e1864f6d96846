"""``peft-safety --help`` and every subcommand's ``--help`` answer in under a second without importing torch, peft,
transformers, trl or datasets; measured in a fresh interpreter (CPU time of the child, which machine load does not
inflate, and wall time with a generous margin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_safety.cli.main import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "peft", "transformers", "trl", "datasets", "accelerate", "huggingface_hub")

CHILD = rf"""
import contextlib, io, json, resource, sys, time
start = time.perf_counter()
from peft_safety.cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"code": code, "wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime,
                  "text": out.getvalue(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _help(argv: list[str], cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PEFT_SAFETY_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """Commands whose flags come from heavy dataclasses (train: every TRL flag; demo) render their help once and
    cache it; the first call here builds the cache, as a user's first call would."""
    cache = tmp_path_factory.mktemp("cache")
    for name in ("train", "demo"):
        first = _help([name, "--help"], cache)
        assert first["code"] == 0 and "usage: peft-safety " + name in first["text"]
    return cache


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help_is_fast_and_imports_nothing_heavy(argv, warm_cache):
    result = _help(argv, warm_cache)
    assert result["code"] == 0
    assert result["heavy"] == [], f"{argv} imported {result['heavy']}"
    assert result["cpu"] < 1.0, f"{argv}: {result['cpu']:.2f} s of CPU"
    assert result["wall"] < 3.0, f"{argv}: {result['wall']:.2f} s"  # the machine may be shared: CPU time is the bar
    assert "usage: peft-safety" in result["text"]


def test_train_help_lists_trl_and_safety_flags(warm_cache):
    text = _help(["train", "--help"], warm_cache)["text"]
    for flag in ("--safety_mask", "--safety_mode", "--load_in_4bit", "--use_peft", "--lora_target_modules",
                 "--attn_implementation", "--packing", "--dataset_name", "--model_name_or_path", "--config"):  # fmt: skip
        assert flag in text, flag


def test_help_cache_follows_the_source(tmp_path, monkeypatch):
    """The cache key changes when a source file changes, so a stale help is never shown."""
    from peft_safety.cli import main as cli_main

    key = cli_main._help_key("train")
    source = ROOT / "peft_safety" / "cli" / "train_cmd.py"
    stat = source.stat()
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert cli_main._help_key("train") != key
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cli_main._help_key("train") == key
