"""Benchmark: global top-k selection over many score tensors, ours (two-pass radix threshold, chunked, no
concatenation) against the naive ``torch.cat`` + ``torch.topk``, in the same run.

Both methods produce the same thing, a :class:`SafetyMask` with per-tensor sorted int32 indices, from the same
:class:`Scores`. Each method runs in a fresh subprocess so that its memory is measured alone:

* the scores are generated first (in place, seeded: no temporaries), the ``Scores`` object is built and a tiny warm-up
  selection runs, so allocator and kernel start-up costs are outside the measurement;
* then the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the selection
  runs; **peak extra memory = VmHWM after - VmRSS before** (from ``/proc/self/status``). Unlike ``tracemalloc``, RSS
  sees torch's CPU allocations;
* the subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc serves every large buffer by ``mmap`` and
  returns it on free (otherwise the dynamic mmap threshold lets freed heap memory be reused unseen).

The naive subprocess also checks that both methods select the same set: the same entries strictly above the k-th
value, the same count, and among entries equal to it ours takes the first ones (tensor order, then index order),
which is the documented tie-break (``torch.topk`` picks ties in an unspecified order, so only the count is compared
for them).

Usage:

```bash
python benchmarks/selection.py --threads 1                 # 100M scores over 200 tensors, 1% selected
python benchmarks/selection.py --small --out /tmp/sel.json  # smoke run (1M scores over 20 tensors)
python benchmarks/selection.py --small --in-process --out /tmp/sel.json  # both methods in one process (tests)
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "selection.json")


def tensor_sizes(total: int, n_tensors: int, seed: int) -> list[tuple[int, int]]:
    """Shapes ``(rows, cols)`` of ``n_tensors`` matrices with about ``total`` entries: one embedding-like tensor of
    ~16% of the total, three of ~8% each, and the rest log-uniform (a spread like an LLM's linear layers)."""
    g = torch.Generator().manual_seed(seed)
    cols = 512
    big = [0.16, 0.08, 0.08, 0.08][: max(1, min(4, n_tensors // 5))]
    rest = n_tensors - len(big)
    weights = torch.exp(torch.empty(rest, dtype=torch.float64).uniform_(0.0, 4.0, generator=g))
    share = 1.0 - sum(big)
    sizes = [b * total for b in big] + (weights / weights.sum() * share * total).tolist()
    shapes = [(max(1, round(s / cols)), cols) for s in sizes]
    perm = torch.randperm(len(shapes), generator=g).tolist()  # big tensors not all first: ties cross tensors
    return [shapes[i] for i in perm]


def make_scores(shapes: list[tuple[int, int]], seed: int):
    from peft_safety.scoring.scores import Scores

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, shape in enumerate(shapes):
        t = torch.empty(shape, dtype=torch.float32)
        t.uniform_(0.0, 1.0, generator=g)  # in place: no temporary buffers before the measurement
        tensors[f"model.layers.{i}.mlp.proj.weight"] = t
    return Scores(tensors, provenance={"method": "synthetic", "seed": seed})


def naive_select(scores, k: int):
    """``torch.cat`` every score, ``torch.topk``, split back into per-tensor sorted indices, build the mask."""
    from peft_safety.mask import SafetyMask

    names = list(scores.names)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    idx = torch.topk(flat, k, sorted=False).indices.sort().values
    del flat
    sizes = torch.tensor([scores[n].numel() for n in names], dtype=torch.int64)
    starts = torch.cumsum(sizes, 0) - sizes
    bounds = torch.searchsorted(idx, torch.cumsum(sizes, 0))
    indices, lo = {}, 0
    for n, start, hi in zip(names, starts.tolist(), bounds.tolist()):
        if hi > lo:
            indices[n] = (idx[lo:hi] - start).to(torch.int32)
        lo = hi
    return SafetyMask(indices=indices, shapes=scores.shapes, provenance=dict(scores.provenance))


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024 for key in ("VmHWM", "VmRSS")}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(
    method: str, shapes: list[tuple[int, int]], fraction: float, threads: int, repeat: int, seed: int, indices: str
) -> dict[str, object]:
    """Generate the scores, warm up, then time ``repeat`` selections and measure the peak extra RSS of ``method``.

    ``ours`` saves its indices to ``indices``; ``naive`` compares its result with them (:func:`check_same`).
    """
    from peft_safety.scoring.selection import count_for_fraction, select

    torch.set_num_threads(threads)
    scores = make_scores(shapes, seed)
    k = count_for_fraction(fraction, scores.numel())
    warm = make_scores([(4, 64), (2, 64)], seed + 1)
    run = (lambda s, kk: select(s, k=kk)) if method == "ours" else naive_select
    run(warm, 10)

    before = _status()["VmRSS"]
    reset = _reset_peak()
    times = []
    mask = None
    for _ in range(repeat):
        mask = None  # the previous result is freed before the next run
        t0 = time.perf_counter()
        mask = run(scores, k)
        times.append(time.perf_counter() - t0)
    peak = _status()["VmHWM"]
    result: dict[str, object] = {
        "method": method,
        "times_s": times,
        "time_s": statistics.median(times),
        "peak_extra_bytes": peak - before if reset else None,
        "peak_measure": "VmHWM - VmRSS after clear_refs" if reset else "unavailable (no /proc/self/clear_refs)",
        "selected": len(mask),
    }
    if method == "ours":
        from safetensors.torch import save_file

        save_file(dict(mask), indices)
    else:
        result["check"] = check_same(scores, mask, indices)
    return result


def interleaved_timing(
    shapes: list[tuple[int, int]], fraction: float, threads: int, repeat: int, seed: int
) -> dict[str, dict]:
    """Both methods on the same scores in this process, one warm-up each, then ``repeat`` rounds with the order
    rotating per round: the time comparison (raw timings, median, spread)."""
    from peft_safety.scoring.selection import count_for_fraction, select

    torch.set_num_threads(threads)
    scores = make_scores(shapes, seed)
    k = count_for_fraction(fraction, scores.numel())
    return _bench.interleaved(
        {"ours": lambda: select(scores, k=k), "naive": lambda: naive_select(scores, k)}, repeats=repeat, warmup=1
    )


def worker(args: argparse.Namespace) -> None:
    """One method in this (fresh) process; the result goes to stdout as one JSON line."""
    shapes = [tuple(s) for s in json.loads(args.shapes)]
    result = measure(args.worker, shapes, args.fraction, args.threads, args.repeat, args.seed, args.indices)
    print("RESULT " + json.dumps(result))


def check_same(scores, naive_mask, ours_path: str) -> dict[str, object]:
    """Compare ours (saved indices) with the naive result, allowing only the documented tie-break difference."""
    from safetensors.torch import load_file

    ours = load_file(ours_path)
    names = list(scores.names)
    n_ours = sum(t.numel() for t in ours.values())
    n_naive = len(naive_mask)
    # the k-th value: the smallest selected score
    kth = min(float(scores[n].reshape(-1)[naive_mask[n].long()].min()) for n in naive_mask.names)
    above_equal, ties_ours, ties_naive = True, [], 0
    for n in names:
        t = scores[n].reshape(-1)
        a = ours[n].long() if n in ours else torch.empty(0, dtype=torch.long)
        b = naive_mask[n].long() if n in naive_mask.names else torch.empty(0, dtype=torch.long)
        above_equal &= torch.equal(a[t[a] > kth], b[t[b] > kth]) and bool((t[a] >= kth).all())
        ties_ours += [(names.index(n), int(i)) for i in a[t[a] == kth]]
        ties_naive += int((t[b] == kth).sum())
    all_ties = [(names.index(n), int(i)) for n in names for i in (scores[n].reshape(-1) == kth).nonzero().flatten()]
    first_ties = all_ties[: len(ties_ours)] == ties_ours
    return {
        "same_count": n_ours == n_naive,
        "same_above_threshold": bool(above_equal),
        "same_tie_count": len(ties_ours) == ties_naive,
        "ours_ties_are_first": first_ties,
        "ties_at_threshold": len(all_ties),
        "same_selection": bool(n_ours == n_naive and above_equal and len(ties_ours) == ties_naive and first_ties),
    }


def _run_worker(method: str, args: argparse.Namespace, shapes, indices_path: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--shapes",
        json.dumps(shapes),
        "--fraction",
        str(args.fraction),
        "--threads",
        str(args.threads),
        "--repeat",
        str(args.repeat),
        "--seed",
        str(args.seed),
        "--indices",
        indices_path,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=100_000_000, help="total number of scores")
    parser.add_argument("--tensors", type=int, default=200, help="number of score tensors")
    parser.add_argument("--fraction", type=float, default=0.01, help="share selected (global)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per method; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="smoke run: 1M scores over 20 tensors, one repeat")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run both methods in this process (quick smoke test; memory numbers are less isolated)",
    )
    # internal: run one method in this process
    parser.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    parser.add_argument("--indices", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.small:
        args.numel, args.tensors, args.repeat = 1_000_000, 20, 1
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)

    shapes = tensor_sizes(args.numel, args.tensors, args.seed)
    total = sum(r * c for r, c in shapes)
    largest = max(r * c for r, c in shapes) * 4
    with tempfile.TemporaryDirectory() as tmp:
        indices_path = os.path.join(tmp, "ours.safetensors")
        if args.in_process:
            common = (shapes, args.fraction, args.threads, args.repeat, args.seed, indices_path)
            ours = measure("ours", *common)
            naive = measure("naive", *common)
        else:
            ours = _run_worker("ours", args, shapes, indices_path)
            naive = _run_worker("naive", args, shapes, indices_path)
    timing = interleaved_timing(shapes, args.fraction, args.threads, args.repeat, args.seed)

    result = {
        "benchmark": "selection",
        "config": {
            "numel": total,
            "tensors": len(shapes),
            "fraction": args.fraction,
            "k": ours["selected"],
            "threads": args.threads,
            "repeat": args.repeat,
            "seed": args.seed,
            "largest_tensor_bytes": largest,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "memory_method": "in-process (smoke run): VmHWM - VmRSS after /proc/self/clear_refs reset"
            if args.in_process
            else "fresh subprocess per method; VmHWM - VmRSS after /proc/self/clear_refs reset; "
            "MALLOC_MMAP_THRESHOLD_=65536",
        },
        "ours": ours,
        "naive": naive,
        "timing": timing,
        "time_ratio_naive_over_ours": timing["naive"]["median_s"] / timing["ours"]["median_s"],
        "ours_peak_over_largest_tensor": None
        if ours["peak_extra_bytes"] is None
        else ours["peak_extra_bytes"] / largest,
        "naive_peak_over_largest_tensor": None
        if naive["peak_extra_bytes"] is None
        else naive["peak_extra_bytes"] / largest,
        "same_selection": naive["check"]["same_selection"],
    }
    result["provenance"] = _bench.finish(prov)
    _bench.write_json(args.out, result)

    print(f"global top-{ours['selected']:,} ({args.fraction:g}) of {total:,} fp32 scores in {len(shapes)} tensors, ")
    print(
        f"threads={args.threads}, largest tensor {_mb(largest)}; median of {args.repeat} (interleaved, same process)"
    )
    header = ("method", "time", "peak extra memory", "x largest tensor")
    rows = [
        (name, f"{timing[key]['median_s']:.3f} s", _mb(r["peak_extra_bytes"]), "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / largest:.2f}")
        for name, key, r in (("ours (radix, chunked)", "ours", ours), ("naive cat+topk", "naive", naive))
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)))
    print(f"time ratio naive/ours: {result['time_ratio_naive_over_ours']:.2f}x   same selection: "
          f"{result['same_selection']} (ties at the threshold: {naive['check']['ties_at_threshold']})")  # fmt: skip
    print(f"-> {args.out}")
    return 0 if result["same_selection"] else 1


if __name__ == "__main__":
    sys.exit(main())
