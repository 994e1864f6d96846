"""The TRL-style script (examples/sft_safety.py) and `peft-safety train` run SET and SPA end to end, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max_steps", "3", "--bf16", "false", "--activation_checkpointing", "false", "--max_length", "64",
          "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
          "--learning_rate", "1e-2", "--weight_decay", "0.1", "--use_cpu", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sft_safety_example", ROOT / "examples" / "sft_safety.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, example):
    folder = tmp_path_factory.mktemp("tiny")
    assert example.main(["--make_tiny", str(folder)]) == 0
    return folder


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_example_spa_full_finetuning_keeps_mask_bit_identical(example, tiny, tmp_path):
    from peft_safety.mask import SafetyMask

    out = tmp_path / "spa-full"
    argv = ["--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"),
            "--safety_mask", str(tiny / "mask"), "--safety_mode", "freeze", "--output_dir", str(out), *COMMON]  # fmt: skip
    assert example.main(argv) == 0
    before, after = _weights(tiny / "model"), _weights(out)
    mask = SafetyMask.from_pretrained(tiny / "mask")
    assert (out / "safety_mask.safetensors").is_file()  # the mask travels with the full weights
    moved = 0
    for name in mask.names:
        frozen = mask.to_dense(name)
        assert torch.equal(after[name][frozen], before[name][frozen]), name
        moved += int((after[name][~frozen] != before[name][~frozen]).sum())
    assert moved > 0


def test_cli_train_set_adapter_changes_only_mask_entries(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_safety  # noqa: F401  (registers the SAFETY type)
    from peft_safety.cli.main import main
    from peft_safety.mask import SafetyMask

    out = tmp_path / "set"
    argv = ["train", "--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"),
            "--safety_mask", str(tiny / "mask"), "--safety_mode", "train_only", "--output_dir", str(out), *COMMON]  # fmt: skip
    assert main(argv) == 0
    assert (out / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny / "model")
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    mask = SafetyMask.from_pretrained(tiny / "mask")
    params = dict(merged.named_parameters())
    changed = 0
    for name, ref in reference.items():
        if name in mask:
            inside = mask.to_dense(name)
            assert torch.equal(params[name][~inside], ref[~inside]), name
            changed += int((params[name][inside] != ref[inside]).sum())
        else:
            assert torch.equal(params[name], ref), name
    assert changed > 0


def test_missing_dataset_is_a_clear_error(tiny, tmp_path):
    from peft_safety.cli.main import main

    argv = ["train", "--model_name_or_path", str(tiny / "model"), "--output_dir", str(tmp_path / "o"), *COMMON]
    assert main(argv) == 2
