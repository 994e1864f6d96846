"""Dataclass configs as command lines, through transformers' ``HfArgumentParser`` (the demo command and the
benchmark scripts; the home-made dataclass-to-argparse helper is gone)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_demo_command_line_builds_the_main_job_config():
    from peft_safety.cli import demo_cmd
    from peft_safety.recipes.main_job import MainJobConfig

    cfg = demo_cmd.parse(["--out", "o", "--set-steps", "7", "--no-plots", "--threads", "1"])
    assert isinstance(cfg, MainJobConfig)
    assert (cfg.out_dir, cfg.set_steps, cfg.plots, cfg.threads) == ("o", 7, False, 1)
    cfg = demo_cmd.parse(["--out_dir", "p", "--set_steps", "3", "--plots", "false"])  # TRL-style spelling too
    assert (cfg.out_dir, cfg.set_steps, cfg.plots) == ("p", 3, False)
    assert demo_cmd.parse([]) == MainJobConfig()
    with pytest.raises(SystemExit):
        demo_cmd.parse(["--set-steps", "many"])


def test_benchmark_scripts_parse_their_dataclasses(monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce_bench", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce_bench", module)
    spec.loader.exec_module(module)
    cfg = module.parse_args([])
    assert cfg == module.ReproduceConfig()
    first = next(f for f in __import__("dataclasses").fields(module.ReproduceConfig) if f.type in ("int", int))
    cfg = module.parse_args([f"--{first.name}", "5"])
    assert getattr(cfg, first.name) == 5
