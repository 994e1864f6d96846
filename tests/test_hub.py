"""Hub I/O without network: a mocked HfApi records uploads; downloads resolve from a hand-made cache snapshot."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask, mask_from_bytes
from peft_safety.mask.cards import write_card
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


def _card(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text)


def test_model_card_front_matter_and_body():
    text = mask_model_card(_mask(note="a|b"), repo_id="me/mask", extra_tags=["llama"])
    card = _card(text)
    assert card.data.library_name == "peft-safety"
    assert card.data.base_model == "org/base-model"
    assert card.data.tags == ["peft-safety", "safety", "safety-mask", "wanda", "llama"]
    body = card.text
    assert "| method | wanda |" in body and "| sparsity | 0.05 |" in body
    assert "| data_hash | not recorded |" in body  # the four essential fields are always stated
    assert "| note | a\\|b |" in body  # table cells are escaped
    assert "mlp.up_proj" in body and "density" in body  # the summary table
    assert "SafetyMask.from_pretrained('me/mask')" in body
    assert "import peft_safety" in body
    assert "selected units: 2 (Neuron(axis=0))" in body


def test_model_card_without_base_model():
    m = SafetyMask({}, {"w": (2, 2)}, provenance={})
    card = _card(mask_model_card(m))
    assert card.data.base_model is None
    assert "<repo_id>" in card.text
    override = _card(mask_model_card(m, base_model='org/with"quote'))
    assert override.data.base_model == 'org/with"quote'  # YAML-safe quoting by huggingface_hub
    with pytest.raises(TypeError, match="expects a SafetyMask"):
        mask_model_card({"w": [1]})


def _hub_files(files: dict[str, str], tmp_path):
    """A stand-in for hf_hub_download: serves `files` from a folder, raises EntryNotFoundError for others."""
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    calls = []

    def download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("revision")))
        if filename not in files:  # what the Hub answers for a missing file (HTTP 404)
            raise RemoteEntryNotFoundError(f"{filename} not in {repo_id}", response=mock.Mock(headers={}))
        return str(tmp_path / filename)

    return download, calls


def _push(mask, repo_id, tmp_path, files=None, **kwargs):
    download, calls = _hub_files(files or {}, tmp_path)
    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.hf_hub_download", download):
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id=kwargs.pop("resolved", repo_id))
        push_mask_to_hub(mask, repo_id, **kwargs)
    ops = {op.path_in_repo: op for op in api.create_commit.call_args.kwargs["operations"]}
    return api_cls, api, ops, calls


def test_push_records_commit_operations(tmp_path):
    m = _mask()
    api_cls, api, ops, _ = _push(m, "me/mask", tmp_path, private=True, token="tok", commit_message="hello")
    api_cls.assert_called_once_with(token="tok")
    api.create_repo.assert_called_once_with("me/mask", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    kwargs = api.create_commit.call_args.kwargs
    assert api.create_commit.call_args.args == ("me/mask",)
    assert kwargs["commit_message"] == "hello" and kwargs["create_pr"] is False and kwargs["revision"] is None
    assert sorted(ops) == ["README.md", MASK_FILENAME]
    uploaded = mask_from_bytes(ops[MASK_FILENAME].path_or_fileobj)
    assert uploaded == m and uploaded.provenance == m.provenance
    assert _card(ops["README.md"].path_or_fileobj.decode()).data.library_name == "peft-safety"


def test_push_to_hub_method_revision_and_pr(tmp_path):
    m = _mask()
    download, calls = _hub_files({}, tmp_path)
    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.hf_hub_download", download):
        api = api_cls.return_value
        api.create_repo.return_value = mock.Mock(repo_id="user/mask")  # a namespace-less id resolves to user/...
        m.push_to_hub("mask", revision="v1", base_model="org/other")
        api.create_branch.assert_called_once_with("user/mask", branch="v1", exist_ok=True, repo_type="model")
        assert api.create_commit.call_args.args == ("user/mask",)
        assert ("user/mask", "README.md", "v1") in calls  # the existing card is read from the target branch
        card = api.create_commit.call_args.kwargs["operations"][1].path_or_fileobj.decode()
        assert _card(card).data.base_model == "org/other"
        api.reset_mock()
        m.push_to_hub("me/mask", revision="v1", create_pr=True)
        api.create_branch.assert_not_called()  # a PR targets an existing revision
        assert api.create_commit.call_args.kwargs["create_pr"] is True


PEFT_CARD = """---
base_model: org/base-model
library_name: peft
pipeline_tag: text-generation
tags:
- base_model:adapter:org/base-model
- lora
- transformers
---

