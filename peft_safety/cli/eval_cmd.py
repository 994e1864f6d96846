"""``peft-safety eval``: refusal, over-refusal and utility of a model or adapter.

Examples::

    peft-safety eval default --harmful harmbench_test --n 64 --benign chat_pairs --out runs/base
    peft-safety eval default --adapter runs/set_adapter --harmful harmbench_test --n 64 --mc arc_easy --out runs/set
    peft-safety eval my_prompts.jsonl ...   # any .csv/.json/.jsonl file works where a data source is expected
"""

from __future__ import annotations

import argparse
import os

from ..errors import SafetyError

HELP = "refusal, over-refusal and utility evaluation of a model or adapter"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_ADAPTER",
                        help="'default' (SmolLM2-135M-Instruct, offline copy), a local folder, a Hub id, or an adapter folder")  # fmt: skip
    parser.add_argument("--adapter", default=None, help="adapter folder (or Hub id) to load on top of MODEL")
    parser.add_argument("--harmful", default="harmbench_test", help="harmful prompts: source name or file")
    parser.add_argument("--benign", default=None, help="benign prompts for over-refusal: source name or file")
    parser.add_argument("--utility", default=None, help="rows with responses for perplexity: source name or file")
    parser.add_argument("--mc", default=None, help="multiple-choice rows for accuracy: source name or file")
    parser.add_argument("--n", type=int, default=64, help="prompts per set (a seeded subsample)")
    parser.add_argument("--n-utility", type=int, default=64, help="rows for perplexity and for multiple choice")
    parser.add_argument("--judges", nargs="+", default=None,
                        help="judge presets (default: wei2024 wei2024_min20 gcg_extended refusal_prefix)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on a bf16-capable CUDA device, float32 elsewhere")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--source", default="auto", choices=["auto", "offline", "hub"],
                        help="where named models and data come from")  # fmt: skip
    parser.add_argument("--out", default=None, help="folder for generations.jsonl, report.json and report.md")
    parser.add_argument("--no-progress", action="store_true")


def _rows(name: str | None, n: int, seed: int, source: str) -> list | None:
    from ..sources.datasets import load_rows

    if name is None:
        return None
    rows = load_rows(name, source=source)
    if len(rows) > n:
        rows = load_rows(name, n=n, seed=seed, source=source)
    return rows


def check(args: argparse.Namespace) -> None:
    """Everything that needs no model: counts, data-set names and files, judge names, model and adapter paths."""
    from ._common import check_data_source, check_local_or_hub

    if args.n < 1 or args.n_utility < 1:
        raise SafetyError(f"--n and --n-utility must be >= 1, got {args.n} and {args.n_utility}.")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise SafetyError(
            f"--max-new-tokens and --batch-size must be >= 1, got {args.max_new_tokens}, {args.batch_size}."
        )
    if args.source != "hub":  # with --source hub, names are Hub data sets
        for flag in ("harmful", "benign", "utility", "mc"):
            check_data_source(f"--{flag}", getattr(args, flag))
    if args.judges:
        from ..evaluation.judges import resolve_judges

        resolve_judges(list(args.judges))  # unknown preset names raise here, not after the model has loaded
    if args.model.strip().lower() not in _MODEL_NAMES:
        from .._files import ADAPTER_CONFIG

        # a folder holding an adapter_config.json is an adapter: its config and weights are checked like --adapter's
        is_adapter = os.path.lexists(os.path.join(os.path.expanduser(args.model), ADAPTER_CONFIG))
        check_local_or_hub("MODEL", args.model, ADAPTER_CONFIG if is_adapter else "config.json")
    check_local_or_hub("--adapter", args.adapter, "adapter_config.json")
    if args.adapter and os.path.isdir(args.adapter):
        from ..tuner import check_adapter_type

        check_adapter_type(args.adapter)  # the weights file says what the adapter is, whatever its config says


#: short names of the embedded models (peft_safety.sources.models.MODEL_SOURCES), resolved without the Hub
_MODEL_NAMES = ("default", "smollm2", "smollm2-135m", "smollm2-135m-instruct")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import DEFAULT_JUDGES, evaluate
    from ..sources.models import load_model
    from ._common import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model_source = "hub" if args.source == "hub" else "auto"
    model, tokenizer = load_model(args.model, resolve_dtype(args.dtype, device), device, adapter=args.adapter,
                                  source=model_source)  # fmt: skip
    report = evaluate(
        model,
        tokenizer,
        _rows(args.harmful, args.n, args.seed, args.source),
        _rows(args.benign, args.n, args.seed, args.source),
        utility_rows=_rows(args.utility, args.n_utility, args.seed, args.source),
        mc_rows=_rows(args.mc, args.n_utility, args.seed, args.source),
        judges=tuple(args.judges) if args.judges else DEFAULT_JUDGES,
        out_dir=args.out,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        progress=not args.no_progress,
    )
    print(report.to_markdown())
    for what, path in report.files.items():
        print(f"{what}: {path}")
    return 0
