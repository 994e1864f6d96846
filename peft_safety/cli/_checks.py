"""Argument checks of the mask, score, select and push commands, run by ``cli.main`` before the command's ``run``
(before any model or file is loaded, and before any network call). Kept apart from the command modules, which own
what their commands do; these only look at the parsed flags."""

from __future__ import annotations

import argparse
import os

from ..errors import SafetyError, SafetyFileNotFoundError
from ._common import add_hub_context, check_local_or_hub

__all__ = ["CHECKS"]

_SCOPES = ("global", "per_tensor", "per_row")
_MASK_FILE = "safety_mask.safetensors"


def _mask(what: str, value: str | None, revision: str | None = None) -> None:
    """A mask argument: an existing path, or a Hub id (recorded for error messages; offline: must be cached). What a
    local folder holds is checked by `SafetyMask.from_pretrained`, which loads no model."""
    check_local_or_hub(what, value, _MASK_FILE, revision)


def check_inspect(args: argparse.Namespace) -> None:
    _mask("MASK", args.mask, getattr(args, "revision", None))


def check_diff(args: argparse.Namespace) -> None:
    _mask("A", args.a)
    _mask("B", args.b)


def check_compare(args: argparse.Namespace) -> None:
    for path in args.masks:
        _mask("MASK", path)


def check_select(args: argparse.Namespace) -> None:
    """The scores file (a complete safetensors file, header read only), the count and the scope, before any tensor
    is read."""
    from .._files import check_safetensors_file

    if not os.path.lexists(args.scores):
        raise SafetyFileNotFoundError(f"no scores file at {args.scores!r}.")
    check_safetensors_file(args.scores, "scores file", "write it with Scores.to_safetensors(path)")
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise SafetyError(f"--fraction={args.fraction} is outside (0, 1]: give the share of units to select.")
    if args.k is not None and args.k < 1:
        raise SafetyError(f"--k must be >= 1, got {args.k}.")
    if args.scope not in _SCOPES:
        from ..vocab import did_you_mean

        raise SafetyError(f"--scope {args.scope!r} is unknown.{did_you_mean(args.scope, _SCOPES)}")
    _mask("--exclude", getattr(args, "exclude", None))


def check_score(args: argparse.Namespace) -> None:
    """The command reads --data only after loading the model: check the file, the scorer name and the ranges first."""
    if not os.path.isfile(args.data):
        raise SafetyFileNotFoundError(f"--data {args.data!r} does not exist.")
    ext = os.path.splitext(args.data)[1].lower()
    if ext not in (".jsonl", ".json", ".csv"):
        raise SafetyError(f"--data {args.data!r}: unsupported extension {ext!r}; use .jsonl, .json or .csv.")
    fraction = getattr(args, "fraction", None)
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise SafetyError(f"--fraction must be in (0, 1], got {fraction}.")
    for flag in ("batch_size", "max_length"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SafetyError(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
    from ..scoring.registry import SCORERS

    SCORERS.get(args.method)  # an unknown name raises with the closest match and the list
    if args.model.strip().lower() not in ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        check_local_or_hub("MODEL", args.model, "config.json")


def check_push(args: argparse.Namespace) -> None:
    """Before any network call: the repo id's form, by huggingface_hub's own rule (the command checks the mask folder
    itself)."""
    from .._files import check_hub_id

    check_hub_id(args.repo_id, "REPO_ID")
    add_hub_context("upload to repo", args.repo_id, _MASK_FILE)


#: command name -> check; a command module's own ``check`` takes precedence
CHECKS = {
    "inspect": check_inspect,
    "diff": check_diff,
    "compare": check_compare,
    "select": check_select,
    "score": check_score,
    "push": check_push,
}
