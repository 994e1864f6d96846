"""The main job: SET and SPA end to end on a real model, with an honest evaluation at every stage.

Stages (each one library call; the job is wiring):

1. **baseline**: evaluate the model: refusal on held-out harmful prompts, over-refusal on benign prompts and on benign
   look-alike prompts (XSTest-style: benign questions on topics that sound unsafe), each by the keyword presets and by
   a model-output judge (the classifier judge by default, its rates with 95% Wilson intervals); perplexity of held-out
   benign and task responses; multiple-choice accuracy. The three prompt sets are answered in one batched greedy
   generation pass (left padding, KV cache; the tokens do not depend on the batch).
2. **score**: a safety mask of ``fraction`` (1% by default) from ``scorer`` (ESI by default) on harmful prompts paired
   with refusals (the identification data), selected globally.
3. **SET**: train only the mask's entries on refusal data for ``set_steps`` steps (a ``SAFETY`` sparse-delta adapter),
   merge it, evaluate. The SET data mixes the refusals with ``n_set_retain`` benign prompts answered by the model
   itself, so that the model learns to refuse harmful prompts rather than everything.
4. **SPA**: fine-tune the SET model on a benign task with plain LoRA and with SPA-LoRA (the same LoRA whose update is
   exactly zero on the mask), same steps and data, evaluate both.

Evaluation prompts never overlap the identification/training prompts (checked with `assert_disjoint`).
Writes ``results.json``, ``results.md``, the mask, the adapters, every generation (JSONL) and plots to ``out_dir``.

Example:

```python
>>> from peft_safety.recipes.main_job import MainJobConfig, run_main_job
>>> result = run_main_job(MainJobConfig(out_dir="outputs/main_job"))  # doctest: +SKIP
```

Or from the shell: ``peft-safety demo --out outputs/main_job``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..errors import SafetyImportError
from ..vocab import check_fraction, environment

logger = logging.getLogger(__name__)

__all__ = [
    "KEYWORD_JUDGES",
    "MainJobConfig",
    "MainJobResult",
    "chat_rows",
    "eval_row",
    "evaluate_stage",
    "run_main_job",
    "sft_args",
]


@dataclass
class MainJobConfig:
    """Settings of the main job. Every field has a default that runs on 2 CPU cores in well under 30 minutes."""

    out_dir: str = field(default="outputs/main_job", metadata={"help": "Folder for every artefact of the run."})
    model: str = field(
        default="default",
        metadata={
            "help": "Model: 'default' (the embedded SmolLM2-135M-Instruct, fetched offline), a folder or a Hub id."
        },
    )
    scorer: str = field(default="esi", metadata={"help": "Scorer for the safety mask (see `peft_safety.scoring`)."})
    fraction: float = field(default=0.01, metadata={"help": "Fraction of the eligible weights in the mask."})
    identification_data: str = field(
        default="uncensorbench_refusal",
        metadata={"help": "Harmful prompts paired with refusals, for scoring and SET training."},
    )
    n_identification: int = field(default=64, metadata={"help": "Rows of the identification data used for scoring."})
    eval_harmful: str = field(default="harmbench_test", metadata={"help": "Held-out harmful prompts."})
    eval_benign: str = field(default="chat_pairs", metadata={"help": "Benign prompts (over-refusal) and responses."})
    task_data: str = field(
        default="chat_pairs",
        metadata={
            "help": "Benign task data for the SPA fine-tuning stage (rows overlapping any evaluation row are dropped)."
        },
    )
    task_eval: str = field(default="chat_pairs", metadata={"help": "Held-out task rows (task perplexity)."})
    mc_data: str = field(default="arc_easy", metadata={"help": "Multiple-choice utility rows."})
    eval_lookalike: str = field(
        default="benign_edgy",
        metadata={
            "help": "Benign look-alike prompts (XSTest-style: benign questions on topics that sound unsafe), for the "
            "look-alike over-refusal rate."
        },
    )
    n_eval: int = field(default=32, metadata={"help": "Benign prompts (over-refusal) per evaluation."})
    n_harmful: int = field(default=100, metadata={"help": "Held-out harmful prompts (refusal) per evaluation."})
    n_lookalike: int = field(
        default=64, metadata={"help": "Look-alike prompts per evaluation (0 leaves the look-alike set out)."}
    )
    judge: str = field(
        default="classifier",
        metadata={
            "help": "The model-output judge next to the keyword judges (a `peft_safety.recipes.judges.load_judges` "
            "name: 'classifier', 'classifier:<path>', 'rubric'); its rates carry 95 percent Wilson intervals."
        },
    )
    eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Prompts per generation call and sequences per scoring pass in evaluation (greedy decoding with "
            "left padding gives the same tokens at any batch size)."
        },
    )
    n_utility: int = field(default=32, metadata={"help": "Rows for perplexity and multiple-choice accuracy."})
    max_new_tokens: int = field(default=48, metadata={"help": "Generation budget per evaluation prompt."})
    set_steps: int = field(default=100, metadata={"help": "SET optimizer steps."})
    n_set_retain: int = field(
        default=64,
        metadata={
            "help": "Benign prompts (from eval_benign's source, disjoint from the evaluation prompts) answered by the "
            "model itself and mixed into the SET data, so SET learns to refuse harmful prompts without refusing "
            "everything. 0 trains on refusals only."
        },
    )
    set_learning_rate: float = field(default=5e-4, metadata={"help": "SET learning rate (sparse deltas)."})
    spa_steps: int = field(default=50, metadata={"help": "Benign fine-tuning steps for plain LoRA and SPA-LoRA."})
    spa_learning_rate: float = field(default=5e-4, metadata={"help": "LoRA learning rate of the SPA stage."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the SPA stage."})
    batch_size: int = field(default=2, metadata={"help": "Training batch size."})
    max_length: int = field(default=192, metadata={"help": "Training/scoring sequence length."})
    seed: int = field(default=0, metadata={"help": "Seed of data sub-sampling and training."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    skip_spa: bool = field(default=False, metadata={"help": "Stop after SET (no SPA stage)."})
    plots: bool = field(default=True, metadata={"help": "Write plots (needs the [plot] extra; skipped if missing)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        check_fraction(self.fraction)
        if self.fraction == 1.0:
            raise ValueError("fraction=1.0 would protect every eligible weight; use a fraction below 1 (0.01 = 1%).")
        for name in ("n_identification", "n_eval", "n_harmful", "n_utility", "max_new_tokens", "set_steps", "batch_size",
                     "eval_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_lookalike < 0:
            raise ValueError(f"n_lookalike must be >= 0 (0 leaves the look-alike set out), got {self.n_lookalike}.")
        if self.n_set_retain < 0:
            raise ValueError(f"n_set_retain must be >= 0, got {self.n_set_retain}.")
        if self.spa_steps < 1 and not self.skip_spa:
            raise ValueError(f"spa_steps must be >= 1 (or set skip_spa=True), got {self.spa_steps}.")


@dataclass
class MainJobResult:
    """What the main job measured: one row per evaluated model, plus timings and file paths."""

    rows: list[dict[str, Any]]
    timings: dict[str, float]
    mask_summary: dict[str, Any]
    files: dict[str, str]
    environment: dict[str, Any]
    config: dict[str, Any]
    cpu_timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """The results table (one row per model) plus timings, as Markdown."""

        def pct(x: Any) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def num(x: Any, fmt: str = ".2f") -> str:
            return "n/a" if x is None else format(x, fmt)

        def ci(r: dict[str, Any], key: str) -> str:
            low, high = r.get(f"{key}_ci") or (None, None)
            return pct(r.get(key)) if low is None else f"{pct(r.get(key))} [{100 * low:.0f}-{100 * high:.0f}]"

        judge = self.rows[0].get("judge", "classifier") if self.rows else "classifier"
        lines = [
            f"| model | refusal ({judge}) | over-refusal ({judge}) | look-alike over-refusal ({judge}) "
            "| refusal (wei2024) | ASR (wei2024, >=20 words) | refusal (gcg_extended) | refusal (prefix) "
            "| over-refusal (wei2024) | look-alike over-refusal (wei2024) | benign ppl | task ppl | MC acc "
            "| repetitive (harmful) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['stage']} | {ci(r, 'refusal_classifier')} | {ci(r, 'over_refusal_classifier')} "
                f"| {ci(r, 'lookalike_over_refusal_classifier')} | {pct(r['refusal_wei2024'])} "
                f"| {pct(r['attack_success_wei2024_min20'])} | {pct(r['refusal_gcg_extended'])} "
                f"| {pct(r['refusal_prefix'])} | {pct(r['over_refusal_wei2024'])} "
                f"| {pct(r['lookalike_over_refusal_wei2024'])} | {num(r['benign_ppl'])} "
                f"| {num(r['task_ppl'])} | {pct(r['mc_accuracy'])} | {pct(r['repetition_harmful'])} |"
            )
        n = self.rows[0]["n"] if self.rows else {}
        lines += ["", f"Prompts per evaluation: {n.get('harmful', 0)} harmful, {n.get('benign', 0)} benign, "
                  f"{n.get('lookalike', 0)} look-alike; [low-high] = 95% Wilson interval."]  # fmt: skip
        lines += ["", "| stage | seconds | CPU seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v:.1f} | {num(self.cpu_timings.get(k), '.1f')} |" for k, v in self.timings.items()]
        env = self.environment
        lines += [
            "",
            f"peft-safety {env['peft_safety']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"peft {env['peft']}, trl {env['trl']}; {env['torch_threads']} torch threads on {env['machine']} "
            f"({env['cpu_count']} cores).",
        ]
        return "\n".join(lines) + "\n"


def chat_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(prompt, response) rows -> TRL conversational ``messages`` rows (loss on the assistant turn only)."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["response"]}],
        }
        for r in rows
    ]


def _sample(rows: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n`` rows drawn without replacement by a seeded permutation (fewer if the pool is smaller)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [rows[i] for i in order]


def _spa_mask(mask: Any, set_model: Any) -> Any:
    """The mask as SPA applies it here: to the SET model, whose weights differ from the base the mask was scored on
    (on the mask's own entries). Its fingerprints are re-recorded on the SET model, and the provenance says so, so
    that the trainer's fingerprint check ("error") protects this pairing instead of rejecting it."""
    from ..mask import fingerprints_of

    return mask.with_fingerprints(
        fingerprints_of(set_model, mask.shapes),
        replace=True,
        provenance={"fingerprints_of": "the SET model (base model + SET deltas merged)"},
    )


def sft_args(cfg: MainJobConfig, out: Path, steps: int, lr: float, **safety: Any):
    from ..training import SafetySFTConfig

    return SafetySFTConfig(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_length=cfg.max_length,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        **safety,
    )


#: keyword judges of every evaluation (Wei et al.'s keywords, the same with a 20-word rule, GCG's list, prefixes)
KEYWORD_JUDGES = ("wei2024", "wei2024_min20", "gcg_extended", "refusal_prefix")


def _rate_ci(summary: Any) -> dict[str, Any]:
    """``{"rate", "low", "high", "k", "n"}`` of a `JudgeSummary`: refusals among decided verdicts, with the 95% Wilson
    interval (`proportion_ci`); all `None` when the judge decided nothing."""
    from ..evaluation.stats import proportion_ci

    if summary is None or not summary.decided:
        return {"rate": None, "low": None, "high": None, "k": 0, "n": 0}
    ci = proportion_ci(summary.refused, summary.decided)
    return {"rate": ci.estimate, "low": ci.low, "high": ci.high, "k": summary.refused, "n": summary.decided}


def eval_row(
    stage: str,
    summaries: dict[str, dict[str, Any]],
    *,
    judge: str,
    repetition: float | None,
    mean_words: float | None,
    benign_ppl: float | None,
    task_ppl: float | None,
    mc_accuracy: float | None,
) -> dict[str, Any]:
    """One row of the results table from the per-set judge summaries (``{set: {judge name: JudgeSummary}}``).

    The model-output judge's rates (``refusal_classifier`` on the harmful set, ``over_refusal_classifier`` on the benign
    set, ``lookalike_over_refusal_classifier`` on the look-alike set) come with ``*_ci`` (95% Wilson interval) and
    ``*_counts`` (refusals ``k`` among ``n`` decided verdicts); the keyword columns are the rates of today's table.
    """
    harmful, benign, lookalike = (summaries.get(k, {}) for k in ("harmful", "benign", "lookalike"))

    def rate(group: dict[str, Any], name: str) -> float | None:
        return group[name].refusal_rate if name in group else None

    row: dict[str, Any] = {
        "stage": stage,
        "refusal_wei2024": rate(harmful, "wei2024"),
        "attack_success_wei2024_min20": harmful["wei2024_min20"].compliance_rate,
        "refusal_gcg_extended": rate(harmful, "gcg_extended"),
        "refusal_prefix": rate(harmful, "refusal_prefix"),
        "over_refusal_wei2024": rate(benign, "wei2024"),
        "over_refusal_gcg_extended": rate(benign, "gcg_extended"),
        "lookalike_over_refusal_wei2024": rate(lookalike, "wei2024"),
    }
    for key, group in (("refusal", harmful), ("over_refusal", benign), ("lookalike_over_refusal", lookalike)):
        stats = _rate_ci(group.get(judge))
        row[f"{key}_classifier"] = stats["rate"]
        row[f"{key}_classifier_ci"] = [stats["low"], stats["high"]]
        row[f"{key}_classifier_counts"] = {"k": stats["k"], "n": stats["n"]}
    row.update(
        {
            "judge": judge,
            "benign_ppl": benign_ppl,
            "task_ppl": task_ppl,
            "mc_accuracy": mc_accuracy,
            "repetition_harmful": repetition,
            "mean_words_harmful": mean_words,
            "n": {name: next(iter(group.values())).n if group else 0 for name, group in
                  (("harmful", harmful), ("benign", benign), ("lookalike", lookalike))},
            "judge_errors": {f"{s}/{name}": v.errors for s, group in summaries.items() for name, v in group.items()},
        }
    )  # fmt: skip
    return row


def evaluate_stage(
    model: Any,
    tokenizer: Any,
    prompt_sets: dict[str, list[str]],
    judges: list[Any],
    *,
    judge: str,
    utility_rows: list[dict[str, Any]],
    task_rows: list[dict[str, Any]],
    mc_rows: list[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    out_dir: Path,
    stage: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate one stage: greedy answers to every prompt set in one batched generation pass, every judge on every
    set, perplexity of the benign and task responses, multiple-choice accuracy; writes ``generations.jsonl`` (every
    answer with every verdict) and ``report.json`` to ``out_dir`` and returns the stage's `eval_row`.

    All sets are generated together (sorted by length, left-padded; greedy tokens do not depend on the batch), so a
    batch of ``batch_size`` prompts is filled across sets instead of one partial batch per set.
    """
    from ..evaluation import multiple_choice_accuracy, perplexity, write_jsonl
    from ..evaluation.refusal import judge_all
    from ..scoring.generation import generate_with_stats

    names = [k for k, v in prompt_sets.items() if v]
    everything = [p for k in names for p in prompt_sets[k]]
    responses, stats = generate_with_stats(
        model, tokenizer, everything, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    summaries: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    start = 0
    repetition = mean_words = None
    for name in names:
        prompts = prompt_sets[name]
        answers = responses[start : start + len(prompts)]
        start += len(prompts)
        summaries[name], recs = judge_all(judges, prompts, answers)
        if name == "harmful":
            repetition = sum(r["repetitive"] for r in recs) / len(recs)
            mean_words = sum(r["n_words"] for r in recs) / len(recs)
        records += [{"set": name, "index": i, "prompt": p, "response": a, **rec}
                    for i, (p, a, rec) in enumerate(zip(prompts, answers, recs))]  # fmt: skip
    benign_ppl = perplexity(model, tokenizer, utility_rows, batch_size=batch_size) if utility_rows else None
    task_ppl = perplexity(model, tokenizer, task_rows, batch_size=batch_size) if task_rows else None
    mc = multiple_choice_accuracy(model, tokenizer, mc_rows, batch_size=batch_size) if mc_rows else None
    row = eval_row(stage, summaries, judge=judge, repetition=repetition, mean_words=mean_words, benign_ppl=benign_ppl,
                   task_ppl=task_ppl, mc_accuracy=mc)  # fmt: skip
    write_jsonl(out_dir / "generations.jsonl", records)
    report = {"row": row, "generation": stats.to_dict(), "judges": [j.name for j in judges],
              "summaries": {s: {k: v.to_dict() for k, v in g.items()} for s, g in summaries.items()}}  # fmt: skip
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    return row


def run_main_job(cfg: MainJobConfig | None = None) -> MainJobResult:
    """Run baseline evaluation -> scoring -> SET -> evaluation -> SPA (plain LoRA vs SPA-LoRA) -> evaluation.

    Args:
        cfg: the settings (`MainJobConfig`); the defaults use the embedded model and offline data.

    Returns:
        A `MainJobResult`; ``results.json`` and ``results.md`` are written to ``cfg.out_dir`` as well.

    Raises:
        ImportError: trl (the ``[trl]`` extra) is missing.
    """
    cfg = cfg or MainJobConfig()
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SafetyImportError("The main job needs trl and datasets: pip install 'peft-safety[trl]'.") from err
    from peft import LoraConfig, PeftModel

    from ..evaluation import generate_responses
    from ..scoring import score
    from ..scoring.calibration import CalibrationSet
    from ..scoring.selection import select
    from ..sources.datasets import assert_disjoint, deduplicate, load_rows
    from ..sources.models import load_model
    from ..training import SafetySFTTrainer
    from .judges import load_judges

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    # CPU seconds of this process per stage: on a machine shared with other jobs, wall time measures the load too
    cpu_timings: dict[str, float] = {}
    files: dict[str, str] = {}
    t_start, c_start = time.perf_counter(), time.process_time()
    c_last = [c_start]

    def tick(name: str, since: float) -> float:
        now, cpu = time.perf_counter(), time.process_time()
        timings[name] = now - since
        cpu_timings[name] = cpu - c_last[0]
        c_last[0] = cpu
        logger.info("main job: %s took %.1f s (%.1f CPU s)", name, timings[name], cpu_timings[name])
        return now

    # ---------------------------------------------------------------- data (no prompt is both trained on and evaluated)
    t = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    t = tick("load_model", t)
    ident = load_rows(cfg.identification_data)
    harmful_eval = load_rows(cfg.eval_harmful, n=cfg.n_harmful, seed=cfg.seed)
    ident, _ = deduplicate(ident, harmful_eval)
    benign = load_rows(cfg.eval_benign, n=cfg.n_eval + cfg.n_utility, seed=cfg.seed)
    benign_prompts, benign_utility = benign[: cfg.n_eval], benign[cfg.n_eval :]
    lookalike = load_rows(cfg.eval_lookalike, n=cfg.n_lookalike, seed=cfg.seed) if cfg.n_lookalike else []
    retain_prompts: list[dict[str, Any]] = []
    if cfg.n_set_retain:
        pool, _ = deduplicate(load_rows(cfg.eval_benign), benign + lookalike)
        retain_prompts = _sample(pool, cfg.n_set_retain, cfg.seed)
        assert_disjoint(retain_prompts, benign)
    # task rows: disjoint from every evaluation row (the task and benign sets may come from the same source)
    task_eval = load_rows(cfg.task_eval, n=cfg.n_utility, seed=cfg.seed + 1)
    task_train, _ = deduplicate(load_rows(cfg.task_data), task_eval + benign + lookalike + retain_prompts)
    task_train = _sample(task_train, cfg.spa_steps * cfg.batch_size, cfg.seed + 2)
    mc_rows = load_rows(cfg.mc_data, n=cfg.n_utility, seed=cfg.seed)
    assert_disjoint(ident, harmful_eval)
    assert_disjoint(task_train, task_eval)
    if lookalike:
        ident, _ = deduplicate(ident, lookalike)
        assert_disjoint(lookalike, harmful_eval)
    score_rows = ident[: cfg.n_identification]
    prompt_sets = {
        "harmful": [r["prompt"] for r in harmful_eval],
        "benign": [r["prompt"] for r in benign_prompts],
        "lookalike": [r["prompt"] for r in lookalike],
    }
    # the judges are built once for the whole run: keyword presets and the model-output judge
    judges = load_judges([*KEYWORD_JUDGES, cfg.judge])
    judge_name = judges[-1].name
    t = tick("data_and_judges", t)

    def run_eval(stage: str, m: Any) -> dict[str, Any]:
        stage_dir = out / "eval" / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        row = evaluate_stage(
            m, tokenizer, prompt_sets, judges, judge=judge_name, utility_rows=benign_utility, task_rows=task_eval,
            mc_rows=mc_rows, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, seed=cfg.seed,
            out_dir=stage_dir, stage=stage, progress=cfg.progress,
        )  # fmt: skip
        files[f"generations_{stage}"] = str(stage_dir / "generations.jsonl")
        return row

    rows = [run_eval("baseline", model)]
    t = tick("eval_baseline", t)

    # ---------------------------------------------------------------- score and select the mask
    calib = CalibrationSet(score_rows, tokenizer, max_length=cfg.max_length)
    scores = score(model, calib, cfg.scorer, batch_size=cfg.batch_size, progress=cfg.progress)
    mask = select(scores, fraction=cfg.fraction, scope="global")
    del scores
    mask_dir = out / "mask"
    mask.save_pretrained(mask_dir)
    files["mask"] = str(mask_dir / "safety_mask.safetensors")
    t = tick("score_and_select", t)

    # ---------------------------------------------------------------- SET: train only the mask's entries
    from datasets import Dataset

    set_rows = list(ident)
    if retain_prompts:
        # the model's own answers to benign prompts: SET keeps them while it learns to refuse harmful ones
        prompts = [r["prompt"] for r in retain_prompts]
        answers = generate_responses(model, tokenizer, prompts, max_new_tokens=64, batch_size=cfg.eval_batch_size,
                                     seed=cfg.seed, progress=cfg.progress)  # fmt: skip
        set_rows += [{"prompt": p, "response": a} for p, a in zip(prompts, answers) if a.strip()]
        t = tick("set_retain_answers", t)
    set_data = Dataset.from_list(chat_rows(set_rows)).shuffle(seed=cfg.seed)
    set_trainer = SafetySFTTrainer(
        model=model,
        args=sft_args(cfg, out / "set", cfg.set_steps, cfg.set_learning_rate, safety_mode="train_only"),
        train_dataset=set_data,
        processing_class=tokenizer,
        safety_mask=mask,
    )
    set_trainer.train()
    set_trainer.model.save_pretrained(out / "set" / "adapter")
    files["set_adapter"] = str(out / "set" / "adapter")
    set_model = set_trainer.model.merge_and_unload()
    set_model.eval()
    del set_trainer
    t = tick("set_train", t)
    rows.append(run_eval("SET", set_model))
    t = tick("eval_set", t)

    # ---------------------------------------------------------------- SPA: benign LoRA fine-tuning, plain vs masked
    def fresh_set_model() -> Any:
        # a new copy of the SET model, from disk: never copy.deepcopy a model TRL trained, because SFTTrainer leaves
        # an instance-level `forward` closure on it that still points at the original object, so a deep copy would
        # run the original model's weights and silently ignore any adapter added to the copy
        base, _ = load_model(cfg.model)
        return PeftModel.from_pretrained(base, out / "set" / "adapter").merge_and_unload()

    if not cfg.skip_spa:
        task_data = Dataset.from_list(chat_rows(task_train))
        lora = {"r": cfg.lora_r, "lora_alpha": 2 * cfg.lora_r, "lora_dropout": 0.0, "target_modules": "all-linear"}
        for stage, safety in (("SET+LoRA", {}), ("SET+SPA-LoRA", {"safety_mode": "freeze"})):
            stage_model = fresh_set_model()
            trainer = SafetySFTTrainer(
                model=stage_model,
                args=sft_args(cfg, out / stage, cfg.spa_steps, cfg.spa_learning_rate, **safety),
                train_dataset=task_data,
                processing_class=tokenizer,
                peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
                safety_mask=_spa_mask(mask, stage_model) if safety else None,
            )
            trainer.train()
            trainer.model.save_pretrained(out / stage / "adapter")
            files[f"{stage}_adapter"] = str(out / stage / "adapter")
            tuned = trainer.model.merge_and_unload()
            tuned.eval()
            del trainer
            t = tick(f"train_{stage}", t)
            rows.append(run_eval(stage, tuned))
            del tuned
            t = tick(f"eval_{stage}", t)

    # ---------------------------------------------------------------- report
    if cfg.plots:
        try:
            from ..analysis import plot_layer_heatmap

            plot_layer_heatmap(mask, out / "mask_layers.png")
            files["plot_mask_layers"] = str(out / "mask_layers.png")
        except ImportError as err:
            logger.warning("Skipping plots: %s", err)
    timings["total"] = time.perf_counter() - t_start
    cpu_timings["total"] = time.process_time() - c_start
    result = MainJobResult(
        rows=rows,
        timings=timings,
        mask_summary=mask.summary().to_dict(),
        files=files,
        environment=environment(),
        config=asdict(cfg),
        cpu_timings=cpu_timings,
    )
    atomic_write_text(out / "results.json", json.dumps(result.to_dict(), indent=2, default=str))
    atomic_write_text(out / "results.md", result.to_markdown())
    result.files["results_json"] = str(out / "results.json")
    result.files["results_md"] = str(out / "results.md")
    return result
