"""``peft-safety score MODEL --data FILE``: build a calibration set, score, select and save a mask.

Examples:

```bash
peft-safety score ./my-model --data refusals.jsonl --method snip --fraction 0.01 --out ./snip-mask
peft-safety score default --data harmful.csv --method esi --scope global --dtype bfloat16 --out ./esi-mask
```

The data file is ``.jsonl`` / ``.json`` (a list of objects, or ``{"rows": [...]}``) / ``.csv`` with ``messages`` or
``prompt`` (+ ``response``) fields (CSV: ``prompt`` and ``response`` columns).
"""

from __future__ import annotations

import argparse
import csv
import json
import os

from ..errors import SafetyError, SafetyFileError, SafetyFileNotFoundError

HELP = "score a model's parameters on a calibration set and save a mask"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder, Hub id, or 'default' (the embedded model)")
    parser.add_argument("--data", required=True, help="calibration rows: .jsonl, .json or .csv")
    parser.add_argument("--method", default="snip", help="scorer name (snip, esi, wanda, random, magnitude, ...)")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of units to select (default 0.01)")
    parser.add_argument("--scope", default="global", choices=["global", "per_tensor", "per_row"])
    parser.add_argument("--out", required=True, help="output folder for safety_mask.safetensors")
    parser.add_argument("--template", default="chat", choices=["chat", "raw", "inst", "alpaca"])
    parser.add_argument("--loss", default="response_only", choices=["response_only", "full_text", "last_token"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-rows", type=int, default=None, help="deterministic subsample of this many rows")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aggregation", default=None, choices=["sum_of_abs", "abs_of_sum"], help="snip only")
    parser.add_argument("--target-modules", nargs="+", default=None, help="module names or suffixes to score")
    parser.add_argument("--include-lm-head", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--isolate-p",
        type=float,
        default=0.0,
        help="utility isolation (Wei et al.): remove the top-p utility units from the mask, same scorer and scope "
        "(recommended for SET masks; 0: off)",
    )
    parser.add_argument(
        "--utility-data",
        default="self",
        help="utility rows for --isolate-p: 'self' (the model's own answers to forgelm_chat and fiqa prompts), or a "
        ".jsonl/.json/.csv file with prompt + response",
    )
    parser.add_argument("--utility-rows", type=int, default=64, help="utility rows scored for --isolate-p")


def read_rows(path: str) -> list[dict]:
    """Rows from a .jsonl / .json / .csv file.

    Raises:
        SafetyFileNotFoundError: no such file.
        SafetyFileError: a line or file that is not JSON (with its line number), a JSON file that is not a list of
            rows, a file that is not UTF-8 text.
    """
    if not os.path.isfile(path):
        raise SafetyFileNotFoundError(f"--data {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".csv"):
        raise SafetyError(f"--data {path!r}: unsupported extension {ext!r}; use .jsonl, .json or .csv.")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if ext == ".csv":
                return [dict(r) for r in csv.DictReader(fh)]
            if ext == ".json":
                try:
                    data = json.load(fh)
                except (json.JSONDecodeError, RecursionError) as err:
                    raise SafetyFileError(f"--data {path!r} is not valid JSON ({err}).") from None
                rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
                if not isinstance(rows, list):
                    raise SafetyFileError(
                        f"--data {path!r} holds a JSON {type(rows).__name__}; expected a list of rows or "
                        '{"rows": [...]}.'
                    )
                return rows
            rows = []
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as err:
                    raise SafetyFileError(f"--data {path!r}, line {number}: not valid JSON ({err}).") from None
            return rows
    except UnicodeDecodeError as err:
        raise SafetyFileError(f"--data {path!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None


def check(args: argparse.Namespace) -> None:
    """The shared checks of ``score`` (`peft_safety.cli._checks.check_score`), then the rows: the data file is read
    and parsed here, before the model loads, and kept for `run`."""
    from ._checks import check_score

    check_score(args)
    args.rows = read_rows(args.data)
    if not args.rows:
        raise SafetyError(f"--data {args.data!r} holds no rows.")


def _utility_calibration(args: argparse.Namespace, model, tokenizer):
    """The utility calibration set of ``--isolate-p``: a file's rows, or the model's own answers (``self``)."""
    from peft_safety.scoring.calibration import CalibrationSet

    kwargs = {"template": args.template, "loss": args.loss, "max_length": args.max_length}
    if args.utility_data != "self":
        return CalibrationSet(read_rows(args.utility_data)[: args.utility_rows], tokenizer, **kwargs)
    import random

    from peft_safety.scoring.rows import build_utility_set
    from peft_safety.sources.datasets import load_rows

    prompts = [r["prompt"] for name in ("forgelm_chat", "fiqa") for r in load_rows(name, normalize=False)]
    random.Random(args.seed).shuffle(prompts)
    return build_utility_set(model, tokenizer, prompts[: args.utility_rows], **kwargs)


def run(args: argparse.Namespace) -> int:
    import torch

    from peft_safety.scoring import score
    from peft_safety.scoring.calibration import CalibrationSet
    from peft_safety.scoring.selection import select

    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model == "default":
        from peft_safety.sources.models import load_default_model

        model, tokenizer = load_default_model(dtype=dtype)
    else:
        from peft_safety.sources.models import load_model

        model, tokenizer = load_model(args.model, dtype=dtype)
    rows = args.rows if getattr(args, "rows", None) is not None else read_rows(args.data)
    calib = CalibrationSet(rows, tokenizer, template=args.template, loss=args.loss, max_length=args.max_length)
    if args.max_rows:
        calib = calib.subsample(args.max_rows, seed=args.seed)
    kwargs = {"batch_size": args.batch_size}
    if args.method in ("random",):
        kwargs = {"seed": args.seed}
    if args.aggregation:
        kwargs["aggregation"] = args.aggregation
    scores = score(
        model,
        calib,
        args.method,
        target_modules=args.target_modules,
        include_lm_head=args.include_lm_head,
        progress=not args.no_progress,
        **kwargs,
    )
    if args.isolate_p:
        if scores.rule is not None:
            raise SafetyError(
                f"--isolate-p: the {args.method!r} scorer selects its units itself; utility isolation needs a scorer "
                "with raw scores (snip, esi, wanda, ...)."
            )
        from peft_safety.scoring.selection import isolate

        utility = score(
            model,
            _utility_calibration(args, model, tokenizer),
            args.method,
            target_modules=args.target_modules,
            include_lm_head=args.include_lm_head,
            progress=not args.no_progress,
            **kwargs,
        )
        mask = isolate(scores, utility, p=args.isolate_p, q=args.fraction, scope=args.scope)
    elif scores.rule is not None:  # scorers that select internally carry their rule: select(scores) applies it
        mask = select(scores)
    else:
        mask = select(scores, fraction=args.fraction, scope=args.scope, provenance={"seed": args.seed})
    path = mask.save_pretrained(args.out)
    print(mask.summary())
    print(f"saved {len(mask)} units ({mask.density:.4%} of {mask.total_numel()} eligible entries) to {path}")
    return 0
