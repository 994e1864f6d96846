"""The TRL-style SFT entry point shared by ``examples/sft_safety.py`` and ``peft-safety train``.

Arguments are three dataclasses parsed by ``HfArgumentParser`` (or ``trl.TrlParser``): `SFTScriptArguments` (data),
`SafetySFTConfig` (TRL's ``SFTConfig`` plus the ``safety_*`` fields) and TRL's ``ModelConfig`` (model and LoRA).
So a usual TRL SFT command line gains ``--safety_mask DIR --safety_mode freeze`` and nothing else changes.
This module imports trl only inside its functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SFTScriptArguments", "load_sft_dataset", "run_sft", "sft_dataclasses"]


@dataclass
class SFTScriptArguments:
    """Data arguments (TRL's ``ScriptArguments`` fields that matter here, plus local files)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local .json/.jsonl/.csv/.parquet file."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (Hub only)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})


def sft_dataclasses() -> tuple[type, type, type]:
    """``(SFTScriptArguments, SafetySFTConfig, trl.ModelConfig)``, for ``HfArgumentParser``.

    Raises:
        ImportError: trl is not installed (the ``[trl]`` extra).
    """
    try:
        from trl import ModelConfig
    except ImportError as err:
        raise ImportError("SFT training needs trl: pip install 'peft-safety[trl]'") from err
    from ..training.config import SafetySFTConfig

    return SFTScriptArguments, SafetySFTConfig, ModelConfig


def load_sft_dataset(name: str, config: str | None = None, split: str = "train"):
    """A ``datasets.Dataset`` from a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or a Hub id.

    Raises:
        ValueError: a local file with another extension.
    """
    from datasets import load_dataset

    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
            os.path.splitext(name)[1].lower()
        )
        if kind is None:
            raise ValueError(f"Unsupported local dataset file {name!r}: use .json, .jsonl, .csv or .parquet.")
        return load_dataset(kind, data_files=name, split="train")
    return load_dataset(name, config, split=split)


def run_sft(script_args: SFTScriptArguments, training_args: Any, model_args: Any):
    """Load the model, tokenizer and data, train with `SafetySFTTrainer`, save (and push if asked).

    Args:
        script_args: `SFTScriptArguments`.
        training_args: a `SafetySFTConfig`.
        model_args: a ``trl.ModelConfig`` (``--use_peft`` and the ``--lora_*`` flags give a ``LoraConfig``).

    Returns:
        The trained `SafetySFTTrainer`.

    Raises:
        ValueError: ``dataset_name`` or ``model_name_or_path`` missing, plus every check of `SafetySFTTrainer`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from ..training.trainer import SafetySFTTrainer

    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required (a Hub id or a local .json/.jsonl/.csv/.parquet file).")
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required.")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    dataset = load_sft_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    trainer = SafetySFTTrainer(
        model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer
