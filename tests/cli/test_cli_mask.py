"""`peft-safety inspect | diff | push` through the CLI entry point."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from peft_safety.cli.main import main
from peft_safety.mask import Neuron, SafetyMask, Weight

UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
SHAPES = {UP: (8, 4), DOWN: (4, 8), "lm_head.weight": (6, 4)}


@pytest.fixture
def masks(tmp_path):
    a = SafetyMask({UP: torch.tensor([0, 1, 2, 3]), DOWN: torch.tensor([5])}, SHAPES, provenance={"method": "snip"})
    # b covers row 0 of up (entries 0..3) as a neuron, plus entry 5 of down
    b = SafetyMask(
        {UP: torch.tensor([0]), DOWN: torch.tensor([5, 6])},
        SHAPES,
        granularity={UP: Neuron(0), DOWN: Weight(), "lm_head.weight": Weight()},
        provenance={"method": "wanda"},
    )
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    return tmp_path / "a", tmp_path / "b"


def test_inspect_text(masks, capsys):
    assert main(["inspect", str(masks[0])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SafetyMask(parameters=2/3, units=5, numel=5")
    assert "provenance" in out and "method" in out and "snip" in out
    assert "mlp.up_proj" in out and "mlp.down_proj" in out and "lm_head" in out
    assert "layer  params  units  entries" in out


def test_inspect_json(masks, capsys):
    assert main(["inspect", str(masks[1] / "safety_mask.safetensors"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["units"] == 3 and data["numel"] == 6 and data["total_numel"] == 88
    assert data["per_layer"]["0"]["numel"] == 4 and data["per_module"]["mlp.down_proj"]["units"] == 2
    assert data["provenance"]["method"] == "wanda"


def test_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "No safety_mask.safetensors" in capsys.readouterr().err
    (tmp_path / "safety_mask.safetensors").write_bytes(b"\x01")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "truncated file" in capsys.readouterr().err


def test_diff_json(masks, capsys):
    assert main(["diff", str(masks[0]), str(masks[1]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # up: A = entries 0..3 = B's row 0 -> 4/4; down: A = {5}, B = {5, 6} -> 1/2; globally 5/6
    assert data["intersection"] == 5 and data["union"] == 6 and data["iou"] == pytest.approx(5 / 6)
    assert data["per_module"]["mlp.up_proj"]["iou"] == 1.0
    assert data["per_module"]["mlp.down_proj"]["iou"] == 0.5
    assert data["per_layer"]["0"]["iou"] == 1.0 and data["per_layer"]["1"]["iou"] == 0.5
    assert data["numel_a"] == 5 and data["numel_b"] == 6


def test_diff_text_and_symmetry(masks, capsys):
    assert main(["diff", str(masks[0]), str(masks[1])]) == 0
    out = capsys.readouterr().out
    assert "IoU 0.8333" in out and "mlp.down_proj" in out and "0.5000" in out
    assert main(["diff", str(masks[1]), str(masks[0])]) == 0
    assert "IoU 0.8333" in capsys.readouterr().out


def test_diff_shape_mismatch_exit_2(masks, tmp_path, capsys):
    SafetyMask({UP: torch.tensor([1])}, {UP: (4, 8)}).save_pretrained(tmp_path / "c")
    assert main(["diff", str(masks[0]), str(tmp_path / "c")]) == 2
    assert "has shape (8, 4) in one mask and (4, 8)" in capsys.readouterr().err


def _missing(repo_id, filename, **kwargs):
    from huggingface_hub.errors import RemoteEntryNotFoundError

    raise RemoteEntryNotFoundError(f"{filename} not in {repo_id}", response=mock.Mock(headers={}))


def test_push(masks, capsys):
    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.hf_hub_download", _missing):
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/mask")
        api.create_commit.return_value = mock.Mock(pr_url=None, commit_url="https://hub/me/mask/commit/1")
        code = main(["push", str(masks[0]), "me/mask", "--private", "--commit-message", "m1"])
    assert code == 0
    assert "https://hub/me/mask/commit/1" in capsys.readouterr().out
    api.create_repo.assert_called_once_with("me/mask", private=True, exist_ok=True, repo_type="model")
    kwargs = api.create_commit.call_args.kwargs
    assert kwargs["commit_message"] == "m1"
    assert sorted(op.path_in_repo for op in kwargs["operations"]) == ["README.md", "safety_mask.safetensors"]


def test_push_subfolder_and_mode(masks, capsys):
    from huggingface_hub import ModelCard

    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.hf_hub_download", _missing):
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/spa")
        api.create_commit.return_value = mock.Mock(pr_url=None, commit_url="u")
        assert main(["push", str(masks[0]), "me/spa", "--subfolder", "mask", "--mode", "SPA"]) == 0
    ops = {op.path_in_repo: op for op in api.create_commit.call_args.kwargs["operations"]}
    assert sorted(ops) == ["README.md", "mask/safety_mask.safetensors"]
    card = ModelCard(ops["README.md"].path_or_fileobj.decode())
    assert card.data.peft_safety == {"mode": "SPA", "mask_path": "mask/safety_mask.safetensors"}
    assert "subfolder='mask'" in card.text
    capsys.readouterr()
    with mock.patch("huggingface_hub.HfApi"):
        assert main(["push", str(masks[0]), "me/spa", "--mode", "lora"]) == 2
    assert "mode=" in capsys.readouterr().err


def test_push_missing_folder_exit_2(tmp_path, capsys):
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        assert main(["push", str(tmp_path / "nope"), "me/mask"]) == 2
    api_cls.assert_not_called()
    assert "No such mask folder" in capsys.readouterr().err
