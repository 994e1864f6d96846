"""Where the main job's time goes, and what would make it faster without changing its results table.

Three parts, written to ``benchmarks/results/set_precision/profile_main_job.json``:

1. ``stages``: the per-stage timings of the committed main-job run (``docs/results/main_job.json``) as shares.
2. ``levers``: side-by-side measurements in this process on the embedded SmolLM2-135M-Instruct, each variant
   interleaved with its reference over ``--repeats`` rounds (ratios of CPU-time medians, one torch thread; wall
   times beside them):

   * evaluation generation: the main job's two generate calls (harmful, benign; batch 16) vs one call over both sets
     at batch 16 / 64, 48 new tokens, with the share of responses identical to the reference (greedy decoding
     can change in the last bits with the batch's shapes);
   * SET training steps: the main job's settings (batch 2, max_length 192, fp32, drift logging at every logging step)
     vs drift logging off, vs max_length 128, vs CPU bf16 autocast;
   * ESI scoring of the identification rows: batch 2 (the main job) vs batch 8.
3. ``cprofile``: the top functions (cumulative and own time) of a reduced main job run (``--small`` sizes).

Run: ``python benchmarks/set_precision/profile_main_job.py --threads 2 --repeats 2``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from _bench import finish, provenance  # noqa: E402

from peft_safety._io import atomic_write_text  # noqa: E402

OUT = HERE.parent / "results" / "set_precision" / "profile_main_job.json"


def stage_shares() -> dict[str, Any]:
    path = HERE.parent.parent / "docs" / "results" / "main_job.json"
    timings = json.loads(path.read_text())["timings"]
    total = timings["total"]
    groups = {
        "generation-heavy evaluation (4 stages)": sum(v for k, v in timings.items() if k.startswith("eval_")),
        "SET training": timings.get("set_train", 0.0),
        "LoRA + SPA-LoRA training": sum(v for k, v in timings.items() if k.startswith("train_")),
        "ESI scoring + selection": timings.get("score_and_select", 0.0),
        "self-answers for the SET mix": timings.get("set_retain_answers", 0.0),
    }
    return {"source": str(path.relative_to(HERE.parent.parent)), "timings": timings, "total": total,
            "groups": {k: {"seconds": v, "share": v / total} for k, v in groups.items()}}  # fmt: skip


#: CPU seconds of this process per variant run (time.process_time): on a machine shared with other jobs, wall time
#: measures the machine's load more than the code; with one torch thread the process's CPU time is the work done
CPU_TIMES: dict[str, list[float]] = {}


def _interleave(variants: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
            CPU_TIMES.setdefault(k, []).append(time.process_time() - c0)
    return times


def _summ(times: dict[str, list[float]], ref: str) -> dict[str, Any]:
    """Wall and CPU seconds per variant; ``x_reference`` is the ratio of CPU-time medians (wall ratios beside)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(CPU_TIMES[k][-len(v) :]) for k, v in times.items()}
    return {k: {"seconds": v, "median": med[k], "x_reference_wall": med[k] / med[ref], "cpu_seconds": CPU_TIMES[k][-len(v) :],
                "cpu_median": cpu[k], "x_reference": cpu[k] / cpu[ref]} for k, v in times.items()}  # fmt: skip


def generation_lever(model, tok, repeats: int) -> dict[str, Any]:
    from peft_safety.evaluation import generate_responses
    from peft_safety.sources.datasets import load_rows

    harmful = [r["prompt"] for r in load_rows("harmbench_test", n=32, seed=0)]
    benign = [r["prompt"] for r in load_rows("chat_pairs", n=64, seed=0)][:32]
    outs: dict[str, list[str]] = {}

    def two_calls():
        outs["two_calls_b16"] = generate_responses(model, tok, harmful, max_new_tokens=48, batch_size=16, progress=False) + \
            generate_responses(model, tok, benign, max_new_tokens=48, batch_size=16, progress=False)  # fmt: skip

    def one_call(bs):
        def f():
            outs[f"one_call_b{bs}"] = generate_responses(model, tok, harmful + benign, max_new_tokens=48,
                                                         batch_size=bs, progress=False)  # fmt: skip

        return f

    variants = {"two_calls_b16": two_calls, "one_call_b16": one_call(16), "one_call_b64": one_call(64)}
    res = _summ(_interleave(variants, repeats), "two_calls_b16")
    ref = outs["two_calls_b16"]
    for k in variants:
        res[k]["identical_responses"] = sum(a == b for a, b in zip(outs[k], ref)) / len(ref)
    return {"prompts": len(harmful) + len(benign), "max_new_tokens": 48, "variants": res}


def _set_trainer(model_name: str, mask, rows, **overrides):
    from datasets import Dataset

    from peft_safety.recipes.main_job import chat_rows
    from peft_safety.sources.models import load_model
    from peft_safety.training import SafetySFTConfig, SafetySFTTrainer

    model, tok = load_model(model_name)
    kw = dict(output_dir=tempfile.mkdtemp(), max_steps=6, learning_rate=5e-4, per_device_train_batch_size=2,
              gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
              max_length=192, logging_steps=1, save_strategy="no", report_to=[], bf16=False, fp16=False,
              use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, safety_mode="train_only")  # fmt: skip
    kw.update(overrides)
    args = SafetySFTConfig(**kw)
    ds = Dataset.from_list(chat_rows(rows)).shuffle(seed=0)
    return SafetySFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, safety_mask=mask)


