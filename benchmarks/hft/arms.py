"""The arms: one small function per defense, registered by name; adding an arm is one `register` entry.

An arm receives an `ArmContext` (the aligned model, its tokenizer, the data, the fine-tuning rows of its (p, seed),
the masks on demand, a scratch folder) and returns the model to evaluate and a dict of what happened (seconds,
losses, the rows it saw, the curve). Fine-tuning arms call `finetune`, which runs the library's own
`SafetySFTTrainer` the way a user would (LoRA from TRL's ``ModelConfig`` defaults, the safety options of the arm),
records every row the optimizer saw (task, harmful, replay) and scores the curve rows every ``curve_every`` steps.

```python
@register("my_defense", masks=("esi",), description="LoRA with my option")
def _my_defense(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("esi"), extra_args={"safety_my_option": 3})
```

Registered arms that need library features not built yet are left out of the registry (the plan lists them as
``not available``): Lisa, Antidote, Booster, Safe LoRA and ``set_repair`` become entries here when they exist.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import HFTConfig


@dataclass(frozen=True)
class Arm:
    """One registered arm."""

    name: str = field(metadata={"help": "Arm name (run ids, tables)."})
    build: Callable[[ArmContext], tuple[Any, dict[str, Any]]] = field(metadata={"help": "ctx -> (model, info)."})
    masks: tuple[str, ...] = field(default=(), metadata={"help": "Masks of the aligned model it needs."})
    trains: bool = field(default=True, metadata={"help": "False: no fine-tuning (evaluated once, no p, no seed)."})
    description: str = field(default="", metadata={"help": "One line for the leaderboard."})


#: name -> `Arm`, in the order the leaderboard lists them
ARMS: dict[str, Arm] = {}

#: arms of the protocol that the library does not offer yet (listed by the plan, skipped)
PLANNED = ("lisa", "antidote", "booster", "safe_lora", "set_repair")


def register(name: str, *, masks: tuple[str, ...] = (), trains: bool = True, description: str = ""):
    """Decorator: register ``fn(ctx) -> (model, info)`` as arm ``name``."""

    def wrap(fn: Callable[[ArmContext], tuple[Any, dict[str, Any]]]) -> Callable:
        if name in ARMS:
            raise ValueError(f"Arm {name!r} is registered twice.")
        ARMS[name] = Arm(name, fn, tuple(masks), trains, description)
        return fn

    return wrap


@dataclass
class ArmContext:
    """What an arm gets: the shared pieces of one (arm, p, seed) run."""

    cfg: HFTConfig
    base: Any
    tok: Any
    data: Any
    p: float
    seed: int
    rows: list[dict[str, Any]]
    masks: Callable[[str], Any]
    work_dir: Path

    def mask(self, name: str) -> Any:
        return self.masks(name)


# ----------------------------------------------------------------------------------------------------------- arms
@register("aligned", trains=False, description="the aligned model, no fine-tuning")
def _aligned(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return ctx.base, {}


@register("lora", description="plain LoRA (the reference arm)")
def _lora(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx)


@register("replay", description="LoRA + safety replay (refusal rows mixed into the stream)")
def _replay(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, replay=True)


@register("spa_esi", masks=("esi",), description="SPA-LoRA: zero LoRA update on the ESI 1% mask")
def _spa_esi(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("esi"), mask_name="esi")


@register("spa_random", masks=("random",), description="SPA-LoRA on a random 1% mask (control)")
def _spa_random(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("random"), mask_name="random")


@register("spa_esi_replay", masks=("esi",), description="SPA-LoRA on the ESI mask + safety replay")
def _spa_esi_replay(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("esi"), mask_name="esi", replay=True)


@register("realign", masks=("esi",), description="LoRA, then the most-drifted 20% of the ESI mask restored")
def _realign(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    from peft_safety.training.realign import RealignCallback

    callback = RealignCallback(ctx.mask("esi"), fraction=ctx.cfg.realign_fraction)
    model, info = finetune(ctx, callbacks=[callback])
    info["realign"] = callback.reports[-1].to_dict() if callback.reports else None
    return model, info


@register("sppft", masks=("sppft",), description="SPPFT: no LoRA update in the safety layers")
def _sppft(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("sppft"), mask_name="sppft")


@register("rsn_tune", masks=("rsn_tune",), description="RSN-Tune: safety neurons (minus foundation ones) frozen")
def _rsn_tune(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    return finetune(ctx, mask=ctx.mask("rsn_tune"), mask_name="rsn_tune")


# ----------------------------------------------------------------------------------------------------------- training
def lora_config(cfg: HFTConfig) -> Any:
    """LoRA as TRL's ``ModelConfig`` defaults give it to a user (``get_peft_config``), targets from PEFT if unset."""
    from peft import LoraConfig

    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()] or None
    return LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")  # fmt: skip


