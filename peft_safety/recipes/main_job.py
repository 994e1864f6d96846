"""The main job: SET and SPA end to end on a real model, with an honest evaluation at every stage.

Stages (each one library call; the job is wiring):

1. **baseline**: evaluate the model (refusal on held-out harmful prompts by two keyword presets, over-refusal on benign
   prompts, perplexity of held-out benign and task responses, multiple-choice accuracy).
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

__all__ = ["MainJobConfig", "MainJobResult", "chat_rows", "eval_row", "run_main_job", "sft_args"]


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
    n_eval: int = field(default=32, metadata={"help": "Prompts per evaluation set (harmful, benign)."})
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
        for name in ("n_identification", "n_eval", "n_utility", "max_new_tokens", "set_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        """The results table (one row per model) plus timings, as Markdown."""

        def pct(x: Any) -> str:
            return "n/a" if x is None else f"{100 * x:.1f}%"

        def num(x: Any, fmt: str = ".2f") -> str:
            return "n/a" if x is None else format(x, fmt)

        lines = [
            "| model | refusal (wei2024) | ASR (wei2024, >=20 words) | refusal (gcg_extended) | refusal (prefix) "
            "| over-refusal (wei2024) | benign ppl | task ppl | MC acc | repetitive (harmful) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['stage']} | {pct(r['refusal_wei2024'])} | {pct(r['attack_success_wei2024_min20'])} "
                f"| {pct(r['refusal_gcg_extended'])} "
                f"| {pct(r['refusal_prefix'])} | {pct(r['over_refusal_wei2024'])} | {num(r['benign_ppl'])} "
                f"| {num(r['task_ppl'])} | {pct(r['mc_accuracy'])} | {pct(r['repetition_harmful'])} |"
            )
        lines += ["", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
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


def eval_row(stage: str, report: Any, task_ppl: float | None) -> dict[str, Any]:
    return {
        "stage": stage,
        "refusal_wei2024": report.refusal_rate("wei2024"),
        "attack_success_wei2024_min20": report.attack_success_rate("wei2024_min20"),
        "refusal_gcg_extended": report.refusal_rate("gcg_extended"),
        "refusal_prefix": report.refusal_rate("refusal_prefix"),
        "over_refusal_wei2024": report.over_refusal_rate("wei2024"),
        "over_refusal_gcg_extended": report.over_refusal_rate("gcg_extended"),
        "benign_ppl": report.perplexity,
        "task_ppl": task_ppl,
        "mc_accuracy": report.mc_accuracy,
        "repetition_harmful": report.repetition.get("harmful"),
        "mean_words_harmful": report.mean_words.get("harmful"),
        "judge_errors": {name: s.errors for name, s in report.harmful.items()},
    }


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

    from ..evaluation import evaluate, generate_responses, perplexity
    from ..scoring import score
    from ..scoring.calibration import CalibrationSet
    from ..scoring.selection import select
    from ..sources.datasets import assert_disjoint, deduplicate, load_rows
    from ..sources.models import load_model
    from ..training import SafetySFTTrainer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    files: dict[str, str] = {}
    t_start = time.perf_counter()

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        logger.info("main job: %s took %.1f s", name, timings[name])
        return now

    # ---------------------------------------------------------------- data (no prompt is both trained on and evaluated)
    t = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    t = tick("load_model", t)
    ident = load_rows(cfg.identification_data)
    harmful_eval = load_rows(cfg.eval_harmful, n=cfg.n_eval, seed=cfg.seed)
    ident, _ = deduplicate(ident, harmful_eval)
    benign = load_rows(cfg.eval_benign, n=cfg.n_eval + cfg.n_utility, seed=cfg.seed)
    benign_prompts, benign_utility = benign[: cfg.n_eval], benign[cfg.n_eval :]
    retain_prompts: list[dict[str, Any]] = []
    if cfg.n_set_retain:
        pool, _ = deduplicate(load_rows(cfg.eval_benign), benign)
        retain_prompts = _sample(pool, cfg.n_set_retain, cfg.seed)
        assert_disjoint(retain_prompts, benign)
    # task rows: disjoint from every evaluation row (the task and benign sets may come from the same source)
    task_eval = load_rows(cfg.task_eval, n=cfg.n_utility, seed=cfg.seed + 1)
    task_train, _ = deduplicate(load_rows(cfg.task_data), task_eval + benign + retain_prompts)
    task_train = _sample(task_train, cfg.spa_steps * cfg.batch_size, cfg.seed + 2)
    mc_rows = load_rows(cfg.mc_data, n=cfg.n_utility, seed=cfg.seed)
    assert_disjoint(ident, harmful_eval)
    assert_disjoint(task_train, task_eval)
    score_rows = ident[: cfg.n_identification]

    def run_eval(stage: str, m: Any) -> dict[str, Any]:
        report = evaluate(
            m,
            tokenizer,
            harmful_eval,
            benign_prompts,
            utility_rows=benign_utility,
            mc_rows=mc_rows,
            judges=["wei2024", "wei2024_min20", "gcg_extended", "refusal_prefix"],
            out_dir=out / "eval" / stage,
            seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens,
            progress=cfg.progress,
        )
        task = perplexity(m, tokenizer, task_eval)
        files[f"generations_{stage}"] = str(out / "eval" / stage / "generations.jsonl")
        return eval_row(stage, report, task)

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
        answers = generate_responses(model, tokenizer, prompts, max_new_tokens=64, progress=cfg.progress)
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
    result = MainJobResult(
        rows=rows,
        timings=timings,
        mask_summary=mask.summary().to_dict(),
        files=files,
        environment=environment(),
        config=asdict(cfg),
    )
    atomic_write_text(out / "results.json", json.dumps(result.to_dict(), indent=2, default=str))
    atomic_write_text(out / "results.md", result.to_markdown())
    result.files["results_json"] = str(out / "results.json")
    result.files["results_md"] = str(out / "results.md")
    return result
