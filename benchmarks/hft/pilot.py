"""``python -m benchmarks.hft.pilot``: time the protocol's units on the real model and write ``pilot.json``.

Measured with the cpu preset's settings: a few plain-LoRA steps through the same `finetune` the arms use (batch,
sequence length and LoRA as in the grid; the trainer's setup is included, so the per-step cost is an upper bound), one
generation batch of HarmBench prompts at the grid's token budget, and the letter scoring of task rows. Each unit has
its wall seconds and its process CPU seconds: on a shared machine the wall time measures the neighbours too, so run
it with ``--threads 1``, where CPU seconds are the work itself (no threads spinning); an idle 2-core machine then
needs about CPU seconds / 2 at best. `estimate.estimate` scales such unit costs over the plan.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks import _bench

    from .arms import ArmContext, finetune
    from .config import parse_args
    from .data import HFTData
    from .evaluate import letter_correct
    from .runner import _load_model

    args = list(sys.argv[1:] if argv is None else argv)
    steps = 4
    cfg = parse_args(["--steps", str(steps), "--curve_every", "0", *args])
    torch.set_num_threads(cfg.threads)
    prov = _bench.provenance(cfg.threads)
    units: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        units[name] = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2)}
        print(f"  {name}: {units[name]}", flush=True)
        return out

    base, tok = timed("load_model", lambda: _load_model(cfg))
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    data = timed("load_data", lambda: HFTData(cfg))
    rows = data.train_rows(0.1, 0)[: steps * cfg.batch_size]
    ctx = ArmContext(cfg, base, tok, data, 0.1, 0, rows, lambda name: None, Path(cfg.work_dir or "/tmp/hft-pilot"))
    _, info = timed("train_steps", lambda: finetune(ctx))
    prompts = [r["prompt"] for r in data.harmbench[: cfg.eval_batch_size]]
    from peft_safety.scoring.generation import generate_with_stats

    _, stats = timed("generate_batch", lambda: generate_with_stats(
        base, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, progress=False))  # fmt: skip
    timed("task_rows", lambda: letter_correct(base, tok, data.task_test[: cfg.eval_batch_size],
                                              batch_size=cfg.eval_batch_size))  # fmt: skip
    payload = {
        "what": "unit costs of the harmful-fine-tuning protocol on the real model (benchmarks/hft/pilot.py)",
        "settings": {"steps": steps, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                     "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens, "task_rows": cfg.eval_batch_size,
                     "threads": cfg.threads, "lora_targets": info["lora"]["targets"]},
        "units": units, "train_seconds_logged": info["train_seconds"], "rows_seen": info["rows_seen"],
        "new_tokens": stats.new_tokens, "provenance": _bench.finish(prov),
        "per_unit_cpu_s": {
            "train_step": units["train_steps"]["cpu_s"] / steps,
            "generated_prompt": units["generate_batch"]["cpu_s"] / len(prompts),
            "task_row": units["task_rows"]["cpu_s"] / cfg.eval_batch_size,
        },
    }  # fmt: skip
    out = Path(os.environ.get("HFT_PILOT_OUT", Path(cfg.out) / "pilot.json"))
    _bench.write_json(str(out), payload)
    print(f"Wrote {out}: {json.dumps(payload['per_unit_cpu_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
