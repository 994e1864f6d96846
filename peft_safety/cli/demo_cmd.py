"""``peft-safety demo``: the main job (baseline -> score -> SET -> SPA, with evaluation) on the embedded model."""

from __future__ import annotations

import argparse
import dataclasses
import logging

HELP = "the main job: score, SET, SPA and evaluation on the embedded default model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._args import add_dataclass_arguments
    from ..recipes.main_job import MainJobConfig

    add_dataclass_arguments(parser, MainJobConfig)
    parser.add_argument("--out", dest="out_dir", help="alias of --out-dir")


def run(args: argparse.Namespace) -> int:
    from ..recipes.main_job import MainJobConfig, run_main_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = {f.name for f in dataclasses.fields(MainJobConfig)}
    # --out and --out-dir share a destination; an unset --out leaves the default in place
    cfg = MainJobConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    result = run_main_job(cfg)
    print(result.to_markdown())
    print(f"Results: {result.files['results_md']} and {result.files['results_json']}")
    return 0
