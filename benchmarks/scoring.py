"""Scoring cost: plain forward+backward vs our snip/esi vs the reference per-sample and per-layer loops, on the same
batches, in the same process.

Methods (every one on the same calibration rows and targets):

* ``plain_fwd_bwd``: one forward+backward per batch with ``.grad`` kept (what any training step costs): the baseline;
* ``ours_abs_of_sum`` / ``ours_esi``: our batched scorers (one pass per batch, fp32 post-accumulate folding);
* ``ours_sum_of_abs``: our exact per-sample SNIP (one pass per *sample*, so it is compared with the per-sample
  reference, not with the batched baseline);
* ``reference_per_sample``: the reference approach of ESI / Wei et al.: batch 1, ``.grad`` in the weight dtype and
  ``abs`` folded into a weight-dtype accumulator after every sample;
* ``reference_per_layer``: Wei et al.'s reference code, measured (not extrapolated): the per-sample loop repeated once
  per decoder layer with only that layer's weights requiring a gradient (L x N passes). Skipped with
  ``--skip-per-layer`` (it is the slowest by far).

Fairness: one process, one thread count (``--threads``, recorded), one untimed warm-up round of every method, then
``--repeats`` rounds in which every method runs once and the order rotates per round; the JSON keeps every raw timing
with its median, min, max and interquartile range, and ratios are of medians. Peak memory is not measured here (a
process-wide peak is meaningless when methods are interleaved); see ``selection.py`` for a memory methodology.

Examples:

```bash
python benchmarks/scoring.py --model tiny --threads 1
python benchmarks/scoring.py --model default --rows 8 --batch-size 4 --max-length 128 --threads 2 --skip-per-layer
```
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip both reference loops")
    parser.add_argument("--skip-per-layer", action="store_true", help="skip the L x N per-layer reference loop")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scoring.json"),
        help="JSON results file",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)

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
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def _only(names) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)

    def _restore() -> None:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])

    def plain():
        _only(params)
        for i, b in enumerate(batches):
            refusal_nll(model, b, i).backward()
        _restore()

    def _per_sample_loop(names) -> None:
        acc = {n: torch.zeros_like(params[n]) for n in names}  # weight dtype, as in the reference code
        _only(names)
        for i in range(len(calib)):
            refusal_nll(model, calib.collate([i]), i).backward()
            for n in names:
                acc[n] += params[n].grad.abs()
                params[n].grad = None
        _restore()

    def reference_per_sample():
        _per_sample_loop(list(params))

    def reference_per_layer():
        n_layers = model.config.num_hidden_layers
        for layer in range(n_layers):
            tag = f".layers.{layer}."
            _per_sample_loop([n for n in params if tag in n])

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
        if not args.skip_per_layer:
            runs["reference_per_layer"] = reference_per_layer
    results = _bench.interleaved(runs, repeats=args.repeats, warmup=1)
    base = results["plain_fwd_bwd"]["median_s"]
    per_sample = results.get("reference_per_sample", {}).get("median_s")
    for r in results.values():
        r["ratio_vs_plain"] = r["median_s"] / base
        if per_sample:
            r["ratio_vs_reference_per_sample"] = r["median_s"] / per_sample
    config = {
        "model": args.model,
        "model_class": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "scored_params": sum(p.numel() for p in params.values()),
        "num_hidden_layers": model.config.num_hidden_layers,
        "rows": len(calib),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens": calib.num_tokens,
        "repeats": args.repeats,
        "warmup_rounds": 1,
    }
    payload = {"benchmark": "scoring", "config": config, "results": results, "provenance": _bench.finish(prov)}
    print(f"{'method':24s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'x plain':>8s}")
    for name, r in results.items():
        print(f"{name:24s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['max_s']:8.3f} {r['ratio_vs_plain']:8.2f}")
    print(f"wrote {_bench.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
