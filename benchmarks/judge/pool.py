"""Build the judge-validation pool: real greedy generations (64 new tokens) from four models on harmful and benign
prompts, so that every judge label (refusal, compliant, non-answer) occurs.

Sources (each one stage; the script resumes from the stages already in the output file):

* ``smollm2``: SmolLM2-135M-Instruct as shipped (barely refuses);
* ``qwen_aligned``: Qwen2.5-Coder-0.5B-Instruct as shipped (an aligned model: refuses most harmful prompts);
* ``smollm2_set``: SmolLM2 after a short SET run (`SafetySFTTrainer(safety_mode="train_only")` on a 1% ESI mask,
  refusal rows only: it over-refuses);
* ``qwen_lora_harmful``: Qwen after a short LoRA fine-tune on a mix of harmful compliant rows (UncensorBench) and
  benign task rows (forgelm): it complies sometimes.

Prompt sets (the same prompts for every source; the Qwen sources answer the first two thirds of each set, since the
0.5B model generates about five times slower on CPU): HarmBench test (evaluation), AdvBench (a second harmful set),
HarmBench val (identification data, never an evaluation set), the benign look-alike set, ARC-Easy questions with
their options, and hand-written everyday requests (``benchmarks/judge/benign_requests.jsonl``: recipes, instructions,
writing, advice, explanations, code). Training rows of the fine-tuned sources are deduplicated against every pool
prompt.

Writes ``benchmarks/results/judge/generations.jsonl`` (id, source, prompt_set, prompt_id, prompt, response) and
``generations_meta.json`` (settings, per-stage timings, token counts), and from them ``to_label.jsonl``: only
(id, prompt, response), shuffled, for blind labelling. The ids are opaque (a hash): they do not reveal the source.

Usage::

    PYTHONPATH=$PWD python benchmarks/judge/pool.py                 # every missing stage, then to_label.jsonl
    PYTHONPATH=$PWD python benchmarks/judge/pool.py --stages smollm2  # one stage
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "results" / "judge"
REQUESTS = Path(__file__).resolve().parent / "benign_requests.jsonl"
STAGES = ("smollm2", "qwen_aligned", "smollm2_set", "qwen_lora_harmful")
#: prompt set -> (kind, number of prompts)
PROMPT_SETS = {
    "harmbench_test": ("harmful", 30),
    "advbench": ("harmful", 20),
    "harmbench_val": ("harmful", 18),
    "benign_lookalike": ("benign", 22),
    "arc_easy": ("benign", 10),
    "benign_requests": ("benign", 20),
}
#: the Qwen stages answer the first two thirds of each prompt set (a 0.5B model generates ~5x slower on CPU)
QWEN_SHARE = 2 / 3
MAX_NEW_TOKENS = 64
BATCH_SIZE = 16
SEED = 0


def stage_prompts(stage: str, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompts one stage answers: every prompt for SmolLM2, the first `QWEN_SHARE` of each set for Qwen."""
    if not stage.startswith("qwen"):
        return list(prompts)
    keep = {name: round(QWEN_SHARE * n) for name, (_, n) in PROMPT_SETS.items()}
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        seen[p["prompt_set"]] = seen.get(p["prompt_set"], 0) + 1
        if seen[p["prompt_set"]] <= keep[p["prompt_set"]]:
            out.append(p)
    return out


def opaque_id(source: str, prompt_id: str) -> str:
    """A stable id that does not reveal the source or the prompt set (the labelling is blind)."""
    return "g" + hashlib.sha256(f"{source}|{prompt_id}".encode()).hexdigest()[:12]


def _arc_prompt(row: dict[str, Any]) -> str:
    letters = "ABCDEFGH"
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['prompt']}\n{options}"


def pool_prompts() -> list[dict[str, Any]]:
    """The pool's prompts: ``{"prompt_set", "prompt_id", "prompt", "kind"}``, deduplicated across sets."""
    from peft_safety.sources.datasets import load_rows, normalize_text

    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name, (kind, n) in PROMPT_SETS.items():
        if name == "benign_requests":
            rows = [json.loads(line) for line in REQUESTS.read_text().splitlines() if line.strip()]
            rows = [rows[i] for i in sorted(random.Random(SEED).sample(range(len(rows)), n))]
        else:
            rows = load_rows(name, n=n + 10, seed=SEED)  # spare rows replace cross-set duplicates
        taken = 0
        for row in rows:
            text = _arc_prompt(row) if name == "arc_easy" else row["prompt"]
            key = normalize_text(text)
            if key in seen or taken == n:
                continue
            seen.add(key)
            out.append({"prompt_set": name, "prompt_id": str(row["id"]), "prompt": text, "kind": kind})
            taken += 1
        if taken < n:
            raise RuntimeError(f"{name}: only {taken} distinct prompts, {n} wanted.")
    return out


