"""CLI arguments, names and paths are checked before any model loads; user, network and Hub errors are one line on
stderr with exit code 2; ``--device auto`` / ``--dtype auto`` follow the hardware."""

from __future__ import annotations

import json

import pytest

from peft_safety.cli.main import main
from peft_safety.mask import SafetyMask


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def mask_dir(tmp_path):
    folder = tmp_path / "mask"
    SafetyMask(indices={"a.weight": [0, 3]}, shapes={"a.weight": (2, 2)}, provenance={}).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import peft_safety.sources.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_model", "load_default_model", "ensure_default_model"):
        monkeypatch.setattr(models, name, refuse)


def test_push_without_network_is_one_line(mask_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused at once
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code = main(["push", str(mask_dir), "me/mask"])
    line = _error_line(capsys.readouterr().err)
    assert code == 2
    assert "'me/mask'" in line and "could not reach the Hugging Face Hub" in line and "No file was uploaded" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["push", "{mask}", "not a repo"], "is not a Hub repo id"),
        (["push", "{tmp}/nope", "me/mask"], "No such mask folder"),
        (["inspect", "{tmp}/nope"], "no such file or folder"),
        (["diff", "{mask}", "{tmp}"], "safety_mask.safetensors"),
        (["select", "{tmp}/scores.safetensors", "--fraction", "0.1", "--out", "{tmp}/o"], "scores file"),
        (
            ["score", "default", "--data", "{tmp}/rows.jsonl", "--method", "snp", "--out", "{tmp}/o"],
            "Did you mean 'snip'",
        ),
        (["score", "default", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "does not exist"),
        (["score", "default", "--data", "{tmp}/rows.jsonl", "--fraction", "2", "--out", "{tmp}/o"], "--fraction"),
        (["score", "{tmp}/no-model", "--data", "{tmp}/rows.jsonl", "--out", "{tmp}/o"], "no such file or folder"),
        (["eval", "default", "--harmful", "advbnch"], "Did you mean 'advbench'"),
        (["eval", "default", "--benign", "{tmp}/missing.csv"], "--benign"),
        (["eval", "default", "--judges", "wei2042"], "wei2042"),
        (["eval", "{tmp}/no-model"], "MODEL"),
        (["eval", "default", "--adapter", "{tmp}/no-adapter"], "--adapter"),
        (["fetch", "--data", "harmbnch_test"], "Did you mean 'harmbench_test'"),
    ],
)
def test_bad_arguments_fail_before_loading(argv, message, tmp_path, mask_dir, capsys, no_model_loading):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    argv = [a.format(tmp=tmp_path, mask=mask_dir) for a in argv]
    code = main(argv)
    line = _error_line(capsys.readouterr().err)
    assert code == 2 and message in line, line


def test_offline_hub_id_missing_from_cache_names_repo_and_file(tmp_path, capsys, monkeypatch, no_model_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "someone/small-model", "--harmful", "advbench"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "'someone/small-model'" in line and "'config.json'" in line and "HF_HUB_OFFLINE" in line
    assert main(["inspect", "someone/a-mask"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "'someone/a-mask'" in line and "'safety_mask.safetensors'" in line


def test_eval_device_and_dtype_default_to_auto():
    import torch

    from peft_safety.cli._common import resolve_device, resolve_dtype
    from peft_safety.cli.main import command_parser

    args = command_parser("eval").parse_args(["default"])
    assert (args.device, args.dtype) == ("auto", "auto")
    device = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert device == expected and resolve_device("cpu") == "cpu"
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto", device) == (torch.bfloat16 if bf16 else torch.float32)
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SAFETY_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["inspect", str(tmp_path / "nope")])
