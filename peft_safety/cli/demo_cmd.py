"""``peft-safety demo``: the main job (baseline -> score -> SET -> SPA, with evaluation) on the embedded model.

Every field of `MainJobConfig` is a flag (``--set-steps 7`` or ``--set_steps 7``; booleans as ``--plots false`` or
``--no-plots``), parsed by transformers' ``HfArgumentParser``; ``--out`` is an alias of ``--out-dir``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

HELP = "the main job: score, SET, SPA and evaluation on the embedded default model"
OWN_PARSER = True
SLOW_HELP = True  # MainJobConfig lives next to torch code


def make_parser(prog: str = "peft-safety demo"):
    from transformers import HfArgumentParser

    from ..recipes.main_job import MainJobConfig

    parser = HfArgumentParser(MainJobConfig, prog=prog, description=HELP)
    parser.add_argument("--out", dest="out_dir", default=argparse.SUPPRESS, help="alias of --out_dir")
    return parser


def help_text(prog: str) -> str:
    return make_parser(prog).format_help()


def parse(argv: Sequence[str], prog: str = "peft-safety demo"):
    """The `MainJobConfig` of a command line."""
    (config,) = make_parser(prog).parse_args_into_dataclasses(list(argv))
    return config


def run(config) -> int:
    from ..recipes.main_job import run_main_job

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run_main_job(config)
    print(result.to_markdown())
    print(f"Results: {result.files['results_md']} and {result.files['results_json']}")
    return 0
