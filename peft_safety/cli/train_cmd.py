"""``peft-safety train``: SET or SPA training with TRL's SFT (a thin wrapper around `SafetySFTTrainer`).

Takes the same arguments as ``examples/sft_safety.py``: every ``SafetySFTConfig`` and TRL ``ModelConfig`` field, plus
``--dataset_name`` (Hub id or local .json/.jsonl/.csv/.parquet file). Example:

    peft-safety train --model_name_or_path MODEL --dataset_name data.jsonl --safety_mask MASK_DIR \
        --safety_mode freeze --use_peft --output_dir out
"""

from __future__ import annotations

import argparse

HELP = "run SET or SPA training (TRL SFT) with a mask"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    from ..recipes.sft import sft_dataclasses

    # copy the actions HfArgumentParser builds from the dataclasses onto the subcommand parser, so
    # `peft-safety train --safety_mode freeze ...` and the example script accept exactly the same flags
    helper = HfArgumentParser(sft_dataclasses())
    for action in helper._actions:
        if action.dest != "help":
            parser._add_action(action)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..recipes.sft import run_sft, sft_dataclasses

    values = vars(args)
    script_args, training_args, model_args = (
        dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values})
        for dtype in sft_dataclasses()
    )
    run_sft(script_args, training_args, model_args)
    print(f"peft-safety train: saved to {training_args.output_dir} (mode {training_args.safety_mode})")
    return 0
