"""The cost of the field's defenses: time per optimizer step of Lisa and Booster vs plain LoRA in the same run, and the
wall time of the post-hoc defenses (Antidote, Safe LoRA, RESTA) on the embedded SmolLM2-135M-Instruct.

Training section. For each model (the tiny in-code Llama with a character tokenizer, and SmolLM2-135M-Instruct), three
arms train LoRA through `SafetySFTTrainer` on the same task rows (``chat_pairs``, chat format), batch size and
sequence length: ``lora`` (plain LoRA), ``lisa`` (``safety_lisa_alignment_steps=1``, ``safety_lisa_task_steps=1``,
``rho=1``: the states alternate every step, so both are timed; alignment rows ``uncensorbench_refusal``) and
``booster`` (``lambda=5``, ``alpha=0.1``, harmful rows ``uncensorbench_compliant``; Booster is an alignment-stage
method, timed here on the same LoRA setup to compare like with like). Each arm runs ``--steps`` optimizer steps per
round, for ``--rounds`` rounds, the arms' order rotating every round (machine noise hits every arm alike); a step's
time is the wall time between two consecutive ``on_step_end`` callbacks (data, forward, backward, every hook, the
optimizer), the first step of each run is dropped (warm-up). Ratios are ratios of medians to ``lora``'s.

Post-hoc section (SmolLM2 only; ``--small``: the tiny model). The pipeline a user runs: score a 1% SNIP mask on
refusal rows, SET-align on them (``--align-steps`` steps: the aligned model is SmolLM2 + this SET adapter), LoRA
fine-tune the aligned model on the task rows (``--steps`` steps), then time, on copies of the fine-tuned model:
`AlignmentDelta.from_adapter` (the SET direction), `safe_lora_project` against it (``top_k=10``), `add_safety_vector`
(on the merged model), `antidote` on the LoRA factors and on the merged model's q/k/v (64 harmful rows, fraction
0.1). Each is timed ``--posthoc-repeats`` times (median reported); what each one did (layers projected, entries
pruned) is recorded too. The SET and LoRA runs are setup, timed once.

Threads: the committed run uses one torch thread. On the heavily shared 2-core machine of this project, a side by
side check made every step several times slower with two threads than with one (each parallel region waits for the
thread the scheduler starves); the thread count is recorded in the provenance block.

Writes ``benchmarks/results/defenses.json`` (every raw timing, the provenance block) and prints a table;
``benchmarks/tables.py`` renders ``docs/defenses.md``'s table from it.

    nice python benchmarks/defenses.py --threads 1                 # the committed run
    python benchmarks/defenses.py --small --out /tmp/defenses.json  # a wiring check on the tiny model (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench

ARMS = ("lora", "lisa", "booster")


def _messages(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in rows]  # fmt: skip


def _model(name: str):
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    if name == "tiny":
        return tiny_llama(seed=0), tiny_tokenizer()
    from peft_safety.sources.models import load_model

    model, tok = load_model(name)
    return model, tok


class _StepClock:
    """A TrainerCallback that records the wall time between consecutive optimizer steps, and Lisa's state."""

    def __init__(self, lisa: Any = None) -> None:
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                if clock.last is not None:
                    step = state.global_step - 1  # the step that just ended (0-based)
                    clock.times.append(now - clock.last)
                    clock.states.append(lisa.state_of(step) if lisa is not None else "task")
                clock.last = now

        self.callback = Callback()
        self.last: float | None = None
        self.times: list[float] = []
        self.states: list[str] = []


def _train(
    arm: str, model, tok, data: dict[str, list], args: argparse.Namespace, steps: int, max_length: int, out: str
):
    """One run of ``arm``: returns (the trainer, the step clock)."""
    from datasets import Dataset
    from peft import LoraConfig

    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if arm == "lisa":
        fields = {"safety_lisa_alignment_steps": 1, "safety_lisa_task_steps": 1, "safety_lisa_rho": 1.0}
        extra = {"safety_replay_dataset": data["align"]}
    elif arm == "booster":
        fields = {"safety_booster_lambda": 5.0, "safety_booster_alpha": 0.1}
        extra = {"safety_booster_harmful_dataset": data["harm"]}
    config = SafetySFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch_size,
                             learning_rate=1e-4, max_length=max_length, bf16=False, activation_checkpointing=False,
                             logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             lr_scheduler_type="constant", disable_tqdm=True, dataset_num_proc=None, **fields)  # fmt: skip
    trainer = SafetySFTTrainer(model, args=config, train_dataset=Dataset.from_list(data["task"]), processing_class=tok,
                               peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0), **extra)  # fmt: skip
    lisa = next((c for c in trainer.protections if c.name == "lisa"), None)
    clock = _StepClock(lisa)
    trainer.add_callback(clock.callback)
    trainer.train()
    return trainer, clock


