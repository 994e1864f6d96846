"""The TRL SFT entry point with a safety mask, shared by ``examples/sft_safety.py`` and ``peft-safety train``.

It is TRL's own ``trl/scripts/sft.py`` wiring, built from TRL's pieces: ``TrlParser`` over TRL's ``ScriptArguments``,
``ModelConfig`` and ``DatasetMixtureConfig``, with `SafetySFTConfig` (TRL's ``SFTConfig`` plus the ``safety_*``
fields) in place of ``SFTConfig``; ``get_quantization_config`` and ``get_peft_config`` build the bitsandbytes and LoRA
configs from ``--load_in_4bit``/``--load_in_8bit`` and ``--use_peft``/``--lora_*``; the model is passed by name so that
the trainer loads it with TRL's loader (``model_init_kwargs``, device map, quantization). So every flag of TRL's SFT
script works, ``--config recipe.yaml`` included, and a usual TRL command line gains ``--safety_mask DIR
--safety_mode freeze`` and nothing else changes.

The current TRL no longer has ``get_kbit_device_map``: its model loader picks the device map itself (none on CPU,
``"auto"`` on one GPU, none under DDP/DeepSpeed, where each process holds its copy).

This module imports trl only inside its functions.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._files import is_local_path
from ..errors import SafetyError, SafetyFileNotFoundError, SafetyImportError

logger = logging.getLogger(__name__)

__all__ = [
    "check_sft_args",
    "load_sft_dataset",
    "make_sft_parser",
    "parse_sft_args",
    "run_sft",
    "sft_dataclasses",
    "with_use_cpu",
]

_LOCAL_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def sft_dataclasses() -> tuple[type, type, type, type]:
    """``(trl.ScriptArguments, SafetySFTConfig, trl.ModelConfig, trl.DatasetMixtureConfig)``: TRL's SFT script
    dataclasses with `SafetySFTConfig` in place of ``SFTConfig``.

    Raises:
        ImportError: trl is not installed (the ``[trl]`` extra).
    """
    try:
        from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments
    except ImportError as err:
        raise SafetyImportError("SFT training needs trl: pip install 'peft-safety[trl]'") from err
    from ..training.config import SafetySFTConfig

    return ScriptArguments, SafetySFTConfig, ModelConfig, DatasetMixtureConfig


def make_sft_parser(prog: str | None = None):
    """A ``trl.TrlParser`` over `sft_dataclasses` (``--config file.yaml`` supported, like ``trl sft``)."""
    from trl import TrlParser

    return TrlParser(
        sft_dataclasses(),
        prog=prog,
        description="TRL's SFT script with a safety mask. Every flag of `trl sft`, plus --safety_mask and "
        "--safety_mode (and the other --safety_* flags). --config FILE.yaml reads flags from a YAML file (keys are "
        "flag names, an `env:` mapping sets environment variables, a `datasets:` list mixes data sets); flags on "
        "the command line win.",
    )


def _has_accelerator() -> bool:
    """Whether this machine has a device a distributed run would use instead of the CPU (CUDA, XPU, MPS)."""
    import torch

    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def with_use_cpu(argv: Sequence[str], world_size: int, has_accelerator: bool) -> list[str]:
    """``argv`` with ``--use_cpu true`` added when several processes were launched (``WORLD_SIZE > 1``, by
    ``torchrun`` or ``accelerate launch``) on a machine without an accelerator and the command line does not set
    ``--use_cpu`` itself.

    Without it transformers sets up no CPU process group: every process trains on its own, all of them write the
    same output folder, and the launcher exits 0. With it, each rank joins one gloo group (DDP on CPU).
    """
    argv = list(argv)
    if world_size <= 1 or has_accelerator or any(a == "--use_cpu" or a.startswith("--use_cpu=") for a in argv):
        return argv
    logger.warning(
        "WORLD_SIZE=%d and no GPU: adding --use_cpu true, so that the %d processes form one gloo (CPU) process group",
        world_size,
        world_size,
    )
    return [*argv, "--use_cpu", "true"]


def parse_sft_args(argv: Sequence[str] | None = None, prog: str | None = None) -> tuple[Any, Any, Any, Any]:
    """Parse a TRL SFT command line (and its ``--config`` YAML file) into ``(script_args, training_args, model_args,
    dataset_args)``; unknown flags and unknown YAML keys are errors.

    Launched as several processes on a machine without an accelerator, ``--use_cpu true`` is added unless the command
    line sets ``--use_cpu`` (see `with_use_cpu`); ``--use_cpu false`` there is refused.

    Raises:
        SafetyError: ``WORLD_SIZE > 1``, no accelerator, and ``--use_cpu false``: the processes would train
            independently into one output folder.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    world = _world_size()
    accelerator = _has_accelerator() if world > 1 else False
    parsed = tuple(make_sft_parser(prog).parse_args_and_config(with_use_cpu(argv, world, accelerator)))
    if world > 1 and not accelerator and not getattr(parsed[1], "use_cpu", False):
        raise SafetyError(
            f"WORLD_SIZE={world} but this machine has no GPU, and --use_cpu is false: the {world} processes would each "
            "train on their own and write the same output folder. Pass --use_cpu true (DDP over a gloo process group "
            "on the CPU), or launch one process."
        )
    return parsed