# Model Card for my adapter

Trained on my task data by me.

### Framework versions

- PEFT 0.21.2
"""


def test_push_mask_into_adapter_repo_keeps_one_card_for_both(tmp_path):
    adapter_config = json.dumps({"peft_type": "SAFETY", "mode": "train_only", "base_model_name_or_path": "org/base"})
    files = {"README.md": PEFT_CARD, "adapter_config.json": adapter_config}
    _, _, ops, calls = _push(_mask(), "me/adapter", tmp_path, files=files, subfolder="mask")
    assert {c[1] for c in calls} == {"README.md", "adapter_config.json"}  # read before anything is written
    assert sorted(ops) == ["README.md", f"mask/{MASK_FILENAME}"]
    card = _card(ops["README.md"].path_or_fileobj.decode())
    # the adapter's card is kept: its front matter and its text
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "org/base-model"
    assert {"lora", "transformers", "base_model:adapter:org/base-model"} <= set(card.data.tags)
    assert "Trained on my task data by me." in card.text and "- PEFT 0.21.2" in card.text
    # and one section describes the adapter and the mask
    assert {"peft-safety", "safety-mask", "set"} <= set(card.data.tags)
    assert card.data.peft_safety == {"mode": "SET", "mask_path": f"mask/{MASK_FILENAME}"}
    assert "import peft_safety" in card.text and "KeyError: 'SAFETY'" in card.text
    assert "PeftModel.from_pretrained(base, 'me/adapter')" in card.text
    assert "SafetyMask.from_pretrained('me/adapter', subfolder='mask')" in card.text
    assert "| method | wanda |" in card.text and "SET (`train_only`)" in card.text
    # pushing again replaces the section instead of adding a second one
    files2 = {"README.md": str(card), "adapter_config.json": adapter_config}
    _, _, ops2, _ = _push(_mask(method="snip"), "me/adapter", tmp_path / "again", files=files2, subfolder="mask")
    text2 = ops2["README.md"].path_or_fileobj.decode()
    assert text2.count("(peft-safety)\n") == 1 and "| method | snip |" in text2
    assert "Trained on my task data by me." in text2


@pytest.mark.parametrize("failure", ["network", "offline"])
def test_push_stops_when_the_existing_card_cannot_be_read(tmp_path, failure):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def broken(*args, **kwargs):
        if failure == "network":
            raise OSError("network down")
        # what hf_hub_download raises offline or without connection; it is an EntryNotFoundError too, and must
        # not be mistaken for "the repository has no README"
        raise LocalEntryNotFoundError("cannot reach the Hub")

    with mock.patch("huggingface_hub.HfApi") as api_cls, mock.patch("huggingface_hub.hf_hub_download", broken):
        api_cls.return_value.create_repo.return_value = mock.Mock(repo_id="me/mask")
        with pytest.raises(OSError, match=r"network down|nothing was uploaded"):
            push_mask_to_hub(_mask(), "me/mask")
    api_cls.return_value.create_commit.assert_not_called()


def test_push_rejects_bad_subfolder_and_mode(tmp_path):
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        for bad in ("../x", "/abs"):
            with pytest.raises(ValueError, match="relative folder"):
                push_mask_to_hub(_mask(), "me/mask", subfolder=bad)
        with pytest.raises(ValueError, match="mode="):
            push_mask_to_hub(_mask(), "me/mask", mode="lora")
    api_cls.assert_not_called()


def test_write_card_updates_a_saved_adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text(PEFT_CARD)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    mask = _mask()
    mask.save_pretrained(folder / "mask")
    write_card(folder, mode="SPA", mask_subfolder="mask", repo_id="me/spa")
    card = _card((folder / "README.md").read_text())
    assert "Trained on my task data by me." in card.text and card.data.library_name == "peft"
    assert "spa" in card.data.tags and card.data.peft_safety["mode"] == "SPA"
    assert "SPA (`freeze`)" in card.text and "adapter (`LORA`)" in card.text
    assert "SafetyMask.from_pretrained('me/spa', subfolder='mask')" in card.text
    assert "| base_model | org/base-model |" in card.text  # the mask was read from the subfolder
    # idempotent: a second call gives the same card
    before = (folder / "README.md").read_text()
    write_card(folder, mode="SPA", mask_subfolder="mask", repo_id="me/spa")
    assert (folder / "README.md").read_text() == before
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_card(tmp_path / "absent")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_card(folder)


def test_mask_subfolder_local_and_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    m = _mask()
    m.save_pretrained(tmp_path / "repo" / "mask")
    assert SafetyMask.from_pretrained(tmp_path / "repo", subfolder="mask") == m
    with pytest.raises(FileNotFoundError):
        SafetyMask.from_pretrained(tmp_path / "repo")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    repo = cache / "models--me--both"
    m.save_pretrained(repo / "snapshots" / ("c" * 40) / "mask")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c" * 40)
    assert SafetyMask.from_pretrained("me/both", subfolder="mask", cache_dir=cache) == m


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


def test_hand_written_card_without_front_matter_is_kept():
    from peft_safety.mask.hub import build_card

    card = build_card("# My notes\n\nDo not lose me.\n", mask=_mask(), mode="SET")
    assert card.text.lstrip().startswith("# My notes") and "Do not lose me." in card.text
    assert card.data.library_name == "peft-safety" and "set" in card.data.tags
    assert card.text.count("<!-- peft-safety:begin -->") == 1


@pytest.mark.parametrize("how", ["unreachable", "offline"])
def test_push_without_network_is_a_clear_error(monkeypatch, how):
    """No mock: the real HfApi against an endpoint where nothing listens, and with HF_HUB_OFFLINE."""
    import huggingface_hub.constants as constants

    from peft_safety.errors import HubUnreachableError, SafetyError

    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    if how == "unreachable":
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError) as info:
        _mask().push_to_hub("me/mask")
    message = str(info.value)
    assert "'me/mask'" in message and "No file was uploaded" in message and "HF_HUB_OFFLINE" in message
    assert isinstance(info.value, SafetyError) and isinstance(info.value, ConnectionError)


def _undefined_names(code: str) -> set[str]:
    """Names a snippet reads before (or without) defining them, builtins aside."""
    import ast
    import builtins

    defined = set(dir(builtins))
    missing = set()
    for stmt in ast.parse(code).body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined:
                missing.add(node.id)
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.alias):
                defined.add((node.asname or node.name).split(".")[0])
    return missing


def _snippet(card_text: str) -> str:
    start = card_text.index("```python\n") + len("```python\n")
    return card_text[start : card_text.index("```", start)]


@pytest.mark.parametrize(
    ("adapter", "with_mask", "key"),
    [
        ({"peft_type": "SAFETY", "mode": "train_only", "base_model_name_or_path": "org/base"}, False, "SAFETY"),
        ({"peft_type": "SAFETY_LORA", "base_model_name_or_path": "org/base"}, False, "SAFETY_LORA"),
        ({"peft_type": "SAFETY_LORA", "base_model_name_or_path": "org/base"}, True, "SAFETY_LORA"),
        (None, True, None),  # full fine-tuning: the folder holds a model and its mask, no adapter
    ],
)
def test_card_snippets_define_every_name_and_name_the_right_type(adapter, with_mask, key):
    from peft_safety.mask.hub import build_card

    card = build_card(
        None, mask=_mask() if with_mask else None, adapter_config=adapter, mode="SPA" if not adapter else None
    )
    code = _snippet(card.text)
    compile(code, "<card>", "exec")
    assert _undefined_names(code) == set(), code
    if key is not None:
        assert f"KeyError: '{key}'`" in card.text
        other = {"SAFETY": "SAFETY_LORA", "SAFETY_LORA": "SAFETY"}[key]
        assert f"KeyError: '{other}'" not in card.text
    if adapter and adapter["peft_type"] == "SAFETY_LORA":
        assert "SPA (`freeze`)" in card.text and card.data.peft_safety == {
            "mode": "SPA",
            **({"mask_path": MASK_FILENAME} if with_mask else {}),
        }
    if with_mask:  # the mask is checked against the base before PeftModel adds its layers to it
        assert code.index("mask.validate(base)") < code.index("PeftModel.from_pretrained") if adapter else True


def test_write_card_never_reads_or_writes_through_a_planted_symlink(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN=hf_secret")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").symlink_to(secret)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "SAFETY", "mode": "train_only"}))
    with pytest.warns(UserWarning, match="symbolic link"):
        write_card(folder)
    assert secret.read_text() == "TOKEN=hf_secret"
    card = (folder / "README.md").read_text()
    assert not (folder / "README.md").is_symlink() and "hf_secret" not in card and "import peft_safety" in card