def training_section(name: str, args: argparse.Namespace, data: dict[str, list], steps: int, max_length: int):
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    states: dict[str, list[str]] = {a: [] for a in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
            for arm in order:
                model, tok = _model(name)
                _, clock = _train(arm, model, tok, data, args, steps, max_length, os.path.join(tmp, arm))
                times[arm].extend(clock.times)
                states[arm].extend(clock.states)
                print(f"  {name} round {r} {arm}: median step {statistics.median(clock.times):.3f} s", flush=True)
    base = statistics.median(times["lora"])
    rows = []
    for arm in ARMS:
        row = {"arm": arm, "step": _bench.stats(times[arm]), "ratio": statistics.median(times[arm]) / base}
        if arm == "lisa":
            for state in ("alignment", "task"):
                picked = [t for t, s in zip(times[arm], states[arm]) if s == state]
                row[f"{state}_step"] = _bench.stats(picked)
                row[f"{state}_ratio"] = statistics.median(picked) / base
        rows.append(row)
    return {"model": name, "steps_per_run": steps, "rounds": args.rounds, "batch_size": args.batch_size,
            "max_length": max_length, "rows": rows}  # fmt: skip


def _timed(fn, repeats: int) -> tuple[dict[str, Any], Any]:
    """Time ``repeats`` calls: each time ``fn()`` prepares (untimed) and returns the work, which is timed."""
    raw, result = [], None
    for _ in range(repeats):
        work = fn()
        t0 = time.perf_counter()
        result = work()
        raw.append(time.perf_counter() - t0)
    return _bench.stats(raw), result


def posthoc_section(name: str, args: argparse.Namespace, data: dict[str, list], steps: int, max_length: int):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_safety.posthoc import AlignmentDelta, add_safety_vector, antidote, safe_lora_project
    from peft_safety.scoring import score
    from peft_safety.scoring.calibration import CalibrationSet
    from peft_safety.scoring.selection import select
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    setup: dict[str, float] = {}
    model, tok = _model(name)
    harmful = data["harm_rows"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        calib = CalibrationSet(data["align_rows"], tok, max_length=max_length)
        mask = select(score(model, calib, "snip", progress=False), fraction=0.01)
        setup["snip_mask_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        config = SafetySFTConfig(output_dir=os.path.join(tmp, "set"), max_steps=args.align_steps,
                                 per_device_train_batch_size=args.batch_size, learning_rate=1e-3,
                                 max_length=max_length, bf16=False, activation_checkpointing=False,
                                 logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True, safety_mode="train_only")  # fmt: skip
        set_trainer = SafetySFTTrainer(model, args=config, train_dataset=Dataset.from_list(data["align"]),
                                       processing_class=tok, safety_mask=mask)  # fmt: skip
        set_trainer.train()
        set_model = set_trainer.model
        setup["set_alignment_s"] = time.perf_counter() - t0
        stats, direction = _timed(lambda: lambda: AlignmentDelta.from_adapter(set_model), args.posthoc_repeats)
        rows.append({"function": "AlignmentDelta.from_adapter", "what": "the SET direction", "time": stats,
                     "result": {"weights": len(direction), "nonzero": direction.nonzero()}})  # fmt: skip
        # the aligned model = base + the SET adapter, merged; fine-tuned with LoRA. Copies are reloaded from disk:
        # a deepcopy of a model TRL trained shares its patched forward with the original
        aligned_dir, lora_dir = os.path.join(tmp, "aligned"), os.path.join(tmp, "lora")
        set_model.merge_and_unload().save_pretrained(aligned_dir)
        t0 = time.perf_counter()
        lora_trainer, _ = _train("lora", AutoModelForCausalLM.from_pretrained(aligned_dir), tok, data, args, steps,
                                 max_length, os.path.join(tmp, "lora_run"))  # fmt: skip
        setup["lora_finetune_s"] = time.perf_counter() - t0
        lora_trainer.model.save_pretrained(lora_dir)

        def fresh():
            return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(aligned_dir), lora_dir)

        def safe():
            work_model = fresh()
            return lambda: safe_lora_project(work_model, direction, top_k=10)[1]

        stats, report = _timed(safe, args.posthoc_repeats)
        with_direction = sum(x.cosine is not None for x in report.layers)
        rows.append({"function": "safe_lora_project", "what": "top_k=10 against the SET direction", "time": stats,
                     "result": {"lora_layers": len(report.layers), "with_direction": with_direction,
                                "projected": len(report.projected)}})  # fmt: skip

        def resta():
            merged = fresh().merge_and_unload()
            return lambda: add_safety_vector(merged, direction, scale=1.0)

        stats, _ = _timed(resta, args.posthoc_repeats)
        rows.append({"function": "add_safety_vector", "what": "scale=1 on the merged model", "time": stats,
                     "result": {"weights": len(direction)}})  # fmt: skip

        def prune_lora():
            work_model = fresh()
            return lambda: antidote(work_model, harmful, 0.1, tokenizer=tok, max_length=max_length, batch_size=8)[1]

        stats, pruned = _timed(prune_lora, args.posthoc_repeats)
        rows.append({"function": "antidote", "what": f"LoRA factors, {len(harmful)} harmful rows, fraction 0.1",
                     "time": stats, "result": {"pruned": pruned.numel(), "of": pruned.total_numel()}})  # fmt: skip

        def prune_full():
            merged = fresh().merge_and_unload()
            return lambda: antidote(merged, harmful, 0.1, tokenizer=tok, max_length=max_length, batch_size=8)[1]

        stats, pruned = _timed(prune_full, args.posthoc_repeats)
        rows.append({"function": "antidote", "what": f"merged q/k/v, {len(harmful)} harmful rows, fraction 0.1",
                     "time": stats, "result": {"pruned": pruned.numel(), "of": pruned.total_numel()}})  # fmt: skip
    return {"model": name, "setup_s": setup, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny model only, few steps (a wiring check)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--align-steps", type=int, default=10)
    parser.add_argument("--posthoc-repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "defenses.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prov = _bench.provenance(args.threads)

    from peft_safety.sources.datasets import load_rows

    n = 16 if args.small else 64
    data = {
        "task": _messages(load_rows("chat_pairs", n=n, seed=0)),
        "align_rows": load_rows("uncensorbench_refusal", n=n, seed=0),
        "harm_rows": load_rows("uncensorbench_compliant", n=n, seed=1),
    }
    data["align"], data["harm"] = _messages(data["align_rows"]), _messages(data["harm_rows"])
    models = [("tiny", 64)] if args.small else [("tiny", 64), ("smollm2-135m", args.max_length)]
    steps = 3 if args.small else args.steps
    results: dict[str, Any] = {"benchmark": "defenses", "threads": args.threads, "training": [], "posthoc": None}
    for name, max_length in models:
        print(f"training section: {name}", flush=True)
        results["training"].append(training_section(name, args, data, steps, max_length))
    name, max_length = models[-1]
    print(f"post-hoc section: {name}", flush=True)
    results["posthoc"] = posthoc_section(name, args, data, steps, max_length)
    results["provenance"] = _bench.finish(prov)
    _bench.write_json(args.out, results)
    print(f"\nthreads={args.threads}; training: median s per optimizer step, x plain LoRA (same run)")
    for section in results["training"]:
        for row in section["rows"]:
            extra = ""
            if row["arm"] == "lisa":
                extra = f"  (alignment {row['alignment_ratio']:.2f}x, task {row['task_ratio']:.2f}x)"
            print(
                f"  {section['model']:14} {row['arm']:8} {row['step']['median_s']:8.3f} s  {row['ratio']:5.2f}x{extra}"
            )
    print(f"post-hoc on {results['posthoc']['model']} (median s): setup {results['posthoc']['setup_s']}")
    for row in results["posthoc"]["rows"]:
        print(f"  {row['function']:28} {row['what']:45} {row['time']['median_s']:8.3f} s  {row['result']}")


if __name__ == "__main__":
    main()
