"""``peft-safety train``: SET or SPA training with TRL's SFT (a thin wrapper around `SafetySFTTrainer`).

Takes the same arguments as ``examples/sft_safety.py``: every ``SafetySFTConfig`` and TRL ``ModelConfig`` field, plus
``--dataset_name`` (Hub id or local .json/.jsonl/.csv/.parquet file). Example:

    peft-safety train --model_name_or_path MODEL --dataset_name data.jsonl --safety_mask MASK_DIR \
        --safety_mode freeze --use_peft --output_dir out
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

HELP = "run SET or SPA training (TRL SFT) with a mask"


@dataclass
class TrainDataArguments:
    dataset_name: str = field(metadata={"help": "Hub dataset id, or a local .json/.jsonl/.csv/.parquet file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub only)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})


def _dataclasses():
    try:
        from trl import ModelConfig
    except ImportError as err:
        raise ImportError("peft-safety train needs trl: pip install 'peft-safety[trl]'") from err
    from ..training.config import SafetySFTConfig

    return (TrainDataArguments, SafetySFTConfig, ModelConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from transformers import HfArgumentParser

    # copy the actions HfArgumentParser builds from the dataclasses onto the subcommand parser, so
    # `peft-safety train --safety_mode freeze ...` and the example script accept exactly the same flags
    helper = HfArgumentParser(_dataclasses())
    for action in helper._actions:
        if action.dest != "help":
            parser._add_action(action)


def _load_dataset(name: str, config: str | None, split: str):
    from datasets import load_dataset

    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            os.path.splitext(name)[1].lower()
        )
        if kind is None:
            raise ValueError(f"Unsupported local dataset file {name!r}: use .json, .jsonl, .csv or .parquet.")
        return load_dataset(kind, data_files=name, split="train")
    return load_dataset(name, config, split=split)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from ..training.trainer import SafetySFTTrainer

    values = vars(args)
    data_args, training_args, model_args = (
        dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values})
        for dtype in _dataclasses()
    )
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required")
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    dataset = _load_dataset(data_args.dataset_name, data_args.dataset_config, data_args.dataset_train_split)
    trainer = SafetySFTTrainer(
        model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    print(f"peft-safety train: saved to {training_args.output_dir} (mode {training_args.safety_mode})")
    return 0
