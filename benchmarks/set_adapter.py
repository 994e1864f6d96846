"""Benchmark: SET adapter (sparse deltas at 1% of the entries) against a frozen step and the alternatives, on CPU.

Variants, on the Llama built from config (~62M parameters, ``peft_safety.testing.benchmark_llama``) and on
SmolLM2-135M (``peft_safety.sources.models.load_model``), in fp32 and bf16:

* ``frozen``: frozen base, forward + backward (gradient w.r.t. the input embeddings only): the floor.
* ``set``: ``get_peft_model(model, SafetyConfig(mask=...))``, the library's default: on an fp32 base the deltas are
  folded into the weight for the one matmul (O(nnz) writes, written back bit-exactly); on a bf16 base they take a
  sparse pass (O(nnz * tokens), no second matmul); the value gradient is a sampled matmul; AdamW over the values.
* ``dense_pass``: the previous half-precision path, written here: ``base(x) + x @ scatter(v)ᵀ`` with a dense
  ``scatter(v)`` (a second matmul of the layer's size in forward and in the input gradient), sampled value gradient.
* ``dense_mask``: the masked weights trainable in full, gradient multiplied by the mask, AdamW over the full tensors.
* ``dense_copy``: SHiRA/Supertuning-style forward ``F.linear(x, W.view(-1).index_add(0, idx, v))`` with plain
  autograd (a dense merged copy kept for backward, a dense weight-sized gradient), AdamW over the values.

Time: per model and dtype, all variants are built in one process and stepped in rounds (one step of each, the order
rotating every round, after 2 untimed rounds), so that load from other processes hits every variant alike; each round
gives one ratio per variant against ``frozen`` (the JSON keeps the per-round ratios, their median and spread, wall-clock
and process CPU seconds). Matmul FLOPs of one step per variant (``torch.utils.flop_counter``) show which variants run
extra matmuls. Memory (first model, fp32): each variant in its own subprocess, so that peak RSS (``ru_maxrss``, glibc
malloc told to return memory) is per variant; "state" is the exact byte count of trainable parameters, their gradients
and the optimizer state.

The machine is shared: run it niced (``nice -n -5`` where allowed) and with ``OMP_WAIT_POLICY=PASSIVE`` (the default
here, set before torch loads). Examples:

```bash
nice -n -5 python benchmarks/set_adapter.py --threads 2
python benchmarks/set_adapter.py --small --threads 1 --rounds 2       # smoke test (seconds)
```
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) loads

import argparse
import gc
import json
import resource
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

VARIANTS = ("frozen", "set", "dense_pass", "dense_mask", "dense_copy")
MODELS = ("llama-62m", "smollm2-135m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: step time of SET / frozen step
TARGET_TIME_MAX = 1.05


@dataclass
class Args:
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    density: float = field(default=0.01, metadata={"help": "fraction of each decoder linear weight in the mask"})
    tokens: int = field(default=256, metadata={"help": "sequence length (batch 1)"})
    rounds: int = field(default=8, metadata={"help": "timed rounds (one step of every variant each), after 2 more"})
    steps: int = field(default=4, metadata={"help": "steps per variant of the memory subprocesses"})
    models: str = field(default=",".join(MODELS), metadata={"help": f"comma-separated, of {MODELS}"})
    dtypes: str = field(
        default=",".join(DTYPES), metadata={"help": f"comma-separated base dtypes, of {tuple(DTYPES)}"}
    )
    variants: str = field(default=",".join(VARIANTS), metadata={"help": f"comma-separated, of {VARIANTS}"})
    small: bool = field(default=False, metadata={"help": "smoke mode: the 2-layer Llama only, 32 tokens"})
    output: str = field(default="benchmarks/results/set_adapter.json", metadata={"help": "JSON output path"})


def build_model(name: str, dtype: torch.dtype, small: bool = False):
    """A fresh, frozen copy of the named model in ``dtype`` (train mode)."""
    if name == "llama-62m":
        from peft_safety.testing import benchmark_llama

        model = benchmark_llama(small)
    elif name == "smollm2-135m":
        from peft_safety.sources.models import load_model

        model, _ = load_model("smollm2-135m")
    else:
        raise ValueError(f"--models: unknown {name!r}; choose from {MODELS}.")
    model = model.to(dtype)
    model.requires_grad_(False)
    model.train()
    return model


def build_mask(model, density: float):
    from peft_safety.mask import SafetyMask, Weight

    gen = torch.Generator().manual_seed(0)
    indices, shapes = {}, {}
    for name, p in model.named_parameters():
        if ".layers." in name and p.ndim == 2:
            k = max(1, int(p.numel() * density))
            indices[name] = torch.randperm(p.numel(), generator=gen)[:k].sort().values.to(torch.int32)
            shapes[name] = tuple(p.shape)
    return SafetyMask(indices=indices, shapes=shapes, granularity=Weight())


class _DenseCopyLinear(torch.nn.Module):
    """SHiRA/Supertuning-style forward: a dense merged copy built with plain autograd."""

    def __init__(self, base: torch.nn.Linear, idx: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("idx", idx.to(torch.int64))
        self.values = torch.nn.Parameter(torch.zeros(idx.numel()))

    def forward(self, x):
        w = self.base.weight.reshape(-1).index_add(0, self.idx, self.values.to(self.base.weight.dtype))
        return F.linear(x, w.view_as(self.base.weight), self.base.bias)


class _DensePass(torch.autograd.Function):
    """The previous library path for half-precision bases: ``x @ scatter(v)ᵀ`` with a dense ``scatter(v)`` (a second
    matmul of the layer's size in forward and again for the input gradient), the value gradient sampled."""

    @staticmethod
    def forward(ctx, x, values, idx, shape):
        delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype).index_add_(0, idx, values).view(shape)
        ctx.save_for_backward(x, values, idx)
        ctx.shape = shape
        return F.linear(x.to(values.dtype), delta)

    @staticmethod
    def backward(ctx, grad):
        from peft_safety.tuner.safety.layer import sampled_matmul

        x, values, idx = ctx.saved_tensors
        shape = ctx.shape
        delta = torch.zeros(shape[0] * shape[1], dtype=values.dtype).index_add_(0, idx, values).view(shape)
        g2 = grad.reshape(-1, shape[0]).to(values.dtype)
        grad_x = (g2 @ delta).view(x.shape).to(x.dtype)
        grad_v = sampled_matmul(g2, x.reshape(-1, shape[1]).to(values.dtype), idx, shape[1])
        return grad_x, grad_v.to(values.dtype), None, None


