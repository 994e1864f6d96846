"""The command line's user-error paths, walked one by one, and the line between a user error and a crash.

Every wrong input a user can give a command (a flag, a path, a damaged file, a Hub id offline) must end in exactly one
line on stderr, exit code 2, no traceback, and a message that names the value or file; no model may load first.
Everything else (a bug raising ``ValueError``, ``KeyError`` or ``OSError`` deep inside a command) must propagate
with its traceback, because a one-line "user error" would hide it.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch

from peft_safety.cli.main import main
from peft_safety.mask import SafetyMask

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def no_model_loading(monkeypatch):
    import peft_safety.sources.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for name in ("load_model", "load_default_model", "ensure_default_model", "_load_folder"):
        monkeypatch.setattr(models, name, refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Masks, scores, data files and a SET adapter folder (tiny model), plus damaged copies."""
    from peft import get_peft_model

    from peft_safety import SafetyConfig
    from peft_safety.scoring.scores import Scores
    from peft_safety.testing import tiny_llama

    root = tmp_path_factory.mktemp("cli")
    base = tiny_llama(seed=0)
    base.save_pretrained(root / "base")
    q = "model.layers.0.self_attn.q_proj.weight"
    shape = tuple(dict(base.named_parameters())[q].shape)
    mask = SafetyMask({q: torch.tensor([0, 5], dtype=torch.int32)}, {q: shape}, provenance={"method": "snip"})
    mask.save_pretrained(root / "mask")
    SafetyMask({q: [1]}, {q: (shape[0], 2 * shape[1])}, provenance={}).save_pretrained(root / "other-shape")
    model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    model.base_model.model.name_or_path = str(root / "base")
    model.save_pretrained(root / "set")
    Scores({q: torch.rand(shape)}).to_safetensors(root / "scores.safetensors")
    (root / "rows.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    (root / "broken.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n{not json\n")
    (root / "dict.json").write_text(json.dumps({"prompt": "p"}))
    (root / "empty.jsonl").write_text("\n")
    (root / "zero.safetensors").write_bytes(b"")
    data = (root / "scores.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "devzero.safetensors").symlink_to("/dev/zero")
    (root / "mask-zero").mkdir()
    (root / "mask-zero" / "safety_mask.safetensors").write_bytes(b"")
    (root / "mask-trunc").mkdir()
    raw = (root / "mask" / "safety_mask.safetensors").read_bytes()
    (root / "mask-trunc" / "safety_mask.safetensors").write_bytes(raw[:-3])
    return root


def damage(root, what: str):
    """A copy of the SET adapter folder with one kind of damage."""
    folder = root / f"set-{what}"
    if folder.exists():
        return folder
    shutil.copytree(root / "set", folder, symlinks=True)
    cfg, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    text = cfg.read_text()
    if what == "cfg_empty":
        cfg.write_text("")
    elif what == "cfg_truncated":
        cfg.write_text(text[: len(text) // 2])
    elif what == "cfg_not_json":
        cfg.write_text("peft_type: SAFETY")
    elif what == "cfg_list":
        cfg.write_text("[]")
    elif what == "cfg_nested":
        cfg.write_text("[" * 100_000 + "]" * 100_000)
    elif what == "cfg_no_type":
        cfg.write_text(json.dumps({k: v for k, v in json.loads(text).items() if k != "peft_type"}))
    elif what == "cfg_unknown_type":
        cfg.write_text(json.dumps({**json.loads(text), "peft_type": "SAFTEY"}))
    elif what == "cfg_missing":
        cfg.unlink()
    elif what == "w_empty":
        weights.write_bytes(b"")
    elif what == "w_truncated":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif what == "w_devzero":
        weights.unlink()
        weights.symlink_to("/dev/zero")
    elif what == "w_missing":
        weights.unlink()
    else:  # pragma: no cover
        raise AssertionError(what)
    return folder


ADAPTER_DAMAGE = {
    "cfg_empty": "adapter_config.json is empty",
    "cfg_truncated": "truncated",
    "cfg_not_json": "is not valid JSON",
    "cfg_list": "must hold a JSON object",
    "cfg_nested": "nested too deeply",
    "cfg_no_type": "has no 'peft_type'",
    "cfg_unknown_type": "Did you mean 'SAFETY'",
    "cfg_missing": "not an adapter folder",
    "w_empty": "has 0 bytes",
    "w_truncated": "truncated",
    "w_devzero": "not a regular file",
    "w_missing": "no weights file",
}


@pytest.mark.parametrize("what", sorted(ADAPTER_DAMAGE))
@pytest.mark.parametrize("how", ["--adapter", "MODEL"])
def test_eval_names_the_damaged_adapter_file(files, what, how, capsys, no_model_loading):
    folder = damage(files, what)
    argv = ["eval", "default", "--adapter", str(folder)] if how == "--adapter" else ["eval", str(folder)]
    if how == "MODEL" and what == "cfg_missing":
        pytest.skip("without adapter_config.json the folder is a model folder, checked when it loads")
    assert main([*argv, "--harmful", "advbench", "--n", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert ADAPTER_DAMAGE[what] in line, line
    assert str(folder) in line  # the folder or the file in it is named


PATHS = [
    # (argv, expected text in the one line)
    (["inspect", "{root}/nope"], "no such file or folder"),
    (["inspect", "{root}/set"], "No safety_mask.safetensors"),
    (["inspect", "{root}/mask-zero"], "truncated file (0 bytes"),
    (["inspect", "{root}/mask-trunc"], "truncated"),
    (["inspect", "{root}/scores.safetensors"], "not a peft-safety mask file"),
    (["diff", "{root}/mask", "{root}/other-shape"], "belong to different models"),
    (["diff", "{root}/mask", "{root}/set"], "No safety_mask.safetensors"),
    (["compare", "{root}/mask", "{root}/mask", "--labels", "a"], "--labels has 1 entries for 2 masks"),
    (["compare", "{root}/mask", "{root}/other-shape", "--labels", "a", "a"], "--labels must be unique"),
    (["select", "{root}/zero.safetensors", "--fraction", "0.1", "--out", "{root}/o"], "has 0 bytes"),
    (["select", "{root}/truncated.safetensors", "--fraction", "0.1", "--out", "{root}/o"], "truncated"),
    (["select", "{root}/devzero.safetensors", "--fraction", "0.1", "--out", "{root}/o"], "not a regular file"),
    (["select", "{root}/missing.safetensors", "--k", "1", "--out", "{root}/o"], "no scores file at"),
    (
        ["select", "{root}/scores.safetensors", "--fraction", "2", "--out", "{root}/o"],
        "--fraction=2.0 is outside (0, 1]",
    ),
    (["select", "{root}/scores.safetensors", "--k", "0", "--out", "{root}/o"], "--k must be >= 1"),
    (["select", "{root}/scores.safetensors", "--k", "1", "--scope", "per_rows", "--out", "{root}/o"], "'per_row'"),
    (["select", "{root}/scores.safetensors", "--k", "1", "--exclude", "./nope", "--out", "{root}/o"], "--exclude"),
    (
        ["score", "default", "--data", "{root}/rows.jsonl", "--method", "snp", "--out", "{root}/o"],
        "Did you mean 'snip'",
    ),
    (["score", "default", "--data", "{root}/missing.jsonl", "--out", "{root}/o"], "does not exist"),
    (["score", "default", "--data", "{root}/scores.safetensors", "--out", "{root}/o"], "unsupported extension"),
    (["score", "default", "--data", "{root}/rows.jsonl", "--batch-size", "0", "--out", "{root}/o"], "--batch-size"),
    (["score", "default", "--data", "{root}/broken.jsonl", "--out", "{root}/o"], "line 2: not valid JSON"),
    (["score", "default", "--data", "{root}/dict.json", "--out", "{root}/o"], "expected a list of rows"),
    (["score", "default", "--data", "{root}/empty.jsonl", "--out", "{root}/o"], "holds no rows"),
    (["score", "{root}/no-model", "--data", "{root}/rows.jsonl", "--out", "{root}/o"], "no such file or folder"),
    (["eval", "default", "--harmful", "advbnch"], "Did you mean 'advbench'"),
    (["eval", "default", "--benign", "{root}/missing.csv"], "--benign"),
    (["eval", "default", "--judges", "wei2042"], "wei2042"),
    (["eval", "default", "--n", "0"], "--n and --n-utility must be >= 1"),
    (["eval", "{root}/no-model"], "no such file or folder"),
    (["push", "{root}/mask", "not a repo"], "is not a Hub repo id"),
    (["push", "{root}/mask", "me/a--b"], "is not a Hub repo id"),
    (["push", "{root}/nope", "me/mask"], "No such mask folder"),
    (["push", "{root}/mask", "me/mask", "--mode", "lora"], "mode='lora' is not valid"),
    (["push", "{root}/mask", "me/mask", "--subfolder", "../up"], "relative folder"),
    (["fetch", "--data", "harmbnch_test"], "Did you mean 'harmbench_test'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), PATHS, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _) in enumerate(PATHS)]
)
def test_every_user_error_is_one_line(files, argv, message, capsys, no_model_loading, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("the Hub was contacted"))
    code = main([a.format(root=files) for a in argv])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and message in line, line


TRAIN_PATHS = [
    (["--dataset_name", "{root}/missing.jsonl", "--model_name_or_path", "{root}/base"], "no such file or folder"),
    (["--dataset_name", "{root}/scores.safetensors", "--model_name_or_path", "{root}/base"], "unsupported file type"),
    (["--dataset_name", "{root}/rows.jsonl", "--model_name_or_path", "{root}/nope"], "--model_name_or_path"),
    (
        ["--dataset_name", "{root}/rows.jsonl", "--model_name_or_path", "{root}/base", "--safety_mask", "./nope",
         "--safety_mode", "freeze"],
        "--safety_mask './nope'",
    ),
    (
        ["--dataset_name", "{root}/rows.jsonl", "--model_name_or_path", "{root}/base", "--safety_mask", "{root}/mask",
         "--safety_mode", "train_only", "--use_peft"],
        "drop --use_peft",
    ),
    (["--dataset_name", "{root}/rows.jsonl", "--model_name_or_path", "{root}/base", "--config", "{root}/nope.yaml"],
     "nope.yaml"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), TRAIN_PATHS)
def test_train_user_errors_are_one_line(files, argv, message, capsys, no_model_loading, tmp_path):
    pytest.importorskip("trl")
    argv = ["train", "--output_dir", str(tmp_path / "out"), *[a.format(root=files) for a in argv]]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert message in line, line


# ------------------------------------------------------------------------------------------------ crashes
@pytest.mark.parametrize("error", [ValueError("bug"), KeyError("bug"), OSError("bug"), TypeError("bug")])
def test_a_bug_inside_a_command_keeps_its_traceback(files, error, monkeypatch, capsys):
    """The same exception types the old CLI turned into one-line "user errors" now propagate (exit code 1 from
    Python, with the traceback) when they do not come from a check."""
    from peft_safety.mask import SafetyMask as cls

    def broken(self):
        raise error

    monkeypatch.setattr(cls, "summary", broken)
    with pytest.raises(type(error)) as info:
        main(["inspect", str(files / "mask")])
    assert info.value is error
    assert ": error: " not in capsys.readouterr().err


def test_a_bug_deep_inside_selection_is_not_a_user_error(files, monkeypatch):
    import peft_safety.scoring.selection as selection

    def broken(*args, **kwargs):
        return {}["missing-key"]  # a KeyError as a bug raises it

    monkeypatch.setattr(selection, "_select_indices", broken)
    with pytest.raises(KeyError, match="missing-key"):
        main(["select", str(files / "scores.safetensors"), "--k", "1", "--out", str(files / "sel")])


def test_the_error_classes_are_the_builtin_ones_too():
    """Code (and tests) that catch ValueError, TypeError, FileNotFoundError or ImportError keep working."""
    from peft_safety import errors

    assert issubclass(errors.SafetyError, ValueError)
    assert issubclass(errors.SafetyTypeError, TypeError) and issubclass(errors.SafetyTypeError, errors.SafetyError)
    assert issubclass(errors.SafetyFileNotFoundError, FileNotFoundError)
    assert issubclass(errors.SafetyImportError, ImportError)
    assert issubclass(errors.HubUnreachableError, ConnectionError)
    assert errors.is_network_error(ConnectionRefusedError()) and not errors.is_network_error(ValueError("x"))


# ------------------------------------------------------------------------------------------------ output
def test_inspect_escapes_text_the_terminal_cannot_encode(tmp_path, monkeypatch):
    mask = SafetyMask({"a.weight": [0]}, {"a.weight": (2, 2)}, provenance={"note": "caf\u00e9 \udcff \u2603"})
    mask.save_pretrained(tmp_path / "m")
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", errors="strict")
    monkeypatch.setattr("sys.stdout", stream)
    assert main(["inspect", str(tmp_path / "m")]) == 0
    stream.flush()
    out = raw.getvalue().decode("ascii")
    assert "caf\\xe9 \\udcff \\u2603" in out


def test_a_value_that_is_not_a_path_is_a_hub_id_only_by_the_hub_rule():
    from peft_safety._files import is_local_path

    assert not is_local_path("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_local_path("gpt2")
    for local in ("./mask", "../m", "~/m", "/abs/m", "a/b/c", "rows.jsonl", "m.safetensors", "a--b", "a..b", "a b",
                  "x" * 97, "me/" + "y" * 97, "a\\b"):  # fmt: skip
        assert is_local_path(local), local
    assert is_local_path(os.getcwd())