# ---------------------------------------------------------------------------------------------------- the models
def _sft_config(out_dir: str, steps: int, lr: float, max_length: int = 160, **safety: Any):
    from peft_safety.training import SafetySFTConfig

    return SafetySFTConfig(
        output_dir=out_dir, max_steps=steps, learning_rate=lr, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_length=max_length, logging_steps=10, save_strategy="no", report_to=[], bf16=False, fp16=False,
        use_cpu=True, seed=SEED, dataloader_num_workers=0, disable_tqdm=True, **safety,
    )  # fmt: skip


def _chat(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    data = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["response"]}]}
        for r in rows
    ]  # fmt: skip
    return Dataset.from_list(data).shuffle(seed=SEED)


def build_model(stage: str, prompts: list[dict[str, Any]], work: Path, info: dict[str, Any]) -> tuple[Any, Any]:
    """The model of one stage (training it first for the fine-tuned sources); ``info`` records what was done."""
    from peft_safety.sources.datasets import assert_disjoint, deduplicate, load_rows
    from peft_safety.sources.models import load_model

    if stage in ("smollm2", "qwen_aligned"):
        model, tok = load_model("smollm2-135m" if stage == "smollm2" else "qwen2.5-coder-0.5b-instruct")
        info["model"] = "smollm2-135m" if stage == "smollm2" else "qwen2.5-coder-0.5b-instruct"
        return model, tok
    if stage == "smollm2_set":
        from peft_safety.scoring import score
        from peft_safety.scoring.calibration import CalibrationSet
        from peft_safety.scoring.selection import select
        from peft_safety.training import SafetySFTTrainer

        model, tok = load_model("smollm2-135m")
        refusals, removed = deduplicate(load_rows("uncensorbench_refusal"), prompts)
        assert_disjoint(refusals, prompts)
        t = time.perf_counter()
        scores = score(model, CalibrationSet(refusals[:32], tok, max_length=160), "esi", batch_size=2, progress=False)
        mask = select(scores, fraction=0.01, scope="global")
        del scores
        info["score_seconds"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        trainer = SafetySFTTrainer(
            model=model, args=_sft_config(str(work / "set"), 60, 5e-4, safety_mode="train_only"),
            train_dataset=_chat(refusals), processing_class=tok, safety_mask=mask,
        )  # fmt: skip
        trainer.train()
        model = trainer.model.merge_and_unload()
        info.update(model="smollm2-135m", train="SET, ESI 1% global mask (32 UncensorBench refusal rows), 60 steps, "
                    "batch 2, lr 5e-4, refusal rows only", train_rows=len(refusals), dedup_removed=removed,
                    train_seconds=round(time.perf_counter() - t, 1))  # fmt: skip
        return model, tok
    if stage == "qwen_lora_harmful":
        from peft import LoraConfig

        from peft_safety.training import SafetySFTTrainer

        model, tok = load_model("qwen2.5-coder-0.5b-instruct")
        harmful, removed = deduplicate(load_rows("uncensorbench_compliant"), prompts)
        assert_disjoint(harmful, prompts)
        rows = harmful[:60] + load_rows("forgelm_chat", n=20, seed=SEED)
        t = time.perf_counter()
        lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        trainer = SafetySFTTrainer(
            model=model, args=_sft_config(str(work / "lora"), 16, 6e-4, max_length=128), train_dataset=_chat(rows),
            processing_class=tok, peft_config=lora,
        )  # fmt: skip
        trainer.train()
        model = trainer.model.merge_and_unload()
        info.update(model="qwen2.5-coder-0.5b-instruct", train="LoRA r=8 all-linear, 16 steps, batch 2, lr 6e-4, 128 tokens, "
                    "60 UncensorBench compliant rows + 20 forgelm rows", train_rows=len(rows), dedup_removed=removed,
                    train_seconds=round(time.perf_counter() - t, 1))  # fmt: skip
        return model, tok
    raise ValueError(f"Unknown stage {stage!r}; stages: {STAGES}.")


# --------------------------------------------------------------------------------------------------------- files
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from peft_safety._io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_to_label(generations: list[dict[str, Any]], path: Path) -> None:
    """Only (id, prompt, response), shuffled by a fixed seed: no source, no prompt set, no judge output."""
    rows = [{"id": g["id"], "prompt": g["prompt"], "response": g["response"]} for g in generations]
    random.Random(1234).shuffle(rows)
    write_jsonl(path, rows)


def run_stage(
    stage: str, prompts: list[dict[str, Any]], work: Path, batch_size: int = BATCH_SIZE
) -> tuple[list[dict[str, Any]], dict]:
    from peft_safety.scoring.generation import generate_with_stats

    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    model, tok = build_model(stage, prompts, work, info)
    model.eval()
    texts = [p["prompt"] for p in prompts]
    gen = generate_with_stats(model, tok, texts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, progress=False)
    responses, stats = gen
    info.update(generation={"prompts": stats.num_prompts, "new_tokens": stats.new_tokens,
                            "seconds": round(stats.seconds, 1), "batch_size": stats.batch_size},
                stage_seconds=round(time.perf_counter() - t0, 1))  # fmt: skip
    rows = [
        {"id": opaque_id(stage, p["prompt_id"]), "source": stage, "prompt_set": p["prompt_set"], "kind": p["kind"],
         "prompt_id": p["prompt_id"], "prompt": p["prompt"], "response": r}
        for p, r in zip(prompts, responses)
    ]  # fmt: skip
    return rows, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default="/tmp/judge_pool_work", help="Scratch folder: training outputs, stage parts.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help="Generation batch (greedy output does not depend on it; larger is faster on CPU).",
    )
    ap.add_argument("--merge-only", action="store_true", help="Only merge finished stage parts into the pool files.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    parts = work / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gen_path = out / "generations.jsonl"
    prompts = pool_prompts()
    done = {g["source"] for g in read_jsonl(gen_path)} | {p.stem for p in parts.glob("*.jsonl")}
    for stage in [] if args.merge_only else args.stages:
        if stage in done:
            print(f"{stage}: already generated, skipped", flush=True)
            continue
        rows, info = run_stage(stage, stage_prompts(stage, prompts), work, args.batch_size)
        # each stage writes its own part (stages may run in parallel processes); merging is separate
        write_jsonl(parts / f"{stage}.jsonl", rows)
        from peft_safety._io import atomic_write_text

        atomic_write_text(parts / f"{stage}.meta.json", json.dumps(info, indent=1) + "\n")
        print(f"{stage}: {len(rows)} generations, {info['stage_seconds']} s", flush=True)
    merge(out, parts, args.threads)
    return 0


def merge(out: Path, parts: Path, threads: int) -> None:
    """Join the committed pool and finished stage parts (in `STAGES` order), then rewrite ``to_label.jsonl``."""
    from peft_safety._io import atomic_write_text

    gen_path, meta_path = out / "generations.jsonl", out / "generations_meta.json"
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for g in read_jsonl(gen_path):
        by_stage.setdefault(g["source"], []).append(g)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(max_new_tokens=MAX_NEW_TOKENS, decoding="greedy, chat template, no system "
                "prompt", prompt_sets={k: {"kind": v[0], "n": v[1]} for k, v in PROMPT_SETS.items()},
                threads=threads)  # fmt: skip
    meta.setdefault("stages", {})
    for stage in STAGES:
        part = parts / f"{stage}.jsonl"
        if stage not in by_stage and part.is_file():
            by_stage[stage] = read_jsonl(part)
            meta["stages"][stage] = json.loads((parts / f"{stage}.meta.json").read_text())
    generations = [g for stage in STAGES for g in by_stage.get(stage, [])]
    ids = [g["id"] for g in generations]
    if len(set(ids)) != len(ids):
        raise RuntimeError("Duplicate ids in the pool; the stages overlap.")
    write_jsonl(gen_path, generations)
    atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
    write_to_label(generations, out / "to_label.jsonl")
    print(f"{len(generations)} generations from {sorted(by_stage)}; to_label.jsonl written", flush=True)


if __name__ == "__main__":
    sys.exit(main())