class _DensePassLinear(_DenseCopyLinear):
    """``base(x) + x @ scatter(v)ᵀ`` through `_DensePass`."""

    def forward(self, x):
        shape = tuple(self.base.weight.shape)
        return self.base(x) + _DensePass.apply(x, self.values, self.idx, shape).to(x.dtype)


def prepare(variant: str, model, mask):
    """Return (model, trainable parameters)."""
    if variant == "frozen":
        return model, []
    if variant == "set":
        from peft import get_peft_model

        from peft_safety.tuner import SafetyConfig

        peft_model = get_peft_model(model, SafetyConfig(mask=mask))
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    params = []
    for name, idx in mask:
        module_name = name.rsplit(".", 1)[0]
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if variant == "dense_mask":
            keep = mask.to_dense(name).to(base.weight.dtype)
            base.weight.requires_grad_(True)
            base.weight.register_hook(lambda g, keep=keep: g * keep)
            params.append(base.weight)
        else:
            new = (_DenseCopyLinear if variant == "dense_copy" else _DensePassLinear)(base, idx)
            setattr(parent, child, new)
            params.append(new.values)
    return model, params


def state_bytes(params, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in optimizer.state.values() if optimizer is not None else ():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
    return total


def step_fn(model, params, ids: torch.Tensor):
    """One training step: forward, backward to the input embeddings (as in training) and the trainable values."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1) if params else None
    embed = model.get_input_embeddings()

    def step():
        inputs = embed(ids).detach().requires_grad_(True)
        model(inputs_embeds=inputs, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def matmul_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def token_ids(model, tokens: int) -> torch.Tensor:
    return torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))


def run_variant(variant: str, args: Args, name: str) -> dict:
    """Memory of one variant (run in its own subprocess)."""
    torch.set_num_threads(args.threads)
    model = build_model(name, torch.float32, args.small)
    mask = build_mask(model, args.density)
    model, params = prepare(variant, model, mask)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1) if params else None
    ids = token_ids(model, 32 if args.small else args.tokens)
    embed = model.get_input_embeddings()
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, state = [], 0
    for i in range(args.steps):
        start = time.perf_counter()
        model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            if i == 0:
                state = state_bytes(params, optimizer)  # before zero_grad drops the gradients
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "mask_numel": mask.numel(),
        "state_MiB": state / 2**20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_over_setup_MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_setup) / 1024,
        "isolated_step_s": statistics.median(times),
    }


def time_run(name: str, dtype_name: str, variants: list[str], args: Args) -> dict:
    """Interleaved paired timing and matmul FLOPs of every variant on one model and dtype."""
    steps, flops, trainable = {}, {}, {}
    ids = None
    for variant in variants:
        model = build_model(name, DTYPES[dtype_name], args.small)
        model, params = prepare(variant, model, build_mask(model, args.density))
        ids = token_ids(model, 32 if args.small else args.tokens) if ids is None else ids
        steps[variant] = step_fn(model, params, ids)
        trainable[variant] = sum(p.numel() for p in params)
    for variant, step in steps.items():
        flops[variant] = matmul_flops(step)
    timing = _bench.paired_rounds(steps, args.rounds, baseline="frozen")
    return {
        "model": name,
        "dtype": dtype_name,
        "trainable": trainable,
        "matmul_flops": flops,
        "flops_vs_frozen": {v: flops[v] / flops["frozen"] for v in variants},
        "target_max": TARGET_TIME_MAX,
        **timing,
    }


def main() -> int:
    from transformers import HfArgumentParser

    from peft_safety.vocab import environment

    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="llama-62m", help=argparse.SUPPRESS)
    args, ns = parser.parse_args_into_dataclasses()  # ns: the flags outside Args (--variant, --model)
    if ns.variant:
        print(json.dumps(run_variant(ns.variant, args, ns.model)))
        return 0
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)
    names = ["llama-62m"] if args.small else [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown {v!r}; choose from {VARIANTS}.")
    for v in ("frozen", "set"):
        if v not in variants:
            raise ValueError(f"--variants must include {v!r} (the ratios are set / frozen).")
    # memory: each variant in its own process, first model, fp32
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    memory = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", names[0], "--threads", str(args.threads),
               "--density", str(args.density), "--tokens", str(args.tokens), "--steps", str(args.steps)]  # fmt: skip
        if args.small:
            cmd.append("--small")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()
        memory.append(json.loads(out[-1]))
    by = {r["variant"]: r for r in memory}
    runs = []
    for name in names:
        for dtype_name in dtypes:
            runs.append(time_run(name, dtype_name, variants, args))
            r = runs[-1]["ratio_wall"]["set"]
            print(f"{name} {dtype_name}: set / frozen {r['median']:.3f} [{r['iqr'][0]:.3f}-{r['iqr'][1]:.3f}]")
            gc.collect()
    first = runs[0]
    results = []
    for r in memory:  # the memory table of the first model, with its fp32 step times
        v = r["variant"]
        results.append(
            {
                **r,
                "step": first["wall"][v],
                "step_s_median": first["wall"][v]["median_s"],
                "time_vs_frozen": first["ratio_wall"][v]["median"] if v != "frozen" else 1.0,
                "state_vs_set": r["state_MiB"] / by["set"]["state_MiB"] if by["set"]["state_MiB"] else None,
            }
        )
    summary = {
        "time_ratio_set_over_frozen": {f"{r['model']} {r['dtype']}": r["ratio_wall"]["set"]["median"] for r in runs},
        "time_ratio_set_over_frozen_cpu": {
            f"{r['model']} {r['dtype']}": r["ratio_cpu"]["set"]["median"] for r in runs
        },
        "flops_set_over_frozen": {f"{r['model']} {r['dtype']}": r["flops_vs_frozen"]["set"] for r in runs},
        "targets": {"memory_ratio_min": 10.0, "time_ratio_max": TARGET_TIME_MAX},
    }
    if "dense_mask" in by and by["set"]["state_MiB"]:
        summary["memory_ratio_dense_mask_over_set"] = by["dense_mask"]["state_MiB"] / by["set"]["state_MiB"]
    report = {
        "benchmark": "set_adapter",
        "args": asdict(args),
        "runs": runs,
        "results": results,
        "summary": summary,
        "environment": environment(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), niceness=os.nice(0)),
        "torch": torch.__version__,
        "provenance": _bench.finish(prov),
    }
    _bench.write_json(args.output, report)
    print(f"\nstep time / frozen step: median of per-round ratios [IQR], {args.rounds} rounds, {args.threads} threads")
    print(f"{'model':<14} {'dtype':<9} " + " ".join(f"{v:>18}" for v in variants[1:]) + "   matmul FLOPs x frozen")
    for r in runs:
        cells = [
            f"{r['ratio_wall'][v]['median']:.3f} [{r['ratio_wall'][v]['iqr'][0]:.2f}-{r['ratio_wall'][v]['iqr'][1]:.2f}]"
            for v in variants[1:]
        ]
        flops = ", ".join(f"{v} {r['flops_vs_frozen'][v]:.2f}" for v in variants[1:])
        print(f"{r['model']:<14} {r['dtype']:<9} " + " ".join(f"{c:>18}" for c in cells) + f"   {flops}")
    print(f"\n{'variant':<11} {'trainable':>10} {'state MiB':>10} {'peak RSS':>9}")
    for r in results:
        print(f"{r['variant']:<11} {r['trainable']:>10,} {r['state_MiB']:>10.2f} {r['peak_rss_MiB']:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
