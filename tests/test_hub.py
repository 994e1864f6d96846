"""Hub I/O without network: a mocked HfApi records uploads; downloads resolve from a hand-made cache snapshot."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask, mask_from_bytes
from peft_safety.mask.hub import mask_model_card, push_mask_to_hub
from peft_safety.mask.serialization import MASK_FILENAME

NAME = "model.layers.0.mlp.up_proj.weight"


def _mask(**prov) -> SafetyMask:
    provenance = {"method": "wanda", "sparsity": 0.05, "seed": 1, "base_model": "org/base-model", **prov}
    return SafetyMask(
        {NAME: torch.tensor([1, 3], dtype=torch.int32)},
        {NAME: (8, 4), "lm_head.weight": (6, 4)},
        granularity=Neuron(0),
        provenance=provenance,
    )


def test_model_card_front_matter_and_body():
    card = mask_model_card(_mask(note="a|b"), repo_id="me/mask", extra_tags=["llama"])
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines() == [
        "library_name: peft-safety",
        'base_model: "org/base-model"',
        "tags:",
        '- "peft-safety"',
        '- "safety"',
        '- "safety-mask"',
        '- "wanda"',
        '- "llama"',
    ]
    assert "| method | wanda |" in body and "| sparsity | 0.05 |" in body
    assert "| note | a\\|b |" in body  # table cells are escaped
    assert "mlp.up_proj" in body and "density" in body  # the summary table
    assert "SafetyMask.from_pretrained('me/mask')" in body
    assert "selected units: 2 (Neuron(axis=0))" in body


def test_model_card_without_base_model():
    m = SafetyMask({}, {"w": (2, 2)}, provenance={})
    card = mask_model_card(m)
    assert "base_model" not in card.split("---")[1]
    assert "<repo_id>" in card
    override = mask_model_card(m, base_model='org/with"quote')
    assert 'base_model: "org/with\\"quote"' in override  # YAML-safe quoting
    with pytest.raises(TypeError, match="expects a SafetyMask"):
        mask_model_card({"w": [1]})


def test_push_records_commit_operations():
    m = _mask()
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="me/mask")
        push_mask_to_hub(m, "me/mask", private=True, token="tok", commit_message="hello")
    api_cls.assert_called_once_with(token="tok")
    api.create_repo.assert_called_once_with("me/mask", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    kwargs = api.create_commit.call_args.kwargs
    assert api.create_commit.call_args.args == ("me/mask",)
    assert kwargs["commit_message"] == "hello" and kwargs["create_pr"] is False and kwargs["revision"] is None
    ops = {op.path_in_repo: op for op in kwargs["operations"]}
    assert sorted(ops) == ["README.md", MASK_FILENAME]
    uploaded = mask_from_bytes(ops[MASK_FILENAME].path_or_fileobj)
    assert uploaded == m and uploaded.provenance == m.provenance
    assert ops["README.md"].path_or_fileobj.decode().startswith("---\nlibrary_name: peft-safety\n")


def test_push_to_hub_method_revision_and_pr():
    m = _mask()
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="user/mask")  # a namespace-less id resolves to user/...
        m.push_to_hub("mask", revision="v1", base_model="org/other")
        api.create_branch.assert_called_once_with("user/mask", branch="v1", exist_ok=True, repo_type="model")
        assert api.create_commit.call_args.args == ("user/mask",)
        card = api.create_commit.call_args.kwargs["operations"][1].path_or_fileobj.decode()
        assert 'base_model: "org/other"' in card
        api.reset_mock()
        m.push_to_hub("me/mask", revision="v1", create_pr=True)
        api.create_branch.assert_not_called()  # a PR targets an existing revision
        assert api.create_commit.call_args.kwargs["create_pr"] is True


def test_push_rejects_bad_inputs_before_touching_the_hub():
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        with pytest.raises(ValueError, match="repo_id must be a non-empty string"):
            push_mask_to_hub(_mask(), " ")
        with pytest.raises(TypeError, match="expects a SafetyMask"):
            push_mask_to_hub("mask", "me/mask")
    api_cls.assert_not_called()


def _fill_cache(cache, repo_id: str, mask: SafetyMask, commit: str = "a" * 40, branch: str = "main"):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    mask.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)


def test_from_pretrained_repo_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # never reach the network, even if imported early
    m = _mask()
    other = _mask(seed=2).restrict([NAME])
    _fill_cache(tmp_path, "me/toy-mask", m)
    _fill_cache(tmp_path, "me/toy-mask", other, commit="b" * 40, branch="v2")
    loaded = SafetyMask.from_pretrained("me/toy-mask", cache_dir=tmp_path)
    assert loaded == m and loaded.provenance == m.provenance
    v2 = SafetyMask.from_pretrained("me/toy-mask", revision="v2", cache_dir=tmp_path)
    assert v2 == other and v2.provenance["seed"] == 2
    with pytest.raises(FileNotFoundError):  # LocalEntryNotFoundError is a FileNotFoundError
        SafetyMask.from_pretrained("me/absent-mask", cache_dir=tmp_path)
