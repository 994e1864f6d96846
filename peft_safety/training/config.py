"""``SafetySFTConfig``: TRL's ``SFTConfig`` plus the safety-mask fields (HfArgumentParser-compatible)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

try:
    from trl import SFTConfig
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("SafetySFTConfig needs trl: install it with `pip install 'peft-safety[trl]'`.") from err

from ..vocab import FINGERPRINT_POLICIES, MODES, check_fingerprint_policy, check_mode

__all__ = ["SafetySFTConfig", "check_defense_fields", "check_utility_fields", "resolve_bf16"]

logger = logging.getLogger(__name__)


@dataclass
class SafetySFTConfig(SFTConfig):
    r"""Configuration of `SafetySFTTrainer`: every `trl.SFTConfig` field, plus the fields below.

    Parameters that control the safety mask:

    > Which mask, and what to do with it

    safety_mask (`str` or `None`, defaults to `None`):
        Folder, ``safety_mask.safetensors`` file or Hub repo id of a `SafetyMask` (a `SafetyMask` object can be given
        to the trainer directly through ``SafetySFTTrainer(..., safety_mask=mask)``).
    safety_mode (`str` or `None`, defaults to `None`):
        ``"freeze"`` (SPA: keep the mask's entries unchanged while fine-tuning with LoRA, QLoRA or full weights) or
        ``"train_only"`` (SET: train only the mask's entries). Required whenever a mask is given.
    safety_train_only_full_weights (`bool`, defaults to `False`):
        With ``safety_mode="train_only"`` and no ``peft_config``, train the mask's entries directly in the full
        weights instead of through a sparse SET adapter. Opt-in because it keeps dense gradients and optimizer state
        for every tensor the mask touches; the adapter holds state only for the mask's entries.

    > Precision

    bf16 (`bool` or `None`, defaults to `None`):
        As in TRL, but resolved by the hardware when left unset: `True` where a bf16-capable accelerator will run the
        training (CUDA with bf16, XPU, NPU, TPU), `False` on a CPU-only machine or with ``use_cpu=True``, with a
        one-time info message. TRL's own default (`True` whenever ``fp16`` is off) makes transformers refuse to start
        on a CPU-only machine unless ``use_cpu=True`` is also passed. Set ``bf16=True`` explicitly (with
        ``use_cpu=True``) to train with CPU bf16 autocast.

    > Checks and logging

    safety_verify (`bool`, defaults to `True`):
        At the end of training, verify that the guarantee holds (frozen entries bit-identical, or the unmasked part
        of an adapter zero) and raise if it does not.
    safety_log_drift (`bool`, defaults to `True`):
        Log ``safety/masked_drift`` and ``safety/unmasked_drift`` (relative change of the masked vs the other
        entries of the covered weights) at each logging step.
    safety_eval_steps (`int` or `None`, defaults to `None`):
        Run the refusal-evaluation callback every this many steps (needs an evaluator, see `RefusalEvalCallback`).
    safety_fingerprint_check (`str`, defaults to `"error"`):
        What to do when the mask's recorded weight fingerprints differ from the model's: ``"error"``, ``"warn"`` or
        ``"ignore"``.

    > Safety replay (no mask needed; see `peft_safety.training.replay`)

    safety_replay_dataset (`str` or `None`, defaults to `None`):
        Refusal rows (prompt + response) to mix into the training set: an offline data set name such as
        ``uncensorbench_refusal``, a ``.json``/``.jsonl``/``.csv`` file or a Hub data set id, read by
        `peft_safety.sources.datasets.load_rows` (rows or a Dataset can be given to the trainer directly:
        ``SafetySFTTrainer(safety_replay_dataset=rows)``).
    safety_replay_ratio (`float`, defaults to `0.0`):
        Share of replay rows in the training stream, in ``[0, 1)``: ``round(N * r / (1 - r))`` replay rows are
        spread evenly among the ``N`` task rows.
    safety_replay_seed (`int` or `None`, defaults to `None`):
        Seed of the replay-row order (defaults to ``seed``; with Lisa, the order of its alignment batches).

    > Utility-aware SET (``safety_mode="train_only"``; see `peft_safety.training.utility`)

    safety_utility_dataset (`str` or `None`, defaults to `None`):
        Benign rows whose answers SET must keep: ``"self"`` (the default when utility rows are on: the model's own
        greedy answers to the benign prompts of ``forgelm_chat`` and ``fiqa``, generated when the trainer is built,
        refusals dropped by the ``wei2024`` judge), ``"self:NAME[,NAME...]"`` (the model's answers to other named sets
        or files), or rows with responses: an offline data set name, a ``.json``/``.jsonl``/``.csv`` file or a Hub
        id, read by `peft_safety.sources.datasets.load_rows` (rows can be given directly:
        ``SafetySFTTrainer(safety_utility_dataset=rows)``).
    safety_utility_ratio (`float` or `None`, defaults to `None`):
        Utility rows per training (refusal) row, mixed evenly into the stream. `None` means 1 with
        ``safety_mode="train_only"`` and 0 otherwise; 0 turns utility rows off (plain SET).
    safety_kl_weight (`float`, defaults to `0.0`):
        Weight of ``KL(base || model)`` on the answer tokens of a batch of utility rows, added to every micro-batch's
        loss; the base model is the SET adapter disabled (no copy of the weights). Needs utility rows and an adapter.
    safety_utility_max_new_tokens (`int`, defaults to `64`):
        Generation budget of a self-distilled answer (``"self"``).

    > Lisa (Huang et al. 2024; see `peft_safety.training.lisa` and ``docs/defenses.md``)

    safety_lisa_alignment_steps (`int`, defaults to `0`):
        Optimizer steps of each alignment state: Lisa is on when this is positive. The alignment rows are those of
        ``safety_replay_dataset`` (or ``SafetySFTTrainer(safety_replay_dataset=rows)``); with Lisa they feed the
        alignment state and are not mixed into the task stream (``safety_replay_ratio`` must stay 0).
    safety_lisa_task_steps (`int`, defaults to `0`):
        Optimizer steps of each task state (required with Lisa; the reference script's split is 100 : 900).
    safety_lisa_rho (`float`, defaults to `1.0`):
        Weight of the proximal term ``rho / 2 * ||w - w_switch||^2`` (``w_switch``: the trainable weights at the
        last switch of state). 0 gives Bi-State Optimization without the proximal term.
    safety_lisa_proximal_after (`int`, defaults to `0`):
        The proximal term is added from this optimizer step on (0-based count of the steps taken). The public code
        waits for 10% of the run's steps; 0 adds it from the first step, as the paper's formula.

    > Booster (Huang et al. 2025; an alignment-stage regulariser, see `peft_safety.training.booster`)

    safety_booster_lambda (`float`, defaults to `0.0`):
        Weight ``lambda`` of ``h(w) - h(w - alpha * g_h / ||g_h||)`` added to the loss (``h``: the loss on a batch
        of harmful rows, ``g_h`` its gradient): Booster is on when this is positive. The reference's value is 5.
    safety_booster_alpha (`float`, defaults to `0.1`):
        Step size ``alpha`` of the simulated harmful step (normalised gradient). The reference's value is 0.1.
    safety_booster_harmful_dataset (`str` or `None`, defaults to `None`):
        Harmful (prompt, harmful answer) rows: an offline data set name such as ``uncensorbench_compliant``, a
        ``.json``/``.jsonl``/``.csv`` file or a Hub data set id, read by `peft_safety.sources.datasets.load_rows`
        (rows can be given directly: ``SafetySFTTrainer(safety_booster_harmful_dataset=rows)``).
    """

    safety_mask: str | None = field(
        default=None,
        metadata={
            "help": "Folder, safety_mask.safetensors file or Hub repo id of a SafetyMask. A SafetyMask object can be "
            "passed to SafetySFTTrainer(safety_mask=...) instead."
        },
    )
    safety_mode: str | None = field(
        default=None,
        metadata={
            "help": "'freeze' (SPA: keep the mask's entries unchanged) or 'train_only' (SET: train only the mask's "
            "entries). Required when a mask is given.",
            "choices": list(MODES),
        },
    )
    safety_train_only_full_weights: bool = field(
        default=False,
        metadata={
            "help": "With safety_mode='train_only' and no peft_config: train the mask's entries in the full weights "
            "instead of a sparse SET adapter (dense gradients and optimizer state: prefer the adapter for small masks)."
        },
    )
    safety_verify: bool = field(
        default=True,
        metadata={"help": "Verify the guarantee at the end of training and raise if it is violated."},
    )
    safety_log_drift: bool = field(
        default=True,
        metadata={"help": "Log safety/masked_drift and safety/unmasked_drift at each logging step."},
    )
    safety_eval_steps: int | None = field(
        default=None,
        metadata={"help": "Run the refusal-evaluation callback every N steps (None: never)."},
    )
    safety_fingerprint_check: str = field(
        default="error",
        metadata={
            "help": "When the mask's weight fingerprints differ from the model's: 'error', 'warn' or 'ignore'.",
            "choices": list(FINGERPRINT_POLICIES),
        },
    )

    safety_replay_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Refusal rows to mix into the training set: an offline data set name such as "
            "uncensorbench_refusal, a .json/.jsonl/.csv file, or a Hub data set id."
        },
    )
    safety_replay_ratio: float = field(
        default=0.0,
        metadata={"help": "Share of replay rows in the training stream, in [0, 1) (0: no replay)."},
    )
    safety_replay_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the replay-row order (default: seed)."},
    )

    safety_utility_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Benign rows whose answers SET keeps: 'self' (the model's own answers to forgelm_chat and fiqa "
            "prompts), 'self:NAME[,NAME]' (its answers to other sets), or rows with responses (a named offline set, "
            "a .json/.jsonl/.csv file or a Hub id)."
        },
    )
    safety_utility_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Utility rows per refusal row for SET (default: 1 with safety_mode='train_only', else 0; 0: plain "
            "SET)."
        },
    )
    safety_kl_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of KL(base || model) on the answer tokens of utility rows (the base: the SET adapter "
            "disabled; 0: off)."
        },
    )
    safety_utility_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Generation budget of a self-distilled utility answer ('self')."},
    )

    safety_lisa_alignment_steps: int = field(
        default=0,
        metadata={
            "help": "Lisa: optimizer steps of each alignment state (0: Lisa off). The alignment rows come from "
            "safety_replay_dataset and are not mixed into the task stream."
        },
    )
    safety_lisa_task_steps: int = field(
        default=0,
        metadata={
            "help": "Lisa: optimizer steps of each task state (required with Lisa; the reference uses 100:900)."
        },
    )
    safety_lisa_rho: float = field(
        default=1.0,
        metadata={"help": "Lisa: weight rho of the proximal term rho/2 * ||w - w_switch||^2 (0: no proximal term)."},
    )
    safety_lisa_proximal_after: int = field(
        default=0,
        metadata={
            "help": "Lisa: add the proximal term from this optimizer step on (the public code waits for a tenth of the "
            "steps; 0: from the first step)."
        },
    )
    safety_booster_lambda: float = field(
        default=0.0,
        metadata={
            "help": "Booster: weight lambda of h(w) - h(w - alpha * g_h/||g_h||) on harmful rows (0: Booster off; the "
            "reference uses 5)."
        },
    )
    safety_booster_alpha: float = field(
        default=0.1,
        metadata={"help": "Booster: step size alpha of the simulated harmful step (the reference uses 0.1)."},
    )
    safety_booster_harmful_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Booster: harmful (prompt, harmful answer) rows: an offline data set name such as "
            "uncensorbench_compliant, a .json/.jsonl/.csv file, or a Hub data set id."
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.safety_replay_ratio) < 1.0:
            raise ValueError(
                f"safety_replay_ratio={self.safety_replay_ratio} must be in [0, 1): the share of replay rows in the "
                "training stream (0.1 = one replay row in ten)."
            )
        check_defense_fields(self)
        if (
            self.safety_replay_dataset is not None
            and not self.safety_replay_ratio
            and not self.safety_lisa_alignment_steps
        ):
            raise ValueError(
                f"safety_replay_dataset={self.safety_replay_dataset!r} is set but safety_replay_ratio is 0: set "
                "safety_replay_ratio (e.g. 0.1) to mix the rows in, safety_lisa_alignment_steps to train on them in "
                "Lisa's alignment states, or drop the replay data set."
            )
        check_utility_fields(self)
        if self.bf16 is None and not self.fp16:
            self.bf16 = resolve_bf16(self.use_cpu)
        super().__post_init__()
        if self.safety_mode is not None:
            check_mode(self.safety_mode, where="safety_mode")
        if self.safety_mask is not None and self.safety_mode is None:
            raise ValueError(
                f"safety_mask={self.safety_mask!r} is set but safety_mode is not: pass safety_mode='freeze' (SPA) or "
                "safety_mode='train_only' (SET)."
            )
        check_fingerprint_policy(self.safety_fingerprint_check, where="safety_fingerprint_check")
        if self.safety_eval_steps is not None and self.safety_eval_steps <= 0:
            raise ValueError(f"safety_eval_steps must be a positive int or None, got {self.safety_eval_steps}.")


def _nonnegative_int(args: object, name: str) -> int:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
    return value


def _nonnegative_float(args: object, name: str) -> float:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def check_defense_fields(args: object) -> None:
    """Check the Lisa and Booster fields of a `SafetySFTConfig` (also called by the protections built from them).

    Raises:
        ValueError: a negative or non-integer step count, a negative weight, Lisa without task steps or next to
            replay mixing, Booster fields without ``safety_booster_lambda``.
    """
    align = _nonnegative_int(args, "safety_lisa_alignment_steps")
    task = _nonnegative_int(args, "safety_lisa_task_steps")
    _nonnegative_int(args, "safety_lisa_proximal_after")
    _nonnegative_float(args, "safety_lisa_rho")
    lamb = _nonnegative_float(args, "safety_booster_lambda")
    _nonnegative_float(args, "safety_booster_alpha")
    if align and not task:
        raise ValueError(
            f"safety_lisa_alignment_steps={align} needs safety_lisa_task_steps > 0: Lisa alternates that many "
            "alignment steps with task steps (the reference script uses 100 and 900)."
        )
    if task and not align:
        raise ValueError(
            f"safety_lisa_task_steps={task} is set but safety_lisa_alignment_steps is 0: set both to turn Lisa on "
            "(e.g. 100 and 900), or neither."
        )
    if align and float(getattr(args, "safety_replay_ratio", 0.0) or 0.0):
        raise ValueError(
            "Lisa (safety_lisa_alignment_steps > 0) trains on the replay rows in its alignment states instead of mixing "
            "them into the task stream: set safety_replay_ratio=0."
        )
    if getattr(args, "safety_booster_harmful_dataset", None) is not None and not lamb:
        raise ValueError(
            f"safety_booster_harmful_dataset={args.safety_booster_harmful_dataset!r} is set but safety_booster_lambda "
            "is 0: set safety_booster_lambda (the reference uses 5) or drop the harmful data set."
        )


def check_utility_fields(args: object) -> None:
    """Check the utility-aware SET fields of a `SafetySFTConfig`.

    Raises:
        ValueError: a negative or non-finite ratio or KL weight, a non-positive generation budget, utility rows or a KL
            weight with the ratio set to 0, or utility rows asked for outside ``safety_mode="train_only"``.
    """
    ratio = getattr(args, "safety_utility_ratio", None)
    if ratio is not None:
        _nonnegative_float(args, "safety_utility_ratio")
    kl = _nonnegative_float(args, "safety_kl_weight")
    budget = getattr(args, "safety_utility_max_new_tokens", 64)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"safety_utility_max_new_tokens must be a positive int, got {budget!r}.")
    mode = getattr(args, "safety_mode", None)
    source = getattr(args, "safety_utility_dataset", None)
    if ratio is not None and ratio > 0 and mode != "train_only":
        raise ValueError(
            f"safety_utility_ratio={ratio} mixes utility rows into SET training, but safety_mode={mode!r}: use "
            "safety_mode='train_only' (with a mask) or drop the ratio."
        )
    if ratio == 0 and (source is not None or kl):
        what = f"safety_utility_dataset={source!r}" if source is not None else f"safety_kl_weight={kl}"
        raise ValueError(
            f"{what} is set but safety_utility_ratio is 0 (utility rows off): set safety_utility_ratio (e.g. 1) or "
            "drop it."
        )
    if mode != "train_only" and (source is not None or kl):
        what = f"safety_utility_dataset={source!r}" if source is not None else f"safety_kl_weight={kl}"
        raise ValueError(f"{what} belongs to utility-aware SET: it needs safety_mode='train_only'.")


_BF16_INFO_SHOWN = False


def resolve_bf16(use_cpu: bool = False) -> bool:
    """Whether to train in bf16 when the user did not say: True where a bf16-capable accelerator will run the training,
    False on CPU (CPU-only machines, or ``use_cpu=True``). Logs the choice once per process when it differs from TRL's
    default (``bf16=True``)."""
    global _BF16_INFO_SHOWN
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if not use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        return True
    if not _BF16_INFO_SHOWN:
        _BF16_INFO_SHOWN = True
        reason = "use_cpu=True" if use_cpu else "no bf16-capable accelerator found"
        logger.info(
            "bf16 not set: training in float32 (%s). Pass --bf16 true (with --use_cpu true on a CPU-only machine) "
            "to use bf16 autocast anyway.",
            reason,
        )
    return False
