"""``--estimate``: the grid's plan and its wall time, from the unit costs of a timed pilot (committed run files).

The pilot is the grid's first two runs (``benchmarks/results/hft/runs/aligned.json`` and ``lora_p0.1_seed0.json``,
or any ``--out`` holding them): the aligned model's evaluation and one plain LoRA run at full size on the real model. From its files: seconds per training step (at its
batch size and sequence length), seconds per generated prompt (at its token budget), seconds per task row scored and
the setup time. The estimate scales them to the settings asked for (steps; prompts; new tokens, linearly; masked arms
by the masked-LoRA factor measured on the same model in ``benchmarks/results/preserve/preserve.json``) and sums them over the plan.

The defenses' extra cost comes from `benchmarks/results/defenses.json` (SmolLM2-135M, side by side with plain LoRA
through the same trainer; the ratios are carried over to the protocol's model): Lisa's steps cost its ratio to plain
LoRA; Booster's alignment run costs ``booster_steps`` steps at Booster's ratio, once per process (a shared artifact),
and its fine-tune is plain LoRA; the alignment direction of Safe LoRA and RESTA costs ``direction_steps`` plain-LoRA
steps once per process; Antidote costs a plain LoRA run plus ``antidote_rows`` rows at the measured Antidote time per
row relative to a plain-LoRA training row. Safe LoRA's projection and RESTA's add-back are arithmetic on the weights
(under two seconds in that benchmark) and are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import HFTConfig

REPO = Path(__file__).resolve().parents[2]
#: the grid's own first runs serve as the pilot: the aligned model's evaluation and plain LoRA at p = 0.1, seed 0
PILOT = REPO / "benchmarks" / "results" / "hft"


def unit_costs(pilot: Path = PILOT) -> dict[str, float]:
    """Unit costs measured by the pilot's run files, in seconds of wall time on an otherwise idle machine.

    The pilot ran next to other jobs, so its wall times measure the neighbours too; its process CPU seconds do not.
    An idle machine's wall time is estimated as CPU seconds / torch threads (perfect use of the threads: a lower
    bound), and the measured wall times are kept beside it.
    """
    runs = pilot / "runs"
    found = sorted(runs.glob("lora_p*_seed0.json"))
    if not found or not (runs / "aligned.json").is_file():
        raise FileNotFoundError(f"No pilot under {runs}: run the grid's first two runs (aligned, plain LoRA) first, "
                                "e.g. python -m benchmarks.hft --max_runs 2.")  # fmt: skip
    lora = json.loads(found[0].read_text(encoding="utf-8"))
    aligned = json.loads((runs / "aligned.json").read_text(encoding="utf-8"))
    threads = max(1, int(lora["settings"]["threads"] or 1))
    steps = lora["train"]["steps"]
    curve_points = len(lora["train"].get("curve") or [])
    n_curve = lora["settings"]["n_curve"]
    task_rows = len(aligned["eval"]["task_correct"])
    cpu = aligned["eval"]["eval_cpu_seconds"]
    per_task_row = cpu["task"] / task_rows / threads
    train = lora["eval"]["cpu_seconds"]["train"] / threads - curve_points * n_curve * per_task_row
    gen = sum(v for k, v in cpu.items() if k.startswith("generate_")) / threads
    prompts = sum(b["n"] for b in aligned["eval"]["sets"].values())
    return {
        "step": train / steps, "step_batch": lora["settings"]["batch_size"],
        "generate_prompt": gen / prompts, "generate_tokens": aligned["settings"]["max_new_tokens"],
        "task_row": per_task_row, "setup": aligned["setup_cpu_seconds"] / threads,
        "masked_factor": _masked_factor(lora["settings"]["spa_entries_method"]),
        "wall_step": lora["train"]["seconds"] / steps, "wall_setup": aligned["setup_seconds"],
        "load_average": lora["provenance"]["load_average_start"][0], "threads": threads,
    }  # fmt: skip


def pilot_costs(path: Path, threads: int = 2) -> dict[str, float]:
    """Unit costs from ``pilot.json`` (`benchmarks.hft.pilot`, run with one thread): its CPU seconds are the work;
    on an idle machine with ``threads`` threads the wall time is at best CPU seconds / ``threads`` (``threads=1``
    gives the one-thread figure, an upper bound for an idle machine)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    per = data["per_unit_cpu_s"]
    s = data["settings"]
    return {
        "step": per["train_step"] / threads, "step_batch": s["batch_size"],
        "generate_prompt": per["generated_prompt"] / threads, "generate_tokens": s["max_new_tokens"],
        "task_row": per["task_row"] / threads,
        "setup": (data["units"]["load_model"]["cpu_s"] + data["units"]["load_data"]["cpu_s"]) / threads,
        "masked_factor": _masked_factor("sparse"), "threads": threads,
        "load_average": data["provenance"]["load_average_start"][0],
    }  # fmt: skip


def _masked_factor(method: str) -> float:
    """Masked-LoRA / plain-LoRA training time on the real model: the mean ``train_seconds`` of the ESI and random
    SPA arms over plain LoRA's in the committed preservation run (same steps, rows and machine, sparse forward)."""
    data = json.loads((REPO / "benchmarks" / "results" / "preserve" / "preserve.json").read_text(encoding="utf-8"))
    if data["config"]["spa_entries_method"] != method:
        raise ValueError(f"The preservation run used the {data['config']['spa_entries_method']} masked forward, not "
                         f"{method!r}: no measured factor for it.")  # fmt: skip

    def mean(arms: tuple[str, ...]) -> float:
        xs = [r["train_seconds"] for r in data["benign"] if r["arm"] in arms]
        return sum(xs) / len(xs)

    return mean(("spa_esi", "spa_random")) / mean(("lora",))


