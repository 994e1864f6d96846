"""The TRL SFT entry point (examples/sft_safety.py and `peft-safety train`): TRL's flags, YAML configs, QLoRA, checks
before loading, and SET/SPA end to end, offline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max_steps", "3", "--activation_checkpointing", "false", "--max_length", "64",
          "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no",
          "--learning_rate", "1e-2", "--weight_decay", "0.1"]  # fmt: skip


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


def test_every_flag_of_trl_sft_is_accepted():
    """The parser is TRL's own script parser plus the safety_* fields: nothing of `trl sft` is missing."""
    from trl.scripts.sft import make_parser

    from peft_safety.recipes.sft import make_sft_parser

    def dests(parser):
        return {a.dest for a in parser._actions if a.dest != "help"}

    trl_flags, ours = dests(make_parser()), dests(make_sft_parser())
    assert trl_flags <= ours, sorted(trl_flags - ours)
    known = {"safety_mask", "safety_mode", "safety_train_only_full_weights", "safety_verify", "safety_log_drift",
             "safety_eval_steps", "safety_fingerprint_check"}  # fmt: skip
    extra = ours - trl_flags
    assert known <= extra and all(d.startswith("safety_") for d in extra), sorted(extra)


def test_yaml_config_and_command_line_precedence(tmp_path):
    from peft_safety.recipes.sft import parse_sft_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_name_or_path: some/model\ndataset_name: data.jsonl\noutput_dir: out\nsafety_mask: m\n"
        "safety_mode: freeze\nuse_peft: true\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\nlearning_rate: 0.003\n"
        "load_in_4bit: true\npacking: true\nenv:\n  PEFT_SAFETY_TEST_ENV: from-yaml\n"
    )
    script, training, model, mixture = parse_sft_args(["--config", str(recipe), "--lora_r", "8"])
    assert (script.dataset_name, training.output_dir, training.safety_mask, training.safety_mode) == (
        "data.jsonl", "out", "m", "freeze"
    )  # fmt: skip
    assert (model.use_peft, model.lora_r, model.lora_target_modules, model.load_in_4bit) == (
        True, 8, ["q_proj", "v_proj"], True
    )  # fmt: skip
    assert training.learning_rate == 0.003 and training.packing and mixture.datasets == []
    import os

    assert os.environ.pop("PEFT_SAFETY_TEST_ENV") == "from-yaml"  # TrlParser's `env:` section
    recipe.write_text("output_dir: out\nsafety_moed: freeze\n")
    with pytest.raises(ValueError, match="safety_moed"):
        parse_sft_args(["--config", str(recipe)])


def test_bf16_not_needed_on_cpu():
    """TRL's bf16=True default makes transformers refuse a CPU-only machine; unset, it follows the hardware."""
    from peft_safety.recipes.sft import parse_sft_args

    _, training, _, _ = parse_sft_args(["--output_dir", "o"])
    if not torch.cuda.is_available():
        assert training.bf16 is False
    _, training, _, _ = parse_sft_args(["--output_dir", "o", "--bf16", "true", "--use_cpu", "true"])
    assert training.bf16 is True  # an explicit choice is kept (CPU autocast)


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


