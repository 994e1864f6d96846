"""``peft-safety train``: TRL's SFT script with a safety mask (SET: train only the mask; SPA: freeze it).

Every flag of ``trl sft`` (TRL's ``ScriptArguments``, ``SFTConfig``, ``ModelConfig`` and ``DatasetMixtureConfig``,
parsed by TRL's ``TrlParser``) plus ``--safety_mask`` / ``--safety_mode`` and the other ``--safety_*`` fields of
`SafetySFTConfig`; ``--config recipe.yaml`` reads the same flags from a YAML file (command-line flags win). The same
entry point as ``examples/sft_safety.py`` (`peft_safety.recipes.sft`). Examples::

    peft-safety train --model_name_or_path MODEL --dataset_name data.jsonl --safety_mask MASK_DIR \
        --safety_mode freeze --use_peft --lora_target_modules q_proj v_proj --output_dir out
    peft-safety train --config recipe.yaml --safety_mask MASK_DIR --safety_mode freeze
    accelerate launch --config_file examples/accelerate/ddp.yaml -m peft_safety.cli.main train --config recipe.yaml

Checked before the model loads: the data set (a Hub id or an existing .json/.jsonl/.csv/.parquet file), the model
folder or Hub id, the mask path and the mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

HELP = "TRL's SFT script with a mask: SET (train only the mask) or SPA (freeze it)"
OWN_PARSER = True
SLOW_HELP = True  # every TRL flag: the dataclasses live in transformers/trl, which import torch


def help_text(prog: str) -> str:
    from ..recipes.sft import make_sft_parser

    return make_sft_parser(prog).format_help()


def parse(argv: Sequence[str], prog: str = "peft-safety train") -> tuple[Any, ...]:
    from ..recipes.sft import parse_sft_args

    return parse_sft_args(argv, prog=prog)


def check(args: tuple[Any, ...]) -> None:
    from ..recipes.sft import check_sft_args
    from ._common import check_local_or_hub

    script_args, training_args, model_args, dataset_args = args
    check_sft_args(script_args, training_args, model_args, dataset_args)
    check_local_or_hub("--model_name_or_path", model_args.model_name_or_path, "config.json", model_args.model_revision)
    check_local_or_hub("--safety_mask", training_args.safety_mask, "safety_mask.safetensors")


def run(args: tuple[Any, ...]) -> int:
    from ..recipes.sft import run_sft

    script_args, training_args, model_args, dataset_args = args
    trainer = run_sft(script_args, training_args, model_args, dataset_args)
    if trainer.is_world_process_zero():
        mode = training_args.safety_mode or "no mask"
        print(f"peft-safety train: saved to {training_args.output_dir} (mode {mode})")
    return 0
