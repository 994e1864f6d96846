"""Dataclass -> argparse flags (the CLI's `demo` and the benchmark scripts)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from peft_safety._args import add_dataclass_arguments, dataclass_from_namespace


@dataclass
class _Cfg:
    max_new_tokens: int = field(default=8, metadata={"help": "budget"})
    rate: float = field(default=0.5, metadata={"help": "rate"})
    name: str = field(default="x", metadata={"help": "name"})
    threads: int | None = field(default=None, metadata={"help": "threads"})
    small: bool = field(default=False, metadata={"help": "smoke"})


def test_flags_types_defaults_and_bools():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Cfg)
    cfg = dataclass_from_namespace(_Cfg, parser.parse_args(["--max-new-tokens", "3", "--small", "--threads", "2"]))
    assert cfg == _Cfg(max_new_tokens=3, rate=0.5, name="x", threads=2, small=True)
    assert dataclass_from_namespace(_Cfg, parser.parse_args(["--no-small"])) == _Cfg()
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "fast"])


def test_underscore_flags_and_unsupported_types():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Cfg, dash_case=False)
    assert dataclass_from_namespace(_Cfg, parser.parse_args(["--max_new_tokens", "5"])).max_new_tokens == 5

    @dataclass
    class Bad:
        items: list = field(default_factory=list)

    with pytest.raises(TypeError, match=r"Bad\.items"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)


def test_demo_command_line_builds_the_main_job_config():
    from peft_safety.cli import demo_cmd
    from peft_safety.recipes.main_job import MainJobConfig

    parser = argparse.ArgumentParser()
    demo_cmd.add_arguments(parser)
    args = parser.parse_args(["--out", "o", "--set-steps", "7", "--no-plots", "--threads", "1"])
    cfg = dataclass_from_namespace(MainJobConfig, args)
    assert (cfg.out_dir, cfg.set_steps, cfg.plots, cfg.threads) == ("o", 7, False, 1)
