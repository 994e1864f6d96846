"""Shared helpers for the benchmark scripts: provenance, timing statistics and atomic JSON output.

Every result file a benchmark writes carries a ``provenance`` block (the exact command, the git commit, library
versions, the torch thread count, the machine and its load average at the start and end) and, for each timed
quantity, the raw timings next to their median and spread (min, max, interquartile range), so that each published
figure can be traced to the run that produced it (``benchmarks/tables.py`` renders the tables from these files).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() or None
    if commit and dirty.stdout.strip():
        commit += " (with uncommitted changes)"
    return commit


def provenance(threads: int) -> dict[str, Any]:
    """The run's command line, commit, versions, thread count and machine load, for the result file."""
    import peft
    import transformers

    from peft_safety import __version__

    return {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "git_commit": _git_commit(),
        "peft_safety": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish(prov: dict[str, Any]) -> dict[str, Any]:
    """Add the end-of-run load average and the run's wall time to ``prov`` (returned for chaining)."""
    prov["load_average_end"] = list(os.getloadavg())
    prov["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return prov


def stats(times: list[float]) -> dict[str, Any]:
    """Raw timings with their median, min, max and interquartile range (seconds)."""
    if not times:
        raise ValueError("stats(): no timings to summarise")
    ordered = sorted(times)
    if len(ordered) >= 2:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = [q[0], q[2]]
    else:
        iqr = [ordered[0], ordered[0]]
    return {
        "raw_s": list(times),
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_s": iqr,
        "repeats": len(times),
    }


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Time every function ``repeats`` times, in rounds (one call of each per round; the order rotates every round),
    after ``warmup`` untimed rounds, so that machine noise and cache order hit every method alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    raw: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t = time.perf_counter()
            fns[name]()
            raw[name].append(time.perf_counter() - t)
    return {n: stats(raw[n]) for n in names}


def write_json(path: str, payload: dict[str, Any]) -> str:
    """Write ``payload`` as indented JSON, atomically."""
    from peft_safety._io import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


class StageClock:
    """Wall time of each named stage of a long run (the time since the previous tick), printed as it goes."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def tick(self, name: str) -> float:
        now = time.perf_counter()
        dt = round(now - self._t, 2)
        self.timings[name] = dt
        print(f"  [{name}: {dt:.1f} s]", flush=True)
        self._t = now
        return dt


def summary(values: list[float]) -> dict[str, Any]:
    """Raw values with their median, min, max and interquartile range (for ratios and other unitless series)."""
    if not values:
        raise ValueError("summary(): no values to summarise")
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "raw": list(values),
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "iqr": [q[0], q[2]],
        "repeats": len(values),
    }


def paired_rounds(
    steps: dict[str, Callable[[], Any]], rounds: int, baseline: str, warmup: int = 2
) -> dict[str, dict[str, Any]]:
    """Time one call of every step per round (the order rotates every round, so A B C, B C A, ...), after ``warmup``
    untimed rounds, in wall-clock and in process CPU seconds.

    On a shared machine both sides of a ratio see the same load when they run back to back, so each round gives one
    ratio per step against ``baseline`` and the ratios are summarised per round (median and spread), next to the
    ratio of the medians.

    Returns:
        ``{"wall": {name: stats}, "cpu": {name: stats}, "ratio_wall": {name: summary}, "ratio_cpu": {name: summary},
        "ratio_of_medians_wall": {name: float}, "ratio_of_medians_cpu": {name: float}}``.
    """
    names = list(steps)
    if baseline not in steps:
        raise ValueError(f"paired_rounds(): baseline {baseline!r} is not one of {names}")
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            w, c = time.perf_counter(), time.process_time()
            steps[name]()
            if r >= warmup:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    out: dict[str, dict[str, Any]] = {
        "wall": {n: stats(wall[n]) for n in names},
        "cpu": {n: stats(cpu[n]) for n in names},
    }
    for kind, series in (("wall", wall), ("cpu", cpu)):
        out[f"ratio_{kind}"] = {
            n: summary([a / b for a, b in zip(series[n], series[baseline])]) for n in names if n != baseline
        }
        out[f"ratio_of_medians_{kind}"] = {
            n: out[kind][n]["median_s"] / out[kind][baseline]["median_s"] for n in names if n != baseline
        }
    return out
