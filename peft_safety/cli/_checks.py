"""Argument checks of the mask, score, select and push commands, run by ``cli.main`` before the command's ``run``
(before any model or file is loaded, and before any network call). Kept apart from the command modules, which own
what their commands do; these only look at the parsed flags."""

from __future__ import annotations

import argparse
import os
import re

from ._common import add_hub_context, check_local_or_hub

__all__ = ["CHECKS"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MASK_FILE = "safety_mask.safetensors"


def _mask(what: str, value: str | None, revision: str | None = None) -> None:
    check_local_or_hub(what, value, _MASK_FILE, revision)
    if value is not None and os.path.isdir(value) and not os.path.isfile(os.path.join(value, _MASK_FILE)):
        raise FileNotFoundError(f"{what} {value!r}: the folder has no {_MASK_FILE}.")


def _fraction(value: float | None, flag: str = "--fraction") -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"{flag} must be in (0, 1], got {value}.")


def check_inspect(args: argparse.Namespace) -> None:
    _mask("MASK", args.mask, getattr(args, "revision", None))


def check_diff(args: argparse.Namespace) -> None:
    _mask("A", args.a)
    _mask("B", args.b)


def check_compare(args: argparse.Namespace) -> None:
    for path in args.masks:
        _mask("MASK", path)


def check_select(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.scores):
        raise FileNotFoundError(f"SCORES {args.scores!r}: no such file (write one with Scores.to_safetensors).")
    _fraction(getattr(args, "fraction", None))
    k = getattr(args, "k", None)
    if k is not None and k < 1:
        raise ValueError(f"--k must be >= 1, got {k}.")
    scope = getattr(args, "scope", "global")
    if scope not in ("global", "per_tensor", "per_row"):
        raise ValueError(f"--scope must be global, per_tensor or per_row, got {scope!r}.")
    _mask("--exclude", getattr(args, "exclude", None))


def check_score(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data!r}: no such file.")
    if os.path.splitext(args.data)[1].lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"--data {args.data!r}: unsupported file type; use .jsonl, .json or .csv.")
    _fraction(getattr(args, "fraction", None))
    for flag in ("batch_size", "max_length"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}.")
    from ..scoring.registry import SCORERS

    SCORERS.get(args.method)  # an unknown name raises with the closest match and the list
    if args.model.strip().lower() not in ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        check_local_or_hub("MODEL", args.model, "config.json")


def check_push(args: argparse.Namespace) -> None:
    if not _REPO_ID.match(args.repo_id):
        raise ValueError(
            f"REPO_ID {args.repo_id!r} is not a Hub model repo id; use 'owner/name' (e.g. me/llama-mask)."
        )
    path = args.mask_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"MASK_DIR {path!r}: no such mask folder or file.")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, _MASK_FILE)):
        raise FileNotFoundError(f"MASK_DIR {path!r}: the folder has no {_MASK_FILE}.")
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
