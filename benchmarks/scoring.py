"""Scoring cost: plain forward+backward vs our snip/esi vs the reference approaches, on the same batches.

Measures, per method, wall time and peak RSS growth (CPU) or peak CUDA memory:

* ``plain``: one forward+backward per batch with ``.grad`` kept (what any training step costs);
* ``ours_abs_of_sum`` / ``ours_esi``: our batched scorers (one pass per batch, fp32 post-accumulate folding);
* ``ours_sum_of_abs``: our exact per-sample SNIP (one pass per sample);
* ``reference_per_sample_bf16``: the reference's loop, one pass per sample with ``.grad`` accumulated in the weight
  dtype (ESI's reference approach); ``reference_per_layer`` (Wei et al.'s reference code: L x N passes) is extrapolated as
  ``n_layers x`` that time, since it repeats the same per-sample loop once per layer.

Examples:

```bash
python benchmarks/scoring.py --model tiny --threads 1
python benchmarks/scoring.py --model default --rows 8 --batch-size 4 --max-length 128 --threads 2
```
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(name: str):
    if name == "default":
        try:
            from peft_safety.sources.models import load_default_model

            return load_default_model(source="cache")
        except (ImportError, FileNotFoundError, ValueError, OSError) as err:
            print(f"default model unavailable ({err}); using the tiny model")
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    return tiny_llama(
        seed=0, num_hidden_layers=4, hidden_size=256, intermediate_size=512, head_dim=32
    ), tiny_tokenizer()


def _timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    start_rss = _rss_mb()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), max(0.0, _rss_mb() - start_rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.json"),
        help="JSON results file",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft_safety.scoring import resolve_targets, score
    from peft_safety.scoring.calibration import CalibrationSet, refusal_rows
    from peft_safety.scoring.gradient import refusal_nll

    model, tok = _load(args.model)
    prompts = [f"Explain step {i} of making something dangerous, in detail please." for i in range(args.rows)]
    calib = CalibrationSet(
        refusal_rows(prompts, "I cannot help with that request, it could cause harm to people."),
        tok,
        max_length=args.max_length,
    )
    targets = resolve_targets(model)
    params = targets.parameters(model)
    batches = list(calib.batches(args.batch_size))

    def plain():
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for i, b in enumerate(batches):
            refusal_nll(model, b, i).backward()
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])

    def reference_per_sample():
        # ESI / Wei style: batch 1, gradients summed in .grad in the weight dtype, abs taken per sample into a
        # weight-dtype accumulator (Wei's saved_grad)
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        for i in range(len(calib)):
            b = calib.collate([i])
            refusal_nll(model, b, i).backward()
            for n, p in params.items():
                acc[n] += p.grad.abs()
                p.grad = None
        for p in model.parameters():
            p.requires_grad_(True)

    runs = {
        "plain_fwd_bwd": plain,
        "ours_abs_of_sum": lambda: score(
            model, calib, "snip", aggregation="abs_of_sum", batch_size=args.batch_size, progress=False
        ),
        "ours_esi": lambda: score(model, calib, "esi", batch_size=args.batch_size, progress=False),
        "ours_sum_of_abs": lambda: score(model, calib, "snip", progress=False),
    }
    if not args.skip_reference:
        runs["reference_per_sample"] = reference_per_sample
    results = {}
    for name, fn in runs.items():
        seconds, rss = _timed(fn, args.repeats)
        results[name] = {"seconds": seconds, "peak_rss_growth_mb": rss}
    base = results["plain_fwd_bwd"]["seconds"]
    n_layers = getattr(model.config, "num_hidden_layers", 1)
    if "reference_per_sample" in results:
        results["reference_per_layer_extrapolated"] = {
            "seconds": results["reference_per_sample"]["seconds"] * n_layers,
            "peak_rss_growth_mb": None,
        }
    for r in results.values():
        r["ratio_vs_plain"] = r["seconds"] / base
    meta = {
        "model": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "rows": len(calib),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens": calib.num_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(meta))
    print(f"{'method':34s} {'seconds':>9s} {'x plain':>8s} {'rss MB':>8s}")
    for name, r in results.items():
        rss = "-" if r["peak_rss_growth_mb"] is None else f"{r['peak_rss_growth_mb']:.0f}"
        print(f"{name:34s} {r['seconds']:9.3f} {r['ratio_vs_plain']:8.2f} {rss:>8s}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
