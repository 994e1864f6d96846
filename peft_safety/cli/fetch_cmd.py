"""``peft-safety fetch``: pre-fetch the embedded default model and the offline data sets into the cache.

Examples::

    peft-safety fetch                 # the default model (download + one-time conversion) and the evaluation sets
    peft-safety fetch --all           # every named data source as well
    peft-safety fetch --data advbench harmbench_test --no-model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import SafetyError

HELP = "fetch the embedded default model and data sets into the local cache"

#: data fetched without --all: what `peft-safety eval` and the examples use
DEFAULT_DATA = ("harmbench_val", "harmbench_test", "advbench", "uncensorbench", "chat_pairs", "arc_easy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="fetch every named data source")
    parser.add_argument("--data", nargs="*", default=None, metavar="NAME", help="data sources to fetch")
    parser.add_argument("--no-model", action="store_true", help="skip the default model")


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 2**20:.1f} MiB"


def _names(args: argparse.Namespace) -> list[str]:
    from ..sources.datasets import DATA_SOURCES

    return sorted(DATA_SOURCES) if args.all else list(args.data if args.data is not None else DEFAULT_DATA)


def check(args: argparse.Namespace) -> None:
    """Data-set names are checked before the (large) model download starts."""
    from ..sources.datasets import DATA_SOURCES
    from ..vocab import did_you_mean

    for name in _names(args):
        if name not in DATA_SOURCES:
            raise SafetyError(f"--data: unknown data source {name!r}.{did_you_mean(name, sorted(DATA_SOURCES))}")


def run(args: argparse.Namespace) -> int:
    from ..sources.datasets import DATA_SOURCES, fetch_source
    from ..sources.models import ensure_default_model

    if not args.no_model:
        start = time.perf_counter()
        folder = ensure_default_model()
        print(f"model  smollm2-135m  {_size(folder):>10}  {folder}  ({time.perf_counter() - start:.1f} s)")
    for name in _names(args):
        if name not in DATA_SOURCES:
            raise SafetyError(f"Unknown data source {name!r}. Available: {sorted(DATA_SOURCES)}.")
        for path in fetch_source(name):
            print(f"data   {name:<24} {_size(path):>10}  {path}")
    return 0
