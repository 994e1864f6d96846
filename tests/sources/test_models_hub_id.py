"""The embedded model, loaded from its local converted copy, reports its Hub id (not the cache path), so masks and
adapters made from it record ``HuggingFaceTB/SmolLM2-135M-Instruct`` as their base model. A tiny model stands in."""

from __future__ import annotations

import json

import pytest

from peft_safety.sources import models
from peft_safety.testing import tiny_llama, tiny_tokenizer

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def cached_copy(tmp_path, monkeypatch):
    """A converted-copy folder in a temporary cache, holding a tiny Llama in place of SmolLM2."""
    monkeypatch.setenv("PEFT_SAFETY_CACHE", str(tmp_path / "cache"))
    folder = models.converted_model_dir("default")
    tiny_llama(seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "peft_safety_source.json").write_text(json.dumps({"hub_id": HUB_ID}))
    return folder


@pytest.mark.parametrize("how", ["load_default_model", "load_model_name", "load_model_hub_id", "load_model_folder"])
def test_embedded_model_reports_hub_id(cached_copy, how):
    if how == "load_default_model":
        model, tok = models.load_default_model(source="cache")
    elif how == "load_model_name":
        model, tok = models.load_model("default", source="cache")
    elif how == "load_model_hub_id":
        model, tok = models.load_model(HUB_ID, source="cache")
    else:  # the cache folder itself, by path
        model, tok = models.load_model(str(cached_copy))
    assert model.config._name_or_path == HUB_ID
    assert model.name_or_path == HUB_ID
    assert tok.name_or_path == HUB_ID


def test_scores_masks_and_adapters_record_hub_id(cached_copy, tmp_path):
    from peft import LoraConfig, get_peft_model

    from peft_safety.scoring import score
    from peft_safety.scoring.selection import select

    model, _ = models.load_default_model(source="cache")
    mask = select(score(model, None, "magnitude", progress=False), fraction=0.01)
    assert mask.provenance["base_model"] == HUB_ID
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    # and the adapter folder loads back onto the local copy through the Hub id
    reloaded, _ = models.load_model(tmp_path / "adapter", source="cache")
    assert reloaded.base_model.model.config._name_or_path == HUB_ID


def test_other_folders_keep_their_path(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    model, _ = models.load_model(str(tmp_path / "m"))
    assert model.config._name_or_path == str(tmp_path / "m")