def training_lever(model_name: str, mask, rows, train_repeats: int, steps: int) -> dict[str, Any]:
    # logging_steps=1 puts the drift computation on every step; the main job logs every set_steps // 5 = 20 steps,
    # so its drift share is this one divided by 20
    variants_cfg = {
        "main_job_fp32_len192_drift_every_step": {"logging_steps": 1},
        "no_drift_logging": {"logging_steps": 1, "safety_log_drift": False},
        "len128": {"logging_steps": 1, "max_length": 128},
        "bf16_autocast": {"logging_steps": 1, "bf16": True},
    }
    losses: dict[str, list[float]] = {}

    def make(name, cfg):
        def f():
            tr = _set_trainer(model_name, mask, rows, max_steps=steps, **cfg)
            t0, c0 = time.perf_counter(), time.process_time()
            tr.train()
            losses[name] = [h["loss"] for h in tr.state.log_history if "loss" in h]
            f.train_seconds.append(time.perf_counter() - t0)
            f.train_cpu.append(time.process_time() - c0)

        f.train_seconds = []
        f.train_cpu = []
        return f

    fns = {k: make(k, v) for k, v in variants_cfg.items()}
    _interleave(fns, train_repeats)
    times = {k: f.train_seconds for k, f in fns.items()}
    for k, f in fns.items():  # training time only (the trainer's construction is not part of a step)
        CPU_TIMES[k] = f.train_cpu
    res = _summ(times, "main_job_fp32_len192_drift_every_step")
    for k in res:
        res[k]["per_step_cpu_median"] = res[k]["cpu_median"] / steps
        res[k]["losses"] = losses[k]
    return {"steps": steps, "batch_size": 2, "variants": res}


def scoring_lever(model, tok, rows, repeats: int) -> dict[str, Any]:
    from peft_safety.scoring import score
    from peft_safety.scoring.calibration import CalibrationSet

    calib = CalibrationSet(rows, tok, max_length=192)
    out: dict[str, Any] = {}

    def run(bs):
        def f():
            out[bs] = score(model, calib, "esi", batch_size=bs, progress=False)

        return f

    res = _summ(_interleave({"batch2": run(2), "batch8": run(8)}, repeats), "batch2")
    a, b = out[2], out[8]
    rel = max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp(min=1e-30)) for n in a.names)
    from peft_safety.scoring.selection import select

    ma, mb = select(a, fraction=0.01), select(b, fraction=0.01)
    same = sum(int(torch.isin(ma[n], mb[n]).sum()) for n in ma.names) / max(
        1, sum(int(ma[n].numel()) for n in ma.names)
    )
    res["max_relative_score_difference"] = rel
    res["mask_overlap_batch8_vs_batch2"] = same
    return {"rows": len(rows), "variants": res}


def cprofile_small(out_dir: str) -> dict[str, Any]:
    from peft_safety.recipes.main_job import MainJobConfig, run_main_job

    cfg = MainJobConfig(out_dir=out_dir, n_eval=8, n_utility=8, n_identification=8, set_steps=6, spa_steps=4,
                        n_set_retain=8, plots=False, progress=False)  # fmt: skip
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    result = run_main_job(cfg)
    prof.disable()
    wall = time.perf_counter() - t0
    top: dict[str, list[dict[str, Any]]] = {}
    for key in ("cumulative", "tottime"):
        st = pstats.Stats(prof, stream=io.StringIO()).sort_stats(key)
        rows = []
        for func, (_cc, nc, tt, ct, _) in sorted(
            st.stats.items(), key=lambda kv: -kv[1][3 if key == "cumulative" else 2]
        )[:30]:
            rows.append(
                {"function": f"{Path(func[0]).name}:{func[1]}({func[2]})", "calls": nc, "tottime": tt, "cumtime": ct}
            )
        top[key] = rows
    return {"config": {"n_eval": 8, "n_utility": 8, "n_identification": 8, "set_steps": 6, "spa_steps": 4,
                       "n_set_retain": 8}, "wall_seconds": wall, "stage_timings": result.timings, "top": top}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train_steps", type=int, default=6)
    p.add_argument("--train_repeats", type=int, default=1)
    p.add_argument("--parts", default="generation,training,scoring,cprofile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prov = provenance(args.threads)
    from peft_safety.sources.datasets import load_rows
    from peft_safety.sources.models import load_model

    parts = args.parts.split(",")
    result: dict[str, Any] = {"stages": stage_shares()}
    if OUT.is_file():
        old = json.loads(OUT.read_text())
        result.update({k: v for k, v in old.items() if k not in ("stages", "provenance")})
        if "provenance" in old:  # the earlier run's provenance stays with the parts it measured
            result.setdefault("provenance_of_parts", {}).update(
                {part: old["provenance"] for part in ("generation", "scoring", "training", "cprofile") if part in old}
            )
    model, tok = load_model("smollm2-135m")
    ident = load_rows("uncensorbench_refusal")[:64]

    def save():
        result["provenance"] = finish(dict(prov))
        OUT.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(OUT, json.dumps(result, indent=1, default=str) + "\n")

    if "generation" in parts:
        result["generation"] = generation_lever(model, tok, args.repeats)
        save()
    if "scoring" in parts:
        result["scoring"] = scoring_lever(model, tok, ident[:16], args.repeats)
        save()
    if "training" in parts:
        from peft_safety.scoring import score
        from peft_safety.scoring.calibration import CalibrationSet
        from peft_safety.scoring.selection import select

        mask = select(score(model, CalibrationSet(ident[:8], tok, max_length=192), "esi", batch_size=2,
                            progress=False), fraction=0.01)  # fmt: skip
        rows = load_rows("uncensorbench_refusal")
        result["training"] = training_lever("smollm2-135m", mask, rows, args.train_repeats, args.train_steps)
        save()
    if "cprofile" in parts:
        with tempfile.TemporaryDirectory() as d:
            result["cprofile"] = cprofile_small(d)
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "cprofile"}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
