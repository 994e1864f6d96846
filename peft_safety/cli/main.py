"""Entry point of the ``peft-safety`` command.

Each subcommand lives in its own module ``peft_safety.cli.<name>`` which defines:

* ``HELP``: one line shown in ``peft-safety --help``;
* ``add_arguments(parser: argparse.ArgumentParser) -> None``;
* ``run(args: argparse.Namespace) -> int``: calls one library function, prints, returns the exit code.

Subcommand modules are imported only when their subcommand runs, so ``peft-safety inspect`` never imports trl.
Errors that are the user's (``ValueError``, ``TypeError``, ``FileNotFoundError``, ``ImportError``) are printed as
one line on stderr with exit code 2; anything else propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._version import __version__

#: subcommand name -> module name inside ``peft_safety.cli``
SUBCOMMANDS: dict[str, str] = {
    "inspect": "inspect_cmd",
    "diff": "diff_cmd",
    "select": "select_cmd",
    "score": "score_cmd",
    "compare": "compare_cmd",
    "train": "train_cmd",
    "eval": "eval_cmd",
    "push": "push_cmd",
    "fetch": "fetch_cmd",
    "demo": "demo_cmd",
}

_SHORT_HELP: dict[str, str] = {
    "inspect": "show a mask's summary: counts per layer and module",
    "diff": "compare two masks: IoU globally and per module",
    "select": "turn saved scores into a mask",
    "score": "score a model's parameters on a calibration set and save a mask",
    "compare": "overlap and stability report of several masks",
    "train": "run SET or SPA training (TRL SFT) with a mask",
    "eval": "refusal, over-refusal and utility evaluation of a model or adapter",
    "push": "upload a mask folder to the Hugging Face Hub",
    "fetch": "fetch the embedded default model and data sets into the local cache",
    "demo": "the main job: score, SET, SPA and evaluation on the embedded default model",
}


def _load(name: str):
    return importlib.import_module(f"peft_safety.cli.{SUBCOMMANDS[name]}")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-safety", description="Safety-critical parameters for PEFT and TRL.")
    parser.add_argument("--version", action="version", version=f"peft-safety {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name in SUBCOMMANDS:
        p = sub.add_parser(name, help=_SHORT_HELP[name], description=_SHORT_HELP[name])
        if name == wanted:
            # only the subcommand that runs is imported (lean imports)
            _load(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = _load(args.command)
    try:
        return int(module.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError, KeyError) as err:
        print(f"peft-safety {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
