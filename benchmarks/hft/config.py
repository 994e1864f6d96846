"""`HFTConfig` and its presets: what one run of the harmful-fine-tuning protocol measures, and at which sizes.

Three presets (``--preset``); a flag given on the command line wins over its preset's value:

* ``tiny``: the tiny in-code Llama and synthetic rows, seconds per run (wiring and tests; numbers meaningless).
* ``cpu``: what runs on 2 CPU cores (the committed grid). Its cuts against the field's sizes are listed in
  `CPU_CUTS` and written into ``hft.json``: fewer fine-tuning rows (400 = one epoch of 100 steps at batch 4),
  p in {0.1, 0} only, 100 HarmBench / 100 StrongREJECT / 100 look-alike prompts, 200 task test rows, 64 new tokens,
  the sparse masked-LoRA forward. Steps (100) and seeds (3) are not cut.
* ``gpu``: the field's sizes (1,000 fine-tuning rows, p in {0, 0.05, 0.1, 0.2}, 500 steps, every HarmBench test
  and StrongREJECT prompt, 128 new tokens, the bit-exact dense masked-LoRA forward).

LoRA is configured as TRL's ``ModelConfig`` defaults give it to a user (r 16, alpha 32, dropout 0.05,
``lora_target_modules=None`` so PEFT picks its per-architecture default targets: ``q_proj``/``v_proj`` for Qwen2 and
Llama). ``settings_digest`` covers every field that changes a result; a resumed or pooled run must match it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

PRESETS = ("tiny", "cpu", "gpu")


@dataclass
class HFTConfig:
    preset: str = field(default="cpu", metadata={"help": "Size preset: tiny, cpu or gpu (flags given win).",
                                                 "choices": list(PRESETS)})  # fmt: skip
    model: str = field(default="qwen2.5-coder-0.5b-instruct", metadata={"help": "Aligned model ('tiny': in-code)."})
    out: str = field(default="benchmarks/results/hft", metadata={"help": "Output folder (runs/, hft.json)."})
    work_dir: str = field(default="", metadata={"help": "Scratch folder (judge, trainer output); '': a temp dir."})
    arms: str = field(default="", metadata={"help": "Comma-separated arms ('': every registered arm)."})
    p: str = field(default="0.1,0", metadata={"help": "Harmful fractions, in grid order (the first is primary)."})
    seeds: str = field(default="0,1,2", metadata={"help": "Seeds of every multi-seed arm."})
    single_seed_arms: str = field(default="sppft,rsn_tune", metadata={"help": "Arms run for the first seed only."})
    p0_arms: str = field(default="lora,replay,lisa,spa_esi", metadata={"help": "Arms run at p = 0."})
    # ------------------------------------------------------------------ data
    task: str = field(default="arc_easy", metadata={"help": "Multiple-choice task (scored by next-token logits)."})
    n_train: int = field(default=400, metadata={"help": "Fine-tuning rows (task + harmful), before replay rows."})
    n_task_test: int = field(default=200, metadata={"help": "Held-out task rows (accuracy)."})
    n_curve: int = field(default=64, metadata={"help": "Task test rows scored during training (the curve)."})
    harmful_sources: str = field(default="uncensorbench_compliant,advbench",
                                 metadata={"help": "Harmful (prompt, compliant answer) sources, in order of use."})  # fmt: skip
    n_harmbench: int = field(default=100, metadata={"help": "HarmBench test prompts (safety)."})
    second_harmful: str = field(default="strongreject", metadata={"help": "Second harmful set, reported apart."})
    n_second: int = field(default=100, metadata={"help": "Prompts of the second harmful set."})
    lookalike: str = field(default="benign_edgy", metadata={"help": "Benign look-alike set (over-refusal)."})
    n_lookalike: int = field(default=100, metadata={"help": "Benign look-alike prompts."})
    n_ident: int = field(default=32, metadata={"help": "Refusal rows that identify the masks."})
    ngram: int = field(default=6, metadata={"help": "Word n-gram length of the disjointness check."})
    # ------------------------------------------------------------------ training
    steps: int = field(default=100, metadata={"help": "Optimizer steps per fine-tuning run."})
    batch_size: int = field(default=4, metadata={"help": "Training batch size."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate (constant, no warm-up)."})
    max_length: int = field(default=256, metadata={"help": "Training sequence length (tokens)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (TRL ModelConfig default)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (TRL ModelConfig default)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (TRL ModelConfig default)."})
    lora_target_modules: str = field(default="", metadata={"help": "'': PEFT's per-architecture default targets."})
    replay_ratio: float = field(default=0.1, metadata={"help": "Share of refusal rows in a replay arm's stream."})
    realign_fraction: float = field(default=0.2, metadata={"help": "Share of the ESI mask restored by realign."})
    density: float = field(default=0.01, metadata={"help": "Density of the ESI and random masks."})
    spa_entries_method: str = field(default="sparse", metadata={"help": "Masked-LoRA forward: sparse or dense."})
    curve_every: int = field(default=25, metadata={"help": "Score the curve rows every N steps (0: never)."})
    curve_arms: str = field(default="lora", metadata={"help": "Arms whose runs score the curve ('': every arm)."})
    log_every: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    # ------------------------------------------------------------------ defense arms (each field belongs to its arms)
    # each belongs to the arms `ARM_FIELDS` names and enters only their settings digest
    lisa_alignment_steps: int = field(default=10, metadata={"help": "Lisa: alignment steps per "
                                      "cycle (git-disl/Lisa lisa_poison_ratio.sh: 100 of a 1,000-step cycle; / 10)."})  # fmt: skip
    lisa_task_steps: int = field(default=90, metadata={"help": "Lisa: task steps per cycle "
                                 "(the reference script: 900; / 10, keeping its 1:9 ratio)."})  # fmt: skip
    lisa_rho: float = field(default=1.0, metadata={"help": "Lisa: proximal weight (RHO=1)."})
    lisa_proximal_after: int = field(default=10, metadata={"help": "Lisa: first step with the "
                                     "proximal term (the reference's trainer: after 10% of the run's steps)."})  # fmt: skip
    booster_lambda: float = field(default=5.0, metadata={"help": "Booster: lambda "
                                  "(git-disl/Booster smooth_align.sh: lamb=5)."})  # fmt: skip
    booster_alpha: float = field(default=0.1, metadata={"help": "Booster: alpha, the "
                                 "simulated step's size (smooth_align.sh: alpha=0.1)."})  # fmt: skip
    booster_steps: int = field(default=100, metadata={"help": "Booster: steps of the "
                               "alignment run on the refusal rows (the reference: 20 epochs of 5,000 rows)."})  # fmt: skip
    booster_lr: float = field(default=5e-4, metadata={"help": "Booster: the alignment run's "
                              "learning rate (smooth_align.sh: 5e-4, constant)."})  # fmt: skip
    booster_weight_decay: float = field(default=0.1, metadata={"help": "Booster: the "
                                        "alignment run's weight decay (smooth_align.sh: 0.1)."})  # fmt: skip
    antidote_fraction: float = field(default=0.1, metadata={"help": "Antidote: share of "
                                     "each row's entries pruned (antidote_poison_ratio.sh: dense_ratio=0.1)."})  # fmt: skip
    antidote_rows: int = field(default=64, metadata={"help": "Antidote: harmful rows scored "
                               "by Wanda, none of the run's own (the reference: bad_sample_num=2000)."})  # fmt: skip
    safe_lora_top_k: int = field(default=10, metadata={"help": "Safe LoRA: project the k "
                                 "least similar layers (IBM/SafeLoRA config.py: 'number', num_proj_layers=10)."})  # fmt: skip
    resta_scale: float = field(default=1.0, metadata={"help": "RESTA: scale of the safety "
                               "vector added back (the paper's add-back: 1)."})  # fmt: skip
    direction_steps: int = field(default=100, metadata={"help": "Safe LoRA / RESTA: "
                                 "steps of the LoRA refusal run whose delta is the alignment direction."})  # fmt: skip
    direction_lr: float = field(default=5e-4, metadata={"help": "Its learning rate "
                                "(git-disl/Booster sft.sh, the SFT alignment stage: 5e-4, constant)."})  # fmt: skip
    direction_weight_decay: float = field(default=0.1, metadata={"help": "Its weight decay (sft.sh: 0.1)."})  # fmt: skip
    # ------------------------------------------------------------------ evaluation
    max_new_tokens: int = field(default=64, metadata={"help": "Greedy generation budget per prompt."})
    eval_batch_size: int = field(default=25, metadata={"help": "Prompts per generation call."})
    judges: str = field(default="wei2024,wei2024_min20,gcg_extended,refusal_prefix",
                        metadata={"help": "Keyword judges (each reported apart)."})  # fmt: skip
    classifier: str = field(default="train", metadata={"help": "Classifier judge: 'train' (the offline classifier, "
                                                       "trained here), a saved judge folder, or 'none'."})  # fmt: skip
    primary_judge: str = field(default="classifier", metadata={"help": "Judge of the headline and the verdict."})
    n_resamples: int = field(default=10_000, metadata={"help": "Bootstrap resamples of every interval."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (recorded; part of the settings)."})
    # ------------------------------------------------------------------ actions
    combine: bool = field(default=False, metadata={"help": "Pool <out>/runs/ into <out>/hft.json (no training)."})
    report: bool = field(default=False, metadata={"help": "Render docs/leaderboard.md and the figure from hft.json."})
    estimate: bool = field(default=False, metadata={"help": "Print the plan and its time estimate, run nothing."})
    max_runs: int = field(default=0, metadata={"help": "Stop after this many new runs (0: the whole plan)."})
    progress: bool = field(default=False, metadata={"help": "Progress bars."})


#: fields that never change a result (where to write, which part of the grid, what to do)
_NOT_SETTINGS = ("preset", "out", "work_dir", "arms", "p", "seeds", "single_seed_arms", "p0_arms", "combine",
                 "report", "estimate", "max_runs", "progress")  # fmt: skip

_TINY = {
    "model": "tiny", "n_train": 16, "n_task_test": 12, "n_curve": 6, "n_harmbench": 6, "n_second": 4,
    "n_lookalike": 4, "n_ident": 6, "steps": 4, "batch_size": 4, "lr": 5e-3, "max_length": 256, "curve_every": 2,
    "log_every": 2, "max_new_tokens": 4, "eval_batch_size": 8, "seeds": "0,1", "n_resamples": 200, "threads": 1,
    "lora_r": 4, "lora_alpha": 8, "lisa_alignment_steps": 1, "lisa_task_steps": 1, "lisa_proximal_after": 0,
    "booster_steps": 2, "antidote_rows": 4, "safe_lora_top_k": 2, "direction_steps": 2,
}  # fmt: skip
_GPU = {
    "n_train": 1000, "p": "0.1,0,0.05,0.2", "steps": 500, "batch_size": 8, "n_task_test": 1000, "n_curve": 200,
    "n_harmbench": 159, "n_second": 281, "n_lookalike": 150, "max_new_tokens": 128, "max_length": 512,
    "eval_batch_size": 64, "spa_entries_method": "dense", "curve_every": 50, "threads": 0,
    "lisa_alignment_steps": 50, "lisa_task_steps": 450, "lisa_proximal_after": 50, "booster_steps": 500,
    "antidote_rows": 256, "direction_steps": 500,
}  # fmt: skip
PRESET_VALUES: dict[str, dict[str, Any]] = {"tiny": _TINY, "cpu": {}, "gpu": _GPU}

#: what the cpu preset cuts against the gpu preset (the field's sizes), in the order the cuts were made
CPU_CUTS = [
    "fine-tuning rows 1,000 -> 400 (one epoch of 100 steps at batch 4; steps are not cut below 100)",
    "harmful fractions {0, 0.05, 0.1, 0.2} -> {0.1, 0}",
    "HarmBench test prompts 159 -> 100, StrongREJECT 281 -> 100, look-alike prompts 150 -> 100",
    "new tokens per answer 128 -> 64",
    "task test rows 1,000 -> 200; curve rows 200 -> 64",
    "training sequence length 512 -> 256 tokens (harmful answers are cut there; task rows are shorter)",
    "masked LoRA with the sparse forward (exact up to fp rounding during training; merged weights exact)",
    "SPPFT and RSN-Tune one seed (the protocol allows it); the other arms 3 seeds",
    "the learning curve (64 test rows every 25 steps) scored in plain LoRA's runs only (it cost about a fifth of a run)",
    "defenses scaled to 100 steps: Lisa's cycle 50/450 -> 10/90 steps (its reference: 100/900 in a longer run), "
    "Booster's alignment run and the alignment direction's run 500 -> 100 steps, Antidote's harmful rows 256 -> 64",
]


#: the defense fields: field -> the arms it belongs to. Such a field enters only the settings digest of its arms
#: (`settings_digest(cfg, arm)`), so adding or changing a defense's field never changes another arm's digest.
ARM_FIELDS: dict[str, tuple[str, ...]] = {
    "lisa_alignment_steps": ("lisa",),
    "lisa_task_steps": ("lisa",),
    "lisa_rho": ("lisa",),
    "lisa_proximal_after": ("lisa",),
    "booster_lambda": ("booster",),
    "booster_alpha": ("booster",),
    "booster_steps": ("booster",),
    "booster_lr": ("booster",),
    "booster_weight_decay": ("booster",),
    "antidote_fraction": ("antidote",),
    "antidote_rows": ("antidote",),
    "safe_lora_top_k": ("safe_lora",),
    "resta_scale": ("resta",),
    "direction_steps": ("safe_lora", "resta"),
    "direction_lr": ("safe_lora", "resta"),
    "direction_weight_decay": ("safe_lora", "resta"),
}


def settings_of(cfg: HFTConfig) -> dict[str, Any]:
    """The fields that change every arm's result (the common part of ``settings_digest``; no arm's own field)."""
    own = ARM_FIELDS
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_SETTINGS and k not in own}


def arm_settings_of(cfg: HFTConfig, arm: str) -> dict[str, Any]:
    """The fields that belong to ``arm`` (its hyper-parameters); ``{}`` for an arm without any."""
    return {k: getattr(cfg, k) for k, arms in ARM_FIELDS.items() if arm in arms}


def settings_digest(cfg: HFTConfig, arm: str | None = None) -> str:
    """sha256 of the settings a run of ``arm`` depends on: the common settings, plus the arm's own fields if it has
    any. An arm without own fields (and ``arm=None``) hashes the common settings alone, exactly as before the defense
    fields existed, so their finished runs keep their digests."""
    import hashlib

    blob: dict[str, Any] = settings_of(cfg)
    own = arm_settings_of(cfg, arm) if arm is not None else {}
    if own:
        blob = {**blob, "arm_settings": {arm: own}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def parse_args(argv: list[str] | None = None) -> HFTConfig:
    """Parse flags into an `HFTConfig`: the preset's values replace the defaults, flags given explicitly win."""
    import sys

    from transformers import HfArgumentParser

    parser = HfArgumentParser(HFTConfig, description="The harmful-fine-tuning protocol (python -m benchmarks.hft).")
    args = list(sys.argv[1:] if argv is None else argv)
    (cfg,) = parser.parse_args_into_dataclasses(args=args)
    given = {a.split("=", 1)[0][2:].replace("-", "_") for a in args if a.startswith("--")}
    for key, value in PRESET_VALUES[cfg.preset].items():
        if key not in given:
            setattr(cfg, key, value)
    check(cfg)
    return cfg


