"""The main job before and after its speed work, side by side in one process, at the same sizes.

"Before" is ``peft_safety/recipes/main_job.py`` as committed at ``--before`` (read with ``git show`` and imported as a
module of this checkout's ``peft_safety.recipes``, so both run on the same library, model and data); "after" is the
current module configured to the same sizes (``n_harmful = n_eval``, no look-alike set; its table carries the
classifier-judge columns on top). Each run is one full job (baseline evaluation, ESI scoring, SET, SPA): the result
file keeps, per run, the process CPU seconds and wall seconds of the whole job and of every stage, and the ratios
before / after of both. On a machine shared with other jobs, CPU seconds of this single-threaded process measure the
work; wall seconds measure the load as well.

It also checks that the speed work leaves the results alone: for every stage, the share of answers (harmful and
benign prompts) that are identical between the two runs, and both results tables.

Run (about twice the main job's time; ``--small`` for a reduced job of the same shape):

    python benchmarks/main_job_speed.py --threads 1
    python benchmarks/main_job_speed.py --threads 1 --small

Writes ``benchmarks/results/main_job_speed.json`` (``main_job_speed_small.json`` with ``--small``) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _bench import finish, provenance  # noqa: E402

from peft_safety._io import atomic_write_text  # noqa: E402

#: the last commit before the main job's speed work
BEFORE = "5a8f641"
#: the sizes both runs share: the main job's defaults before the change (``--small``: a reduced job of the same shape)
SIZES = {"n_identification": 64, "n_eval": 32, "n_utility": 32, "max_new_tokens": 48, "set_steps": 100,
         "n_set_retain": 64, "spa_steps": 50}  # fmt: skip
SMALL = {"n_identification": 16, "n_eval": 16, "n_utility": 16, "max_new_tokens": 48, "set_steps": 10,
         "n_set_retain": 16, "spa_steps": 6}  # fmt: skip


def load_before(rev: str) -> Any:
    """The main-job module as committed at ``rev``, imported inside this checkout's ``peft_safety.recipes``."""
    source = subprocess.run(["git", "show", f"{rev}:peft_safety/recipes/main_job.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    tmp = Path(tempfile.mkdtemp()) / "main_job_before.py"
    tmp.write_text(source, encoding="utf-8")
    name = "peft_safety.recipes._main_job_before"
    spec = importlib.util.spec_from_file_location(name, tmp)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "peft_safety.recipes"
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run(module: Any, out_dir: str, sizes: dict[str, int], threads: int, **extra: Any) -> dict[str, Any]:
    cfg = module.MainJobConfig(out_dir=out_dir, threads=threads, plots=False, progress=False, **sizes, **extra)
    c0, t0 = time.process_time(), time.perf_counter()
    result = module.run_main_job(cfg)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"cpu_s": cpu, "wall_s": wall, "stage_wall_s": result.timings,
            "stage_cpu_s": getattr(result, "cpu_timings", None), "rows": result.rows, "out_dir": out_dir}  # fmt: skip


def _answers(out_dir: str, stage: str) -> dict[tuple[str, str], str]:
    path = Path(out_dir) / "eval" / stage / "generations.jsonl"
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    return {(r["set"], r["prompt"]): r["response"] for r in records if r["set"] in ("harmful", "benign")}


def _groups(stages: dict[str, float]) -> dict[str, float]:
    """Stage timings -> evaluation / scoring / SET answers / training totals (the names both versions share)."""
    out = {"evaluation": 0.0, "scoring": 0.0, "set_retain_answers": 0.0, "training": 0.0, "other": 0.0}
    for k, v in stages.items():
        if k == "total":
            continue
        key = ("evaluation" if k.startswith("eval_") else "scoring" if k == "score_and_select"
               else "set_retain_answers" if k == "set_retain_answers"
               else "training" if k.startswith(("train_", "set_train")) else "other")  # fmt: skip
        out[key] += v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--before", default=BEFORE, help="git revision of the main job before the change")
    p.add_argument("--small", action="store_true", help="a reduced job of the same shape (see SMALL)")
    p.add_argument("--work", default=None, help="folder for both runs' outputs (default: a temporary folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prov = provenance(args.threads)
    sizes = SMALL if args.small else SIZES
    out = Path(args.out or HERE / "results" / ("main_job_speed_small.json" if args.small else "main_job_speed.json"))
    work = Path(args.work or tempfile.mkdtemp(prefix="main_job_speed_"))

    from peft_safety.recipes import main_job as after
    from peft_safety.recipes.judges import load_judges

    before = load_before(args.before)
    load_judges(["classifier"])  # built once into the cache, so that neither run pays for training it
    runs = {
        "before": run(before, str(work / "before"), sizes, args.threads),
        "after": run(after, str(work / "after"), sizes, args.threads, n_harmful=sizes["n_eval"], n_lookalike=0),
    }
    b, a = runs["before"], runs["after"]
    identical = {}
    for row in b["rows"]:
        stage = row["stage"]
        old, new = _answers(b["out_dir"], stage), _answers(a["out_dir"], stage)
        common = sorted(set(old) & set(new))
        identical[stage] = {"compared": len(common), "identical": sum(old[k] == new[k] for k in common)}
    keys = [k for k in b["rows"][0] if k in a["rows"][0] and k not in ("stage", "judge_errors")]
    same_table = {r0["stage"]: {k: r0[k] == r1[k] for k in keys} for r0, r1 in zip(b["rows"], a["rows"])}
    gb, ga = _groups(b["stage_wall_s"]), _groups(a["stage_wall_s"])
    result = {
        "sizes": sizes,
        "before": args.before,
        "ratio_cpu": b["cpu_s"] / a["cpu_s"],
        "ratio_wall": b["wall_s"] / a["wall_s"],
        "ratio_wall_by_group": {k: (gb[k] / ga[k] if ga[k] else None) for k in gb},
        "identical_answers": identical,
        "same_table_entries": same_table,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "out_dir"} for k, v in runs.items()},
    }
    result["provenance"] = finish(prov)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1, default=str) + "\n")
    print(
        f"| run | CPU s | wall s |\n|---|---|---|\n| before ({args.before}) | {b['cpu_s']:.1f} | {b['wall_s']:.1f} |"
    )
    print(f"| after | {a['cpu_s']:.1f} | {a['wall_s']:.1f} |")
    print(f"| before / after | {result['ratio_cpu']:.2f}x | {result['ratio_wall']:.2f}x |")
    print("\n| group | before wall s | after wall s |\n|---|---|---|")
    for k in gb:
        print(f"| {k} | {gb[k]:.1f} | {ga[k]:.1f} |")
    print("\n| stage | identical answers |\n|---|---|")
    for stage, v in identical.items():
        print(f"| {stage} | {v['identical']}/{v['compared']} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
