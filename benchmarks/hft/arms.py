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

The defenses (Lisa, Booster, Antidote, Safe LoRA, RESTA) run through the same `finetune` (same task rows, LoRA,
steps, learning rate and evaluation) and differ only in their own step; their hyper-parameters are `HFTConfig` fields
that belong to the arm (`config.ARM_FIELDS`, in the arm's settings digest only). What several runs share and costs a
training run to make (Booster's hardened model, the alignment direction of Safe LoRA and RESTA) is an *artifact*:
built once per process by `build_artifact`, its digest written into every run that used it and checked against the
finished runs (like the masks). Every row a defense reads (alignment, harmful or calibration rows) comes from the
protocol's pools, which the data check keeps disjoint from every evaluation prompt; `leak_counts` checks it again with
the judge's leak check and its counts go into the run file.

Registered arms that need library features not built yet are left out of the registry (the plan lists them as
``not available``): ``set_repair`` becomes an entry here when it exists.
"""

from __future__ import annotations

import copy
import gc
import random
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
    artifacts: tuple[str, ...] = field(default=(), metadata={"help": "Shared artifacts it needs (`ARTIFACTS`)."})
    description: str = field(default="", metadata={"help": "One line for the leaderboard."})


#: name -> `Arm`, in the order the leaderboard lists them
ARMS: dict[str, Arm] = {}

#: the shared artifacts arms may need (builders in `ARTIFACTS`, defined after the arms)
ARTIFACT_NAMES = ("booster", "direction")

#: arms of the protocol that the library does not offer yet (listed by the plan, skipped)
PLANNED = ("set_repair",)


def register(
    name: str, *, masks: tuple[str, ...] = (), trains: bool = True, artifacts: tuple[str, ...] = (),
    description: str = "",
):  # fmt: skip
    """Decorator: register ``fn(ctx) -> (model, info)`` as arm ``name``."""

    def wrap(fn: Callable[[ArmContext], tuple[Any, dict[str, Any]]]) -> Callable:
        if name in ARMS:
            raise ValueError(f"Arm {name!r} is registered twice.")
        unknown = [a for a in artifacts if a not in ARTIFACT_NAMES]
        if unknown:
            raise ValueError(f"Arm {name!r} needs unknown artifacts {unknown}; known: {ARTIFACT_NAMES}.")
        ARMS[name] = Arm(name, fn, tuple(masks), trains, tuple(artifacts), description)
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
    artifacts: Callable[[str], Any] | None = None

    def mask(self, name: str) -> Any:
        return self.masks(name)

    def artifact(self, name: str) -> Any:
        """The shared artifact ``name`` (`ARTIFACTS`), built once per process."""
        if self.artifacts is None:
            raise RuntimeError(f"This context has no artifact source; arm needs {name!r}.")
        return self.artifacts(name)


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


# ----------------------------------------------------------------------------------------------------------- defenses
# Hyper-parameters: `HFTConfig`'s defense fields, whose help names the reference each value comes from (the Lisa,
# Booster and Antidote scripts of git-disl, IBM/SafeLoRA's config.py); docs/leaderboard.md's protocol section lists
# them with the cuts made for 100-step runs.
@register("lisa", description="Lisa: refusal-row (alignment) and task steps alternate, with a proximal term")
def _lisa(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    cfg = ctx.cfg
    leak = leak_counts(ctx.data.refusals, ctx.data)
    model, info = finetune(ctx, alignment_rows=ctx.data.refusals, extra_args={
        "safety_lisa_alignment_steps": cfg.lisa_alignment_steps, "safety_lisa_task_steps": cfg.lisa_task_steps,
        "safety_lisa_rho": cfg.lisa_rho, "safety_lisa_proximal_after": cfg.lisa_proximal_after})  # fmt: skip
    info["leak"] = {"alignment_rows": leak}
    return model, info


@register("booster", artifacts=("booster",),
          description="Booster alignment run on refusal rows (harmful-perturbation term), then plain LoRA")  # fmt: skip
def _booster(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    hardened = ctx.artifact("booster")
    model, info = finetune(ctx, base=hardened["model"])
    info["booster"] = hardened["info"]
    return model, info


def antidote_rows(ctx: ArmContext) -> list[dict[str, Any]]:
    """The harmful rows Antidote scores with: the first ``antidote_rows`` of a fixed permutation of the harmful pool
    that are not among this run's own fine-tuning rows (the reference takes its rows after the attack's,
    ``poison_data_start=5000``)."""
    own = {r["prompt"] for r in ctx.rows}
    order = list(range(len(ctx.data.harmful_pool)))
    random.Random(5000).shuffle(order)
    rows = [ctx.data.harmful_pool[i] for i in order if ctx.data.harmful_pool[i]["prompt"] not in own]
    if len(rows) < ctx.cfg.antidote_rows:
        raise ValueError(f"--antidote_rows {ctx.cfg.antidote_rows}: only {len(rows)} harmful rows are left outside "
                         "this run's fine-tuning rows; lower it.")  # fmt: skip
    return rows[: ctx.cfg.antidote_rows]


@register("antidote", description="plain LoRA, then Antidote: the LoRA entries Wanda scores highest on harmful rows "
          "pruned")  # fmt: skip
def _antidote(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    from peft_safety.posthoc import antidote

    cfg = ctx.cfg
    rows = antidote_rows(ctx)
    leak = leak_counts(rows, ctx.data)

    def prune(peft_model: Any) -> dict[str, Any]:
        _, mask = antidote(peft_model, [{"prompt": r["prompt"], "response": r["response"]} for r in rows],
                           cfg.antidote_fraction, tokenizer=ctx.tok, max_length=cfg.max_length,
                           batch_size=cfg.eval_batch_size)  # fmt: skip
        sizes = {n: int(t.numel()) for n, t in peft_model.named_parameters() if "lora_" in n}
        return {"pruned": int(mask.numel()), "of": sum(sizes.values()), "weights": len(sizes),
                "fraction": cfg.antidote_fraction, "rows": len(rows)}  # fmt: skip

    model, info = finetune(ctx, posthoc=prune)
    info["leak"] = {"antidote_rows": leak}
    return model, info


@register("safe_lora", artifacts=("direction",),
          description="plain LoRA, then Safe LoRA: the least aligned layers' updates projected on the refusal "
          "direction")  # fmt: skip
def _safe_lora(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    from peft_safety.posthoc import safe_lora_project

    direction = ctx.artifact("direction")

    def project(peft_model: Any) -> dict[str, Any]:
        _, report = safe_lora_project(peft_model, direction["delta"], top_k=ctx.cfg.safe_lora_top_k)
        return {"top_k": ctx.cfg.safe_lora_top_k, "projected": report.projected,
                "layers": [vars(x) for x in report.layers]}  # fmt: skip

    model, info = finetune(ctx, posthoc=project)
    info["direction"] = direction["info"]
    return model, info


@register("resta", artifacts=("direction",),
          description="plain LoRA, then RESTA: the refusal direction added back to the merged model")  # fmt: skip
def _resta(ctx: ArmContext) -> tuple[Any, dict[str, Any]]:
    from peft_safety.posthoc import add_safety_vector

    direction = ctx.artifact("direction")
    model, info = finetune(ctx)
    add_safety_vector(model, direction["delta"], scale=ctx.cfg.resta_scale)
    info["resta"] = {"scale": ctx.cfg.resta_scale, "weights": len(direction["delta"])}
    info["direction"] = direction["info"]
    return model, info


# ----------------------------------------------------------------------------------------------------------- artifacts
def leak_counts(rows: list[dict[str, Any]], data: Any) -> dict[str, int]:
    """The judge's leak check (`leak_report`) of a defense's rows against every evaluation set: ``{set: n_leaked}``.

    Raises:
        ValueError: any row leaks (the data check should have removed it: the protocol's pools are broken).
    """
    from peft_safety.evaluation.classifier_judge import leak_report

    report = leak_report([{"prompt": r["prompt"], "response": r["response"]} for r in rows], data.eval_sets)
    counts = {name: v["n_leaked"] for name, v in report.items()}
    if any(counts.values()):
        bad = {k: v["examples"][:1] for k, v in report.items() if v["n_leaked"]}
        raise ValueError(f"Defense rows leak into evaluation sets: {counts} (e.g. {bad}); they must come from the "
                         "protocol's pools, which are disjoint from every evaluation prompt.")  # fmt: skip
    return counts


def _lora_digest(peft_model: Any) -> str:
    """sha256 of a LoRA adapter's factors (names, shapes, fp32 bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted((n, p) for n, p in peft_model.named_parameters() if "lora_" in n):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _alignment_run(ctx: ArmContext, *, steps: int, lr: float, weight_decay: float, posthoc: Callable,
                   extra_args: dict[str, Any] | None = None,
                   trainer_kwargs: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A LoRA run on the refusal rows from the aligned model (seed 0, no curve): the alignment stage of Booster and
    the run whose update is the alignment direction of Safe LoRA and RESTA."""
    from dataclasses import replace

    actx = replace(ctx, cfg=replace(ctx.cfg, curve_every=0), seed=0, rows=list(ctx.data.refusals))
    return finetune(actx, steps=steps, lr=lr, weight_decay=weight_decay, posthoc=posthoc, extra_args=extra_args,
                    trainer_kwargs=trainer_kwargs)  # fmt: skip


def _booster_artifact(ctx: ArmContext) -> dict[str, Any]:
    """Booster's alignment stage on the aligned model: LoRA on the refusal rows with the harmful-perturbation term on
    the harmful pool's rows, merged (the reference merges its alignment LoRA before the attack's LoRA)."""
    from peft_safety.recipes.main_job import chat_rows

    cfg, data = ctx.cfg, ctx.data
    leak = {"alignment_rows": leak_counts(data.refusals, data), "harmful_rows": leak_counts(data.harmful_pool, data)}
    digest: dict[str, Any] = {}

    def capture(peft_model: Any) -> dict[str, Any]:
        digest["lora"] = _lora_digest(peft_model)
        return {}

    model, info = _alignment_run(
        ctx, steps=cfg.booster_steps, lr=cfg.booster_lr, weight_decay=cfg.booster_weight_decay, posthoc=capture,
        # lambda 0: the same alignment run without the term (the reference's plain SFT alignment, sft.sh)
        extra_args={"safety_booster_lambda": cfg.booster_lambda, "safety_booster_alpha": cfg.booster_alpha}
        if cfg.booster_lambda else None,
        trainer_kwargs={"safety_booster_harmful_dataset": chat_rows(data.harmful_pool)} if cfg.booster_lambda else None,
    )  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    record = {"digest": digest["lora"], "steps": info["steps"], "train_seconds": info["train_seconds"],
              "train_loss": info["train_loss"], "losses": info["losses"], "booster_logs": info["safety_logs"],
              "rows_seen": info["rows_seen"], "alignment_rows": len(data.refusals),
              "harmful_rows": len(data.harmful_pool), "leak": leak}  # fmt: skip
    return {"model": model, "info": record}


def _direction_artifact(ctx: ArmContext) -> dict[str, Any]:
    """The alignment direction of Safe LoRA and RESTA: the update ``scaling * B A`` of a LoRA run on the refusal rows
    from the aligned model (the model has no unaligned twin offline, so ``W_aligned - W_base`` is not available; this
    is the direction one more alignment step takes), on the fine-tuning LoRA's target modules."""
    from peft_safety.posthoc import AlignmentDelta

    cfg, data = ctx.cfg, ctx.data
    leak = {"alignment_rows": leak_counts(data.refusals, data)}
    got: dict[str, Any] = {}

    def capture(peft_model: Any) -> dict[str, Any]:
        got["delta"] = AlignmentDelta.from_adapter(peft_model)
        got["digest"] = _lora_digest(peft_model)
        return {}

    _, info = _alignment_run(ctx, steps=cfg.direction_steps, lr=cfg.direction_lr,
                             weight_decay=cfg.direction_weight_decay, posthoc=capture)  # fmt: skip
    delta = got["delta"]
    record = {"digest": got["digest"], "weights": len(delta), "names": sorted(delta), "steps": info["steps"],
              "train_seconds": info["train_seconds"], "train_loss": info["train_loss"], "losses": info["losses"],
              "rows_seen": info["rows_seen"], "alignment_rows": len(data.refusals), "leak": leak}  # fmt: skip
    return {"delta": delta, "info": record}


#: artifact name -> builder(ctx) -> ``{"info": {"digest": ..., ...}, ...}``; built once per process
ARTIFACTS: dict[str, Callable[[ArmContext], dict[str, Any]]] = {
    "booster": _booster_artifact,
    "direction": _direction_artifact,
}


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
        batch_sizes: list[int]

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ids, attn = inputs["input_ids"], inputs.get("attention_mask")
            self.batch_sizes.append(int(ids.shape[0]))
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
    alignment_rows: list[dict[str, Any]] | None = None,
    base: Any = None,
    posthoc: Callable[[Any], dict[str, Any]] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    trainer_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of the aligned model on ``ctx.rows`` with LoRA and the given safety options.

    Args:
        ctx: the run's context.
        mask: a `SafetyMask` to keep frozen (SPA: ``safety_mode="freeze"``), or `None`.
        mask_name: its name in the run record.
        replay: mix the refusal rows into the stream at ``cfg.replay_ratio`` (the trainer's replay option).
        callbacks: more trainer callbacks (realignment).
        extra_args: more `SafetySFTConfig` fields (new defenses).
        alignment_rows: rows given to the trainer as ``safety_replay_dataset`` without replay mixing (Lisa's
            alignment state reads them).
        base: the model to copy and fine-tune instead of the aligned model (Booster's hardened model).
        posthoc: ``fn(peft_model) -> dict`` applied to the trained LoRA model before it is merged (Antidote, Safe
            LoRA); its dict goes into ``info["posthoc"]``.
        steps, lr, weight_decay: the run's optimizer settings (default: the protocol's ``steps`` and ``lr``, no weight
            decay; alignment runs use their reference's).
        trainer_kwargs: more `SafetySFTTrainer` arguments (Booster's harmful rows).

    Returns:
        ``(merged model in eval mode, info)`` with the seconds, the logged losses, the curve, the rows seen by kind
        (``rows_seen``), the kinds of every micro-batch in order (``batch_kinds``), the protections' state and logged
        safety metrics and, for masked arms, ``masked_entries_moved`` (must be 0).
    """
    from datasets import Dataset

    from peft_safety.recipes.main_job import chat_rows
    from peft_safety.training import SafetySFTConfig

    cfg = ctx.cfg
    model = copy.deepcopy(ctx.base if base is None else base)
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
        output_dir=str(ctx.work_dir), max_steps=cfg.steps if steps is None else steps,
        learning_rate=cfg.lr if lr is None else lr, per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=weight_decay,
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
        safety_replay_dataset=chat_rows(ctx.data.refusals) if replay else
        (chat_rows(alignment_rows) if alignment_rows is not None else None), **(trainer_kwargs or {}),
    )  # fmt: skip
    trainer.seen_ids = []
    trainer.batch_sizes = []
    stream_rows = len(trainer.train_dataset)
    result = trainer.train()
    seconds = time.perf_counter() - t
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    texts = [ctx.tok.decode(ids, skip_special_tokens=False) for ids in trainer.seen_ids]
    kinds = _kinds_of(ctx.data, ctx.rows)
    seen = _classify(texts, kinds)
    batch_kinds, i = [], 0
    for n in trainer.batch_sizes:  # the kinds of each micro-batch, in the order the optimizer saw them
        batch_kinds.append(sorted({next((k for p, k in kinds if p in t), "unknown") for t in texts[i : i + n]}))
        i += n
    protections = [c.state() for c in getattr(trainer, "protections", []) if hasattr(c, "state")]
    safety_logs = [{k: v for k, v in h.items() if k.startswith("safety/") or k == "step"}
                   for h in trainer.state.log_history if any(k.startswith("safety/") for k in h)]  # fmt: skip
    tuned = trainer.model
    adapter = getattr(tuned, "peft_config", {}).get("default")
    targets = sorted(getattr(adapter, "target_modules", None) or [])  # what PEFT resolved
    posthoc_info = posthoc(tuned) if posthoc is not None else None
    if hasattr(tuned, "merge_and_unload"):
        tuned = tuned.merge_and_unload()
    info: dict[str, Any] = {
        "train_seconds": round(seconds, 1), "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "losses": losses, "curve": curve, "stream_rows": stream_rows, "rows_seen": seen,
        "sequences_seen": len(texts), "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha,
                                               "dropout": cfg.lora_dropout, "targets": targets},
        "mask": mask_name, "batch_kinds": batch_kinds, "protections": protections, "safety_logs": safety_logs,
    }  # fmt: skip
    if posthoc_info is not None:
        info["posthoc"] = posthoc_info
    if mask is not None:
        from benchmarks._shared import masked_entries_moved

        info["masked_entries_moved"] = masked_entries_moved(ctx.base, tuned, mask)
    del trainer
    gc.collect()
    tuned.eval()
    return tuned, info