def check(cfg: HFTConfig) -> None:
    """Clear errors for settings that cannot run."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: choose one of {PRESETS}.")
    for p in p_values(cfg):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"--p {cfg.p!r}: every harmful fraction must be in [0, 1).")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.n_train < cfg.batch_size:
        raise ValueError(f"--steps {cfg.steps}, --batch_size {cfg.batch_size}, --n_train {cfg.n_train}: need "
                         "steps >= 1 and n_train >= batch_size.")  # fmt: skip
    if cfg.spa_entries_method not in ("sparse", "dense"):
        raise ValueError(f"--spa_entries_method {cfg.spa_entries_method!r}: use 'sparse' or 'dense'.")
    if cfg.n_curve > cfg.n_task_test:
        raise ValueError(f"--n_curve {cfg.n_curve} exceeds --n_task_test {cfg.n_task_test} (the curve rows are "
                         "the first test rows).")  # fmt: skip
    if not seed_list(cfg):
        raise ValueError("--seeds needs at least one seed.")


def p_values(cfg: HFTConfig) -> list[float]:
    return [float(x) for x in cfg.p.split(",") if x.strip()]


def seed_list(cfg: HFTConfig) -> list[int]:
    return [int(x) for x in cfg.seeds.split(",") if x.strip()]


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