def test_load_in_4bit_quantises_and_spa_holds(tiny, tmp_path):
    """--load_in_4bit gives bitsandbytes 4-bit layers (bitsandbytes runs 4-bit on CPU), and the LoRA update measured
    through the layers themselves (output on the identity minus the quantised base's output) is exactly zero on every
    masked entry and non-zero elsewhere."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_safety.mask import SafetyMask
    from peft_safety.recipes.sft import parse_sft_args, run_sft

    out = tmp_path / "qlora"
    argv = ["--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"),
            "--safety_mask", str(tiny / "mask"), "--safety_mode", "freeze", "--output_dir", str(out),
            "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj", "--lora_dropout", "0",
            "--load_in_4bit", *COMMON]  # fmt: skip
    trainer = run_sft(*parse_sft_args(argv))
    model = trainer.model
    assert getattr(model, "is_loaded_in_4bit", False) or getattr(model.base_model.model, "is_loaded_in_4bit", False)
    modules = dict(model.named_modules())
    quantised = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(n.endswith("q_proj.base_layer") for n in quantised) and any("mlp" in n for n in quantised)
    mask = SafetyMask.from_pretrained(tiny / "mask")
    # train mode, grad on: an eval-mode no-grad forward makes bitsandbytes repack 4-bit weights on CPU (INTEGRATION §6.2)
    model.train()
    checked = 0
    for name in mask.names:
        layer = modules[f"base_model.model.{name.removesuffix('.weight')}"]
        eye = torch.eye(layer.in_features)
        delta = (layer(eye).detach().float() - layer.base_layer(eye).detach().float()).T  # (out, in): LoRA's update
        frozen = mask.to_dense(name)
        assert torch.count_nonzero(delta[frozen]) == 0, f"{name}: LoRA moves masked entries"
        assert torch.count_nonzero(delta[~frozen]) > 0.9 * (~frozen).sum(), f"{name}: LoRA did not train"
        checked += int(frozen.sum())
    assert checked == mask.numel() > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "safety_mask.safetensors").is_file()


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


def _error_line(stderr: str) -> str:
    """The one error line (dependency warnings, e.g. transformers' FutureWarning, may precede it); no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if anything tries to load a model: the checks must come first."""
    import trl.trainer.utils as trl_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(trl_utils, "create_model_from_path", refuse)


def test_argument_errors_before_any_model_loads(tiny, tmp_path, capsys, no_model_loading):
    from peft_safety.cli.main import main

    model, data, mask = str(tiny / "model"), str(tiny / "data.jsonl"), str(tiny / "mask")
    cases = [
        (["--model_name_or_path", model], "no training data"),
        (["--model_name_or_path", model, "--dataset_name", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--model_name_or_path", model, "--dataset_name", str(tiny / "model" / "config.json.bak")], "no such file"),
        (["--dataset_name", data], "--model_name_or_path is required"),
        (["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", data], "no such folder"),
        (
            [
                "--model_name_or_path",
                model,
                "--dataset_name",
                data,
                "--safety_mask",
                str(tmp_path / "m"),
                "--safety_mode",
                "freeze",
            ],
            "--safety_mask",
        ),
        (["--model_name_or_path", model, "--dataset_name", data, "--safety_mask", mask], "safety_mode is not"),
        (
            [
                "--model_name_or_path",
                model,
                "--dataset_name",
                data,
                "--safety_mask",
                mask,
                "--safety_mode",
                "train_only",
                "--use_peft",
            ],
            "LoRA cannot express",
        ),
        (["--model_name_or_path", model, "--dataset_name", data, "--no_such_flag", "1"], "no_such_flag"),
    ]
    for argv, message in cases:
        code = main(["train", *argv, "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2, argv
        assert message in _error_line(err), (argv, err)


def test_hub_model_missing_from_offline_cache_names_repo_and_file(tiny, tmp_path, capsys, monkeypatch,
                                                                  no_model_loading):  # fmt: skip
    from peft_safety.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["train", "--model_name_or_path", "someone/tiny-model", "--dataset_name", str(tiny / "data.jsonl"),
                 "--output_dir", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    err = _error_line(err)
    assert "'someone/tiny-model'" in err and "'config.json'" in err and "HF_HUB_OFFLINE" in err


def test_yaml_recipe_end_to_end_through_the_cli(tiny, tmp_path):
    from peft_safety.cli.main import main
    from peft_safety.mask import SafetyMask

    out = tmp_path / "yaml-run"
    argv = ["train", "--config", str(ROOT / "examples" / "sft_safety.yaml"), "--model_name_or_path",
            str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"), "--safety_mask", str(tiny / "mask"),
            "--output_dir", str(out), "--max_steps", "2"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4  # from the YAML
    assert SafetyMask.from_pretrained(out).numel() == SafetyMask.from_pretrained(tiny / "mask").numel()


def test_safety_replay_from_the_command_line(example, tiny, tmp_path, monkeypatch):
    """`--safety_replay_dataset FILE --safety_replay_ratio R` mixes the file's rows into the training set the
    trainer really uses: for 32 task rows at R = 0.2 exactly round(32 * 0.2 / 0.8) = 8 replay rows, converted to the
    task data's prompt/completion format."""
    from peft_safety.training import replay as replay_mod

    replay_file = tmp_path / "refusals.jsonl"
    rows = [{"prompt": f"How do I break lock {i}?", "response": "I can't help with that."} for i in range(5)]
    replay_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    seen = {}
    real_mix = replay_mod.mix_replay

    def spy(train, replay, ratio, **kwargs):
        mixed = real_mix(train, replay, ratio, **kwargs)
        seen.update(n_task=len(train), ratio=ratio, rows=list(mixed))
        return mixed

    monkeypatch.setattr(replay_mod, "mix_replay", spy)
    base = ["--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"),
            "--safety_mask", str(tiny / "mask"), "--safety_mode", "freeze", "--use_peft", "--lora_target_modules",
            "q_proj", "v_proj", "--safety_replay_dataset", str(replay_file), *COMMON]  # fmt: skip
    assert example.main([*base, "--safety_replay_ratio", "0.2", "--output_dir", str(tmp_path / "o")]) == 0
    assert seen["n_task"] == 32 and seen["ratio"] == 0.2
    replayed = [r for r in seen["rows"] if r["completion"].strip() == "I can't help with that."]
    assert len(seen["rows"]) == 40 and len(replayed) == 8
    assert {r["prompt"] for r in replayed} <= {r["prompt"] for r in rows}
    # without a ratio the file is refused, not silently ignored
    seen.clear()
    try:
        code = example.main([*base, "--output_dir", str(tmp_path / "o2")])
    except (SystemExit, ValueError) as err:
        code = getattr(err, "code", 1)
    assert code not in (0, None) and not seen


def test_safety_replay_names_an_offline_data_set(example, tiny, tmp_path, monkeypatch):
    """`--safety_replay_dataset uncensorbench_refusal` reads that offline data set (here a stand-in for its rows)
    instead of asking the Hub for a data set of that name."""
    from peft_safety.sources import datasets as sources
    from peft_safety.training import replay as replay_mod

    asked = []
    real_load_rows = sources.load_rows

    def fake_load_rows(name, *args, **kwargs):
        asked.append(name)
        if name != "uncensorbench_refusal":  # the task data file goes through the same loader
            return real_load_rows(name, *args, **kwargs)
        return [{"prompt": f"harmful {i}", "response": "I won't do that.", "id": str(i)} for i in range(3)]

    mixed = {}
    real_mix = replay_mod.mix_replay

    def spy(train, replay, ratio, **kwargs):
        out = real_mix(train, replay, ratio, **kwargs)
        mixed["rows"] = list(out)
        return out

    monkeypatch.setattr(sources, "load_rows", fake_load_rows)
    monkeypatch.setattr(replay_mod, "mix_replay", spy)
    argv = ["--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data.jsonl"),
            "--safety_replay_dataset", "uncensorbench_refusal", "--safety_replay_ratio", "0.5",
            "--use_peft", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", str(tmp_path / "o"),
            *COMMON]  # fmt: skip
    assert example.main(argv) == 0
    assert asked == [str(tiny / "data.jsonl"), "uncensorbench_refusal"]
    replayed = [r for r in mixed["rows"] if r["completion"].strip() == "I won't do that."]
    assert len(mixed["rows"]) == 64 and len(replayed) == 32  # 32 task rows at ratio 0.5
