"""Benchmark: masked LoRA (SPA) step time against plain LoRA with the same rank and modules, on CPU.

For each mask granularity (``neuron`` rows/columns, ``layer``, ``weight`` entries) one training step (forward,
backward, AdamW) of ``get_masked_lora_model(model, cfg, mask)`` is timed against ``get_peft_model(model, cfg)`` with
the same ``LoraConfig``, interleaved step by step so machine noise hits both alike. For ``layer`` masks the masked
modules carry no adapter at all, so the comparison is against plain LoRA on every module (the masked model does less
work). ``weight`` masks use ``--entries_method`` (default ``dense``, the library's default and its bit-exact path;
``auto`` picks the inexact sparse correction up to ``SPARSE_MAX_DENSITY`` on CPU).

``--sweep 0.01,0.05,0.1,0.2`` additionally times weight masks at each density with both forward paths forced
(``entries_method="sparse"`` and ``"dense"``, interleaved with plain LoRA): the crossover behind
``peft_safety.tuner.safety_lora.config.SPARSE_MAX_DENSITY``.

Examples:

```bash
python benchmarks/masked_lora.py --threads 2
python benchmarks/masked_lora.py --threads 1 --granularities weight --sweep 0.01,0.05,0.1,0.2,0.3
python benchmarks/masked_lora.py --small --threads 1      # smoke test
```
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

GRANULARITIES = ("neuron", "layer", "weight")
TARGETS = {"neuron": 1.05, "layer": 1.05, "weight": 1.5}


@dataclass
class Args:
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    rank: int = field(default=16, metadata={"help": "LoRA rank"})
    density: float = field(default=0.01, metadata={"help": "fraction of units masked (neuron/weight)"})
    tokens: int = field(default=256, metadata={"help": "sequence length (batch 1)"})
    steps: int = field(default=6, metadata={"help": "timed steps per model (after 2 warm-up steps)"})
    small: bool = field(default=False, metadata={"help": "tiny model smoke mode"})
    granularities: str = field(default=",".join(GRANULARITIES), metadata={"help": "comma-separated mask kinds"})
    entries_method: str = field(
        default="dense", metadata={"help": "weight-mask forward path: dense (default, exact), auto, sparse"}
    )
    sweep: str = field(default="", metadata={"help": "comma-separated weight-mask densities to time sparse vs dense"})
    output: str = field(default="benchmarks/results/masked_lora.json", metadata={"help": "JSON output path"})


def build_model(small: bool):
    from peft_safety.testing import benchmark_llama

    model = benchmark_llama(small)
    return model


def build_mask(model, granularity: str, density: float):
    from peft_safety.mask import Layer, Neuron, SafetyMask, Weight

    gen = torch.Generator().manual_seed(0)
    indices, shapes, grans = {}, {}, {}
    n_layers = model.config.num_hidden_layers
    for name, p in model.named_parameters():
        if ".layers." not in name or p.ndim != 2:
            continue
        shapes[name] = tuple(p.shape)
        if granularity == "layer":
            grans[name] = Layer()
            # the first quarter of the decoder layers (at least one), as in "safety layers"
            if int(name.split(".layers.")[1].split(".")[0]) < max(1, n_layers // 4):
                indices[name] = torch.tensor([0], dtype=torch.int32)
            continue
        if granularity == "neuron":
            gran = Neuron(axis=1) if name.endswith(("down_proj.weight", "o_proj.weight")) else Neuron(axis=0)
        else:
            gran = Weight()
        grans[name] = gran
        units = gran.num_units(p.shape)
        k = max(1, int(units * density))
        indices[name] = torch.randperm(units, generator=gen)[:k].sort().values.to(torch.int32)
    return SafetyMask(indices=indices, shapes=shapes, granularity=grans)


def main() -> int:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args, description=__doc__.split("\n")[0]).parse_args_into_dataclasses()
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)

    from peft import LoraConfig, get_peft_model

    from peft_safety.tuner import get_masked_lora_model

    tokens = 32 if args.small else args.tokens
    ids = torch.randint(0, 128 if args.small else 8192, (1, tokens), generator=torch.Generator().manual_seed(0))
    cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    results = []
    for granularity in args.granularities.split(","):
        if granularity not in GRANULARITIES:
            raise ValueError(f"--granularities: unknown {granularity!r}; choose from {GRANULARITIES}.")
        base = build_model(args.small)
        mask = build_mask(base, granularity, args.density)
        models = {
            "plain": get_peft_model(build_model(args.small), cfg),
            "masked": get_masked_lora_model(base, cfg, mask, entries_method=args.entries_method),
        }
        step_stats = time_steps(models, ids, args.steps)
        times = {k: v["median_s"] for k, v in step_stats.items()}
        plain_s, masked_s = times["plain"], times["masked"]
        results.append(
            {
                "granularity": granularity,
                "plain_step_s": plain_s,
                "masked_step_s": masked_s,
                "ratio": masked_s / plain_s,
                "plain_step": step_stats["plain"],
                "masked_step": step_stats["masked"],
                "target_max": TARGETS[granularity],
                "entries_paths": sorted(entry_paths(models["masked"])),
                "trainable_plain": trainable(models["plain"]),
                "trainable_masked": trainable(models["masked"]),
            }
        )
        del models
    sweep = []
    for density in [float(d) for d in args.sweep.split(",") if d]:
        base_sparse, base_dense = build_model(args.small), build_model(args.small)
        mask = build_mask(base_sparse, "weight", density)
        models = {
            "plain": get_peft_model(build_model(args.small), cfg),
            "sparse": get_masked_lora_model(base_sparse, cfg, mask, entries_method="sparse"),
            "dense": get_masked_lora_model(base_dense, cfg, mask, entries_method="dense"),
        }
        step_stats = time_steps(models, ids, args.steps)
        times = {k: v["median_s"] for k, v in step_stats.items()}
        sweep.append(
            {
                "density": density,
                "steps": step_stats,
                **{f"{k}_step_s": v for k, v in times.items()},
                "sparse_ratio": times["sparse"] / times["plain"],
                "dense_ratio": times["dense"] / times["plain"],
            }
        )
        del models
    report = {
        "benchmark": "masked_lora",
        "args": asdict(args),
        "results": results,
        "sweep": sweep,
        "torch": torch.__version__,
        "provenance": _bench.finish(prov),
    }
    _bench.write_json(args.output, report)
    print(f"{'mask':<8} {'plain s':>9} {'masked s':>9} {'ratio':>7} {'target':>7}")
    for r in results:
        print(
            f"{r['granularity']:<8} {r['plain_step_s']:>9.4f} {r['masked_step_s']:>9.4f} {r['ratio']:>7.3f} "
            f"{'<= ' + str(r['target_max']):>7}"
        )
    if sweep:
        print(f"\n{'density':<8} {'plain s':>9} {'sparse s':>9} {'dense s':>9} {'sparse':>7} {'dense':>7}")
        for r in sweep:
            print(
                f"{r['density']:<8} {r['plain_step_s']:>9.4f} {r['sparse_step_s']:>9.4f} {r['dense_step_s']:>9.4f} "
                f"{r['sparse_ratio']:>7.3f} {r['dense_ratio']:>7.3f}"
            )
    return 0


def time_steps(models: dict, ids: torch.Tensor, steps: int) -> dict[str, dict]:
    """Statistics (raw, median, spread) of the seconds of one training step (forward, backward, AdamW) per model,
    interleaved after 2 untimed warm-up steps; the order of the models rotates every step."""
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)
        for k, m in models.items()
    }
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for step in range(steps + 2):
        for key in keys[step % len(keys) :] + keys[: step % len(keys)]:  # interleaved, rotating order
            model = models[key]
            model.train()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            if step >= 2:
                times[key].append(time.perf_counter() - start)
    return {k: _bench.stats(v) for k, v in times.items()}


def entry_paths(model) -> set[str]:
    from peft_safety.tuner import SafetyLoraLinear

    return {
        path
        for m in model.modules()
        if isinstance(m, SafetyLoraLinear)
        for path in [m.entries_path(a) for a in m.lora_A]
        if path is not None
    }


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    raise SystemExit(main())
