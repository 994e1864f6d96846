"""SPA training overhead: step time and extra memory of the Freezer vs plain full fine-tuning, in the same run.

Targets (docs/trainer.md): SPA full FT <= 1.10x the plain step time with O(mask) extra memory. Steps of the two
variants are interleaved, and which variant goes first alternates every step (the second of a pair runs on warmer
caches), so machine noise and ordering hit both; the median step time is reported. The Freezer's own per-step work
(one ``index_fill_`` per frozen gradient, one ``index_copy_`` per frozen tensor) is also timed in isolation: on a
shared machine that number is the noise-free overhead. Writes JSON (atomically) and a table.

    python benchmarks/spa_training.py --small --threads 1
    python benchmarks/spa_training.py --threads 1 --density 0.01     # ~21M-parameter Llama, 4 x 128 tokens

Masks: ``weight`` (random entries at ``--density`` of every q/k/v/o/gate/up/down weight), ``neuron`` (rows of
gate/up/q at the same density, the cheap storage path). SPA with LoRA is measured by the tuner's own benchmark
(its masked layer is the tuner engineer's code), so only full fine-tuning is timed here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench


def build_mask(model, kind: str, density: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed" in name or "lm_head" in name:
            continue
        if kind == "weight":
            masks[name] = torch.rand(p.shape, generator=g) < density
        else:
            if not name.endswith(("gate_proj.weight", "up_proj.weight", "q_proj.weight")):
                continue
            rows = torch.zeros(p.shape, dtype=torch.bool)
            rows[torch.rand(p.shape[0], generator=g) < density] = True
            masks[name] = rows
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny model, few steps (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spa_training.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)

    from peft_safety.testing import tiny_llama
    from peft_safety.training.freeze import Freezer

    if args.small:
        cfg = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "head_dim": 16}
        steps, seq = args.steps or 10, 64
    else:
        cfg = {
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 4,
            "head_dim": 128,
            "vocab_size": 4096,
        }
        steps, seq = args.steps or 20, 128
    results = {"threads": args.threads, "density": args.density, "config": cfg, "steps": steps, "rows": []}
    for kind in ("weight", "neuron"):
        models = {v: tiny_llama(seed=0, **cfg) for v in ("plain", "spa")}
        opts = {v: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1) for v, m in models.items()}
        mask = build_mask(models["spa"], kind, args.density)
        freezer = Freezer(mask).install(models["spa"], opts["spa"])
        g = torch.Generator().manual_seed(0)
        vocab = models["plain"].config.vocab_size
        times = {"plain": [], "spa": []}
        for step in range(steps + 2):
            ids = torch.randint(6, vocab, (4, seq), generator=g)
            order = ("plain", "spa") if step % 2 == 0 else ("spa", "plain")
            for v in order:
                m = models[v]
                m.train()
                t0 = time.perf_counter()
                m(input_ids=ids, labels=ids).loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opts[v].step()
                opts[v].zero_grad()
                if step >= 2:  # warm-up
                    times[v].append(time.perf_counter() - t0)
        # the Freezer's per-step work alone: zero the frozen gradients (the hooks' job) and restore the entries
        spa = models["spa"]
        spa(input_ids=ids, labels=ids).loss.backward()
        work = []
        for _ in range(20):
            t0 = time.perf_counter()
            freezer.mask_grads_()
            freezer.restore_()
            work.append(time.perf_counter() - t0)
        opts["spa"].zero_grad()
        report = freezer.verify()
        weights = sum(p.numel() * p.element_size() for p in models["spa"].parameters())
        row = {
            "mask": kind,
            "frozen_entries": freezer.num_frozen,
            "plain_step_s": statistics.median(times["plain"]),
            "spa_step_s": statistics.median(times["spa"]),
            "plain_step": _bench.stats(times["plain"]),
            "spa_step": _bench.stats(times["spa"]),
            "freezer_work": _bench.stats(work),
            "freezer_bytes": freezer.memory_bytes,
            "weights_bytes": weights,
            "freezer_work_s": statistics.median(work),
            "exact": report.ok,
        }
        row["ratio"] = row["spa_step_s"] / row["plain_step_s"]
        row["extra_memory_fraction"] = row["freezer_bytes"] / weights
        row["freezer_work_fraction"] = row["freezer_work_s"] / row["plain_step_s"]
        results["rows"].append(row)
        freezer.remove()
    results["benchmark"] = "spa_training"
    results["provenance"] = _bench.finish(prov)
    _bench.write_json(args.out, results)
    print(f"threads={args.threads} density={args.density} steps={steps} (median step, interleaved)")
    header = f"{'mask':8} {'frozen':>10} {'plain s':>9} {'SPA s':>9} {'ratio':>6} {'freezer ms':>10} {'% step':>7}"
    print(header + f" {'held KiB':>9} {'% of W':>7} exact")
    for r in results["rows"]:
        print(
            f"{r['mask']:8} {r['frozen_entries']:>10,} {r['plain_step_s']:>9.4f} {r['spa_step_s']:>9.4f} "
            f"{r['ratio']:>6.3f} {1000 * r['freezer_work_s']:>10.3f} {100 * r['freezer_work_fraction']:>6.2f}% "
            f"{r['freezer_bytes'] / 1024:>9.1f} {100 * r['extra_memory_fraction']:>6.2f}% {r['exact']}"
        )


if __name__ == "__main__":
    main()