def check_sft_args(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any = None) -> None:
    """Every check that needs no model: data source, model name, mask file, modes. Run before anything loads.

    Raises:
        ValueError: no data set or no model given, a local data file of an unsupported type, a mask with LoRA in
            ``train_only`` mode.
        FileNotFoundError: a local data file or mask path that does not exist (a path, not a Hub id).
    """
    datasets = getattr(dataset_args, "datasets", None)
    if not datasets and not script_args.dataset_name:
        raise SafetyError(
            "no training data: pass --dataset_name (a Hub id, an offline data set name, or a local "
            ".json/.jsonl/.csv/.parquet file) or a `datasets:` list in the --config YAML file."
        )
    name = script_args.dataset_name
    if name and not datasets and _looks_like_path(name):
        if not os.path.exists(name):
            raise SafetyFileNotFoundError(f"--dataset_name {name!r}: no such file or folder.")
        if os.path.isfile(name) and os.path.splitext(name)[1].lower() not in _LOCAL_KINDS:
            raise SafetyError(f"--dataset_name {name!r}: unsupported file type; use .json, .jsonl, .csv or .parquet.")
    if not model_args.model_name_or_path:
        raise SafetyError("--model_name_or_path is required (a Hub id or a local model folder).")
    if _looks_like_path(model_args.model_name_or_path) and not os.path.exists(model_args.model_name_or_path):
        raise SafetyFileNotFoundError(f"--model_name_or_path {model_args.model_name_or_path!r}: no such folder.")
    mask = getattr(training_args, "safety_mask", None)
    if mask and _looks_like_path(mask) and not os.path.exists(mask):
        raise SafetyFileNotFoundError(
            f"--safety_mask {mask!r}: no such folder or file (give a folder with safety_mask.safetensors, the file, or "
            "a Hub repo id)."
        )
    if mask and training_args.safety_mode == "train_only" and model_args.use_peft:
        raise SafetyError(
            "--safety_mode train_only trains only the mask's entries, which LoRA cannot express: drop --use_peft (a SET "
            "adapter is built from the mask), or use --safety_mode freeze for SPA with LoRA."
        )


def _looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id: the package's one rule, `peft_safety._files.is_local_path`."""
    return is_local_path(name)


def load_sft_dataset(name: str, config: str | None = None, streaming: bool = False):
    """A ``DatasetDict`` of training rows.

    A local ``.json``/``.jsonl``/``.csv``/``.parquet`` file or a named offline data set of
    `peft_safety.sources.datasets` (e.g. ``forgelm_chat``) is read by `peft_safety.sources.datasets.load_rows` (the
    one loader of rows, shared with scoring and safety replay) and becomes the ``train`` split, rows as stored. A Hub
    id or a folder keeps TRL's script behaviour, ``datasets.load_dataset(name, name=config)`` with every split; so
    does streaming (an ``IterableDataset`` is not a list of rows).

    Raises:
        ValueError: a local file with another extension.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    from ..sources.datasets import DATA_SOURCES, load_rows

    if os.path.isfile(name):
        kind = _LOCAL_KINDS.get(os.path.splitext(name)[1].lower())
        if kind is None:
            raise SafetyError(f"Unsupported local dataset file {name!r}: use .json, .jsonl, .csv or .parquet.")
        if streaming:
            return load_dataset(kind, data_files={"train": name}, streaming=True)
        return DatasetDict({"train": Dataset.from_list(load_rows(name, normalize=False))})
    if name in DATA_SOURCES and not streaming:
        return DatasetDict({"train": Dataset.from_list(load_rows(name, normalize=False))})
    return load_dataset(name, name=config, streaming=streaming)


def run_sft(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any = None):
    """TRL's SFT script with `SafetySFTTrainer`: load the data, train, save (and push if asked).

    Args:
        script_args: ``trl.ScriptArguments`` (``--dataset_name``, splits, streaming).
        training_args: a `SafetySFTConfig` (every ``SFTConfig`` flag plus ``--safety_mask``/``--safety_mode``).
        model_args: ``trl.ModelConfig`` (model, dtype, attention, ``--load_in_4bit``/``--load_in_8bit``,
            ``--use_peft`` and the ``--lora_*`` flags).
        dataset_args: ``trl.DatasetMixtureConfig`` (a ``datasets:`` list in the YAML config), optional.

    Returns:
        The trained `SafetySFTTrainer`.

    Raises:
        ValueError: see `check_sft_args`, plus every check of `SafetySFTTrainer`.
    """
    from trl import get_dataset, get_peft_config, get_quantization_config

    from ..training.trainer import SafetySFTTrainer

    check_sft_args(script_args, training_args, model_args, dataset_args)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    if dataset_args is not None and dataset_args.datasets:
        dataset = get_dataset(dataset_args)  # TRL's mixture; takes precedence over --dataset_name, as in TRL
    else:
        dataset = load_sft_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    if script_args.dataset_train_split not in dataset:
        raise SafetyError(
            f"--dataset_train_split {script_args.dataset_train_split!r} is not a split of {script_args.dataset_name!r}; "
            f"it has {sorted(dataset)}."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise SafetyError(
                f"--eval_strategy {training_args.eval_strategy} needs the split --dataset_test_split "
                f"{script_args.dataset_test_split!r}, which the data set lacks (splits: {sorted(dataset)})."
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = SafetySFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()
    return trainer
