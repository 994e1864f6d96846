"""``SafetySFTConfig``: TRL's ``SFTConfig`` plus the safety-mask fields (HfArgumentParser-compatible)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

try:
    from trl import SFTConfig
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("SafetySFTConfig needs trl: install it with `pip install 'peft-safety[trl]'`.") from err

from ..vocab import FINGERPRINT_POLICIES, MODES, check_fingerprint_policy, check_mode

__all__ = ["SafetySFTConfig", "resolve_bf16"]

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
        Seed of the replay-row order (defaults to ``seed``).
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

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.safety_replay_ratio) < 1.0:
            raise ValueError(
                f"safety_replay_ratio={self.safety_replay_ratio} must be in [0, 1): the share of replay rows in the "
                "training stream (0.1 = one replay row in ten)."
            )
        if self.safety_replay_dataset is not None and not self.safety_replay_ratio:
            raise ValueError(
                f"safety_replay_dataset={self.safety_replay_dataset!r} is set but safety_replay_ratio is 0: set "
                "safety_replay_ratio (e.g. 0.1) or drop the replay data set."
            )
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