def _kinds_of(data: Any, rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(prompt, kind) of every row the stream can hold: the run's rows and every refusal (replay) row."""
    pairs = [(r["prompt"], r["kind"]) for r in rows]
    pairs += [(r["prompt"], "replay") for r in data.refusals]
    # longest first, so a prompt that contains a shorter one is matched as itself
    return sorted(set(pairs), key=lambda x: -len(x[0]))


def _classify(texts: list[str], kinds: list[tuple[str, str]]) -> dict[str, int]:
    counts = {"task": 0, "harmful": 0, "replay": 0, "unknown": 0}
    for text in texts:
        kind = next((k for p, k in kinds if p in text), "unknown")
        counts[kind] += 1
    return counts


def _trainer_class() -> type:
    """`SafetySFTTrainer` that keeps the token ids of every sequence the optimizer trains on (the dose record)."""
    from peft_safety.training import SafetySFTTrainer

    class RecordingTrainer(SafetySFTTrainer):
        seen_ids: list[list[int]]

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ids, attn = inputs["input_ids"], inputs.get("attention_mask")
            for r in range(ids.shape[0]):
                row = ids[r] if attn is None else ids[r][attn[r].bool()]
                self.seen_ids.append(row.tolist())
            return super().training_step(model, inputs, *args, **kwargs)

    return RecordingTrainer


def _curve_callback(ctx: ArmContext, curve: list[dict[str, Any]]) -> Any:
    from transformers import TrainerCallback

    from .evaluate import letter_correct

    every = ctx.cfg.curve_every

    class Curve(TrainerCallback):
        def _score(self, model: Any, step: int) -> None:
            correct = letter_correct(model, ctx.tok, ctx.data.curve, batch_size=ctx.cfg.eval_batch_size)
            curve.append({"step": step, "accuracy": sum(correct) / len(correct), "n": len(correct)})

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if every and model is not None:
                self._score(model, 0)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if every and model is not None and state.global_step % every == 0:
                self._score(model, state.global_step)

    return Curve()


def finetune(
    ctx: ArmContext,
    *,
    mask: Any = None,
    mask_name: str | None = None,
    replay: bool = False,
    callbacks: list[Any] | None = None,
    extra_args: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of the aligned model on ``ctx.rows`` with LoRA and the given safety options.

    Args:
        ctx: the run's context.
        mask: a `SafetyMask` to keep frozen (SPA: ``safety_mode="freeze"``), or `None`.
        mask_name: its name in the run record.
        replay: mix the refusal rows into the stream at ``cfg.replay_ratio`` (the trainer's replay option).
        callbacks: more trainer callbacks (realignment).
        extra_args: more `SafetySFTConfig` fields (new defenses).

    Returns:
        ``(merged model in eval mode, info)`` with the seconds, the logged losses, the curve, the rows seen by kind
        (``rows_seen``) and, for masked arms, ``masked_entries_moved`` (must be 0).
    """
    from datasets import Dataset

    from peft_safety.recipes.main_job import chat_rows
    from peft_safety.training import SafetySFTConfig

    cfg = ctx.cfg
    model = copy.deepcopy(ctx.base)
    for p in model.parameters():  # the shared base is frozen for evaluation; LoRA re-freezes the copy's weights
        p.requires_grad_(True)
    peft_config = lora_config(cfg)
    safety: dict[str, Any] = dict(extra_args or {})
    if mask is not None:
        safety["safety_mode"] = "freeze"
        peft_config.entries_method = cfg.spa_entries_method  # a SafetyLoraConfig field, read by the trainer
    if replay:
        safety["safety_replay_ratio"] = cfg.replay_ratio
    curve: list[dict[str, Any]] = []
    args = SafetySFTConfig(
        output_dir=str(ctx.work_dir), max_steps=cfg.steps, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_length=cfg.max_length, logging_steps=cfg.log_every, save_strategy="no", report_to=[], bf16=False,
        fp16=False, use_cpu=not torch.cuda.is_available(), seed=ctx.seed, data_seed=ctx.seed,
        dataloader_num_workers=0, disable_tqdm=not cfg.progress, safety_log_drift=False,
        gradient_checkpointing=False, safety_verify=cfg.spa_entries_method == "dense", **safety,
    )  # fmt: skip
    trainer_cls = _trainer_class()
    t = time.perf_counter()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(chat_rows(ctx.rows)), processing_class=ctx.tok,
        peft_config=peft_config, safety_mask=mask,
        callbacks=[*(callbacks or []), _curve_callback(ctx, curve)],
        safety_replay_dataset=chat_rows(ctx.data.refusals) if replay else None,
    )  # fmt: skip
    trainer.seen_ids = []
    stream_rows = len(trainer.train_dataset)
    result = trainer.train()
    seconds = time.perf_counter() - t
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    texts = [ctx.tok.decode(ids, skip_special_tokens=False) for ids in trainer.seen_ids]
    seen = _classify(texts, _kinds_of(ctx.data, ctx.rows))
    tuned = trainer.model
    adapter = getattr(tuned, "peft_config", {}).get("default")
    targets = sorted(getattr(adapter, "target_modules", None) or [])  # what PEFT resolved
    if hasattr(tuned, "merge_and_unload"):
        tuned = tuned.merge_and_unload()
    info: dict[str, Any] = {
        "train_seconds": round(seconds, 1), "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "losses": losses, "curve": curve, "stream_rows": stream_rows, "rows_seen": seen,
        "sequences_seen": len(texts), "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                               "dropout": cfg.lora_dropout, "targets": targets},
        "mask": mask_name,
    }  # fmt: skip
    if mask is not None:
        from benchmarks._shared import masked_entries_moved

        info["masked_entries_moved"] = masked_entries_moved(ctx.base, tuned, mask)
    del trainer
    gc.collect()
    tuned.eval()
    return tuned, info
