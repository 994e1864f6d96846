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
python benchmarks/selection.py --out-of-core --numel 1000000000 --tensors 200   # selection from files on disk
```

``--out-of-core`` writes the scores to disk as a `Scores.save_pretrained` folder (tensor by tensor, never all in
memory; ``--dir``, default a temporary folder under ``/tmp``) and measures, each in a fresh subprocess (peak RSS as
above): one **read pass** (every file read once in the chunks the selection reads, with its read-ahead thread), the
out-of-core **selection** (`select(ScoreFiles(...))`: the one-read buffer when it fits, as at 1%) and the selection
with the two-pass **histogram** engine forced. Every pass reads the disk: the files are evicted from the page cache
before each run and every range as soon as it is read (``posix_fadvise(DONTNEED)``), as they would be for scores
larger than RAM. The runs alternate (read, select, histogram, read, ...) ``--repeat`` times; ratios are ratios of
medians. A last subprocess loads every score into memory and checks that in-memory `select` gives the same mask
(``--no-check`` skips it: it needs RAM for all the scores). Results: ``results/selection_out_of_core.json``.
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
DEFAULT_OOC_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "selection_out_of_core.json")


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


# ------------------------------------------------------------------------------------------------- out of core
class _GeneratedScores:
    """The scores of `make_scores`, generated one tensor at a time when `save_scores` asks for it (never all in
    memory): just the interface `peft_safety.scoring.score_files.save_scores` reads."""

    is_sharded = False
    shards: dict = {}

    def __init__(self, shapes: list[tuple[int, int]], seed: int) -> None:
        from peft_safety.mask import Weight

        self._shapes = {f"model.layers.{i}.mlp.proj.weight": tuple(sh) for i, sh in enumerate(shapes)}
        self._weight = Weight()
        self._gen = torch.Generator().manual_seed(seed)
        self.provenance = {"method": "synthetic", "seed": seed}
        self.fingerprints: dict = {}

    names = property(lambda self: tuple(self._shapes))
    shapes = property(lambda self: dict(self._shapes))

    def granularity_of(self, name: str):
        return self._weight

    def selection_comm(self):
        from peft_safety.scoring.distributed import Comm

        return Comm.local()

    def __getitem__(self, name: str) -> torch.Tensor:
        t = torch.empty(self._shapes[name], dtype=torch.float32)
        return t.uniform_(0.0, 1.0, generator=self._gen)  # tensors drawn in name order: the same values as make_scores


def _evict(folder: str) -> None:
    """Drop the folder's files from the page cache (they were written with fsync, so their pages are clean)."""
    for f in os.listdir(folder):
        fd = os.open(os.path.join(folder, f), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ooc_measure(kind: str, folder: str, fraction: float, threads: int, indices: str | None) -> dict[str, object]:
    """One out-of-core run in this (fresh) process: ``read`` (one pass over the files), ``select`` (the default
    out-of-core selection), ``histogram`` (the radix engine forced), or ``check`` (in-memory `select` on the loaded
    scores, compared with the saved masks)."""
    from peft_safety.scoring import distributed as dist_sel
    from peft_safety.scoring.score_files import ScoreFiles
    from peft_safety.scoring.scores import Scores
    from peft_safety.scoring.selection import count_for_fraction, select

    torch.set_num_threads(threads)
    warm = make_scores([(4, 64), (2, 64)], 1)
    select(warm, k=10)  # kernels and allocator warm
    files = ScoreFiles(folder, drop_cache=kind != "check")
    k = count_for_fraction(fraction, files.numel())
    if kind == "histogram":  # the default budget, given explicitly: no one-read buffer
        real = dist_sel.select_pieces

        def forced(pieces, *rest, **kwargs):
            largest_piece = max((p.numel for p in pieces), default=0)
            return real(pieces, *rest, **{**kwargs, "budget": max(1 << 20, largest_piece // 3)})

        dist_sel.select_pieces = forced
    if kind != "check":
        _evict(folder)
    before = _status()["VmRSS"]
    reset = _reset_peak()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    result: dict[str, object] = {"kind": kind}
    if kind == "read":
        total = 0
        for pieces in files.selection_pieces().values():
            for p in pieces:
                for _, c in p.chunks(files.selection_chunk):
                    total += c.numel()
        result["entries_read"] = total
    elif kind in ("select", "histogram"):
        mask = select(files, k=k)
        result["selected"] = len(mask)
        from safetensors.torch import save_file

        save_file(dict(mask), indices)
    else:  # check: everything in memory, in-memory select, against the masks of the out-of-core runs
        from safetensors.torch import load_file

        scores = Scores.from_pretrained(folder)
        mask = select(scores, k=k)
        same = {}
        for name, path in json.loads(indices).items():
            ooc = load_file(path)
            same[name] = set(ooc) == set(mask.names) and all(torch.equal(ooc[n], mask[n]) for n in mask.names)
        result["same_as_in_memory"] = same
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    peak = _status()["VmHWM"]
    files.close()
    result.update(
        {
            "time_s": elapsed,
            "cpu_s": cpu,
            "peak_extra_bytes": peak - before if reset else None,
            "baseline_rss_bytes": before,
        }
    )
    return result


def _cpu_seconds() -> float:
    """User + system CPU time of this process, every thread (the read-ahead thread included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_ooc_worker(kind: str, args: argparse.Namespace, folder: str, indices: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--ooc-worker", kind, "--dir", folder, "--fraction",
           str(args.fraction), "--threads", str(args.threads), "--indices", indices]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"out-of-core {kind} worker failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def out_of_core(args: argparse.Namespace) -> int:
    """Generate the score files, measure read / select / histogram alternately, check against in-memory select."""
    import shutil

    from peft_safety.scoring.score_files import save_scores

    prov = _bench.provenance(args.threads)
    shapes = tensor_sizes(args.numel, args.tensors, args.seed)
    total = sum(r * c for r, c in shapes)
    largest = max(r * c for r, c in shapes) * 4
    base = args.dir or tempfile.mkdtemp(prefix="peft-safety-ooc-", dir="/tmp")
    folder = os.path.join(base, "scores")
    os.makedirs(base, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < total * 4 * 1.2:
        raise SystemExit(f"{base}: {free / 2**30:.1f} GiB free, the scores need {total * 4 / 2**30:.1f} GiB")
    try:
        t0 = time.perf_counter()
        save_scores(_GeneratedScores(shapes, args.seed), folder, max_file_bytes=args.max_file_bytes)
        written = time.perf_counter() - t0
        n_files = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
        runs: dict[str, list[dict]] = {"read": [], "select": [], "histogram": []}
        order = list(runs)
        for r in range(args.repeat):
            for kind in order[r % 3 :] + order[: r % 3]:  # rotate the order every round
                path = os.path.join(base, f"{kind}.safetensors")
                runs[kind].append(_run_ooc_worker(kind, args, folder, path))
        check = None
        if args.check:
            masks = {kind: os.path.join(base, f"{kind}.safetensors") for kind in ("select", "histogram")}
            check = _run_ooc_worker("check", args, folder, json.dumps(masks))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    med = {kind: statistics.median(r["time_s"] for r in rs) for kind, rs in runs.items()}
    cpu = {kind: statistics.median(r["cpu_s"] for r in rs) for kind, rs in runs.items()}
    peak = {kind: max(r["peak_extra_bytes"] or 0 for r in rs) for kind, rs in runs.items()}
    result = {
        "benchmark": "selection_out_of_core",
        "config": {
            "numel": total,
            "tensors": len(shapes),
            "files": n_files,
            "max_file_bytes": args.max_file_bytes,
            "fraction": args.fraction,
            "k": runs["select"][0]["selected"],
            "threads": args.threads,
            "repeat": args.repeat,
            "seed": args.seed,
            "score_bytes": total * 4,
            "largest_tensor_bytes": largest,
            "write_s": written,
            "cache": "every file evicted before each run and every range once read (posix_fadvise DONTNEED)",
            "memory_method": "fresh subprocess per run; VmHWM - VmRSS after /proc/self/clear_refs reset; "
            "MALLOC_MMAP_THRESHOLD_=65536",
        },
        "runs": runs,
        "median_s": med,
        "median_cpu_s": cpu,
        "select_over_read": med["select"] / med["read"],
        "histogram_over_read": med["histogram"] / med["read"],
        "peak_extra_bytes": peak,
        "select_peak_over_largest_tensor": peak["select"] / largest,
        "histogram_peak_over_largest_tensor": peak["histogram"] / largest,
        "check": check,
        "same_as_in_memory": None if check is None else all(check["same_as_in_memory"].values()),
    }
    result["provenance"] = _bench.finish(prov)
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OOC_OUT
    _bench.write_json(out, result)
    print(f"out-of-core top-{result['config']['k']:,} ({args.fraction:g}) of {total:,} fp32 scores in {len(shapes)} "
          f"tensors, {n_files} files ({total * 4 / 2**30:.2f} GiB; largest tensor {_mb(largest)}); median of "
          f"{args.repeat}, every pass from disk")  # fmt: skip
    for kind, label in (
        ("read", "one read pass"),
        ("select", "select (default)"),
        ("histogram", "select (histogram)"),
    ):
        print(f"  {label:22s} {med[kind]:8.2f} s  x read {med[kind] / med['read']:5.2f}   CPU {cpu[kind]:7.2f} s   "
              f"peak extra {_mb(peak[kind])} ({peak[kind] / largest:.2f} x largest tensor)")  # fmt: skip
    print(f"same mask as in-memory select: {result['same_as_in_memory']}")
    print(f"-> {out}")
    return 0 if result["same_as_in_memory"] in (True, None) else 1


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
    parser.add_argument("--out-of-core", action="store_true", help="select from score files on disk (see above)")
    parser.add_argument("--dir", help="--out-of-core: folder for the score files (default: a new one under /tmp)")
    parser.add_argument("--max-file-bytes", type=int, default=2**30, help="--out-of-core: bytes per score file")
    parser.add_argument("--keep", action="store_true", help="--out-of-core: keep the score files")
    parser.add_argument("--no-check", dest="check", action="store_false", help="--out-of-core: skip the check")
    # internal: run one method in this process
    parser.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--ooc-worker", choices=["read", "select", "histogram", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    parser.add_argument("--indices", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.ooc_worker:
        result = ooc_measure(args.ooc_worker, args.dir, args.fraction, args.threads, args.indices)
        print("RESULT " + json.dumps(result))
        return 0
    if args.small:
        args.numel, args.tensors, args.repeat = 1_000_000, 20, 1
    if args.threads < 1:
        parser.error(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    if args.out_of_core:
        return out_of_core(args)
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
