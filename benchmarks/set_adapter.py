"""Benchmark: SET adapter (sparse deltas at 1% of the entries) against the alternatives, on CPU.

Variants, all on the same Llama built from config (>= 50M parameters, no download):

* ``frozen``: frozen base, forward + backward (gradient w.r.t. the input embeddings only): the floor.
* ``set``: ``get_peft_model(model, SafetyConfig(mask=...))``: 1-D values + int32 indices, custom autograd with a
  sampled-matmul value gradient, AdamW over the values.
* ``dense_mask``: the masked weights trainable in full, gradient multiplied by the mask, AdamW over the full tensors.
* ``dense_copy``: SHiRA/Supertuning-style forward ``F.linear(x, W.view(-1).index_add(0, idx, v))`` with plain
  autograd (a dense merged copy kept for backward, a dense weight-sized gradient), AdamW over the values.

Memory: each variant runs in its own subprocess so that peak RSS (``ru_maxrss``, glibc malloc told to return memory)
is per variant; "state" is the exact byte count of trainable parameters, their gradients and the optimizer state.
Time: all four variants are then built in one process and stepped **interleaved** (one step of each in turn), so
that load from other processes on a shared machine hits every variant alike; ratios come from these medians.

Examples:

```bash
python benchmarks/set_adapter.py --threads 2                 # ~68M-parameter Llama, 256 tokens
python benchmarks/set_adapter.py --small --threads 1         # smoke test (seconds)
```
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

VARIANTS = ("frozen", "set", "dense_mask", "dense_copy")


@dataclass
class Args:
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    density: float = field(default=0.01, metadata={"help": "fraction of each decoder linear weight in the mask"})
    tokens: int = field(default=256, metadata={"help": "sequence length (batch 1)"})
    steps: int = field(default=6, metadata={"help": "timed steps per variant (after 2 warm-up steps)"})
    small: bool = field(default=False, metadata={"help": "tiny model smoke mode"})
    output: str = field(default="benchmarks/results/set_adapter.json", metadata={"help": "JSON output path"})


def build_model(small: bool):
    from peft_safety.testing import benchmark_llama

    model = benchmark_llama(small)
    model.requires_grad_(False)
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
        w = self.base.weight.reshape(-1).index_add(0, self.idx, self.values).view_as(self.base.weight)
        return F.linear(x, w, self.base.bias)


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
            new = _DenseCopyLinear(base, idx)
            setattr(parent, child, new)
            params.append(new.values)
    return model, params


def state_bytes(params, optimizer) -> int:
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    for state in optimizer.state.values() if optimizer is not None else ():
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
    return total


def run_variant(variant: str, args: Args) -> dict:
    torch.set_num_threads(args.threads)
    model = build_model(args.small)
    mask = build_mask(model, args.density)
    model, params = prepare(variant, model, mask)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1) if params else None
    tokens = 32 if args.small else args.tokens
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=gen)
    embed = model.get_input_embeddings()
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.steps + 2):
        start = time.perf_counter()
        inputs = embed(ids).detach().requires_grad_(True)  # backward always reaches the input, as in training
        loss = model(inputs_embeds=inputs, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            measured = state_bytes(params, optimizer) if step == 0 else None
            optimizer.zero_grad(set_to_none=True)
        else:
            measured = 0 if step == 0 else None
        if measured is not None:
            state = measured
        if step >= 2:
            times.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
        "mask_numel": mask.numel(),
        "state_MiB": state / 2**20,
        "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_over_setup_MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_setup) / 1024,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
    }


def interleaved_times(args: Args) -> dict[str, dict]:
    """Step-time statistics of every variant (raw timings, median, spread), stepping them in turn in one process;
    the order of the variants rotates every step, after 2 untimed warm-up steps."""
    torch.set_num_threads(args.threads)
    runs = {}
    for variant in VARIANTS:
        model = build_model(args.small)
        model, params = prepare(variant, model, build_mask(model, args.density))
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1) if params else None
        runs[variant] = (model, opt)
    tokens = 32 if args.small else args.tokens
    ids = torch.randint(
        0, runs["frozen"][0].config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
    )
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for step in range(args.steps + 2):
        order = VARIANTS[step % len(VARIANTS) :] + VARIANTS[: step % len(VARIANTS)]
        for variant in order:
            model, opt = runs[variant]
            start = time.perf_counter()
            inputs = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=inputs, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[variant].append(time.perf_counter() - start)
    return {v: _bench.stats(t) for v, t in times.items()}


def main() -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args, ns = parser.parse_args_into_dataclasses()  # ns: the flags outside Args (--variant)
    if ns.variant:
        print(json.dumps(run_variant(ns.variant, args)))
        return 0
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = []
    for variant in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--threads",
            str(args.threads),
            "--density",
            str(args.density),
            "--tokens",
            str(args.tokens),
            "--steps",
            str(args.steps),
        ]
        if args.small:
            cmd.append("--small")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
    by = {r["variant"]: r for r in results}
    step_stats = interleaved_times(args)
    medians = {v: s["median_s"] for v, s in step_stats.items()}
    for r in results:
        r["isolated_step_s"] = r.pop("step_s_median")  # one step in the memory run: indicative only
        r.pop("step_s_min")
        r["step_s_median"] = medians[r["variant"]]
        r["step"] = step_stats[r["variant"]]
        r["time_vs_frozen"] = r["step_s_median"] / medians["frozen"]
        r["state_vs_set"] = r["state_MiB"] / by["set"]["state_MiB"] if by["set"]["state_MiB"] else None
    summary = {
        "memory_ratio_dense_mask_over_set": by["dense_mask"]["state_MiB"] / by["set"]["state_MiB"],
        "time_ratio_set_over_frozen": medians["set"] / medians["frozen"],
        "time_ratio_set_over_dense_mask": medians["set"] / medians["dense_mask"],
        "time_ratio_set_over_dense_copy": medians["set"] / medians["dense_copy"],
        "targets": {"memory_ratio_min": 10.0, "time_ratio_max": 1.3},
    }
    report = {
        "benchmark": "set_adapter",
        "args": asdict(args),
        "results": results,
        "summary": summary,
        "torch": torch.__version__,
        "provenance": _bench.finish(prov),
    }
    _bench.write_json(args.output, report)
    print(
        f"{'variant':<11} {'params':>10} {'trainable':>10} {'state MiB':>10} {'peak RSS':>9} {'step s':>8} {'x frozen':>8}"
    )
    for r in results:
        print(
            f"{r['variant']:<11} {r['params']:>10,} {r['trainable']:>10,} {r['state_MiB']:>10.2f} "
            f"{r['peak_rss_MiB']:>9.0f} {r['step_s_median']:>8.3f} {r['time_vs_frozen']:>8.2f}"
        )
    print(
        f"state memory dense_mask / set = {summary['memory_ratio_dense_mask_over_set']:.1f}x (target >= 10x); "
        f"step time set / frozen = {summary['time_ratio_set_over_frozen']:.2f}x (target <= 1.3x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