def defense_factors(path: Path | None = None) -> dict[str, float]:
    """From ``defenses.json``: Lisa's and Booster's step time over plain LoRA's, and Antidote's seconds per harmful
    row over plain LoRA's seconds per training row (a step's time / its batch), all on SmolLM2-135M."""
    import re

    data = json.loads(Path(path or REPO / "benchmarks" / "results" / "defenses.json").read_text(encoding="utf-8"))
    model = data["posthoc"]["model"]
    training = next((m for m in data["training"] if m["model"] == model), None)
    if training is None:
        raise ValueError(f"defenses.json has no training timings of {model}, the model of its post-hoc timings.")
    rows = {r["arm"]: r for r in training["rows"]}
    antidote = next((r for r in data["posthoc"]["rows"] if r["function"] == "antidote" and "LoRA" in r["what"]), None)
    found = re.search(r"(\d+) harmful rows", antidote["what"]) if antidote else None
    if found is None:
        raise ValueError("defenses.json has no Antidote timing on LoRA factors with its row count.")
    per_row = antidote["time"]["median_s"] / int(found.group(1))
    train_row = rows["lora"]["step"]["median_s"] / training["batch_size"]
    return {"lisa": rows["lisa"]["ratio"], "booster": rows["booster"]["ratio"], "antidote_row": per_row / train_row,
            "model": model}  # fmt: skip


def estimate(cfg: HFTConfig, costs: dict[str, float] | None = None) -> dict[str, Any]:
    """Seconds per planned run and in total (on the pilot's machine and load)."""
    from .arms import ARMS
    from .runner import plan

    costs = costs or unit_costs()
    runs, missing = plan(cfg)
    prompts = cfg.n_harmbench + cfg.n_second + cfg.n_lookalike
    gen = prompts * costs["generate_prompt"] * cfg.max_new_tokens / costs["generate_tokens"]
    task = cfg.n_task_test * costs["task_row"]
    step = costs["step"] * cfg.batch_size / costs["step_batch"]
    curve = (cfg.steps // cfg.curve_every + 1) * cfg.n_curve * costs["task_row"] if cfg.curve_every else 0.0
    curve_arms = [a.strip() for a in cfg.curve_arms.split(",") if a.strip()]
    defense = defense_factors()
    per_run = {}
    for spec in runs:
        arm = ARMS[spec.arm]
        train = 0.0
        if arm.trains:
            masked = bool(arm.masks) and spec.arm != "realign"  # realign trains plain LoRA, then restores
            factor = costs["masked_factor"] if masked else defense["lisa"] if spec.arm == "lisa" else 1.0
            scored = not curve_arms or spec.arm in curve_arms
            train = cfg.steps * step * factor + (curve if scored else 0.0)
            if spec.arm == "antidote":
                train += cfg.antidote_rows * defense["antidote_row"] * step / cfg.batch_size
        per_run[spec.id] = round(train + gen + task, 1)
    # shared artifacts: built once per process (each sitting of the grid builds the ones its runs need again)
    needed = {a for spec in runs for a in ARMS[spec.arm].artifacts}
    artifacts = {}
    if "booster" in needed:
        artifacts["booster"] = round(cfg.booster_steps * step * defense["booster"], 1)
    if "direction" in needed:
        artifacts["direction"] = round(cfg.direction_steps * step, 1)
    total = sum(per_run.values()) + sum(artifacts.values()) + costs["setup"]
    return {"per_run_s": per_run, "artifacts_s": artifacts, "total_s": round(total, 1),
            "total_h": round(total / 3600, 1), "costs": {**costs, "defenses": defense},
            "not_available": missing}  # fmt: skip


def print_estimate(cfg: HFTConfig) -> None:
    """The plan and its time, with unit costs from ``<out>/runs`` (the grid's first runs) or, before they exist, from
    ``<out>/pilot.json`` (lower bound: 2 threads used perfectly; upper bound: one thread)."""
    if not (Path(cfg.out) / "runs" / "aligned.json").is_file() and (Path(cfg.out) / "pilot.json").is_file():
        for threads in (2, 1):
            est = estimate(cfg, pilot_costs(Path(cfg.out) / "pilot.json", threads))
            print(f"From {cfg.out}/pilot.json, CPU seconds / {threads} thread(s): {est['total_h']} h for "
                  f"{len(est['per_run_s'])} runs; per run (min): "
                  + ", ".join(f"{k} {v / 60:.0f}" for k, v in est["per_run_s"].items())
                  + "; artifacts once per sitting (min): "
                  + ", ".join(f"{k} {v / 60:.0f}" for k, v in est["artifacts_s"].items()))  # fmt: skip
        return
    est = estimate(cfg, unit_costs(Path(cfg.out)))
    for rid, s in est["per_run_s"].items():
        print(f"  {rid}: {s / 60:.0f} min")
    for name, s in est["artifacts_s"].items():
        print(f"  artifact {name} (once per sitting): {s / 60:.0f} min")
    print(f"Total: {est['total_h']} h of an idle machine for {len(est['per_run_s'])} runs (unit costs from the CPU "
          f"seconds of {cfg.out}/runs, which ran at load average {est['costs']['load_average']:.1f}: "
          f"{json.dumps(est['costs'])})")  # fmt: skip
